//! What a plugin writes, read by its instance: responses (to `initialize`, `shutdown`, pings
//! and tasks), notifications (progress, stream items, logs), stray lines and violations.

use super::{Crash, Effect, EventKind, InstanceCore, Now, Phase, Step};
use crate::supervisor::process::StdoutEvent;
use crate::supervisor::reply_id;
use crate::task::{CancelCause, Failure, FailureKind, Outcome, TaskEvent};
use plugin_protocol::{
    capability, code, method, ErrorObject, Id, LogLevel, LogParams, Message, Response,
    TaskErrorData, TaskProgressParams, TaskRetryData, TaskStreamParams,
};
use serde_json::Value;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

/// Stray stdout lines logged in full per instance and window; the rest are counted.
const STRAY_LOG_BURST: u32 = 10;
const STRAY_LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

impl InstanceCore {
    pub(super) fn on_stdout(&mut self, ev: Option<StdoutEvent>, now: Now) -> Step {
        if let (Some(StdoutEvent::Message(_)), Some((id, _))) = (&ev, self.ping) {
            // A plugin that writes is not hung: its answer may be queued behind what it wrote
            // first (a task streaming faster than it is read). The ping's timeout counts from
            // its last message.
            let due = now.at() + self.spec.manifest.timeouts.ping_timeout;
            self.ping = Some((id, due));
        }
        match ev {
            Some(StdoutEvent::Message(Message::Response(r))) => return self.on_response(r, now),
            Some(StdoutEvent::Message(msg)) => self.on_message(msg),
            Some(StdoutEvent::Stray { line, error }) => self.on_stray_line(&line, &error, now),
            Some(StdoutEvent::TooLong { seen }) => {
                return Crash::violation(self.too_long(seen)).into()
            }
            Some(StdoutEvent::Closed) | None => return Step::StdoutClosed,
        }
        Step::Continue
    }

    /// Delivers a response to whoever waits for it. A string id is a protocol violation: the
    /// instance must end, and the task it seems to answer fails with the reason.
    pub(super) fn on_response(&mut self, r: Response, now: Now) -> Step {
        let id = match &r.id {
            Some(Id::Num(id)) => *id,
            Some(Id::Str(s)) => return self.string_id(s).into(),
            None => {
                match r.result {
                    Err(e) => {
                        tracing::warn!(plugin = %self.name(), instance = self.spec.index, pid = self.pid, code = e.code, "plugin reported an error about a message it could not read: {}", e.message)
                    }
                    Ok(_) => {
                        tracing::warn!(plugin = %self.name(), instance = self.spec.index, "plugin sent a response without an id; ignored")
                    }
                }
                return Step::Continue;
            }
        };
        match self.phase {
            Phase::Handshake { id: init, .. } if id == init => {
                return self.on_initialized(r.result, now)
            }
            Phase::Draining {
                id: shutdown,
                grace,
                ..
            } if id == shutdown => {
                return Step::Drained {
                    grace,
                    exited: false,
                }
            }
            _ => {}
        }
        if self.ping.is_some_and(|(ping, _)| ping == id) {
            self.ping = None;
            self.next_ping = now.at() + self.spec.manifest.timeouts.ping_interval;
            return Step::Continue;
        }
        let Some(run) = self.running.remove(&id) else {
            if matches!(self.phase, Phase::Draining { .. }) {
                // E.g. a late answer to `initialize` from a process stopped while starting.
                tracing::debug!(plugin = %self.name(), instance = self.spec.index, id, "answer to request {id} while stopping; ignored");
            } else {
                tracing::warn!(plugin = %self.name(), instance = self.spec.index, id, "plugin answered request id {id}, which is not outstanding (answered twice, or never asked); ignored");
            }
            return Step::Continue;
        };
        self.by_task.remove(&run.job.request.id);
        self.follow_task_log();
        let outcome = match r.result {
            Ok(value) => Outcome::Success(value),
            Err(e) => Outcome::Failure(task_failure(e, run.cancel.as_ref())),
        };
        self.effects.push(Effect::Finish(run.job, outcome));
        Step::Continue
    }

    /// The reply to `initialize`: judged by the shared rules, then tasks may be sent.
    fn on_initialized(&mut self, reply: Result<Value, ErrorObject>, now: Now) -> Step {
        let result = match crate::supervisor::handshake::check(reply, &self.spec.manifest) {
            Ok(r) => r,
            Err(reason) => return Crash::incompatible(reason.to_string()).into(),
        };
        if let Some(warning) =
            crate::supervisor::handshake::version_mismatch(&result, &self.spec.manifest)
        {
            tracing::warn!(plugin = %self.name(), instance = self.spec.index, "{warning}");
        }
        self.notify(method::INITIALIZED, serde_json::json!({}));
        self.pings_while_busy = result
            .capabilities
            .iter()
            .any(|c| c == capability::PING_WHILE_BUSY);
        self.phase = Phase::Serving;
        self.next_ping = now.at() + self.spec.manifest.timeouts.ping_interval;
        tracing::info!(plugin = %self.name(), instance = self.spec.index, pid = self.pid, version = %result.plugin.version, "plugin instance ready");
        self.effects.push(Effect::Report(EventKind::Ready {
            pid: self.pid,
            plugin_version: result.plugin.version,
        }));
        Step::Continue
    }

    /// The crash for a response with a string id; the task it names (if any) is the culprit.
    fn string_id(&self, s: &str) -> Box<Crash> {
        let meant = reply_id::meant(s);
        let (method, culprit) = match (meant, self.phase) {
            (Some(n), Phase::Handshake { id, .. }) if n == id => (Some(method::INITIALIZE), None),
            (Some(n), _) if self.running.contains_key(&n) => (Some(method::TASK_RUN), Some(n)),
            (Some(n), _) if self.ping.is_some_and(|(p, _)| p == n) => (Some(method::PING), None),
            _ => (None, None),
        };
        let reason = reply_id::string_id_violation(s, method);
        let culprit = culprit.map(|n| {
            let failure = Failure::new(
                FailureKind::Raised { retryable: false },
                "ProtocolViolation",
                "worker.errors",
                format!("plugin `{}` {reason}", self.name()),
            );
            (n, failure)
        });
        Box::new(Crash {
            culprit,
            ..*Crash::violation(reason)
        })
    }

    /// Notifications and requests from the plugin.
    fn on_message(&mut self, msg: Message) {
        match msg {
            Message::Notification(n) => match n.method.as_str() {
                method::TASK_PROGRESS => {
                    match serde_json::from_value::<TaskProgressParams>(n.params) {
                        Ok(p) => {
                            self.publish_progress(&p);
                            let TaskProgressParams {
                                task_id,
                                done,
                                total,
                                message,
                            } = p;
                            self.pass_on(
                                &task_id,
                                TaskEvent::Progress {
                                    done,
                                    total,
                                    message,
                                },
                            )
                        }
                        Err(e) => self.bad_params(method::TASK_PROGRESS, &e),
                    }
                }
                method::TASK_STREAM => match serde_json::from_value::<TaskStreamParams>(n.params) {
                    Ok(p) => self.pass_on(&p.task_id, TaskEvent::Stream { items: p.items }),
                    Err(e) => self.bad_params(method::TASK_STREAM, &e),
                },
                method::LOG => match serde_json::from_value::<LogParams>(n.params) {
                    Ok(p) => self.log(p),
                    Err(e) => self.bad_params(method::LOG, &e),
                },
                other => {
                    tracing::debug!(plugin = %self.name(), method = other, "ignoring unknown notification")
                }
            },
            Message::Request(r) => self.on_request(r),
            Message::Response(_) => unreachable!("responses are handled by on_response"),
        }
    }

    /// A `log` record whose `fields.task_id` names a task running here that asked for its
    /// log goes to it too (dropped when its channel is full).
    fn log_to_task(&mut self, p: &LogParams) {
        let Some(task_id) = p.fields.get("task_id").and_then(Value::as_str) else {
            return;
        };
        let Some(run) = self
            .by_task
            .get(task_id)
            .and_then(|id| self.running.get(id))
        else {
            return;
        };
        if run.job.request.capture_log {
            let event = Box::new(TaskEvent::Log {
                line: p.message.clone(),
            });
            let to = run.job.events.clone();
            self.effects.push(Effect::DeliverLog(to, event));
        }
    }

    /// Tells event subscribers of the progress of a task running here.
    fn publish_progress(&self, p: &TaskProgressParams) {
        if !self.by_task.contains_key(p.task_id.as_str()) {
            return;
        }
        self.spec.events.publish("task.progress", |f| {
            f.field("task_id", &p.task_id)
                .field("plugin", &self.spec.manifest.name)
                .field("instance", &self.spec.index)
                .field("done", &p.done)
                .field("total", &p.total)
                .field("message", &p.message);
        });
    }

    /// Passes a progress or stream event to the task's submitter. When it has no room, the
    /// event comes back (`Wake::NoRoom`) and is held: stdout is not read until it has room,
    /// backpressure to the plugin.
    fn pass_on(&mut self, task_id: &str, event: TaskEvent) {
        let Some(run) = self
            .by_task
            .get(task_id)
            .and_then(|id| self.running.get(id))
        else {
            tracing::debug!(plugin = %self.name(), task_id, "event for a task that is not running here; ignored");
            return;
        };
        let to = run.job.events.clone();
        self.effects.push(Effect::Deliver(to, Box::new(event)));
    }

    /// Room for the held event: deliver it and read stdout again. A ping that was outstanding
    /// gets its full timeout from now, since its answer may have waited behind our pause.
    pub(super) fn release_held(
        &mut self,
        permit: Option<mpsc::OwnedPermit<Box<TaskEvent>>>,
        now: Now,
    ) {
        if let (Some(permit), Some((_, event))) = (permit, self.held.take()) {
            self.effects.push(Effect::Release(permit, event));
        }
        self.held = None;
        if let Some((id, due)) = self.ping {
            let fresh = now.at() + self.spec.manifest.timeouts.ping_timeout;
            self.ping = Some((id, due.max(fresh)));
        }
    }

    fn log(&mut self, p: LogParams) {
        self.log_to_task(&p);
        let fields = if p.fields.is_empty() {
            String::new()
        } else {
            Value::Object(p.fields).to_string()
        };
        let (plugin, instance, pid, msg) = (self.name(), self.spec.index, self.pid, p.message);
        match p.level {
            LogLevel::Trace => {
                tracing::trace!(target: "plugin", plugin, instance, pid, %fields, "{msg}")
            }
            LogLevel::Debug => {
                tracing::debug!(target: "plugin", plugin, instance, pid, %fields, "{msg}")
            }
            LogLevel::Info => {
                tracing::info!(target: "plugin", plugin, instance, pid, %fields, "{msg}")
            }
            LogLevel::Warn => {
                tracing::warn!(target: "plugin", plugin, instance, pid, %fields, "{msg}")
            }
            LogLevel::Error => {
                tracing::error!(target: "plugin", plugin, instance, pid, %fields, "{msg}")
            }
        }
    }

    fn bad_params(&self, method: &str, e: &serde_json::Error) {
        tracing::warn!(plugin = %self.name(), instance = self.spec.index, pid = self.pid, "plugin sent `{method}` with invalid params ({e}); ignored");
    }

    /// Counts a stray stdout line and logs it, at most `STRAY_LOG_BURST` per `STRAY_LOG_WINDOW`
    /// per instance; the rest are summed up when the window ends.
    fn on_stray_line(&mut self, line: &str, error: &plugin_protocol::ParseError, now: Now) {
        let n = self.spec.stray_lines.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now.at();
        if now.duration_since(self.stray_log.0) >= STRAY_LOG_WINDOW {
            self.summarize_stray_lines();
            self.stray_log = (now, 0, 0);
        }
        let (_, logged, quiet) = &mut self.stray_log;
        if *logged >= STRAY_LOG_BURST {
            *quiet += 1;
            return;
        }
        *logged += 1;
        tracing::warn!(
            target: "plugin",
            plugin = %self.spec.manifest.name,
            instance = self.spec.index,
            pid = self.pid,
            count = n,
            "plugin wrote a non-protocol line to stdout ({error}); log to stderr instead: {line}"
        );
    }

    /// Logs how many stray lines went unlogged in the current window, if any.
    pub(super) fn summarize_stray_lines(&mut self) {
        let quiet = std::mem::take(&mut self.stray_log.2);
        if quiet > 0 {
            tracing::warn!(target: "plugin", plugin = %self.spec.manifest.name, instance = self.spec.index, pid = self.pid, "... {quiet} more non-protocol stdout lines in the last {}s", STRAY_LOG_WINDOW.as_secs());
        }
    }

    fn too_long(&self, seen: usize) -> String {
        format!(
            "broke the protocol: a stdout line of more than {seen} bytes exceeds the limit of {} bytes (`max_line_bytes`)",
            self.spec.max_line_bytes
        )
    }
}

/// A retry answer (1.4) as a failure of kind `Retry` carrying its exception and its plan; a
/// retry answer whose data does not read is a plain failure naming why.
fn retry_failure(e: ErrorObject) -> Failure {
    let data = e.data.unwrap_or_else(|| Value::Object(Default::default()));
    let retry: TaskRetryData = match serde_json::from_value(data) {
        Ok(r) => r,
        Err(why) => {
            return Failure::new(
                FailureKind::Raised { retryable: false },
                "PluginError",
                "worker.errors",
                format!(
                    "the plugin answered a retry (error -32004) whose data does not read: {why}"
                ),
            )
        }
    };
    let (exc_type, message, module, traceback) = match &retry.exc {
        Some(x) => (
            x.exc_type.clone(),
            x.message.clone(),
            x.module.clone().unwrap_or_else(|| "worker.errors".into()),
            x.traceback.clone(),
        ),
        None => ("Retry".into(), e.message, "worker.errors".into(), None),
    };
    Failure {
        kind: FailureKind::RetryRequested,
        exc_type,
        message,
        module,
        traceback,
        retry: Some(Box::new(retry)),
    }
}

/// Maps a `task.run` error response to a failure.
fn task_failure(e: ErrorObject, cancel: Option<&super::tasks::Cancel>) -> Failure {
    let data: Option<TaskErrorData> = e.data.clone().and_then(|d| serde_json::from_value(d).ok());
    match e.code {
        code::TASK_CANCELLED => match cancel.map(|c| &c.request) {
            Some(c) if c.cause == CancelCause::SoftTimeLimit => Failure::new(
                FailureKind::SoftTimeLimit,
                "SoftTimeLimitExceeded",
                "worker.errors",
                c.reason.clone(),
            ),
            Some(c) => Failure::cancelled(c.cause, &c.reason),
            None => Failure::cancelled(
                CancelCause::ByPlugin,
                "the plugin cancelled the task itself",
            ),
        },
        code::SHUTTING_DOWN => Failure::rejected(format!("the plugin refused it: {}", e.message)),
        code::TASK_RETRY => retry_failure(e),
        code::UNKNOWN_TASK => Failure::new(
            FailureKind::NotRegistered,
            "NotRegistered",
            "worker.errors",
            e.message,
        ),
        _ => match data {
            Some(d) => Failure {
                kind: FailureKind::Raised {
                    retryable: d.retryable,
                },
                exc_type: d.exc_type,
                message: d.message,
                module: d.module.unwrap_or_else(|| "worker.errors".into()),
                traceback: d.traceback,
                retry: None,
            },
            None => Failure::new(
                FailureKind::Raised { retryable: false },
                "PluginError",
                "worker.errors",
                format!("error {}: {}", e.code, e.message),
            ),
        },
    }
}
