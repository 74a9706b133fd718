//! The harness: an instance core under test, fed as its shell would feed it.

use super::super::*;
use crate::task::{CancelCause, TaskRequest};
use serde_json::{json, Value};
use std::path::Path;
use tokio::sync::oneshot;

pub(super) fn manifest(concurrency: u32) -> Manifest {
    let text = format!(
        "name = \"p\"\nversion = \"1\"\ncommand = [\"x\"]\nconcurrency = {concurrency}\n[[tasks]]\nname = \"t\"\n"
    );
    let mut m = Manifest::parse(&text, Path::new("/p")).expect("manifest");
    m.timeouts.init = Duration::from_secs(10);
    m.timeouts.ping_interval = Duration::from_secs(30);
    m.timeouts.ping_timeout = Duration::from_secs(5);
    m.timeouts.cancel_grace = Duration::from_secs(2);
    m
}

/// A core under test, the time it is told, and what its effects did, carried out as the
/// shell would (outcomes to each task's far end, events to its channel).
pub(super) struct Harness {
    pub(super) inst: InstanceCore,
    pub(super) now: Instant,
    /// What the pool heard, as "ready 42" or "finished t ok=true".
    reported: Vec<String>,
    /// Offers handed on (task ids), and the stderr reader's sink each time it changed.
    pub(super) offered: Vec<String>,
    pub(super) follows_log: Vec<bool>,
}

/// A task's far end: its outcome and its events.
pub(super) struct Submitted {
    outcome: oneshot::Receiver<Outcome>,
    pub(super) events: crate::task::EventReceiver,
}

impl Submitted {
    pub(super) fn outcome(&mut self) -> Option<Outcome> {
        self.outcome.try_recv().ok()
    }

    pub(super) fn failure(&mut self) -> Failure {
        match self.outcome() {
            Some(Outcome::Failure(f)) => f,
            other => panic!("not a failure: {other:?}"),
        }
    }
}

pub(super) fn spec(manifest: Manifest) -> LaunchSpec {
    LaunchSpec {
        manifest: Arc::new(manifest),
        index: 0,
        slot: 0,
        generation: 1,
        worker_name: "w@h".into(),
        max_line_bytes: 1024,
        stderr: StderrTail::default(),
        stray_lines: Arc::default(),
        violations: Arc::default(),
        state_dir: None,
        plugin_user: None,
        events: crate::events::EventBus::new(),
        cgroups: None,
        offers: Default::default(),
    }
}

impl Harness {
    /// Started with `initialize` sent, as the shell leaves it.
    pub(super) fn new(manifest: Manifest) -> Harness {
        let now = Instant::now();
        let mut h = Harness {
            inst: InstanceCore::new(spec(manifest), 42, now),
            now,
            reported: Vec::new(),
            offered: Vec::new(),
            follows_log: Vec::new(),
        };
        h.inst.begin_handshake(h.clock());
        h
    }

    /// Through a sound handshake: serving.
    pub(super) fn serving(manifest: Manifest) -> Harness {
        let mut h = Harness::new(manifest);
        h.written();
        assert_eq!(h.answer(1, json!(initialize_result())), "continue");
        assert_eq!(h.written(), ["initialized"]);
        assert_eq!(h.reports(), ["ready 42"]);
        h
    }

    pub(super) fn clock(&self) -> Now {
        Now::fixed(self.now, std::time::SystemTime::UNIX_EPOCH)
    }

    pub(super) fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    pub(super) fn wake(&mut self, wake: Wake) -> String {
        let step = self.inst.handle(wake, self.clock());
        self.carry_out();
        describe(step)
    }

    /// The effects, carried out as the shell does.
    pub(super) fn carry_out(&mut self) {
        for effect in self.inst.take_effects() {
            match effect {
                Effect::Finish(job, outcome) => {
                    let ok = outcome.is_success();
                    self.reported
                        .push(format!("finished {} ok={ok}", job.request.id));
                    job.finish(outcome);
                }
                Effect::Refuse(job, failure) => job.finish(Outcome::Failure(failure)),
                Effect::Report(EventKind::Ready { pid, .. }) => {
                    self.reported.push(format!("ready {pid}"))
                }
                Effect::Report(other) => panic!("the core reports only Ready: {other:?}"),
                Effect::Deliver(to, event) => {
                    if let Err(mpsc::error::TrySendError::Full(event)) = to.try_send(event) {
                        self.inst.handle(Wake::NoRoom(to, event), self.clock());
                    }
                }
                Effect::DeliverLog(to, event) => {
                    let _ = to.try_send(event);
                }
                Effect::Release(permit, event) => {
                    permit.send(event);
                }
                Effect::FollowLog(sink) => self.follows_log.push(sink.is_some()),
                Effect::Offer(_, params) => self.offered.push(params.task_id),
            }
        }
    }

    pub(super) fn command(&mut self, cmd: Command) -> String {
        self.wake(Wake::Command(Some(cmd)))
    }

    pub(super) fn line(&mut self, line: Value) -> String {
        let msg = Message::parse(line.to_string().as_bytes()).expect("a protocol line");
        self.wake(Wake::Stdout(Some(StdoutEvent::Message(msg))))
    }

    pub(super) fn answer(&mut self, id: u64, result: Value) -> String {
        self.line(json!({"jsonrpc": "2.0", "id": id, "result": result}))
    }

    pub(super) fn error(&mut self, id: u64, code: i64, data: Value) -> String {
        let error = json!({"code": code, "message": "no", "data": data});
        self.line(json!({"jsonrpc": "2.0", "id": id, "error": error}))
    }

    pub(super) fn run(&mut self, task_id: &str, events: usize) -> Submitted {
        self.run_logged(task_id, events, false)
    }

    /// A task whose request asks for its log (`capture_log`) when `log`.
    pub(super) fn run_logged(&mut self, task_id: &str, events: usize, log: bool) -> Submitted {
        let mut request = TaskRequest::new("t", vec![json!(1)], Default::default());
        request.id = task_id.into();
        request.capture_log = log;
        let (events_tx, events) = mpsc::channel(events);
        let (reply, outcome) = oneshot::channel();
        let job = Job {
            request: Arc::new(request),
            attempt: 1,
            events: events_tx,
            reply,
            store: None,
        };
        assert_eq!(self.command(Command::Run(job)), "continue");
        Submitted { outcome, events }
    }

    pub(super) fn cancel(&mut self, task_id: &str, escalate: bool) -> String {
        self.command(Command::Cancel {
            task_id: task_id.into(),
            cancel: Cancellation::new(CancelCause::Revoked, "asked"),
            escalate,
        })
    }

    /// What was queued for stdin since the last look ("method id task" per line), as if the
    /// pipe took it all.
    pub(super) fn written(&mut self) -> Vec<String> {
        let pending = self.inst.out.pending().to_vec();
        assert_eq!(self.wake(Wake::Written(Ok(pending.len()))), "continue");
        describe_lines(&pending)
    }

    /// What the pool heard since the last look.
    pub(super) fn reports(&mut self) -> Vec<String> {
        std::mem::take(&mut self.reported)
    }

    /// A timer, `cpu_wait` not known.
    pub(super) fn timer(&mut self) -> String {
        self.wake(Wake::Timer { cpu_wait: None })
    }

    /// Moves the clock to the next deadline and fires the timer.
    pub(super) fn timer_at_next_deadline(&mut self) -> String {
        let due = self.inst.next_deadline().expect("a timer is due");
        self.now = self.now.max(due);
        self.timer()
    }

    /// Buries the process after `step` (a crash), given the answers its pipe still held.
    pub(super) fn bury_with(&mut self, step: Step, answers: &[Value]) -> ExitReason {
        let Step::Crash(crash) = step else {
            panic!("not a crash")
        };
        let answers = answers
            .iter()
            .map(|a| match Message::parse(a.to_string().as_bytes()) {
                Ok(Message::Response(r)) => r,
                other => panic!("not a response: {other:?}"),
            })
            .collect();
        let reason = self.inst.bury(*crash, answers, self.clock());
        self.carry_out();
        reason
    }

    pub(super) fn bury(&mut self, step: Step) -> ExitReason {
        self.bury_with(step, &[])
    }
}

/// Lines as "method id task" (a response: "response id").
pub(super) fn describe_lines(pending: &[u8]) -> Vec<String> {
    let mut lines = Vec::new();
    for line in pending.split_inclusive(|&b| b == b'\n') {
        let v: Value = serde_json::from_slice(line).expect("json");
        let method = v["method"].as_str().unwrap_or("response").to_string();
        lines.push(match (&v["id"], &v["params"]["task_id"]) {
            (Value::Number(id), Value::String(t)) => format!("{method} {id} {t}"),
            (Value::Number(id), _) => format!("{method} {id}"),
            (_, Value::String(t)) => format!("{method} {t}"),
            _ => method,
        });
    }
    lines
}

pub(super) fn initialize_result() -> Value {
    json!({"protocol_version": "1.5", "plugin": {"name": "p", "version": "1"}, "tasks": [{"name": "t"}]})
}

pub(super) fn describe(step: Step) -> String {
    match step {
        Step::Continue => "continue".into(),
        Step::StdoutClosed => "stdout closed".into(),
        Step::Drained { exited, .. } => format!("drained exited={exited}"),
        Step::Crash(c) => {
            let mut s = format!("crash: {}", c.reason);
            if c.violation {
                s.push_str(" [violation]");
            }
            if c.incompatible {
                s.push_str(" [incompatible]");
            }
            s
        }
    }
}

impl Step {
    pub(super) fn is_drained(&self) -> bool {
        matches!(self, Step::Drained { .. })
    }
}
