//! Every transition of the instance's core, without a process, a runtime or a clock: an
//! [`InstanceCore`] is fed [`Wake`]s at a given time as its shell would, and what it leaves
//! (lines for stdin, effects) is read back as text; a task's outcome and events reach
//! in-memory channels.

mod harness;

use super::*;
use crate::task::{CancelCause, FailureKind};
use harness::{describe, initialize_result, manifest, Harness};
use serde_json::json;

#[test]
fn the_handshake_ends_in_serving_or_says_why_not() {
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
    assert_eq!(h.timer(), "continue", "not yet due");
    let late = h.timer_at_next_deadline();
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

#[test]
fn a_task_runs_and_its_answer_reaches_its_submitter() {
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

#[test]
fn what_the_plugin_breaks_ends_its_process_and_fails_its_tasks() {
    let mut h = Harness::serving(manifest(2));
    let mut culprit = h.run("culprit", 1);
    let mut other = h.run("other", 1);
    let string_id = Message::parse(br#"{"jsonrpc":"2.0","id":"2","result":1}"#).unwrap();
    let step = h.inst.handle(
        Wake::Stdout(Some(StdoutEvent::Message(string_id))),
        h.clock(),
    );
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

#[test]
fn a_cancel_is_sent_once_and_escalates_after_its_grace() {
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
    let step = h.inst.handle(Wake::Timer { cpu_wait: None }, h.clock());
    assert_eq!(describe(step), "continue", "its grace has not passed");
    h.advance(Duration::from_secs(2));
    let step = h.inst.handle(Wake::Timer { cpu_wait: None }, h.clock());
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

#[test]
fn time_limits_cancel_at_the_soft_one_and_kill_at_the_hard_one() {
    let mut m = manifest(2);
    m.timeouts.task_soft = Some(Duration::from_secs(5));
    m.timeouts.task_hard = Some(Duration::from_secs(8));
    let mut h = Harness::serving(m);
    let mut soft = h.run("soft", 1);
    let mut hard = h.run("hard", 1);
    h.written();
    assert_eq!(h.timer_at_next_deadline(), "continue");
    let mut cancels = h.written();
    cancels.sort();
    assert_eq!(cancels, ["task.cancel hard", "task.cancel soft"]);
    assert_eq!(h.error(2, -32001, json!(null)), "continue");
    assert_eq!(soft.failure().exc_type, "SoftTimeLimitExceeded");
    h.advance(Duration::from_secs(3));
    let step = h.inst.handle(Wake::Timer { cpu_wait: None }, h.clock());
    let exit = h.bury(step);
    assert!(matches!(exit, ExitReason::Crashed(m) if m.contains("hard time limit of 8s")));
    assert_eq!(hard.failure().kind, FailureKind::HardTimeLimit);
}

#[test]
fn an_idle_plugin_is_pinged_and_ended_when_it_does_not_answer() {
    let mut h = Harness::serving(manifest(1));
    assert_eq!(h.timer_at_next_deadline(), "continue");
    assert_eq!(h.written(), ["ping 2"]);
    assert_eq!(h.answer(2, json!({})), "continue");
    assert!(h.inst.ping.is_none());
    assert_eq!(h.timer_at_next_deadline(), "continue");
    assert_eq!(h.written(), ["ping 3"]);
    let missed = h.timer_at_next_deadline();
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
    h.advance(Duration::from_secs(3600));
    assert_eq!(h.timer(), "continue");
    assert_eq!(h.written(), Vec::<String>::new());
}

#[test]
fn a_ping_times_out_only_after_the_plugins_last_message() {
    let mut h = Harness::serving(manifest(1));
    h.inst.pings_while_busy = true;
    let _busy = h.run("streaming", 16);
    h.written();
    assert_eq!(h.timer_at_next_deadline(), "continue");
    assert_eq!(h.written(), ["ping 3"]);
    // The answer is queued behind a stream: each message read pushes the timeout back.
    let stream = json!({"jsonrpc": "2.0", "method": "task.stream", "params": {"task_id": "streaming", "items": [1]}});
    for _ in 0..4 {
        h.advance(Duration::from_secs(4));
        assert_eq!(h.line(stream.clone()), "continue");
        assert_eq!(h.timer(), "continue", "4s since the last message");
    }
    h.advance(Duration::from_secs(5));
    assert_eq!(&h.timer()[..29], "crash: failed its health ping");
}

#[test]
fn an_event_its_submitter_has_no_room_for_holds_stdout_back() {
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
    let permit = tx.try_reserve_owned().ok();
    assert_eq!(h.wake(Wake::Room(permit)), "continue");
    assert!(h.inst.held.is_none());
    assert!(matches!(
        slow.events.try_recv().map(|e| *e),
        Ok(TaskEvent::Progress { done: 2, .. })
    ));
}

#[test]
fn a_stop_drains_then_ends_on_the_answer_or_the_deadline() {
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
    assert_eq!(h.timer_at_next_deadline(), "drained exited=false");
    h.inst.interrupt_all();
    h.carry_out();
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

#[test]
fn an_exit_while_serving_is_a_crash_naming_how() {
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

#[test]
fn answers_written_before_a_crash_still_count_unless_it_broke_the_protocol() {
    let written = [json!({"jsonrpc": "2.0", "id": 2, "result": "done"})];
    let mut h = Harness::serving(manifest(2));
    let mut answered = h.run("answered", 1);
    let mut lost = h.run("lost", 1);
    let step = h.inst.on_exit(Ok(ExitStatus::default()));
    h.bury_with(step, &written);
    assert!(matches!(answered.outcome(), Some(Outcome::Success(v)) if v == "done"));
    assert_eq!(lost.failure().kind, FailureKind::PluginCrashed);

    let mut h = Harness::serving(manifest(1));
    let mut untrusted = h.run("untrusted", 1);
    let step = h.wake(Wake::Stdout(Some(StdoutEvent::TooLong { seen: 4096 })));
    assert!(step.ends_with("[violation]"));
    let step = Step::Crash(Crash::violation("too long".into()));
    h.bury_with(step, &written);
    assert_eq!(untrusted.failure().kind, FailureKind::PluginCrashed);
}

#[test]
fn a_plugin_that_stops_reading_its_stdin_is_found_out_and_events_give_way_first() {
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

#[test]
fn stdin_takes_what_the_pipe_took_and_lines_from_outside() {
    let mut h = Harness::serving(manifest(2));
    let _a = h.run("a", 1);
    let pending = h.inst.out.pending().len();
    assert_eq!(h.wake(Wake::Written(Ok(10))), "continue");
    assert_eq!(h.inst.out.pending().len(), pending - 10, "a part written");
    let offer_answer = br#"{"jsonrpc":"2.0","id":"o1","result":{"state":"SUCCESS"}}"#;
    let line = [&offer_answer[..], b"\n"].concat();
    assert_eq!(h.wake(Wake::Late(Some(line))), "continue");
    assert!(h.inst.out.pending().ends_with(b"\"SUCCESS\"}}\n"));
    assert_eq!(
        h.wake(Wake::Written(Err(std::io::ErrorKind::BrokenPipe.into()))),
        "continue"
    );
    assert!(
        h.inst.out.is_empty(),
        "a pipe that is gone takes nothing more"
    );
    assert_eq!(h.wake(Wake::Late(None)), "continue");
}

#[test]
fn the_end_of_stdout_is_a_crash_or_a_drain_by_phase_and_exit() {
    use std::os::unix::process::ExitStatusExt;
    let killed = Ok(ExitStatus::from_raw(9));
    let h = Harness::new(manifest(1));
    let step = describe(h.inst.stdout_closed(Some(&killed)));
    assert_eq!(
        step,
        "crash: was killed by signal 9 (SIGKILL) before answering `initialize`"
    );
    let mut h = Harness::serving(manifest(1));
    assert_eq!(
        describe(h.inst.stdout_closed(None)),
        "crash: closed its stdout"
    );
    h.command(Command::Stop {
        grace: Duration::from_secs(1),
    });
    assert_eq!(
        describe(h.inst.stdout_closed(Some(&killed))),
        "drained exited=true"
    );
    assert_eq!(describe(h.inst.stdout_closed(None)), "drained exited=false");
}

#[test]
fn a_missed_ping_waits_as_long_as_the_process_waited_for_a_cpu() {
    let mut h = Harness::serving(manifest(1));
    h.advance(Duration::from_secs(30));
    let sent_at = Some(Duration::from_millis(100));
    assert_eq!(h.wake(Wake::Timer { cpu_wait: sent_at }), "continue");
    assert_eq!(h.written(), ["ping 2"]);
    h.advance(Duration::from_secs(5));
    let starved = Some(Duration::from_millis(2100));
    assert_eq!(
        h.wake(Wake::Timer { cpu_wait: starved }),
        "continue",
        "it waited 2s for a CPU: not hung"
    );
    assert_eq!(h.inst.next_deadline(), Some(h.now + Duration::from_secs(2)));
    h.advance(Duration::from_secs(2));
    let a_little = Some(Duration::from_micros(2_100_500));
    let missed = h.wake(Wake::Timer { cpu_wait: a_little });
    assert!(
        missed.starts_with("crash: failed its health ping"),
        "less than MIN_STARVED more: {missed}"
    );
}

#[test]
fn a_lone_task_that_asked_for_its_log_gets_its_stderr_and_log_records() {
    let mut h = Harness::serving(manifest(2));
    let mut logged = h.run_logged("logged", 4, true);
    assert_eq!(h.follows_log, [true], "alone and asking: followed");
    let _other = h.run("other", 1);
    assert_eq!(
        h.follows_log,
        [true, false],
        "two at once cannot be told apart"
    );
    let log = |task: &str| json!({"jsonrpc": "2.0", "method": "log", "params": {"level": "info", "message": "hi", "fields": {"task_id": task}}});
    assert_eq!(h.line(log("logged")), "continue");
    assert_eq!(h.line(log("other")), "continue", "did not ask: log only");
    assert!(matches!(
        logged.events.try_recv().map(|e| *e),
        Ok(TaskEvent::Log { line }) if line == "hi"
    ));
    assert!(logged.events.try_recv().is_err());
    assert_eq!(h.answer(3, json!(null)), "continue");
    assert_eq!(h.follows_log, [true, false, true], "alone again");
    assert_eq!(h.answer(2, json!(null)), "continue");
    assert_eq!(h.follows_log, [true, false, true, false]);
    let _quiet = h.run("quiet", 1);
    assert_eq!(
        h.follows_log.len(),
        4,
        "nothing followed, nothing asked: left alone"
    );
}

#[test]
fn an_offer_is_handed_on_within_its_window_or_answered_at_once() {
    let offer = |id: &str, task: &str| json!({"jsonrpc": "2.0", "id": id, "method": "task.offer", "params": {"task_id": task, "task": "t"}});
    let mut h = Harness::serving(manifest(1));
    assert_eq!(h.line(offer("o1", "a")), "continue");
    assert_eq!(h.written(), ["response"], "not a queue backend");
    assert!(h.inst.out.is_empty() && h.offered.is_empty());

    let mut m = manifest(1);
    m.backends.queue_backend = Some(crate::manifest::QueueBackend { window: 1 });
    let mut h = Harness::serving(m);
    assert_eq!(h.line(offer("o1", "a")), "continue");
    assert_eq!(h.offered, ["a"], "handed on");
    assert!(h.written().is_empty());
    // The shell's reply holds the window place until the offer is answered.
    let place = h.inst.offers_out.clone();
    place.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(h.line(offer("o2", "b")), "continue");
    let refused = h.inst.out.pending().to_vec();
    assert!(
        String::from_utf8_lossy(&refused).contains("window full"),
        "{}",
        String::from_utf8_lossy(&refused)
    );
    h.written();
    let bad =
        json!({"jsonrpc": "2.0", "id": "o3", "method": "task.offer", "params": {"task_id": ""}});
    assert_eq!(h.line(bad), "continue");
    assert!(String::from_utf8_lossy(h.inst.out.pending()).contains("-32602"));
    h.written();
    // Nothing took it: answered "not run" and counted.
    let not_taken = crate::supervisor::offer::not_taken("a", "plugin_unavailable", "none");
    assert_eq!(
        h.wake(Wake::OfferNotTaken(Id::Str("o1".into()), not_taken)),
        "continue"
    );
    assert!(String::from_utf8_lossy(h.inst.out.pending()).contains("not run"));
    let stats = h.inst.spec.offers.stats.of("p");
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        (count(&stats.offers_not_taken), count(&stats.offers_refused)),
        (1, 2)
    );
    // A stopping instance takes no offer.
    h.written();
    h.command(Command::Stop {
        grace: Duration::from_secs(1),
    });
    h.written();
    place.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(h.line(offer("o4", "c")), "continue");
    assert_eq!(h.offered, ["a"]);
    assert!(String::from_utf8_lossy(h.inst.out.pending()).contains("the plugin is stopping"));
}
