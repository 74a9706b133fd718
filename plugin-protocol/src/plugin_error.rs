//! The error a task handler ends with, and how it becomes a `task.run` error response (a
//! failure, a cancel, or a request to be run again later). Part of the Rust SDK: `plugin`
//! re-exports [`TaskError`]; this module knows nothing of threads or stdio.

use crate::message::ErrorObject;
use crate::methods::{code, TaskErrorData, TaskRetryData};

/// An error a task ends with; becomes a `task.run` error response.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskError {
    pub exc_type: String,
    pub message: String,
    pub retryable: bool,
    pub traceback: Option<String>,
    /// Set by [`TaskError::retry`]: the task asks to be run again later (protocol 1.4).
    /// Boxed: the common error stays small.
    pub retry: Option<Box<TaskRetryData>>,
}

impl TaskError {
    /// An error of the given type name (what a Celery client will see) and message.
    pub fn new(exc_type: impl Into<String>, message: impl Into<String>) -> Self {
        TaskError {
            exc_type: exc_type.into(),
            message: message.into(),
            retryable: false,
            traceback: None,
            retry: None,
        }
    }

    /// Asks the worker to run the task again later, as Celery's `self.retry(...)` does
    /// (protocol 1.4): after `countdown` (default 180 s), at most `max_retries` times in all
    /// (default 3), failing with `exc` once none is left (`MaxRetriesExceededError` without one).
    ///
    /// `return Err(TaskError::retry(Some(Duration::from_secs(5)), Some(3), Some(cause)))`
    pub fn retry(
        countdown: Option<std::time::Duration>,
        max_retries: Option<u64>,
        exc: Option<TaskError>,
    ) -> Self {
        let message = exc
            .as_ref()
            .map(|e| format!("{}: {}", e.exc_type, e.message))
            .unwrap_or_default();
        TaskError {
            retry: Some(Box::new(TaskRetryData {
                countdown: countdown.map(|d| d.as_secs_f64()),
                eta: None,
                max_retries,
                exc: exc.map(|e| e.data()),
            })),
            ..TaskError::new("Retry", message)
        }
    }

    /// The error a handler returns after it saw
    /// [`TaskContext::is_cancelled`](crate::plugin::TaskContext::is_cancelled).
    pub fn cancelled() -> Self {
        TaskError::new("Cancelled", "task cancelled")
    }

    /// Marks the error as one that a retry could fix.
    pub fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }

    pub(crate) fn data(&self) -> TaskErrorData {
        TaskErrorData {
            exc_type: self.exc_type.clone(),
            message: self.message.clone(),
            module: None,
            traceback: self.traceback.clone(),
            retryable: self.retryable,
        }
    }

    pub(crate) fn to_error_object(&self) -> ErrorObject {
        if let Some(retry) = &self.retry {
            let message = match self.message.is_empty() {
                true => "retry".to_string(),
                false => format!("retry: {}", self.message),
            };
            return ErrorObject::new(code::TASK_RETRY, message)
                .with_data(serde_json::to_value(retry).expect("retry data serializes"));
        }
        let code = if self.exc_type == "Cancelled" {
            code::TASK_CANCELLED
        } else {
            code::TASK_FAILED
        };
        ErrorObject::new(code, format!("{}: {}", self.exc_type, self.message))
            .with_data(serde_json::to_value(self.data()).expect("error data serializes"))
    }
}
