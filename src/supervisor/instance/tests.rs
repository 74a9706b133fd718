//! Every transition of the instance's state machine, without a process: an [`Instance`] is
//! built on in-memory channels (its stdin lines, its reports to the pool, each task's reply
//! and events) and fed [`Wake`]s as its event loop would; time is tokio's paused clock.

use super::*;
use crate::framed::FramedReader;
use crate::task::{CancelCause, FailureKind, TaskRequest};
use serde_json::{json, Value};
use std::path::Path;
use tokio::sync::oneshot;

fn manifest(concurrency: u32) -> Manifest {
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

/// An instance under test and the other ends of its channels.
struct Harness {
    inst: Instance,
    reports: mpsc::Receiver<InstanceEvent>,
    stdout: FramedReader<&'static [u8]>,
}

/// A task's far end: its outcome and its events.
struct Submitted {
    outcome: oneshot::Receiver<Outcome>,
    events: crate::task::EventReceiver,
}

impl Submitted {
    fn outcome(&mut self) -> Option<Outcome> {
        self.outcome.try_recv().ok()
    }

    fn failure(&mut self) -> Failure {
        match self.outcome() {
            Some(Outcome::Failure(f)) => f,
            other => panic!("not a failure: {other:?}"),
        }
    }
}

impl Harness {
    /// Started with `initialize` sent, as `run` leaves it.
    fn new(manifest: Manifest) -> Harness {
        let spec = LaunchSpec {
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
        };
        let (late, _) = mpsc::channel(1);
        let (events, reports) = mpsc::channel(super::reports_capacity(4));
        let stdout = FramedReader::new(&b""[..], 1024);
        let task_log = process::TaskLog::default();
        let mut inst = Instance::new(
            spec,
            42,
            late,
            super::Reports::channel(events),
            task_log,
            Instant::now(),
        );
        inst.begin_handshake();
        Harness {
            inst,
            reports,
            stdout,
        }
    }

    /// Through a sound handshake: serving.
    fn serving(manifest: Manifest) -> Harness {
        let mut h = Harness::new(manifest);
        h.written();
        assert_eq!(h.answer(1, json!(initialize_result())), "continue");
        assert_eq!(h.written(), ["initialized"]);
        assert_eq!(h.reports(), ["ready 42"]);
        h
    }

    fn wake(&mut self, wake: Wake) -> String {
        describe(self.inst.handle(wake))
    }

    fn command(&mut self, cmd: Command) -> String {
        self.wake(Wake::Command(Some(cmd)))
    }

    fn line(&mut self, line: Value) -> String {
        let msg = Message::parse(line.to_string().as_bytes()).expect("a protocol line");
        self.wake(Wake::Stdout(Some(StdoutEvent::Message(msg))))
    }

    fn answer(&mut self, id: u64, result: Value) -> String {
        self.line(json!({"jsonrpc": "2.0", "id": id, "result": result}))
    }

    fn error(&mut self, id: u64, code: i64, data: Value) -> String {
        let error = json!({"code": code, "message": "no", "data": data});
        self.line(json!({"jsonrpc": "2.0", "id": id, "error": error}))
    }

    fn run(&mut self, task_id: &str, events: usize) -> Submitted {
        let mut request = TaskRequest::new("t", vec![json!(1)], Default::default());
        request.id = task_id.into();
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

    fn cancel(&mut self, task_id: &str, escalate: bool) -> String {
        self.command(Command::Cancel {
            task_id: task_id.into(),
            cancel: Cancellation::new(CancelCause::Revoked, "asked"),
            escalate,
        })
    }

    /// What was queued for stdin since the last look ("method id task" per line), as if the
    /// pipe took it all.
    fn written(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        let pending = self.inst.out.pending().to_vec();
        self.inst.out.written(pending.len());
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

    /// What the pool heard since the last look.
    fn reports(&mut self) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(ev) = self.reports.try_recv() {
            seen.push(match ev.kind {
                EventKind::Ready { pid, .. } => format!("ready {pid}"),
                EventKind::Finished { task_id, ok } => format!("finished {task_id} ok={ok}"),
                EventKind::Exited { reason, .. } => format!("exited {reason:?}"),
            });
        }
        seen
    }

    /// Moves the paused clock to the next deadline and fires the timer.
    async fn timer_at_next_deadline(&mut self) -> String {
        let due = self.inst.next_deadline().expect("a timer is due");
        tokio::time::advance(due - Instant::now()).await;
        self.wake(Wake::Timer)
    }

    fn bury(&mut self, step: Step) -> ExitReason {
        let Step::Crash(crash) = step else {
            panic!("not a crash")
        };
        self.inst.bury(&mut self.stdout, *crash)
    }
}

fn initialize_result() -> Value {
    json!({"protocol_version": "1.5", "plugin": {"name": "p", "version": "1"}, "tasks": [{"name": "t"}]})
}

fn describe(step: Step) -> String {
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

#[tokio::test(start_paused = true)]
async fn the_handshake_ends_in_serving_or_says_why_not() {
    let mut h = Harness::new(manifest(1));
    assert_eq!(h.written(), ["initialize 1"]);
    let mut early = h.run("early", 1);
    assert_eq!(
        early.failure().kind,
        FailureKind::Rejected,
        "not serving yet"
    );
    assert_eq!(h.answer(1, initialize_result()), "continue");
    assert_eq!(h.written(), ["initialized"]);
    assert_eq!(h.reports(), ["ready 42"]);
    assert_eq!(h.inst.phase, Phase::Serving);

    let mut h = Harness::new(manifest(1));
    let wrong =
        json!({"protocol_version": "1.5", "plugin": {"name": "p", "version": "1"}, "tasks": []});
    let step = h.answer(1, wrong);
    assert!(step.ends_with("[incompatible]"), "{step}");
    let exit = h.error(1, -32603, json!(null));
    assert!(exit.ends_with("[incompatible]"), "{exit}");

    let mut h = Harness::new(manifest(1));
    assert_eq!(h.wake(Wake::Timer), "continue", "not yet due");
    let late = h.timer_at_next_deadline().await;
    assert!(
        late.starts_with("crash: did not answer `initialize` within the init timeout of 10s"),
        "{late}"
    );

    let mut h = Harness::new(manifest(1));
    assert_eq!(
        h.wake(Wake::Stdout(Some(StdoutEvent::Closed))),
        "stdout closed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_runs_and_its_answer_reaches_its_submitter() {
    let mut h = Harness::serving(manifest(2));
    let mut ok = h.run("ok", 4);
    let mut bad = h.run("bad", 4);
    assert_eq!(h.written(), ["task.run 2 ok", "task.run 3 bad"]);
    let progress = json!({"jsonrpc": "2.0", "method": "task.progress", "params": {"task_id": "ok", "done": 1, "total": 2}});
    assert_eq!(h.line(progress), "continue");
    let stream = json!({"jsonrpc": "2.0", "method": "task.stream", "params": {"task_id": "ok", "items": [7]}});
    assert_eq!(h.line(stream), "continue");
    assert_eq!(h.answer(2, json!(3)), "continue");
    let data = json!({"type": "ValueError", "message": "bad input", "retryable": true});
    assert_eq!(h.error(3, -32000, data), "continue");
    assert_eq!(
        h.reports(),
        ["finished ok ok=true", "finished bad ok=false"]
    );
    assert!(matches!(ok.outcome(), Some(Outcome::Success(v)) if v == json!(3)));
    assert!(matches!(
        ok.events.try_recv().map(|e| *e),
        Ok(TaskEvent::Progress {
            done: 1,
            total: Some(2),
            ..
        })
    ));
    assert!(
        matches!(ok.events.try_recv().map(|e| *e), Ok(TaskEvent::Stream { items }) if items == [json!(7)])
    );
    let failure = bad.failure();
    assert_eq!(
        (failure.exc_type.as_str(), failure.message.as_str()),
        ("ValueError", "bad input")
    );
    assert_eq!(failure.kind, FailureKind::Raised { retryable: true });
    // Answered twice, or never asked: ignored.
    assert_eq!(h.answer(2, json!(3)), "continue");
    assert_eq!(h.answer(99, json!(3)), "continue");
    assert!(h.inst.running.is_empty() && h.inst.by_task.is_empty());
}

#[tokio::test(start_paused = true)]
async fn what_the_plugin_breaks_ends_its_process_and_fails_its_tasks() {
    let mut h = Harness::serving(manifest(2));
    let mut culprit = h.run("culprit", 1);
    let mut other = h.run("other", 1);
    let step = h.inst.on_stdout(Some(StdoutEvent::Message(
        Message::parse(br#"{"jsonrpc":"2.0","id":"2","result":1}"#).unwrap(),
    )));
    let exit = h.bury(step);
    assert!(
        matches!(&exit, ExitReason::Crashed(m) if m.contains("broke the protocol")),
        "{exit:?}"
    );
    assert_eq!(culprit.failure().exc_type, "ProtocolViolation");
    assert_eq!(other.failure().kind, FailureKind::PluginCrashed);
    assert_eq!(
        h.inst
            .spec
            .violations
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let mut finished = h.reports();
    finished.sort();
    assert_eq!(
        finished,
        ["finished culprit ok=false", "finished other ok=false"]
    );

    let mut h = Harness::serving(manifest(1));
    let too_long = h.wake(Wake::Stdout(Some(StdoutEvent::TooLong { seen: 2048 })));
    assert!(
        too_long.contains("exceeds the limit of 1024 bytes") && too_long.ends_with("[violation]"),
        "{too_long}"
    );
    let stray = StdoutEvent::Stray {
        line: "hello".into(),
        error: Message::parse(b"hello").unwrap_err(),
    };
    assert_eq!(
        h.wake(Wake::Stdout(Some(stray))),
        "continue",
        "stray lines are counted, never fatal"
    );
    assert_eq!(
        h.inst
            .spec
            .stray_lines
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancel_is_sent_once_and_escalates_after_its_grace() {
    let mut h = Harness::serving(manifest(2));
    let mut polite = h.run("polite", 1);
    let mut stubborn = h.run("stubborn", 1);
    h.written();
    assert_eq!(h.cancel("polite", false), "continue");
    assert_eq!(h.cancel("polite", true), "continue", "once per task");
    assert_eq!(h.cancel("unknown", true), "continue");
    assert_eq!(h.written(), ["task.cancel polite"]);
    assert_eq!(h.error(2, -32001, json!(null)), "continue");
    assert_eq!(
        polite.failure().kind,
        FailureKind::Cancelled(CancelCause::Revoked)
    );

    assert_eq!(h.cancel("stubborn", true), "continue");
    assert_eq!(h.written(), ["task.cancel stubborn"]);
    let step = h.inst.on_timer();
    assert_eq!(describe(step), "continue", "its grace has not passed");
    tokio::time::advance(Duration::from_secs(2)).await;
    let step = h.inst.on_timer();
    let exit = h.bury(step);
    assert!(
        matches!(exit, ExitReason::Crashed(m) if m.contains("did not stop after `task.cancel`"))
    );
    let failure = stubborn.failure();
    assert_eq!(failure.kind, FailureKind::Cancelled(CancelCause::Revoked));
    assert!(
        failure.message.contains("was killed"),
        "{}",
        failure.message
    );
}

#[tokio::test(start_paused = true)]
async fn time_limits_cancel_at_the_soft_one_and_kill_at_the_hard_one() {
    let mut m = manifest(2);
    m.timeouts.task_soft = Some(Duration::from_secs(5));
    m.timeouts.task_hard = Some(Duration::from_secs(8));
    let mut h = Harness::serving(m);
    let mut soft = h.run("soft", 1);
    let mut hard = h.run("hard", 1);
    h.written();
    assert_eq!(h.timer_at_next_deadline().await, "continue");
    let mut cancels = h.written();
    cancels.sort();
    assert_eq!(cancels, ["task.cancel hard", "task.cancel soft"]);
    assert_eq!(h.error(2, -32001, json!(null)), "continue");
    assert_eq!(soft.failure().exc_type, "SoftTimeLimitExceeded");
    tokio::time::advance(Duration::from_secs(3)).await;
    let step = h.inst.on_timer();
    let exit = h.bury(step);
    assert!(matches!(exit, ExitReason::Crashed(m) if m.contains("hard time limit of 8s")));
    assert_eq!(hard.failure().kind, FailureKind::HardTimeLimit);
}

#[tokio::test(start_paused = true)]
async fn an_idle_plugin_is_pinged_and_ended_when_it_does_not_answer() {
    let mut h = Harness::serving(manifest(1));
    assert_eq!(h.timer_at_next_deadline().await, "continue");
    assert_eq!(h.written(), ["ping 2"]);
    assert_eq!(h.answer(2, json!({})), "continue");
    assert!(h.inst.ping.is_none());
    assert_eq!(h.timer_at_next_deadline().await, "continue");
    assert_eq!(h.written(), ["ping 3"]);
    let missed = h.timer_at_next_deadline().await;
    assert!(
        missed.starts_with("crash: failed its health ping (no reply within 5s"),
        "{missed}"
    );
    // A busy plugin that did not declare `ping_while_busy` is not pinged.
    let mut h = Harness::serving(manifest(1));
    let _busy = h.run("busy", 1);
    h.written();
    assert_eq!(
        h.inst.next_deadline(),
        None,
        "nothing is due: the timer is not armed"
    );
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(h.wake(Wake::Timer), "continue");
    assert_eq!(h.written(), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn a_ping_times_out_only_after_the_plugins_last_message() {
    let mut h = Harness::serving(manifest(1));
    h.inst.pings_while_busy = true;
    let _busy = h.run("streaming", 16);
    h.written();
    assert_eq!(h.timer_at_next_deadline().await, "continue");
    assert_eq!(h.written(), ["ping 3"]);
    // The answer is queued behind a stream: each message read pushes the timeout back.
    let stream = json!({"jsonrpc": "2.0", "method": "task.stream", "params": {"task_id": "streaming", "items": [1]}});
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(h.line(stream.clone()), "continue");
        assert_eq!(h.wake(Wake::Timer), "continue", "4s since the last message");
    }
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(&h.wake(Wake::Timer)[..29], "crash: failed its health ping");
}

#[tokio::test(start_paused = true)]
async fn an_event_its_submitter_has_no_room_for_holds_stdout_back() {
    let mut h = Harness::serving(manifest(1));
    let mut slow = h.run("slow", 1);
    let progress = |done: u64| json!({"jsonrpc": "2.0", "method": "task.progress", "params": {"task_id": "slow", "done": done}});
    assert_eq!(h.line(progress(1)), "continue");
    assert!(h.inst.held.is_none());
    assert_eq!(h.line(progress(2)), "continue");
    assert!(
        h.inst.held.is_some(),
        "the channel of one is full: held, stdout not read"
    );
    assert!(matches!(
        slow.events.try_recv().map(|e| *e),
        Ok(TaskEvent::Progress { done: 1, .. })
    ));
    let (tx, _) = h.inst.held.clone().unwrap();
    let permit = tx.reserve_owned().await.ok();
    assert_eq!(h.wake(Wake::Room(permit)), "continue");
    assert!(h.inst.held.is_none());
    assert!(matches!(
        slow.events.try_recv().map(|e| *e),
        Ok(TaskEvent::Progress { done: 2, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_stop_drains_then_ends_on_the_answer_or_the_deadline() {
    let mut h = Harness::serving(manifest(2));
    let mut running = h.run("running", 1);
    h.written();
    assert_eq!(
        h.command(Command::Stop {
            grace: Duration::from_secs(3)
        }),
        "continue"
    );
    assert_eq!(
        h.command(Command::Stop {
            grace: Duration::from_secs(9)
        }),
        "continue"
    );
    assert_eq!(h.written(), ["shutdown 3"], "once");
    let mut late = h.run("late", 1);
    assert_eq!(late.failure().kind, FailureKind::Rejected);
    assert_eq!(
        h.answer(2, json!("done")),
        "continue",
        "tasks in flight may finish"
    );
    assert!(matches!(running.outcome(), Some(Outcome::Success(_))));
    assert_eq!(h.answer(3, json!({})), "drained exited=false");

    let mut h = Harness::serving(manifest(1));
    let mut stuck = h.run("stuck", 1);
    h.command(Command::Stop {
        grace: Duration::from_secs(3),
    });
    assert_eq!(h.timer_at_next_deadline().await, "drained exited=false");
    h.inst.interrupt_all();
    assert_eq!(stuck.failure().kind, FailureKind::Interrupted);
    assert_eq!(h.reports(), ["finished stuck ok=false"]);
    // The pool dropping its handle is a stop too; the exit of a draining process ends it.
    let mut h = Harness::serving(manifest(1));
    assert_eq!(h.wake(Wake::Command(None)), "continue");
    assert_eq!(h.written(), ["shutdown 2"]);
    assert!(h
        .inst
        .on_exit(Err(std::io::Error::other("gone")))
        .is_drained());
}

#[tokio::test(start_paused = true)]
async fn an_exit_while_serving_is_a_crash_naming_how() {
    use std::os::unix::process::ExitStatusExt;
    let mut h = Harness::serving(manifest(1));
    let mut task = h.run("t1", 1);
    let step = h.inst.on_exit(Ok(ExitStatus::from_raw(9)));
    let exit = h.bury(step);
    assert!(
        matches!(&exit, ExitReason::Crashed(m) if m.contains("was killed by signal 9 (SIGKILL)")),
        "{exit:?}"
    );
    let failure = task.failure();
    assert_eq!(failure.kind, FailureKind::PluginCrashed);
    assert!(
        failure.message.contains("while running task t1"),
        "{}",
        failure.message
    );
}

impl Step {
    fn is_drained(&self) -> bool {
        matches!(self, Step::Drained { .. })
    }
}

#[tokio::test(start_paused = true)]
async fn answers_written_before_a_crash_still_count_unless_it_broke_the_protocol() {
    let written: &'static [u8] = b"{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":\"done\"}\n\n";
    let mut h = Harness::serving(manifest(2));
    let mut answered = h.run("answered", 1);
    let mut lost = h.run("lost", 1);
    h.stdout = FramedReader::new(written, 1024);
    let step = h.inst.on_exit(Ok(ExitStatus::default()));
    h.bury(step);
    assert!(matches!(answered.outcome(), Some(Outcome::Success(v)) if v == "done"));
    assert_eq!(lost.failure().kind, FailureKind::PluginCrashed);

    let mut h = Harness::serving(manifest(1));
    let mut untrusted = h.run("untrusted", 1);
    h.stdout = FramedReader::new(written, 1024);
    let step = h.wake(Wake::Stdout(Some(StdoutEvent::TooLong { seen: 4096 })));
    assert!(step.ends_with("[violation]"));
    let step = Step::Crash(Crash::violation("too long".into()));
    h.bury(step);
    assert_eq!(untrusted.failure().kind, FailureKind::PluginCrashed);
}

#[tokio::test(start_paused = true)]
async fn a_plugin_that_stops_reading_its_stdin_is_found_out_and_events_give_way_first() {
    let mut h = Harness::serving(manifest(1));
    let capacity = h.inst.out.capacity();
    assert_eq!(capacity, stdin::STDIN_LINES);
    let stats = Arc::new(crate::events::DeliveryStats::default());
    let mut tasks = Vec::new();
    for i in 0..capacity {
        if i == capacity * 3 / 4 {
            let event = Command::Event {
                event: "{}".into(),
                stats: stats.clone(),
            };
            assert_eq!(h.command(event), "continue");
            assert_eq!(
                stats.delivered(),
                0,
                "the last quarter is kept for requests"
            );
        }
        tasks.push(h.run(&format!("t{i}"), 1));
    }
    assert!(!h.inst.stdin_full);
    tasks.push(h.run("one too many", 1));
    assert!(h.inst.stdin_full, "the drive loop ends it as a violation");
    h.written();
    assert!(h.inst.out.is_empty());
}
