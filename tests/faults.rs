//! Every task answered exactly once when a plugin breaks the protocol, blocks, crashes or is
//! replaced under it, and a failed plugin that comes back. Real child processes; misbehaviour
//! from tests/plugins/faulty.py.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;
use worker::dispatch::TaskUpdate;
use worker::supervisor::status::{InstanceState, PluginState};
use worker::task::{FailureKind, Outcome, TaskEvent, TaskRequest};

const FAST_RESTARTS: &str =
    "[restart]\nmax_restarts = 2\nbackoff_initial = 0.01\nbackoff_max = 0.05\n";

#[tokio::test]
async fn a_string_id_is_a_protocol_violation_that_says_how_to_fix_it() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(root.path(), "faulty", &[], "", "")]);
    h.ready().await;
    // Before: the response was ignored and the task waited forever.
    let f = h.fails("f.string_id", vec![]).await;
    let f = &f;
    assert_eq!(
        (f.exc_type.as_str(), f.kind),
        (
            "ProtocolViolation",
            FailureKind::Raised { retryable: false }
        )
    );
    assert!(
        f.message.contains("answered task.run with id \"")
            && f.message
                .contains("(a string); echo the request's id unchanged, same JSON type"),
        "{}",
        f.message
    );
    let s = h
        .wait_status("faulty", "restarted after the violation", |s| {
            s.instances[0].restarts == 1 && s.instances[0].state == InstanceState::Ready
        })
        .await;
    assert!(s.instances[0]
        .last_exit
        .as_deref()
        .unwrap()
        .contains("broke the protocol"));
    h.ok("f.ok", vec![]).await;
    h.stop().await;
}

#[tokio::test]
async fn invalid_utf8_in_a_response_is_decoded_lossily() {
    let root = tempfile::tempdir().unwrap();
    let h = Harness::start(&[faulty_plugin(root.path(), "faulty", &[], "", "")]);
    h.ready().await;
    // Before: the line counted as garbage and the task waited forever.
    assert_eq!(&h.ok("f.bad_utf8", vec![]).await, &json!("caf\u{FFFD}("));
    assert_eq!(h.status("faulty").await.instances[0].stray_stdout_lines, 0);
    h.stop().await;
}

#[tokio::test]
async fn nothing_written_after_an_over_long_line_is_accepted() {
    let root = tempfile::tempdir().unwrap();
    let dir = faulty_plugin(root.path(), "faulty", &[], "max_attempts = 1", "");
    let mut opts = options();
    opts.max_line_bytes = 64 * 1024;
    let h = Harness::start_with(&[dir], opts);
    h.ready().await;
    // The answer right behind the violation must never become the task's result.
    for _ in 0..5 {
        let f = h.fails("f.huge_then_answer", vec![json!(200_000)]).await;
        let f = &f;
        assert!(f.message.contains("broke the protocol"), "{}", f.message);
        h.wait_all_ready("faulty").await;
    }
    h.stop().await;
}

#[tokio::test]
async fn a_blocking_plugin_runs_a_task_longer_than_the_default_ping_deadline() {
    let root = tempfile::tempdir().unwrap();
    // Default timeouts: ping every 10 s, 5 s to answer. A plugin that reads nothing while it
    // runs a task used to be killed as hung about 15 s in.
    let h = Harness::start(&[faulty_plugin(root.path(), "faulty", &[], "", "")]);
    h.ready().await;
    assert_eq!(
        &h.ok("f.block", vec![json!(20.0)]).await,
        &json!("unblocked")
    );
    let s = h.status("faulty").await;
    assert_eq!(s.instances[0].restarts, 0);
    h.stop().await;
}

#[tokio::test]
async fn busy_pings_apply_only_to_plugins_that_declare_them() {
    let root = tempfile::tempdir().unwrap();
    let pings = "[timeouts]\nping_interval = 0.2\nping_timeout = 0.3\n";
    let quiet = faulty_plugin(root.path(), "quiet", &[], "max_attempts = 1", pings);
    let busy = faulty_plugin(
        root.path(),
        "busy",
        &[("FAULT_CAPS", "ping_while_busy")],
        "max_attempts = 1",
        pings,
    );
    let h = Harness::start(&[quiet]);
    h.ready().await;
    // Not declared: never pinged while busy, so a task 10 ping deadlines long ends well.
    assert_eq!(
        &h.ok("f.block", vec![json!(5.0)]).await,
        &json!("unblocked")
    );
    assert_eq!(h.status("quiet").await.instances[0].restarts, 0);
    h.stop().await;

    // Declared: held to it, so the same blocking task is caught as hung.
    let h = Harness::start(&[busy]);
    h.ready().await;
    let f = h.fails("f.block", vec![json!(5.0)]).await;
    let f = &f;
    assert!(
        f.message.contains("failed its health ping"),
        "{}",
        f.message
    );
    h.stop().await;
}

#[tokio::test]
async fn a_task_interrupted_by_a_replacement_spends_no_attempt() {
    let root = tempfile::tempdir().unwrap();
    let dir = faulty_plugin(root.path(), "faulty", &[], "max_attempts = 1", "");
    let h = Harness::start(std::slice::from_ref(&dir));
    h.ready().await;
    let (_, task) = h.spawn("f.sleep_nocancel", vec![json!(1.0)]);
    h.wait_status("faulty", "the task running", |s| {
        s.instances[0].in_flight == 1
    })
    .await;
    // A changed manifest replaces the plugin; no drain time, so the old instance is stopped
    // under the task. Before: that counted as its one attempt and it failed PluginCrashed.
    let text = std::fs::read_to_string(dir.join("plugin.toml")).unwrap();
    std::fs::write(
        dir.join("plugin.toml"),
        text.replace("[env]\n", "[env]\nFAULT_TAG = \"v2\"\n"),
    )
    .unwrap();
    let manifest = worker::manifest::Manifest::load(&dir).unwrap();
    let report = h
        .supervisor
        .reload(vec![manifest], Duration::ZERO, false)
        .await;
    assert_eq!(report.replaced, vec!["faulty".to_string()]);
    let outcome = within(Duration::from_secs(30), task).await.unwrap();
    assert_eq!(success(&outcome), &json!("slept"));
    h.stop().await;
}

/// A task that asks for its log (a Girder job's) gets its lone process's stderr lines and the
/// `log` records naming it; one that does not ask gets none.
#[tokio::test]
async fn a_task_that_asks_for_its_log_gets_its_stderr_and_log_records() {
    let root = tempfile::tempdir().unwrap();
    let dir = faulty_plugin(root.path(), "faulty", &[], "", "");
    let h = Harness::start(&[dir]);
    h.ready().await;
    let mut request = TaskRequest::new("f.stderr_wait", vec![json!(2)], Default::default());
    request.capture_log = true;
    let id = request.id.clone();
    let mut run = h.dispatcher.submit(request);
    let mut lines = Vec::new();
    while lines.len() < 3 {
        match within(Duration::from_secs(30), run.next()).await {
            Some(TaskUpdate::Event(TaskEvent::Log { line })) => lines.push(line),
            other => panic!("expected log lines, got {other:?} after {lines:?}"),
        }
    }
    lines.sort();
    assert_eq!(lines, ["noted", "stderr line 0", "stderr line 1"]);
    assert!(
        h.dispatcher
            .cancel(&id, worker::task::Cancellation::requested("test"))
            .await
    );
    let rest = within(Duration::from_secs(30), run.next()).await;
    assert!(
        matches!(rest, Some(TaskUpdate::Done(Outcome::Failure(_)))),
        "{rest:?}"
    );

    let (outcome, events) = h.run("f.stderr", vec![json!(3)]).await;
    assert_eq!(success(&outcome), &json!("wrote"));
    assert!(
        events.is_empty(),
        "no log asked for, none given: {events:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_crash_report_quotes_only_the_crashed_process_stderr() {
    let root = tempfile::tempdir().unwrap();
    let dir = faulty_plugin(root.path(), "faulty", &[], "max_attempts = 1", "");
    let h = Harness::start(&[dir]);
    h.ready().await;
    h.ok("f.stderr", vec![json!(2)]).await;
    let first = h.fails("f.exit", vec![json!(4)]).await;
    assert!(first.message.contains("stderr line 1"), "{}", first.message);
    h.wait_all_ready("faulty").await;
    // The second process wrote nothing: its report must not borrow the first one's lines.
    let second = h.fails("f.exit", vec![json!(5)]).await;
    assert!(second.message.contains("exited with status 5"));
    assert!(
        !second.message.contains("stderr line"),
        "{}",
        second.message
    );
    let tail = h.status("faulty").await.instances[0].stderr_tail.clone();
    assert!(
        tail[0].starts_with("[pid "),
        "older lines name their pid: {tail:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_failed_plugin_is_tried_again_after_its_cool_down_on_restart_and_on_reload() {
    let root = tempfile::tempdir().unwrap();
    let blocker = root.path().join("broken");
    std::fs::write(&blocker, "").unwrap();
    let env = [("FAULT_EXIT_IF", blocker.to_str().unwrap())];
    let restart = format!("{FAST_RESTARTS}failed_retry = 1.5\n");
    let dir = faulty_plugin(root.path(), "faulty", &env, "", &restart);
    let h = Harness::start(&[dir]);
    let failed =
        |s: &worker::supervisor::status::PluginStatus| matches!(s.state, PluginState::Failed(_));
    let s = h.wait_status("faulty", "failed", failed).await;
    assert!(s.next_try_at.is_some(), "the next try is shown: {s:?}");
    let f = h.fails("f.ok", vec![]).await;
    let f = &f;
    assert_eq!(f.kind, FailureKind::PluginUnavailable);
    assert!(
        f.message.contains("refusing to start") && f.message.contains("next try in"),
        "{}",
        f.message
    );

    // 1. After `restart.failed_retry` it is tried again on its own.
    std::fs::remove_file(&blocker).unwrap();
    h.wait_status("faulty", "back after the cool-down", |s| {
        s.state == PluginState::Running
    })
    .await;
    h.ok("f.ok", vec![]).await;

    // 2. `plugins restart` (the pool's restart) brings it back at once, long before its
    //    cool-down.
    h.stop().await;
    std::fs::write(&blocker, "").unwrap();
    let long = format!("{FAST_RESTARTS}failed_retry = 300\n");
    let h = Harness::start(&[faulty_plugin(root.path(), "faulty", &env, "", &long)]);
    h.wait_status("faulty", "failed", failed).await;
    let pool = h.supervisor.plugin("faulty").unwrap();
    std::fs::remove_file(&blocker).unwrap();
    assert!(pool.restart().await, "it was failed");
    h.wait_status("faulty", "restarted", |s| s.state == PluginState::Running)
        .await;
    assert!(!pool.restart().await, "a running plugin is left alone");

    // 3. A reload restarts a failed plugin whose manifest did not change.
    std::fs::write(&blocker, "").unwrap();
    let _ = h.run("f.exit", vec![json!(1)]).await;
    h.wait_status("faulty", "failed again", failed).await;
    std::fs::remove_file(&blocker).unwrap();
    let manifest = (**pool.manifest()).clone();
    let report = h
        .supervisor
        .reload(vec![manifest], Duration::from_secs(5), false)
        .await;
    assert_eq!(report.restarted, vec!["faulty".to_string()]);
    h.wait_status("faulty", "running after reload", |s| {
        s.state == PluginState::Running
    })
    .await;
    h.stop().await;
}
