//! Why a task message could not be read: shared by the message decoder ([`super::celery`])
//! and the canvas embed reader ([`super::embed`]).

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "content type `{0}` is not supported; configure the client with task_serializer='json'"
    )]
    ContentType(String),
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("malformed task message: {0}")]
    Shape(String),
}
