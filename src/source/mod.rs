//! Where tasks come from. The control socket (`crate::control`) and `worker run` are the local
//! sources; [`amqp`] consumes Celery task messages from RabbitMQ. Sources hand tasks to the
//! dispatcher and turn outcomes into their own replies; they never talk to plugins.

pub mod amqp;
pub mod canvas;
pub mod celery;
pub mod decode_error;
pub mod embed;
pub mod girder;
pub mod pidbox;
pub mod pyrepr;
pub mod redis_backend;

/// A broker or backend URL without its credentials, for logs, status and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}
