//! A plugin process driven directly, one request at a time, outside any pool: what
//! `worker plugins test` checks and what `worker plugins install` handshakes with before a
//! plugin counts as installed.

use crate::framed::FramedReader;
use crate::manifest::Manifest;
use crate::supervisor::handshake::HandshakeError;
use crate::supervisor::process::{self, StderrTail};
use crate::supervisor::reply_id;
use plugin_protocol::{
    method, ErrorObject, Frame, Id, InitializeResult, Message, Notification, Request, Response,
};
use serde_json::Value;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The answer to a request from the plugin: a `task.offer` is recorded and answered "not
/// run" (the plugin keeps the task), anything else is an unknown method.
fn answer_plugin_request(r: Request, offered: &mut Vec<(String, String)>) -> Vec<u8> {
    let error = if r.method == method::TASK_OFFER {
        let task = r.params["task"].as_str().unwrap_or("?").to_string();
        let task_id = r.params["task_id"].as_str().unwrap_or("?").to_string();
        offered.push((task, task_id.clone()));
        crate::supervisor::offer::not_taken(
            &task_id,
            "shutting_down",
            "this is `worker plugins test`",
        )
    } else {
        ErrorObject::new(
            plugin_protocol::code::METHOD_NOT_FOUND,
            format!("`worker plugins test` has no method `{}`", r.method),
        )
    };
    Message::Response(Response::err(Some(r.id), error)).to_line()
}

/// How long an install-time probe waits for a clean stop before killing the plugin.
const PROBE_STOP_GRACE: Duration = Duration::from_secs(3);

/// One plugin process. Dropping it kills the process group.
pub struct Session {
    pub child: Child,
    pid: u32,
    stdin: ChildStdin,
    stdout: FramedReader<ChildStdout>,
    next_id: u64,
    /// How long `call` waits for an answer.
    pub reply_timeout: Duration,
    /// Its last stderr lines (they are also logged under the `plugin` target).
    pub stderr: StderrTail,
    _stderr_reader: tokio::task::JoinHandle<()>,
    /// In the environment of the plugin's processes (see `containment`).
    marker: String,
    /// `WORKER_PLUGIN_DATA` while probing: a temporary directory.
    _data: tempfile::TempDir,
    /// The `(task, task_id)` of each `task.offer` a queue backend made, each answered "not
    /// run" (so the plugin acks nothing: a test never consumes its queue).
    pub offered: Vec<(String, String)>,
}

/// What went wrong talking to a plugin directly.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("could not start `{program}`: {cause}")]
    Start {
        program: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot write to the plugin: {0}")]
    Write(std::io::Error),
    #[error("cannot read from the plugin: {0}")]
    Read(std::io::Error),
    #[error("the plugin closed its stdout")]
    Closed,
    #[error("no answer to `{method}` within {timeout:?}")]
    Timeout { method: String, timeout: Duration },
    /// The plugin broke the protocol (e.g. a string id); the message says how to fix it.
    #[error("{0}")]
    Violation(String),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("it answered `shutdown` with error {code}: {message}")]
    Shutdown { code: i64, message: String },
    #[error("still running {0:?} after `exit`")]
    NoExit(Duration),
    /// Any of the above, followed by the plugin's last stderr lines.
    #[error("{error}{stderr}")]
    WithStderr {
        error: Box<ProbeError>,
        stderr: String,
    },
}

impl Session {
    /// Starts instance 0 of the plugin, as the user it would run as under a daemon.
    pub fn start(
        m: &Manifest,
        max_line_bytes: usize,
        plugin_user: Option<&str>,
    ) -> Result<Session, ProbeError> {
        let start_error = |cause| ProbeError::Start {
            program: m.program(),
            cause,
        };
        let identity = crate::supervisor::identity::of(m, plugin_user).map_err(start_error)?;
        if let Some(id) = &identity {
            crate::supervisor::identity::check_reach(id, &m.dir).map_err(|e| {
                start_error(std::io::Error::other(format!(
                    "{e}: make that directory searchable by `{}`, or name another `user`",
                    id.name
                )))
            })?;
        }
        let marker = crate::supervisor::containment::new_marker();
        // A data directory of its own for the probe, gone with it.
        let data = tempfile::Builder::new()
            .prefix("worker-probe-data-")
            .tempdir()
            .map_err(|cause| ProbeError::Start {
                program: m.program(),
                cause,
            })?;
        let tmp = data.path().join("tmp");
        std::fs::create_dir_all(&tmp).map_err(start_error)?;
        for dir in [data.path(), tmp.as_path()] {
            crate::supervisor::identity::give(dir, identity.as_ref()).map_err(start_error)?;
        }
        let strict = m.sandbox == crate::manifest::Sandbox::Strict;
        let launch = process::Launch {
            instance: 0,
            marker: &marker,
            data: Some(data.path()),
            tmp: strict.then_some(tmp.as_path()),
            identity: identity.as_ref(),
            // A handshake or `plugins test` is short and waited for: no cgroup.
            cgroup: None,
        };
        let mut child = process::spawn(m, launch).map_err(|cause| ProbeError::Start {
            program: m.program(),
            cause,
        })?;
        let pid = child.id().unwrap_or(0);
        let stderr = StderrTail::default();
        let origin = process::LogOrigin {
            plugin: m.name.clone(),
            instance: 0,
            pid,
        };
        let stderr_reader = process::read_stderr(
            child.stderr.take().expect("stderr is piped"),
            origin,
            stderr.clone(),
            process::TaskLog::default(),
        );
        Ok(Session {
            pid,
            stdin: child.stdin.take().expect("stdin is piped"),
            stdout: FramedReader::new(
                child.stdout.take().expect("stdout is piped"),
                max_line_bytes,
            ),
            child,
            next_id: 1,
            reply_timeout: m.timeouts.init,
            stderr,
            _stderr_reader: stderr_reader,
            marker,
            _data: data,
            offered: Vec::new(),
        })
    }

    pub async fn send(&mut self, msg: Message) -> std::io::Result<()> {
        self.stdin.write_all(&msg.to_line()).await?;
        self.stdin.flush().await
    }

    pub async fn notify(&mut self, method: &str, params: Value) -> std::io::Result<()> {
        self.send(Message::Notification(Notification::new(method, params)))
            .await
    }

    /// Sends a request and waits for its response, skipping notifications and stray lines.
    pub async fn call(
        &mut self,
        method: &str,
        params: Value,
    ) -> Result<Result<Value, ErrorObject>, ProbeError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(Message::Request(Request::new(Id::Num(id), method, params)))
            .await
            .map_err(ProbeError::Write)?;
        let (stdout, stdin, offered) = (&mut self.stdout, &mut self.stdin, &mut self.offered);
        let wait = async {
            loop {
                let frame = stdout
                    .next()
                    .await
                    .map_err(ProbeError::Read)?
                    .ok_or(ProbeError::Closed)?;
                let Frame::Line(line) = frame else { continue };
                match Message::parse(&line) {
                    Ok(Message::Response(r)) if r.id == Some(Id::Num(id)) => return Ok(r.result),
                    Ok(Message::Request(r)) => {
                        let answer = answer_plugin_request(r, offered);
                        stdin.write_all(&answer).await.map_err(ProbeError::Write)?;
                    }
                    // A string id never matches: say so now rather than time out.
                    Ok(Message::Response(Response {
                        id: Some(Id::Str(s)),
                        ..
                    })) => {
                        let asked = (reply_id::meant(&s) == Some(id)).then_some(method);
                        return Err(ProbeError::Violation(reply_id::string_id_violation(
                            &s, asked,
                        )));
                    }
                    _ => {}
                }
            }
        };
        let timeout = self.reply_timeout;
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ProbeError::Timeout {
                method: method.to_string(),
                timeout,
            })?
    }

    /// Reads for `wait`, answering what the plugin asks meanwhile (a queue backend's
    /// offers): for a test of what it does unprompted.
    pub async fn listen(&mut self, wait: Duration) -> Result<(), ProbeError> {
        let (stdout, stdin, offered) = (&mut self.stdout, &mut self.stdin, &mut self.offered);
        let read = async {
            loop {
                let frame = stdout
                    .next()
                    .await
                    .map_err(ProbeError::Read)?
                    .ok_or(ProbeError::Closed)?;
                let Frame::Line(line) = frame else { continue };
                if let Ok(Message::Request(r)) = Message::parse(&line) {
                    let answer = answer_plugin_request(r, offered);
                    stdin.write_all(&answer).await.map_err(ProbeError::Write)?;
                }
            }
        };
        let heard: Result<Result<(), ProbeError>, _> = tokio::time::timeout(wait, read).await;
        heard.unwrap_or(Ok(()))
    }

    /// Sends `initialize` and judges the reply by the same rules the pool uses.
    pub async fn initialize(
        &mut self,
        m: &Manifest,
        worker_name: &str,
        max_line_bytes: usize,
    ) -> Result<InitializeResult, ProbeError> {
        let params =
            crate::supervisor::handshake::initialize_params(m, worker_name, max_line_bytes, 0);
        let params = serde_json::to_value(params).expect("initialize params serialize");
        let reply = self.call(method::INITIALIZE, params).await?;
        Ok(crate::supervisor::handshake::check(reply, m)?)
    }

    /// Sends `shutdown` and waits up to `grace` for its answer.
    pub async fn shutdown(&mut self, grace: Duration) -> Result<(), ProbeError> {
        self.reply_timeout = grace.max(Duration::from_millis(100));
        self.call(method::SHUTDOWN, Value::Null)
            .await?
            .map(|_| ())
            .map_err(|e| ProbeError::Shutdown {
                code: e.code,
                message: e.message,
            })
    }

    /// Sends `exit` and waits up to `grace` for the process to end; returns how it exited.
    pub async fn exit(&mut self, grace: Duration) -> Result<String, ProbeError> {
        let grace = grace.max(Duration::from_millis(100));
        self.notify(method::EXIT, Value::Null)
            .await
            .map_err(ProbeError::Write)?;
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => Ok(process::describe_exit(&status)),
            _ => Err(ProbeError::NoExit(grace)),
        }
    }

    /// `error` followed by the plugin's last stderr lines.
    pub fn explain(&self, error: ProbeError) -> ProbeError {
        ProbeError::WithStderr {
            error: Box::new(error),
            stderr: self.stderr.summary(self.pid, 5),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Also sweeps anything the plugin forked, in its group or not.
        process::signal_group(self.pid, nix::sys::signal::Signal::SIGKILL);
        crate::supervisor::containment::kill_marked(&self.marker);
        crate::supervisor::containment::waited(self.pid);
    }
}

/// Starts the plugin once, handshakes (tasks must match the manifest), and stops it. The error
/// says what went wrong, with the plugin's last stderr lines. A plugin that does not stop when
/// asked is killed, not refused: the daemon copes with that too, and `plugins test` reports it.
pub async fn handshake(
    m: &Manifest,
    worker_name: &str,
    max_line_bytes: usize,
    plugin_user: Option<&str>,
) -> Result<InitializeResult, ProbeError> {
    let mut s = Session::start(m, max_line_bytes, plugin_user)?;
    let result = match s.initialize(m, worker_name, max_line_bytes).await {
        Ok(r) => r,
        Err(e) => return Err(s.explain(e)),
    };
    let _ = s.notify(method::INITIALIZED, serde_json::json!({})).await;
    let grace = m.timeouts.shutdown_grace.min(PROBE_STOP_GRACE);
    let stopped = match s.shutdown(grace).await {
        Ok(()) => s.exit(grace).await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = stopped {
        tracing::warn!(plugin = %m.name, "it did not stop when asked ({e}); killed it");
    }
    drop(s);
    Ok(result)
}
