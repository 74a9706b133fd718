//! Where tasks come from. The control socket (`crate::control`) and `worker run` are the local
//! sources; [`amqp`] consumes Celery task messages from RabbitMQ, [`redis_broker`] from Redis. Sources hand tasks to the
//! dispatcher and turn outcomes into their own replies; they never talk to plugins. The daemon
//! runs a broker's source through the [`Source`] contract, whatever its transport.

pub mod amqp;
pub mod canvas;
pub mod celery;
pub mod decode_error;
pub mod embed;
pub mod engine;
pub mod girder;
pub mod pidbox;
pub mod pyrepr;
pub mod redis_backend;
pub mod redis_broker;

/// A broker or backend URL without its credentials, for logs, status and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// What a source's graceful finish is: a future the daemon awaits.
pub type Finishing = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A source of tasks the daemon runs beside the control socket: started by [`start_broker`],
/// stopped in the daemon's phases, watched for READY. Its broker state is on the broker board
/// ([`crate::broker_status`]).
pub trait Source: Send + Sync {
    /// Fires when the source is asked to stop the worker (Celery's `control shutdown`).
    fn shutdown_requested(&self) -> tokio_util::sync::CancellationToken;
    /// Whether it is connected and consuming, as that changes.
    fn connected(&self) -> tokio::sync::watch::Receiver<bool>;
    /// Graceful stop, phase 1: take no more tasks.
    fn stop_consuming(&self);
    /// Phase 2, once the dispatcher drained: settle what was answered (up to `timeout`) and
    /// disconnect.
    fn finish(self: Box<Self>, timeout: std::time::Duration) -> Finishing;
}

/// Starts the source for `config.broker`'s URL, its transport chosen by the URL's scheme
/// (checked with the config: `amqp://`, `amqps://`, `redis://`).
pub fn start_broker(
    config: &crate::config::Config,
    url: &str,
    dispatcher: &std::sync::Arc<crate::dispatch::Dispatcher>,
    tls: amqp::tls::BrokerTls,
) -> Box<dyn Source> {
    if config.redis_broker() {
        let certificates = redis::TlsCertificates {
            client_tls: tls.client_pem().map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.to_vec(),
                client_key: key.to_vec(),
            }),
            root_cert: tls.ca_pem().map(|pem| pem.as_bytes().to_vec()),
        };
        let options =
            redis_broker::RedisOptions::from_config(config, url, dispatcher, certificates);
        return Box::new(redis_broker::RedisSource::start(
            options,
            dispatcher.clone(),
        ));
    }
    let options = amqp::AmqpOptions::from_config(config, url, dispatcher, tls);
    Box::new(amqp::AmqpSource::start(options, dispatcher.clone()))
}
