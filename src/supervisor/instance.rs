//! One plugin instance: an actor that owns one child process, performs the handshake, runs
//! tasks on it, enforces time limits and health pings, and stops or buries it.
//!
//! The actor turns everything it waits on (a command from its pool, a stdout message, the
//! child's exit, a timer) into one decision at a time. It never retries anything: every task
//! handed to it gets exactly one outcome from it, and when the process dies the pool hears
//! `Exited` after every task has had its outcome. It knows nothing of where tasks come from.

use super::process::{self, LogOrigin, StderrTail, StdoutEvent};
use crate::manifest::Manifest;
use crate::task::{Failure, FailureKind, Outcome, TaskEvent, TaskRequest};
use nix::sys::signal::Signal;
use plugin_protocol::{
    code, method, ErrorObject, Id, InitializeParams, InstanceRef, Limits, LogLevel, LogParams,
    Message, Notification, PeerInfo, Request, Response, TaskCancelParams, TaskErrorData,
    TaskProgressParams, TaskRunParams, TaskStreamParams, TimeLimits, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};

/// How many stderr lines go into a crash message.
const CRASH_STDERR_LINES: usize = 5;
/// How long to wait for the stderr pump to catch up after the process died.
const STDERR_SETTLE: Duration = Duration::from_millis(250);

/// A task handed to an instance, with where its events and its outcome go.
#[derive(Debug)]
pub struct Job {
    pub request: Arc<TaskRequest>,
    pub attempt: u32,
    pub events: mpsc::UnboundedSender<TaskEvent>,
    pub reply: oneshot::Sender<Outcome>,
}

impl Job {
    pub fn finish(self, outcome: Outcome) {
        // The submitter may have gone away (e.g. its connection closed); nothing to do then.
        let _ = self.reply.send(outcome);
    }
}

/// What the pool tells an instance.
#[derive(Debug)]
pub enum Command {
    Run(Job),
    Cancel {
        task_id: String,
        reason: String,
    },
    /// Graceful stop: `shutdown`, `exit`, then SIGTERM and SIGKILL, each after `grace`.
    Stop {
        grace: Duration,
    },
}

/// What an instance tells its pool.
#[derive(Debug)]
pub struct InstanceEvent {
    pub slot: usize,
    pub generation: u64,
    pub kind: EventKind,
}

#[derive(Debug)]
pub enum EventKind {
    /// Handshake done; tasks may be sent.
    Ready { pid: u32, plugin_version: String },
    /// A task ended (its outcome is already delivered).
    Finished { task_id: String, ok: bool },
    /// The process is gone and every task it held has its outcome.
    Exited {
        reason: ExitReason,
        ran_for: Duration,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExitReason {
    /// Stopped on request.
    Stopped,
    /// Died or was killed for misbehaving; worth a restart.
    Crashed(String),
    /// Handshake showed it can never work with this manifest; restarting will not help.
    Incompatible(String),
}

/// Everything needed to start an instance.
#[derive(Debug, Clone)]
pub struct Spec {
    pub manifest: Arc<Manifest>,
    pub index: u32,
    pub slot: usize,
    pub generation: u64,
    pub worker_name: String,
    pub max_line_bytes: usize,
    /// Shared with the pool for status reports.
    pub stderr: StderrTail,
    pub garbage_lines: Arc<AtomicU64>,
}

/// The pool's side of an instance.
#[derive(Debug, Clone)]
pub struct InstanceHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl InstanceHandle {
    /// Sends a command; gives it back if the instance has already ended.
    pub fn send(&self, cmd: Command) -> Result<(), Command> {
        self.tx.send(cmd).map_err(|e| e.0)
    }
}

/// Starts the instance's actor. The pool hears `Ready` or `Exited` on `events`.
pub fn start(
    spec: Spec,
    events: mpsc::UnboundedSender<InstanceEvent>,
) -> (InstanceHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = tokio::spawn(run(spec, rx, events));
    (InstanceHandle { tx }, handle)
}

/// A task running on the process.
struct Running {
    job: Job,
    soft_at: Option<Instant>,
    hard_at: Option<Instant>,
    hard_limit: Option<Duration>,
    /// Set once `task.cancel` was sent.
    cancel: Option<Cancel>,
}

struct Cancel {
    reason: String,
    /// A soft time limit maps the plugin's Cancelled error to SoftTimeLimitExceeded.
    soft_limit: bool,
    /// When the process is killed if the task has not ended (user cancels only).
    kill_at: Option<Instant>,
}

/// Why the actor must end the process now.
struct Crash {
    reason: String,
    /// A task whose own fault this is; it gets `culprit_failure`, the others are crashed.
    culprit: Option<(u64, Failure)>,
    /// The process broke the protocol: nothing it wrote after that is accepted.
    violation: bool,
}

impl Crash {
    fn new(reason: String) -> Box<Crash> {
        Box::new(Crash {
            reason,
            culprit: None,
            violation: false,
        })
    }

    fn violation(reason: String) -> Box<Crash> {
        Box::new(Crash {
            reason,
            culprit: None,
            violation: true,
        })
    }
}

enum Flow {
    Continue,
    /// Stdout reached EOF; the caller finds out why.
    StdoutClosed,
    Crash(Box<Crash>),
    Stop(Duration),
}

struct Instance {
    spec: Spec,
    pid: u32,
    out: mpsc::UnboundedSender<Vec<u8>>,
    next_id: u64,
    running: HashMap<u64, Running>,
    by_task: HashMap<String, u64>,
    /// Outstanding ping id and when it times out.
    ping: Option<(u64, Instant)>,
    next_ping: Instant,
    /// The plugin declared `ping_while_busy`: it is pinged while tasks run, too. Otherwise
    /// only while idle, since a plugin that runs one task at a time cannot answer meanwhile.
    pings_while_busy: bool,
    started: Instant,
}

async fn run(
    spec: Spec,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<InstanceEvent>,
) {
    let (slot, generation) = (spec.slot, spec.generation);
    let report = |kind: EventKind| {
        let _ = events.send(InstanceEvent {
            slot,
            generation,
            kind,
        });
    };
    let started = Instant::now();
    let mut child = match process::spawn(&spec.manifest, spec.index) {
        Ok(child) => child,
        Err(e) => {
            let reason = format!(
                "could not start `{}`: {e} (check `command` in {}/plugin.toml)",
                spec.manifest.program().display(),
                spec.manifest.dir.display()
            );
            // Nothing of this process ran, so every failure to spawn counts as a crash.
            fail_commands(&mut commands, &reason);
            report(EventKind::Exited {
                reason: ExitReason::Crashed(reason),
                ran_for: Duration::ZERO,
            });
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    let origin = LogOrigin {
        plugin: spec.manifest.name.clone(),
        instance: spec.index,
        pid,
    };
    let stderr_pump = process::pump_stderr(
        child.stderr.take().expect("stderr is piped"),
        origin,
        spec.stderr.clone(),
    );
    let (stdout_tx, mut stdout) = mpsc::channel(1024);
    let stdout_pump = process::pump_stdout(
        child.stdout.take().expect("stdout is piped"),
        spec.max_line_bytes,
        stdout_tx,
    );
    let (out, writer) = process::spawn_writer(child.stdin.take().expect("stdin is piped"));

    let mut inst = Instance {
        next_ping: Instant::now() + spec.manifest.timeouts.ping_interval,
        pings_while_busy: false,
        spec,
        pid,
        out,
        next_id: 1,
        running: HashMap::new(),
        by_task: HashMap::new(),
        ping: None,
        started,
    };
    tracing::debug!(plugin = %inst.spec.manifest.name, instance = inst.spec.index, pid, "plugin process started");

    let flow = match inst.handshake(&mut child, &mut stdout, &mut commands).await {
        Ok(version) => {
            report(EventKind::Ready {
                pid,
                plugin_version: version,
            });
            inst.serve(&mut child, &mut stdout, &mut commands, &events)
                .await
        }
        Err(flow) => flow,
    };
    let crash = match flow {
        Flow::Stop(grace) => {
            inst.stop(&mut child, &mut stdout, grace, &events).await;
            None
        }
        Flow::Crash(crash) => {
            process::signal_group(pid, Signal::SIGKILL);
            let _ = child.wait().await;
            Some(*crash)
        }
        Flow::Continue | Flow::StdoutClosed => {
            unreachable!("serve and handshake only return Stop or Crash")
        }
    };
    // The group may still hold forked grandchildren: sweep it. Once they are gone stderr
    // reaches EOF, so the crash report below carries the plugin's last words.
    process::signal_group(pid, Signal::SIGKILL);
    let _ = timeout(STDERR_SETTLE, stderr_pump).await;
    let reason = match crash {
        Some(crash) => inst.bury(&mut stdout, crash, &events),
        None => ExitReason::Stopped,
    };
    stdout_pump.abort();
    writer.abort();
    fail_commands(
        &mut commands,
        "the plugin instance ended before the task could start",
    );
    report(EventKind::Exited {
        reason,
        ran_for: inst.started.elapsed(),
    });
}

/// Stdout closing usually means the process is exiting: prefer its exit status as the reason.
async fn closed_reason(child: &mut Child) -> String {
    match timeout(Duration::from_millis(500), child.wait()).await {
        Ok(Ok(status)) => process::describe_exit(&status),
        _ => "closed its stdout".to_string(),
    }
}

/// Tasks the pool sent after the instance decided to end never reached the process: they go
/// back as `Rejected`, which the dispatcher reruns without counting an attempt.
fn fail_commands(commands: &mut mpsc::UnboundedReceiver<Command>, reason: &str) {
    commands.close();
    while let Ok(cmd) = commands.try_recv() {
        if let Command::Run(job) = cmd {
            let failure = Failure::new(
                FailureKind::Rejected,
                "PluginUnavailable",
                "worker.errors",
                reason,
            );
            job.finish(Outcome::Failure(failure));
        }
    }
}

impl Instance {
    fn name(&self) -> &str {
        &self.spec.manifest.name
    }

    fn send(&mut self, msg: Message) {
        // A failed write means the process is going away; its exit will be noticed.
        let _ = self.out.send(msg.to_line());
    }

    fn request(&mut self, method: &str, params: impl serde::Serialize) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send(Message::Request(Request::new(Id::Num(id), method, params)));
        id
    }

    fn notify(&mut self, method: &str, params: impl serde::Serialize) {
        self.send(Message::Notification(Notification::new(method, params)));
    }

    /// `initialize` -> check the reply -> `initialized`. Returns the plugin's version.
    async fn handshake(
        &mut self,
        child: &mut Child,
        stdout: &mut mpsc::Receiver<StdoutEvent>,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Result<String, Flow> {
        let m = self.spec.manifest.clone();
        let id = self.request(
            method::INITIALIZE,
            InitializeParams {
                protocol_version: PROTOCOL_VERSION.into(),
                worker: PeerInfo {
                    name: self.spec.worker_name.clone(),
                    version: crate::WORKER_VERSION.into(),
                },
                plugin: InstanceRef {
                    name: m.name.clone(),
                    instance: self.spec.index,
                },
                settings: m.settings.clone(),
                limits: Limits {
                    max_line_bytes: self.spec.max_line_bytes as u64,
                    concurrency: m.concurrency,
                },
            },
        );
        let deadline = Instant::now() + m.timeouts.init;
        let crash = |reason: String| Err(Flow::Crash(Crash::new(reason)));
        let reply = loop {
            tokio::select! {
                ev = stdout.recv() => match ev {
                    Some(StdoutEvent::Message(Message::Response(r))) if r.id == Some(Id::Num(id)) => break r.result,
                    Some(StdoutEvent::Message(Message::Response(Response { id: Some(Id::Str(s)), .. }))) => {
                        let method = (super::reply_id::meant(&s) == Some(id)).then_some(method::INITIALIZE);
                        return Err(Flow::Crash(Crash::violation(super::reply_id::string_id_violation(&s, method))));
                    }
                    Some(StdoutEvent::Message(msg)) => { self.on_message(msg); }
                    Some(StdoutEvent::Garbage { line, error }) => self.on_garbage(&line, &error),
                    Some(StdoutEvent::TooLong { seen }) => return Err(Flow::Crash(Crash::violation(self.too_long(seen)))),
                    Some(StdoutEvent::Closed) | None => {
                        return crash(format!("{} before answering `initialize`", closed_reason(child).await));
                    }
                },
                status = child.wait() => {
                    let how = status.map(|s| process::describe_exit(&s)).unwrap_or_else(|e| format!("could not be waited for: {e}"));
                    return crash(format!("{how} before answering `initialize`"));
                }
                cmd = commands.recv() => match cmd {
                    Some(Command::Stop { grace }) => return Err(Flow::Stop(grace)),
                    None => return Err(Flow::Stop(m.timeouts.shutdown_grace)),
                    Some(Command::Run(job)) => job.finish(Outcome::Failure(Failure::crashed("the instance was not ready"))),
                    Some(Command::Cancel { .. }) => {}
                },
                _ = sleep_until(deadline) => {
                    return crash(format!(
                        "did not answer `initialize` within the init timeout of {:?} (raise `timeouts.init` in plugin.toml if it needs longer to start)",
                        m.timeouts.init
                    ));
                }
            }
        };
        let incompatible =
            |reason: String| Err(Flow::Crash(Crash::new(format!("incompatible: {reason}"))));
        let result = match super::handshake::check(reply, &m) {
            Ok(r) => r,
            Err(reason) => return incompatible(reason),
        };
        self.notify(method::INITIALIZED, serde_json::json!({}));
        self.pings_while_busy = result
            .capabilities
            .iter()
            .any(|c| c == plugin_protocol::capability::PING_WHILE_BUSY);
        tracing::info!(plugin = %self.name(), instance = self.spec.index, pid = self.pid, version = %result.plugin.version, "plugin instance ready");
        Ok(result.plugin.version)
    }

    /// The main loop: runs tasks until the process dies, misbehaves, or is told to stop.
    /// The exit watch and the timer live across iterations: re-creating them per event would
    /// cost a `waitpid` and a timer registration for every message.
    async fn serve(
        &mut self,
        child: &mut Child,
        stdout: &mut mpsc::Receiver<StdoutEvent>,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        events: &mpsc::UnboundedSender<InstanceEvent>,
    ) -> Flow {
        let mut exited = std::pin::pin!(child.wait());
        let mut timer = std::pin::pin!(tokio::time::sleep_until(self.next_deadline()));
        loop {
            let deadline = self.next_deadline();
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let flow = tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => Flow::Stop(self.spec.manifest.timeouts.shutdown_grace),
                },
                ev = stdout.recv() => {
                    // Take everything already read in one go.
                    let mut flow = self.on_stdout(ev, events);
                    while matches!(flow, Flow::Continue) {
                        match stdout.try_recv() {
                            Ok(ev) => flow = self.on_stdout(Some(ev), events),
                            Err(_) => break,
                        }
                    }
                    flow
                }
                status = &mut exited => return Flow::Crash(Crash::new(status.map(|s| process::describe_exit(&s)).unwrap_or_else(|e| format!("could not be waited for: {e}")))),
                _ = &mut timer => self.on_timer(),
            };
            match flow {
                Flow::Continue => {}
                Flow::StdoutClosed => {
                    // Usually the process is exiting: prefer its exit status as the reason.
                    let reason = match timeout(Duration::from_millis(500), &mut exited).await {
                        Ok(Ok(status)) => process::describe_exit(&status),
                        _ => "closed its stdout".to_string(),
                    };
                    return Flow::Crash(Crash::new(reason));
                }
                other => return other,
            }
        }
    }

    fn on_command(&mut self, cmd: Command) -> Flow {
        match cmd {
            Command::Run(job) => {
                let m = &self.spec.manifest;
                let soft = job.request.soft_time_limit.or(m.timeouts.task_soft);
                let hard = job.request.hard_time_limit.or(m.timeouts.task_hard);
                let params = TaskRunParams {
                    task_id: job.request.id.clone(),
                    task: job.request.name.clone(),
                    args: job.request.args.clone(),
                    kwargs: job.request.kwargs.clone(),
                    attempt: job.attempt,
                    time_limit: TimeLimits {
                        soft: soft.map(|d| d.as_secs_f64()),
                        hard: hard.map(|d| d.as_secs_f64()),
                    },
                };
                let now = Instant::now();
                let id = self.request(method::TASK_RUN, params);
                self.by_task.insert(job.request.id.clone(), id);
                self.running.insert(
                    id,
                    Running {
                        job,
                        soft_at: soft.map(|d| now + d),
                        hard_at: hard.map(|d| now + d),
                        hard_limit: hard,
                        cancel: None,
                    },
                );
            }
            Command::Cancel { task_id, reason } => {
                let grace = self.spec.manifest.timeouts.cancel_grace;
                self.cancel(&task_id, reason, false, Some(grace));
            }
            Command::Stop { grace } => return Flow::Stop(grace),
        }
        Flow::Continue
    }

    /// Sends `task.cancel` once per task; `kill_grace` arms the kill if it does not end.
    fn cancel(
        &mut self,
        task_id: &str,
        reason: String,
        soft_limit: bool,
        kill_grace: Option<Duration>,
    ) {
        let Some(id) = self.by_task.get(task_id).copied() else {
            return;
        };
        let Some(run) = self.running.get_mut(&id) else {
            return;
        };
        if run.cancel.is_some() {
            return;
        }
        run.cancel = Some(Cancel {
            reason: reason.clone(),
            soft_limit,
            kill_at: kill_grace.map(|g| Instant::now() + g),
        });
        self.notify(
            method::TASK_CANCEL,
            TaskCancelParams {
                task_id: task_id.to_string(),
                reason,
            },
        );
    }

    fn on_stdout(
        &mut self,
        ev: Option<StdoutEvent>,
        events: &mpsc::UnboundedSender<InstanceEvent>,
    ) -> Flow {
        match ev {
            Some(StdoutEvent::Message(Message::Response(r))) => {
                if let Some(crash) = self.on_response(r, events) {
                    return Flow::Crash(crash);
                }
            }
            Some(StdoutEvent::Message(msg)) => self.on_message(msg),
            Some(StdoutEvent::Garbage { line, error }) => self.on_garbage(&line, &error),
            Some(StdoutEvent::TooLong { seen }) => {
                return Flow::Crash(Crash::violation(self.too_long(seen)))
            }
            Some(StdoutEvent::Closed) | None => return Flow::StdoutClosed,
        }
        Flow::Continue
    }

    /// Delivers a response to whoever waits for it. A string id is a protocol violation: the
    /// instance must end, and the task it seems to answer fails with the reason.
    fn on_response(
        &mut self,
        r: Response,
        events: &mpsc::UnboundedSender<InstanceEvent>,
    ) -> Option<Box<Crash>> {
        if let Some(Id::Str(s)) = &r.id {
            return Some(self.string_id(s));
        }
        let Some(Id::Num(id)) = r.id else {
            match r.result {
                Err(e) => {
                    tracing::warn!(plugin = %self.name(), instance = self.spec.index, pid = self.pid, code = e.code, "plugin reported an error about a message it could not read: {}", e.message)
                }
                Ok(_) => {
                    tracing::warn!(plugin = %self.name(), instance = self.spec.index, "plugin sent a response without an id; ignored")
                }
            }
            return None;
        };
        if let Some((ping, _)) = self.ping {
            if ping == id {
                self.ping = None;
                self.next_ping = Instant::now() + self.spec.manifest.timeouts.ping_interval;
                return None;
            }
        }
        let Some(run) = self.running.remove(&id) else {
            tracing::warn!(plugin = %self.name(), instance = self.spec.index, id, "plugin answered request id {id}, which is not outstanding (answered twice, or never asked); ignored");
            return None;
        };
        let task_id = run.job.request.id.clone();
        self.by_task.remove(&task_id);
        let outcome = match r.result {
            Ok(value) => Outcome::Success(value),
            Err(e) => Outcome::Failure(self.task_failure(e, run.cancel.as_ref())),
        };
        let ok = outcome.is_success();
        run.job.finish(outcome);
        let _ = events.send(InstanceEvent {
            slot: self.spec.slot,
            generation: self.spec.generation,
            kind: EventKind::Finished { task_id, ok },
        });
        None
    }

    /// The crash for a response with a string id; the task it names (if any) is the culprit.
    fn string_id(&self, s: &str) -> Box<Crash> {
        let meant = super::reply_id::meant(s);
        let (method, culprit) = match meant {
            Some(n) if self.running.contains_key(&n) => (Some(method::TASK_RUN), Some(n)),
            Some(n) if self.ping.is_some_and(|(p, _)| p == n) => (Some(method::PING), None),
            _ => (None, None),
        };
        let reason = super::reply_id::string_id_violation(s, method);
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
            reason,
            culprit,
            violation: true,
        })
    }

    /// Maps a `task.run` error response to a failure.
    fn task_failure(&self, e: ErrorObject, cancel: Option<&Cancel>) -> Failure {
        let data: Option<TaskErrorData> =
            e.data.clone().and_then(|d| serde_json::from_value(d).ok());
        match e.code {
            code::TASK_CANCELLED => match cancel {
                Some(c) if c.soft_limit => Failure::new(
                    FailureKind::SoftTimeLimit,
                    "SoftTimeLimitExceeded",
                    "celery.exceptions",
                    c.reason.clone(),
                ),
                Some(c) => Failure::cancelled(&c.reason),
                None => Failure::cancelled("the plugin cancelled the task itself"),
            },
            code::SHUTTING_DOWN => Failure::new(
                FailureKind::Rejected,
                "PluginShuttingDown",
                "worker.errors",
                e.message,
            ),
            code::UNKNOWN_TASK => Failure::new(
                FailureKind::NotRegistered,
                "NotRegistered",
                "celery.exceptions",
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

    /// Notifications and requests from the plugin.
    fn on_message(&mut self, msg: Message) {
        match msg {
            Message::Notification(n) => match n.method.as_str() {
                method::TASK_PROGRESS => {
                    match serde_json::from_value::<TaskProgressParams>(n.params) {
                        Ok(p) => self.forward(
                            &p.task_id,
                            TaskEvent::Progress {
                                done: p.done,
                                total: p.total,
                                message: p.message,
                            },
                        ),
                        Err(e) => self.bad_params(method::TASK_PROGRESS, &e),
                    }
                }
                method::TASK_STREAM => match serde_json::from_value::<TaskStreamParams>(n.params) {
                    Ok(p) => self.forward(&p.task_id, TaskEvent::Stream { items: p.items }),
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
            Message::Request(r) => {
                let err = ErrorObject::new(
                    code::METHOD_NOT_FOUND,
                    format!("the worker has no method `{}`", r.method),
                );
                self.send(Message::Response(Response::err(Some(r.id), err)));
            }
            Message::Response(_) => {
                tracing::warn!(plugin = %self.name(), instance = self.spec.index, "unexpected response before the handshake finished; ignored");
            }
        }
    }

    fn forward(&self, task_id: &str, event: TaskEvent) {
        match self
            .by_task
            .get(task_id)
            .and_then(|id| self.running.get(id))
        {
            Some(run) => {
                let _ = run.job.events.send(event);
            }
            None => {
                tracing::debug!(plugin = %self.name(), task_id, "event for a task that is not running here; ignored")
            }
        }
    }

    fn log(&self, p: LogParams) {
        let fields = if p.fields.is_empty() {
            String::new()
        } else {
            serde_json::Value::Object(p.fields).to_string()
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

    fn on_garbage(&self, line: &str, error: &plugin_protocol::ParseError) {
        let n = self.spec.garbage_lines.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            target: "plugin",
            plugin = %self.name(),
            instance = self.spec.index,
            pid = self.pid,
            count = n,
            "plugin wrote a non-protocol line to stdout ({error}); log to stderr instead: {line}"
        );
    }

    fn too_long(&self, seen: usize) -> String {
        format!(
            "broke the protocol: a stdout line of more than {seen} bytes exceeds the limit of {} bytes (`max_line_bytes`)",
            self.spec.max_line_bytes
        )
    }

    /// Whether a new health ping may be sent now (see `pings_while_busy`).
    fn pingable(&self) -> bool {
        self.pings_while_busy || self.running.is_empty()
    }

    fn next_deadline(&self) -> Instant {
        // Without any timer due, wake up rarely; a ping is only scheduled while pingable.
        let idle = Instant::now() + self.spec.manifest.timeouts.ping_interval;
        let mut next = match self.ping {
            Some((_, due)) => due,
            None if self.pingable() => self.next_ping,
            None => idle,
        };
        for run in self.running.values() {
            let soft = if run.cancel.is_none() {
                run.soft_at
            } else {
                None
            };
            let kill = run.cancel.as_ref().and_then(|c| c.kill_at);
            for t in [soft, run.hard_at, kill].into_iter().flatten() {
                next = next.min(t);
            }
        }
        next
    }

    fn on_timer(&mut self) -> Flow {
        let now = Instant::now();
        if let Some((_, due)) = self.ping {
            if now >= due {
                return Flow::Crash(Box::new(Crash {
                    reason: format!(
                        "failed its health ping (no reply within {:?}; `timeouts.ping_timeout`)",
                        self.spec.manifest.timeouts.ping_timeout
                    ),
                    culprit: None,
                    violation: false,
                }));
            }
        } else if now >= self.next_ping && self.pingable() {
            let id = self.request(method::PING, serde_json::json!({}));
            self.ping = Some((id, now + self.spec.manifest.timeouts.ping_timeout));
        }
        let mut soft_due = Vec::new();
        for (&id, run) in &self.running {
            if run.hard_at.is_some_and(|t| now >= t) {
                let limit = run.hard_limit.unwrap_or_default();
                let failure = Failure::new(
                    FailureKind::HardTimeLimit,
                    "TimeLimitExceeded",
                    "billiard.exceptions",
                    format!("task {} exceeded its hard time limit of {limit:?}; the plugin process was killed", run.job.request.id),
                );
                return Flow::Crash(Box::new(Crash {
                    reason: format!(
                        "was killed because task {} exceeded its hard time limit of {limit:?}",
                        run.job.request.id
                    ),
                    culprit: Some((id, failure)),
                    violation: false,
                }));
            }
            if let Some(c) = &run.cancel {
                if c.kill_at.is_some_and(|t| now >= t) {
                    let failure = Failure::cancelled(&format!(
                        "{} (the plugin did not stop the task in time and was killed)",
                        c.reason
                    ));
                    return Flow::Crash(Box::new(Crash {
                        reason: format!(
                            "was killed because task {} did not stop after `task.cancel`",
                            run.job.request.id
                        ),
                        culprit: Some((id, failure)),
                        violation: false,
                    }));
                }
            } else if run.soft_at.is_some_and(|t| now >= t) {
                soft_due.push(run.job.request.id.clone());
            }
        }
        for task_id in soft_due {
            self.cancel(&task_id, "soft time limit exceeded".into(), true, None);
        }
        Flow::Continue
    }

    /// After the process died: fails every task it held and says why it ended.
    fn bury(
        &mut self,
        stdout: &mut mpsc::Receiver<StdoutEvent>,
        crash: Crash,
        events: &mpsc::UnboundedSender<InstanceEvent>,
    ) -> ExitReason {
        // Answers that were already written before the crash still count, unless the crash
        // is a protocol violation: whatever came after it is not trusted.
        stdout.close();
        while let (false, Ok(ev)) = (crash.violation, stdout.try_recv()) {
            if let StdoutEvent::Message(Message::Response(r)) = ev {
                if self.on_response(r, events).is_some() {
                    break;
                }
            }
        }
        let incompatible = crash
            .reason
            .strip_prefix("incompatible: ")
            .map(str::to_string);
        let reason = incompatible.clone().unwrap_or(crash.reason);
        let lead = format!(
            "plugin `{}` instance {} (pid {}) {reason}",
            self.name(),
            self.spec.index,
            self.pid
        );
        let stderr = self.spec.stderr.summary(self.pid, CRASH_STDERR_LINES);
        tracing::warn!(plugin = %self.name(), instance = self.spec.index, pid = self.pid, in_flight = self.running.len(), "{lead}{stderr}");
        let mut culprit = crash.culprit;
        for (id, run) in self.running.drain() {
            let failure = match culprit.take_if(|(cid, _)| *cid == id) {
                Some((_, f)) => f,
                None => Failure::crashed(format!(
                    "{lead} while running task {}{stderr}",
                    run.job.request.id
                )),
            };
            let task_id = run.job.request.id.clone();
            run.job.finish(Outcome::Failure(failure));
            let _ = events.send(InstanceEvent {
                slot: self.spec.slot,
                generation: self.spec.generation,
                kind: EventKind::Finished { task_id, ok: false },
            });
        }
        self.by_task.clear();
        match incompatible {
            Some(_) => ExitReason::Incompatible(format!("{lead}{stderr}")),
            None => ExitReason::Crashed(format!("{lead}{stderr}")),
        }
    }

    /// Graceful stop: `shutdown` (in-flight tasks may finish), `exit`, SIGTERM, SIGKILL.
    async fn stop(
        &mut self,
        child: &mut Child,
        stdout: &mut mpsc::Receiver<StdoutEvent>,
        grace: Duration,
        events: &mpsc::UnboundedSender<InstanceEvent>,
    ) {
        let shutdown = self.request(method::SHUTDOWN, serde_json::Value::Null);
        let deadline = Instant::now() + grace;
        let mut exited = false;
        loop {
            tokio::select! {
                ev = stdout.recv() => match ev {
                    Some(StdoutEvent::Message(Message::Response(r))) if r.id == Some(Id::Num(shutdown)) => break,
                    Some(StdoutEvent::Message(Message::Response(r))) => { let _ = self.on_response(r, events); }
                    Some(StdoutEvent::Message(msg)) => self.on_message(msg),
                    Some(StdoutEvent::Garbage { line, error }) => self.on_garbage(&line, &error),
                    Some(StdoutEvent::TooLong { .. }) | Some(StdoutEvent::Closed) | None => break,
                },
                _ = child.wait() => { exited = true; break; }
                _ = sleep_until(deadline) => break,
            }
        }
        if !exited {
            self.notify(method::EXIT, serde_json::Value::Null);
            exited = timeout(grace, child.wait()).await.is_ok();
        }
        if !exited {
            tracing::warn!(plugin = %self.name(), instance = self.spec.index, pid = self.pid, "plugin did not exit within {grace:?} of `exit`; sending SIGTERM");
            process::signal_group(self.pid, Signal::SIGTERM);
            exited = timeout(grace, child.wait()).await.is_ok();
        }
        if !exited {
            tracing::warn!(plugin = %self.name(), instance = self.spec.index, pid = self.pid, "plugin ignored SIGTERM for {grace:?}; sending SIGKILL");
            process::signal_group(self.pid, Signal::SIGKILL);
            let _ = child.wait().await;
        }
        let lead = format!(
            "plugin `{}` instance {} (pid {}) was stopped",
            self.name(),
            self.spec.index,
            self.pid
        );
        for (_, run) in self.running.drain() {
            let task_id = run.job.request.id.clone();
            run.job
                .finish(Outcome::Failure(Failure::interrupted(format!(
                    "{lead} while running task {task_id}"
                ))));
            let _ = events.send(InstanceEvent {
                slot: self.spec.slot,
                generation: self.spec.generation,
                kind: EventKind::Finished { task_id, ok: false },
            });
        }
        self.by_task.clear();
        tracing::info!(plugin = %self.name(), instance = self.spec.index, pid = self.pid, "plugin instance stopped");
    }
}
