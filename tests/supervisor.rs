//! The supervisor with real child processes: handshakes, routing, crashes, restarts, limits,
//! cancellation and stopping. Misbehaviour comes from tests/plugins/faulty.py.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};
use worker::supervisor::status::{InstanceState, PluginState};
use worker::task::{CancelCause, Cancellation, FailureKind, TaskEvent, TaskRequest};

const FAST_RESTARTS: &str =
    "[restart]\nmax_restarts = 2\nbackoff_initial = 0.01\nbackoff_max = 0.05\n";

#[tokio::test]
async fn handshake_succeeds_and_tasks_run() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(root.path(), "faulty", &[], "", "")]);
    h.ready().await;
    assert_eq!(
        &h.ok("f.ok", vec![json!(1), json!("two")]).await,
        &json!([1, "two"])
    );
    let s = h.status("faulty").await;
    assert_eq!(s.state, PluginState::Running);
    assert_eq!(s.instances[0].state, InstanceState::Ready);
    assert_eq!(s.instances[0].done, 1);
    h.stop().await;
}

async fn failed_reason(env: &[(&str, &str)], tables: &str) -> String {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(root.path(), "faulty", env, "", tables)]);
    let s = h
        .wait_status("faulty", "the failed state", |s| {
            matches!(s.state, PluginState::Failed(_))
        })
        .await;
    // A task for a failed plugin fails fast, naming the reason.
    let started = Instant::now();
    let f = h.fails("f.ok", vec![]).await;
    let f = &f;
    assert_eq!(f.kind, FailureKind::PluginUnavailable);
    assert!(started.elapsed() < Duration::from_secs(2));
    h.stop().await;
    let PluginState::Failed(reason) = s.state else {
        unreachable!()
    };
    assert!(f.message.contains(&reason), "{} / {reason}", f.message);
    reason
}

#[tokio::test]
async fn handshake_failure_exit_before_reply() {
    let reason = failed_reason(&[("FAULT_HANDSHAKE", "exit")], FAST_RESTARTS).await;
    assert!(
        reason.contains("exited with status 3 before answering `initialize`"),
        "{reason}"
    );
    assert!(
        reason.contains("refusing to start"),
        "stderr is quoted: {reason}"
    );
    assert!(reason.contains("restarted 2 times"), "{reason}");
}

#[tokio::test]
async fn handshake_failure_init_timeout() {
    let tables = format!("[timeouts]\ninit = 0.3\n{FAST_RESTARTS}");
    let reason = failed_reason(&[("FAULT_HANDSHAKE", "hang")], &tables).await;
    assert!(
        reason.contains("did not answer `initialize` within the init timeout"),
        "{reason}"
    );
}

#[tokio::test]
async fn handshake_failure_version_mismatch_is_not_retried() {
    let reason = failed_reason(&[("FAULT_HANDSHAKE", "version")], "").await;
    let expected = format!(
        "speaks protocol version 2.0 but this worker speaks {}",
        plugin_protocol::PROTOCOL_VERSION
    );
    assert!(reason.contains(&expected), "{reason}");
}

#[tokio::test]
async fn handshake_failure_undeclared_task() {
    let reason = failed_reason(&[("FAULT_HANDSHAKE", "extra_task")], "").await;
    assert!(
        reason.contains("f.undeclared") && reason.contains("does not declare"),
        "{reason}"
    );
}

#[tokio::test]
async fn handshake_failure_missing_program() {
    let root = tempfile::tempdir().unwrap();
    let dir = faulty_plugin(root.path(), "faulty", &[], "", FAST_RESTARTS);
    let text = std::fs::read_to_string(dir.join("plugin.toml"))
        .unwrap()
        .replace("/usr/bin/python3", "./no-such-binary");
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
    let h = Harness::start(&[dir]);
    let s = h
        .wait_status("faulty", "failed", |s| {
            matches!(s.state, PluginState::Failed(_))
        })
        .await;
    let PluginState::Failed(reason) = s.state else {
        unreachable!()
    };
    assert!(
        reason.contains("could not start") && reason.contains("no-such-binary"),
        "{reason}"
    );
    h.stop().await;
}

#[tokio::test]
async fn concurrent_tasks_spread_over_instances() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[],
        "instances = 3\nconcurrency = 2",
        "",
    )]);
    h.ready().await;
    h.wait_status("faulty", "3 ready instances", |s| {
        s.instances.iter().all(|i| i.state == InstanceState::Ready)
    })
    .await;
    let tasks: Vec<_> = (0..6)
        .map(|_| h.spawn("f.sleep", vec![json!(30)]))
        .collect();
    let s = h
        .wait_status("faulty", "6 tasks in flight", |s| {
            s.instances.iter().map(|i| i.in_flight).sum::<usize>() == 6
        })
        .await;
    assert!(
        s.instances.iter().all(|i| i.in_flight == 2),
        "least-loaded routing: {:?}",
        s.instances
    );
    // A seventh task waits in the queue.
    let (queued_id, queued) = h.spawn("f.ok", vec![json!("queued")]);
    h.wait_status("faulty", "one queued", |s| s.queued == 1)
        .await;
    for (id, _) in &tasks {
        assert!(
            h.dispatcher
                .cancel(id, Cancellation::requested("test done"))
                .await
        );
    }
    for (_, t) in tasks {
        assert_eq!(
            failure(&t.await.unwrap()).kind,
            FailureKind::Cancelled(CancelCause::Requested)
        );
    }
    assert_eq!(
        success(&queued.await.unwrap()),
        &json!(["queued"]),
        "{queued_id}"
    );
    h.stop().await;
}

#[tokio::test]
async fn sigkill_one_instance_disturbs_nothing_else() {
    let root = tempfile::tempdir().unwrap();
    let faulty = faulty_plugin(
        root.path(),
        "faulty",
        &[],
        "instances = 2\nconcurrency = 4\nmax_attempts = 3",
        "",
    );
    let rust = rust_plugin(root.path(), "instances = 1\nconcurrency = 4");
    let h = Harness::start(&[faulty, rust]);
    h.ready().await;
    h.wait_status("faulty", "2 ready", |s| {
        s.instances.iter().all(|i| i.state == InstanceState::Ready)
    })
    .await;

    let sleepers: Vec<_> = (0..4)
        .map(|_| h.spawn("f.sleep", vec![json!(1.5)]))
        .collect();
    let counters: Vec<_> = (0..3)
        .map(|_| h.spawn("rust.count", vec![json!(20), json!(50)]))
        .collect();
    let before = h
        .wait_status("faulty", "4 in flight on 2 instances", |s| {
            s.instances.iter().all(|i| i.in_flight == 2)
        })
        .await;
    let victim = before.instances[0].pid.unwrap();
    let survivor = before.instances[1].pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    for (_, t) in sleepers {
        assert_eq!(
            success(&t.await.unwrap()),
            &json!("slept"),
            "killed tasks are retried and succeed"
        );
    }
    for (_, t) in counters {
        assert_eq!(
            success(&t.await.unwrap()),
            &json!(20),
            "the other plugin is undisturbed"
        );
    }
    let after = h
        .wait_status("faulty", "instance back", |s| {
            s.instances[0].state == InstanceState::Ready
        })
        .await;
    assert_eq!(after.instances[0].restarts, 1);
    assert_ne!(after.instances[0].pid, Some(victim));
    assert_eq!(
        after.instances[1].pid,
        Some(survivor),
        "the other instance was not restarted"
    );
    assert_eq!(after.instances[1].restarts, 0);
    let exit = after.instances[0].last_exit.as_deref().unwrap();
    assert!(exit.contains("was killed by signal 9 (SIGKILL)"), "{exit}");
    assert_eq!(h.status("rust-echo").await.instances[0].restarts, 0);
    h.stop().await;
}

#[tokio::test]
async fn crash_without_retries_fails_with_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[],
        "max_attempts = 1",
        "",
    )]);
    h.ready().await;
    let f = h.fails("f.crash", vec![]).await;
    let f = &f;
    assert_eq!(f.kind, FailureKind::PluginCrashed);
    assert_eq!(f.exc_type, "PluginCrashed");
    for part in [
        "plugin `faulty` instance 0",
        "was killed by signal 9 (SIGKILL)",
        "while running task",
        "about to crash on purpose",
        "gave up after 1 attempt",
    ] {
        assert!(
            f.message.contains(part),
            "missing {part:?} in {}",
            f.message
        );
    }
    h.wait_status("faulty", "restarted", |s| {
        s.instances[0].state == InstanceState::Ready && s.instances[0].restarts == 1
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn crashed_task_is_retried_on_a_fresh_process() {
    let root = tempfile::tempdir().unwrap();
    let marker = root.path().join("crashed-once");
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[],
        "max_attempts = 2",
        "",
    )]);
    h.ready().await;
    let (outcome, events) = h
        .run("f.crash_once", vec![json!(marker.to_str().unwrap())])
        .await;
    assert_eq!(success(&outcome), &json!("survived"));
    assert!(marker.exists());
    // The submitter hears of the rerun on the task's own stream, as data.
    match &events[..] {
        [worker::task::TaskEvent::Retrying { attempt: 1, reason }] => {
            assert!(!reason.is_empty(), "the reason is given")
        }
        other => panic!("one Retrying event for attempt 1, got {other:?}"),
    }
    h.stop().await;
}

#[tokio::test]
async fn poison_task_stops_at_the_attempt_limit() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[],
        "max_attempts = 3",
        "[restart]\nmax_restarts = 10\n",
    )]);
    h.ready().await;
    let f = h.fails("f.exit", vec![json!(9)]).await;
    let f = &f;
    assert!(
        f.message.contains("exited with status 9") && f.message.contains("gave up after 3 attempt"),
        "{}",
        f.message
    );
    let s = h
        .wait_status("faulty", "ready again", |s| {
            s.instances[0].state == InstanceState::Ready
        })
        .await;
    assert_eq!(s.instances[0].restarts, 3);
    h.stop().await;
}

#[tokio::test]
async fn restart_storm_reaches_failed_state() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[],
        "max_attempts = 1",
        "[restart]\nmax_restarts = 3\nwindow = 60\nbackoff_initial = 0.01\nbackoff_max = 0.02\n",
    )]);
    h.ready().await;
    for _ in 0..4 {
        h.wait_all_ready("faulty").await;
        assert_eq!(
            h.fails("f.crash", vec![]).await.kind,
            FailureKind::PluginCrashed
        );
    }
    let s = h
        .wait_status("faulty", "failed", |s| {
            matches!(s.state, PluginState::Failed(_))
        })
        .await;
    let PluginState::Failed(reason) = &s.state else {
        unreachable!()
    };
    assert!(reason.contains("restarted 3 times within 60s"), "{reason}");
    assert_eq!(s.instances[0].state, InstanceState::Failed);
    assert_eq!(
        h.fails("f.ok", vec![]).await.kind,
        FailureKind::PluginUnavailable
    );
    h.stop().await;
}

#[tokio::test]
async fn hung_plugin_is_caught_by_ping() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[("FAULT_PING", "hang")],
        "",
        "[timeouts]\nping_interval = 0.2\nping_timeout = 0.3\n",
    )]);
    h.ready().await;
    let s = h
        .wait_status("faulty", "a restart after a missed ping", |s| {
            s.instances[0].restarts >= 1
        })
        .await;
    let exit = s.instances[0].last_exit.as_deref().unwrap();
    assert!(exit.contains("failed its health ping"), "{exit}");
    h.stop().await;
}

#[tokio::test]
async fn non_json_stdout_is_logged_and_counted_never_fatal() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[("FAULT_GARBAGE", "1")],
        "",
        "",
    )]);
    h.ready().await;
    assert_eq!(&h.ok("f.garbage", vec![]).await, &json!("ok"));
    let s = h.status("faulty").await;
    assert_eq!(s.instances[0].stray_stdout_lines, 3);
    assert_eq!(s.instances[0].restarts, 0);
    h.stop().await;
}

#[tokio::test]
async fn over_long_stdout_line_is_a_protocol_violation() {
    let root = tempfile::tempdir().unwrap();
    let dir = faulty_plugin(root.path(), "faulty", &[], "max_attempts = 1", "");
    let mut opts = options();
    opts.max_line_bytes = 64 * 1024;
    let h = Harness::start_with(&[dir], opts);
    h.ready().await;
    let f = h.fails("f.huge", vec![json!(200_000)]).await;
    let f = &f;
    assert!(
        f.message.contains("broke the protocol") && f.message.contains("65536"),
        "{}",
        f.message
    );
    let s = h
        .wait_status("faulty", "restarted", |s| {
            s.instances[0].state == InstanceState::Ready
        })
        .await;
    assert_eq!(s.instances[0].restarts, 1);
    h.ok("f.ok", vec![]).await;
    h.stop().await;
}

#[tokio::test]
async fn plugin_ignoring_sigterm_is_killed_on_stop() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[("FAULT_TERM", "ignore")],
        "",
        "[timeouts]\nshutdown_grace = 0.2\n",
    )]);
    h.ready().await;
    let pid = h.status("faulty").await.instances[0].pid.unwrap();
    h.stop().await;
    assert!(
        wait_gone(pid, Duration::from_secs(5)).await,
        "pid {pid} still alive"
    );
}

#[tokio::test]
async fn forked_grandchild_is_gone_after_stop() {
    let root = tempfile::tempdir().unwrap();
    let pidfile = root.path().join("grandchild.pid");
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[("FAULT_FORK", pidfile.to_str().unwrap())],
        "",
        "",
    )]);
    h.ready().await;
    let grandchild: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!process_gone(grandchild));
    h.stop().await;
    assert!(
        wait_gone(grandchild, Duration::from_secs(5)).await,
        "grandchild {grandchild} survived the stop"
    );
}

#[tokio::test]
async fn soft_time_limit_cancels_the_task() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[],
        "",
        "[timeouts]\ntask_soft = 0.2\n",
    )]);
    h.ready().await;
    let pid = h.status("faulty").await.instances[0].pid;
    let f = h.fails("f.sleep", vec![json!(30)]).await;
    let f = &f;
    assert_eq!(f.kind, FailureKind::SoftTimeLimit);
    assert_eq!(f.exc_type, "SoftTimeLimitExceeded");
    assert_eq!(
        h.status("faulty").await.instances[0].pid,
        pid,
        "a soft limit does not kill the process"
    );
    h.stop().await;
}

#[tokio::test]
async fn hard_time_limit_kills_the_process_and_retries_its_other_tasks() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[],
        "concurrency = 2\nmax_attempts = 2",
        "",
    )]);
    h.ready().await;
    let (_, bystander) = h.spawn("f.sleep", vec![json!(1.0)]);
    h.wait_status("faulty", "bystander running", |s| {
        s.instances[0].in_flight == 1
    })
    .await;
    let mut request = TaskRequest::new("f.sleep_nocancel", vec![json!(30)], Default::default());
    request.hard_time_limit = Some(Duration::from_millis(300));
    let (outcome, _) = h.run_request(request).await;
    let f = failure(&outcome);
    assert_eq!(f.kind, FailureKind::HardTimeLimit);
    assert_eq!(f.exc_type, "TimeLimitExceeded");
    assert_eq!(
        success(&bystander.await.unwrap()),
        &json!("slept"),
        "the other task was retried"
    );
    let s = h
        .wait_status("faulty", "restarted", |s| {
            s.instances[0].state == InstanceState::Ready
        })
        .await;
    assert!(s.instances[0]
        .last_exit
        .as_deref()
        .unwrap()
        .contains("hard time limit"));
    h.stop().await;
}

#[tokio::test]
async fn cancel_running_queued_and_stubborn_tasks() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[],
        "concurrency = 1",
        "[timeouts]\ncancel_grace = 0.3\n",
    )]);
    h.ready().await;
    // Running and cooperative: ends with Cancelled, process kept.
    let (running, t1) = h.spawn("f.sleep", vec![json!(30)]);
    h.wait_status("faulty", "running", |s| s.instances[0].in_flight == 1)
        .await;
    // Queued behind it: dropped from the queue.
    let (queued, t2) = h.spawn("f.ok", vec![]);
    h.wait_status("faulty", "queued", |s| s.queued == 1).await;
    assert!(
        h.dispatcher
            .cancel(&queued, Cancellation::requested("not needed"))
            .await
    );
    assert_eq!(
        failure(&t2.await.unwrap()).kind,
        FailureKind::Cancelled(CancelCause::Requested)
    );
    let pid = h.status("faulty").await.instances[0].pid;
    assert!(
        h.dispatcher
            .cancel(&running, Cancellation::requested("user asked"))
            .await
    );
    let f = t1.await.unwrap();
    assert_eq!(
        failure(&f).kind,
        FailureKind::Cancelled(CancelCause::Requested)
    );
    assert!(failure(&f).message.contains("user asked"));
    assert_eq!(h.status("faulty").await.instances[0].pid, pid);
    // Stubborn: ignores task.cancel, so the process is killed after cancel_grace.
    let (stubborn, t3) = h.spawn("f.sleep_nocancel", vec![json!(30)]);
    h.wait_status("faulty", "stubborn running", |s| {
        s.instances[0].in_flight == 1
    })
    .await;
    assert!(
        h.dispatcher
            .cancel(&stubborn, Cancellation::requested("really"))
            .await
    );
    let f = t3.await.unwrap();
    assert_eq!(
        failure(&f).kind,
        FailureKind::Cancelled(CancelCause::Requested)
    );
    assert!(
        failure(&f).message.contains("killed"),
        "{}",
        failure(&f).message
    );
    assert!(
        !h.dispatcher
            .cancel("no-such-task", Cancellation::requested("x"))
            .await
    );
    h.stop().await;
}

#[tokio::test]
async fn progress_and_stream_arrive_in_order_before_the_result() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(root.path(), "faulty", &[], "", "")]);
    h.ready().await;
    let (outcome, events) = h.run("f.progress", vec![]).await;
    assert_eq!(success(&outcome), &json!("done"));
    assert_eq!(
        events,
        vec![
            TaskEvent::Progress {
                done: 1,
                total: Some(2),
                message: Some("half".into())
            },
            TaskEvent::Stream {
                items: vec![json!("a"), json!("b")]
            },
            TaskEvent::Stream {
                items: vec![json!("c")]
            },
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn task_errors_unknown_tasks_and_full_queues_are_explicit() {
    let root = tempfile::tempdir().unwrap();
    let mut opts = options();
    opts.queue_capacity = 1;
    let h = Harness::start_with(
        &[faulty_plugin(
            root.path(),
            "faulty",
            &[],
            "concurrency = 1",
            "",
        )],
        opts,
    );
    h.ready().await;
    let f = h.fails("f.raise", vec![json!(3)]).await;
    let f = &f;
    assert_eq!(
        (f.exc_type.as_str(), f.kind),
        ("ValueError", FailureKind::Raised { retryable: false })
    );
    assert_eq!(f.message, "bad value: [3]");
    assert_eq!(
        h.fails("no.such.task", vec![]).await.kind,
        FailureKind::NotRegistered
    );

    let (running, t1) = h.spawn("f.sleep", vec![json!(30)]);
    h.wait_status("faulty", "running", |s| s.instances[0].in_flight == 1)
        .await;
    let (queued, t2) = h.spawn("f.ok", vec![]);
    h.wait_status("faulty", "queued", |s| s.queued == 1).await;
    assert_eq!(h.fails("f.ok", vec![]).await.kind, FailureKind::QueueFull);
    h.dispatcher
        .cancel(&running, Cancellation::requested("done"))
        .await;
    t1.await.unwrap();
    success(&t2.await.unwrap());
    let _ = queued;
    h.stop().await;
}

#[tokio::test]
async fn stop_drains_in_flight_tasks_within_grace() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(
        root.path(),
        "faulty",
        &[],
        "concurrency = 2",
        "[timeouts]\nshutdown_grace = 10\n",
    )]);
    h.ready().await;
    let (_, t) = h.spawn("f.sleep", vec![json!(0.5)]);
    h.wait_status("faulty", "running", |s| s.instances[0].in_flight == 1)
        .await;
    h.stop().await;
    assert_eq!(
        success(&t.await.unwrap()),
        &json!("slept"),
        "shutdown lets the task finish"
    );
    assert_eq!(
        h.fails("f.ok", vec![]).await.kind,
        FailureKind::PluginUnavailable
    );
}

#[tokio::test]
async fn instances_grow_shrink_and_autoscale_while_tasks_run() {
    use worker::supervisor::pool::Scale;
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(root.path(), "faulty", &[], "", "")]);
    h.ready().await;
    let pool = h.supervisor.plugin("faulty").unwrap();

    // Grow: two more instances start and take tasks.
    assert_eq!(pool.scale(Scale::By(2)).await, Ok(3));
    let s = h
        .wait_status("faulty", "3 ready", |s| {
            s.instances.len() == 3 && s.instances.iter().all(|i| i.state == InstanceState::Ready)
        })
        .await;
    let pids: Vec<u32> = s.instances.iter().filter_map(|i| i.pid).collect();
    let tasks: Vec<_> = (0..3)
        .map(|_| h.spawn("f.sleep", vec![json!(30)]))
        .collect();
    h.wait_status("faulty", "one task on each", |s| {
        s.instances.iter().all(|i| i.in_flight == 1)
    })
    .await;

    // Shrink: the two highest retire; each finishes its task before its process stops.
    assert_eq!(pool.scale(Scale::By(-2)).await, Ok(1));
    let s = h.status("faulty").await;
    assert_eq!(
        s.instances.len(),
        3,
        "retiring instances are shown until they end"
    );
    assert_eq!(s.instances[1].state, InstanceState::Stopping);
    assert_eq!(s.instances[1].in_flight, 1, "its task is not interrupted");
    for (id, _) in &tasks {
        assert!(
            h.dispatcher
                .cancel(id, Cancellation::requested("test done"))
                .await
        );
    }
    for (_, t) in tasks {
        assert_eq!(
            failure(&t.await.unwrap()).kind,
            FailureKind::Cancelled(CancelCause::Requested),
            "ended as the cancel says, not interrupted"
        );
    }
    let s = h
        .wait_status("faulty", "one instance left", |s| s.instances.len() == 1)
        .await;
    assert_eq!(
        s.instances[0].pid,
        Some(pids[0]),
        "the first instance stays"
    );
    for pid in &pids[1..] {
        assert!(
            wait_gone(*pid, Duration::from_secs(10)).await,
            "retired pid {pid} ended"
        );
    }
    assert_eq!(pool.scale(Scale::By(-5)).await, Ok(1), "never below one");

    // Autoscale: tasks waiting with every instance busy bring instances up to the maximum;
    // pool_grow is refused meanwhile, as in Celery.
    assert_eq!(pool.scale(Scale::Auto { min: 1, max: 3 }).await, Ok(1));
    assert!(pool.scale(Scale::By(1)).await.is_err());
    let tasks: Vec<_> = (0..6)
        .map(|_| h.spawn("f.sleep", vec![json!(30)]))
        .collect();
    h.wait_status("faulty", "autoscaled to 3 busy instances", |s| {
        s.instances.len() == 3 && s.instances.iter().all(|i| i.in_flight == 1)
    })
    .await;
    for (id, _) in &tasks {
        h.dispatcher
            .cancel(id, Cancellation::requested("test done"))
            .await;
    }
    h.stop().await;
}
