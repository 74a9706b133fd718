//! Girder Worker's job contract, kept out of process: a task message from a Girder server
//! carries a `jobInfoSpec` header naming the job's URL, and the worker keeps that job up to
//! date as Girder Worker's signal handlers do (girder_worker/app.py, utils `JobManager`):
//! RUNNING when the task starts, its log and progress while it runs, then SUCCESS, ERROR (the
//! exception and traceback in the log) or CANCELED. A job Girder set CANCELING is cancelled
//! cooperatively, as a revoke is.
//!
//! This module is the contract as pure functions (what the spec says, which status ends a
//! task, the form a Girder server reads, what its replies mean); [`reporter`] does the HTTP.

pub mod reporter;

use serde_json::{Map, Value};

/// Girder's job statuses (girder_worker.utils.JobStatus).
pub mod status {
    pub const RUNNING: i64 = 2;
    pub const SUCCESS: i64 = 3;
    pub const ERROR: i64 = 4;
    pub const CANCELED: i64 = 5;
    /// Set by Girder when a user cancels the job: the worker should stop it.
    pub const CANCELING: i64 = 824;
}

/// The longest log text kept between two flushes; more is dropped with a marker line, so a
/// plugin that prints without pause cannot grow the worker's memory.
pub const MAX_LOG_BUFFER: usize = 1 << 20;

/// A job to keep up to date: the `jobInfoSpec` header of a task message.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// The job's URL (`.../api/v1/job/<id>`), http or https.
    pub url: String,
    /// The HTTP method of an update (`PUT` unless the spec says otherwise).
    pub method: String,
    /// Sent with every request (`Girder-Token`).
    pub headers: Vec<(String, String)>,
    /// Whether the task's own output (the plugin's log lines) goes to the job log; the
    /// exception of a failed task always does.
    pub log_print: bool,
}

impl JobSpec {
    /// The spec in a message's headers: `None` without `jobInfoSpec`, an error naming what is
    /// wrong with a spec that cannot be followed.
    pub fn from_headers(headers: &Map<String, Value>) -> Option<Result<JobSpec, String>> {
        let spec = headers.get("jobInfoSpec")?;
        Some(JobSpec::read(spec))
    }

    fn read(spec: &Value) -> Result<JobSpec, String> {
        let Value::Object(spec) = spec else {
            return Err("`jobInfoSpec` is not an object".into());
        };
        let url = match spec.get("url") {
            Some(Value::String(u)) => u.clone(),
            _ => return Err("`jobInfoSpec.url` is not a string".into()),
        };
        // Compared and used as parsed (dot segments resolved, the host made plain), so a
        // prefix check cannot be walked around with `..` or `user@host` tricks.
        let url = match reqwest::Url::parse(&url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => u.to_string(),
            _ => return Err(format!("`jobInfoSpec.url` {url:?} is not an http(s) URL")),
        };
        let method = match spec.get("method") {
            None | Some(Value::Null) => "PUT".to_string(),
            Some(Value::String(m)) if is_token(m) => m.to_ascii_uppercase(),
            Some(other) => return Err(format!("`jobInfoSpec.method` {other} is not a method")),
        };
        let headers = match spec.get("headers") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(h)) => h
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) if is_token(k) && is_header_value(s) => {
                        Ok((k.clone(), s.clone()))
                    }
                    _ => Err(format!("`jobInfoSpec.headers.{k}` is not a header")),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("`jobInfoSpec.headers` is not an object".into()),
        };
        let log_print = !matches!(spec.get("logPrint"), Some(Value::Bool(false)));
        Ok(JobSpec {
            url,
            method,
            headers,
            log_print,
        })
    }

    /// Whether updates may go to this job's URL: `allowed` are URL prefixes (`girder_job_urls`
    /// in worker.toml, as [`url_prefix`] gives them); `*` allows any.
    pub fn allowed_by(&self, allowed: &[String]) -> bool {
        allowed
            .iter()
            .any(|p| p == "*" || self.url.starts_with(p.as_str()))
    }
}

/// A `girder_job_urls` entry as job URLs are compared with it: `*`, or the URL parsed (a bare
/// host gains its `/`, so `https://girder.example` cannot match `https://girder.example.evil`).
pub fn url_prefix(entry: &str) -> Result<String, String> {
    if entry == "*" {
        return Ok(entry.to_string());
    }
    match reqwest::Url::parse(entry) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Ok(u.to_string()),
        _ => Err(format!(
            "`{entry}` is not \"*\" or an http:// or https:// URL prefix"
        )),
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

fn is_header_value(s: &str) -> bool {
    s.len() <= 8192 && s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// How a task ended, as far as its job is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    Succeeded,
    /// The exception's type, message and traceback, written to the job log first.
    Failed {
        exc_type: String,
        message: String,
        traceback: Option<String>,
    },
    /// Revoked (before or while it ran), expired, or cancelled because Girder asked.
    Canceled,
}

impl JobEnd {
    /// The job's final status.
    pub fn status(&self) -> i64 {
        match self {
            JobEnd::Succeeded => status::SUCCESS,
            JobEnd::Failed { .. } => status::ERROR,
            JobEnd::Canceled => status::CANCELED,
        }
    }

    /// What goes to the job log before the final status, as Girder Worker writes it:
    /// `Type: message` and the traceback.
    pub fn log(&self) -> Option<String> {
        let JobEnd::Failed {
            exc_type,
            message,
            traceback,
        } = self
        else {
            return None;
        };
        let tb = traceback.as_deref().unwrap_or_default();
        Some(format!("{exc_type}: {message}\n{tb}"))
    }
}

/// Progress as the job keeps it (`progressTotal`, `progressCurrent`, `progressMessage`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub total: Option<u64>,
    pub current: Option<u64>,
    pub message: Option<String>,
}

/// The form of one update: a status, or log text and progress (absent fields are left out,
/// as Python's requests leaves out `None`).
pub fn form(status: Option<i64>, log: &str, progress: &Progress) -> Vec<(&'static str, String)> {
    let mut form = Vec::new();
    if let Some(s) = status {
        form.push(("status", s.to_string()));
        return form;
    }
    if let Some(t) = progress.total {
        form.push(("progressTotal", t.to_string()));
    }
    if let Some(c) = progress.current {
        form.push(("progressCurrent", c.to_string()));
    }
    if let Some(m) = &progress.message {
        form.push(("progressMessage", m.clone()));
    }
    if !log.is_empty() {
        form.push(("log", log.to_string()));
    }
    form
}

/// The job's status in a Girder reply (the job document), if it says.
pub fn reply_status(body: &[u8]) -> Option<i64> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("status")?.as_i64()
}

/// Whether a reply refuses a status change (Girder answers 400 with `field: "status"` for a
/// transition the job cannot make, e.g. RUNNING while it is CANCELING).
pub fn refuses_status(code: u16, body: &[u8]) -> bool {
    code == 400
        && serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| {
                v.get("field")
                    .and_then(Value::as_str)
                    .map(|f| f == "status")
            })
            .unwrap_or(false)
}

/// Appends `line` to the log text waiting for the next flush, within [`MAX_LOG_BUFFER`]; the
/// first line that does not fit is replaced by a marker, and later ones are dropped until the
/// next flush. False when the line was dropped.
pub fn buffer_line(buf: &mut String, line: &str) -> bool {
    const MARKER: &str = "[worker: log lines dropped: more than 1 MiB between two updates]\n";
    if buf.ends_with(MARKER) {
        return false;
    }
    if buf.len() + line.len() + 1 > MAX_LOG_BUFFER - MARKER.len() {
        buf.push_str(MARKER);
        return false;
    }
    buf.push_str(line);
    buf.push('\n');
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(spec: Value) -> Map<String, Value> {
        json!({ "jobInfoSpec": spec }).as_object().unwrap().clone()
    }

    #[test]
    fn reads_the_spec_a_girder_server_sends() {
        let h = headers(json!({
            "method": "PUT",
            "url": "http://girder:8080/api/v1/job/65f0",
            "reference": "r1",
            "headers": {"Girder-Token": "tok"},
            "logPrint": true,
        }));
        let spec = JobSpec::from_headers(&h).unwrap().unwrap();
        assert_eq!(spec.url, "http://girder:8080/api/v1/job/65f0");
        assert_eq!(spec.method, "PUT");
        assert_eq!(spec.headers, vec![("Girder-Token".into(), "tok".into())]);
        assert!(spec.log_print);
        let quiet = headers(json!({"url": "https://g/api/v1/job/1", "logPrint": false}));
        let spec = JobSpec::from_headers(&quiet).unwrap().unwrap();
        assert_eq!((spec.method.as_str(), spec.log_print), ("PUT", false));
        assert!(JobSpec::from_headers(&Map::new()).is_none());
    }

    #[test]
    fn refuses_a_spec_it_cannot_follow_and_says_why() {
        let cases = [
            (json!("x"), "is not an object"),
            (json!({"url": 5}), "url` is not a string"),
            (json!({"url": "file:///etc/passwd"}), "not an http(s) URL"),
            (
                json!({"url": "http://g/", "method": "PUT\r\nX: y"}),
                "not a method",
            ),
            (
                json!({"url": "http://g/", "headers": {"A": "b\r\nC: d"}}),
                "not a header",
            ),
            (json!({"url": "http://g/", "headers": [1]}), "not an object"),
        ];
        for (spec, why) in cases {
            let err = JobSpec::from_headers(&headers(spec.clone()))
                .unwrap()
                .unwrap_err();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn urls_are_allowed_by_prefix_or_star() {
        let h = headers(json!({"url": "https://girder.example/api/v1/job/1"}));
        let spec = JobSpec::from_headers(&h).unwrap().unwrap();
        assert!(spec.allowed_by(&["*".into()]));
        assert!(spec.allowed_by(&["https://girder.example/api/v1/".into()]));
        assert!(!spec.allowed_by(&["https://other/".into()]));
        assert!(!spec.allowed_by(&[]));
        let allowed = [url_prefix("https://girder.example/api/v1/").unwrap()];
        for sneaky in [
            "https://girder.example/api/v1/../../admin",
            "https://girder.example/api/v1/%2e%2e/%2e%2e/admin",
            "https://girder.example.evil/api/v1/job/1",
            "https://girder.example@evil/api/v1/job/1",
        ] {
            let h = headers(json!({ "url": sneaky }));
            let spec = JobSpec::from_headers(&h).unwrap().unwrap();
            assert!(!spec.allowed_by(&allowed), "{sneaky} -> {}", spec.url);
        }
        let bare = [url_prefix("https://girder.example").unwrap()];
        let h = headers(json!({"url": "https://girder.example.evil/api/v1/job/1"}));
        assert!(!JobSpec::from_headers(&h)
            .unwrap()
            .unwrap()
            .allowed_by(&bare));
        assert!(url_prefix("girder.example").is_err());
    }

    #[test]
    fn a_failed_task_logs_its_exception_and_traceback_then_errors() {
        let end = JobEnd::Failed {
            exc_type: "ValueError".into(),
            message: "bad".into(),
            traceback: Some("Traceback (most recent call last):\n  ...\n".into()),
        };
        assert_eq!(end.status(), status::ERROR);
        assert_eq!(
            end.log().unwrap(),
            "ValueError: bad\nTraceback (most recent call last):\n  ...\n"
        );
        assert_eq!(JobEnd::Succeeded.status(), status::SUCCESS);
        assert_eq!(JobEnd::Canceled.status(), status::CANCELED);
        assert_eq!(JobEnd::Canceled.log(), None);
    }

    #[test]
    fn forms_hold_a_status_alone_or_log_and_progress() {
        let p = Progress {
            total: Some(10),
            current: Some(3),
            message: None,
        };
        assert_eq!(form(Some(2), "x", &p), vec![("status", "2".to_string())]);
        assert_eq!(
            form(None, "a\n", &p),
            vec![
                ("progressTotal", "10".to_string()),
                ("progressCurrent", "3".to_string()),
                ("log", "a\n".to_string())
            ]
        );
    }

    #[test]
    fn replies_tell_the_jobs_status_and_refused_transitions() {
        assert_eq!(reply_status(br#"{"_id": "1", "status": 824}"#), Some(824));
        assert_eq!(reply_status(b"not json"), None);
        let refused =
            br#"{"message": "invalid transition", "field": "status", "type": "validation"}"#;
        assert!(refuses_status(400, refused));
        assert!(!refuses_status(500, refused));
        assert!(!refuses_status(400, br#"{"field": "log"}"#));
    }

    #[test]
    fn the_log_buffer_is_bounded_with_one_marker() {
        let mut buf = String::new();
        let line = "x".repeat(1000);
        let mut kept = 0;
        while buffer_line(&mut buf, &line) {
            kept += 1;
        }
        assert!(kept > 1000);
        assert!(buf.len() <= MAX_LOG_BUFFER);
        assert!(!buffer_line(&mut buf, "y"));
        assert_eq!(buf.matches("log lines dropped").count(), 1);
    }
}
