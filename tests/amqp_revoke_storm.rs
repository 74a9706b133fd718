//! A storm of deliveries, revokes and cancels for thousands of task ids at once: a delivery
//! deciding what to do with a task and a revoke marking tasks must never wait on each other
//! (they once took two locks in opposite orders, and a revoke arriving with a task hung the
//! worker for good). Tasks are published raw with py-amqp (`tests/celery/hostile.py`, explicit
//! ids, no reply queue) while another process broadcasts `app.control.revoke(ids)` in batches
//! (addressed to this worker only) and the test cancels ids through the control socket. Needs
//! RabbitMQ and the Celery venv, like `tests/amqp.rs`.

mod common;

use common::broker::*;
use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tasks published: every fiftieth a 100 ms `rust.count` (a target for cancels and
/// terminating revokes while it runs), the others `rust.noop` (deliveries as fast as they
/// come). The old two-lock code hung in 3 of 3 runs of this storm (in 1 of 3 with a quarter
/// of the tasks and half the revokes, 4 ids a broadcast): the window is a few instructions
/// wide, so the size of the storm is what makes it likely.
const TASKS: usize = 20_000;
const SLOW_EVERY: usize = 50;
/// Of them, revoked by broadcast (terminate alternating False/True per broadcast).
const REVOKED: usize = 4000;
/// Ids per `app.control.revoke` broadcast: one, so that every id is a revoke of its own.
const BATCH: usize = 1;
/// The revokes are spread over this, so that they keep arriving while the tasks do.
const REVOKE_SECONDS: &str = "8";
/// Control-socket cancels (`worker task cancel ID`) of tasks `worker task list` shows in
/// flight, by this many threads at once.
const CANCELS: usize = 300;
const CANCEL_THREADS: usize = 4;
/// Everything must be done within this: published, revoked, cancelled and the queue drained.
const LIMIT: Duration = Duration::from_secs(120);
/// A queue whose depth has not changed for this long is a hung worker (a healthy one, even
/// on a loaded machine, acks something every few milliseconds).
const STALL: Duration = Duration::from_secs(30);

fn hostile(lane: &Lane, args: &[&str]) -> Command {
    let mut cmd = lane.script("hostile.py");
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Waits for `child` until `deadline`, killing it then: its exit status, or None if killed.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().expect("the child can be waited on") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The JSON of a finished helper's last stdout line.
fn last_json(child: Child, what: &str) -> Value {
    let out = child.wait_with_output().expect("the helper's output");
    let stdout = text(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("{what} said {stdout:?}, stderr {}", text(&out.stderr)))
}

/// How the control-socket cancels went: cancelled, not found (ended before the cancel came),
/// and control-socket calls (`task list` or `task cancel`) not answered within 10 s.
#[derive(Debug, Default)]
struct Cancels {
    cancelled: usize,
    ended: usize,
    unanswered: usize,
}

/// What `Daemon::cli` passes, for threads (a `Daemon` stays on the test's thread).
struct Cli {
    socket: std::path::PathBuf,
    plugins: std::path::PathBuf,
    state: std::path::PathBuf,
}

impl Cli {
    /// `worker ARGS` on the daemon's socket, given 10 s: its stdout, or None if it failed or
    /// did not answer (`unanswered` counts the latter).
    fn run(&self, args: &[&str], unanswered: &mut usize) -> Option<String> {
        let mut child = worker()
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--plugins")
            .arg(&self.plugins)
            .arg("--state-dir")
            .arg(&self.state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the worker CLI runs");
        // A `task list` fits the pipe (at most a prefetch of tasks).
        match wait_until(&mut child, Instant::now() + Duration::from_secs(10)) {
            Some(s) if s.success() => {
                let out = child.wait_with_output().expect("its output");
                Some(text(&out.stdout))
            }
            Some(_) => None,
            None => {
                *unanswered += 1;
                None
            }
        }
    }
}

/// Until `stop` or `CANCELS` claimed in all: `worker task list`, then `worker task cancel` of
/// the ids it shows that no thread has claimed yet.
fn cancel_in_flight(cli: &Cli, claimed: &Mutex<HashSet<String>>, stop: &AtomicBool) -> Cancels {
    let mut tally = Cancels::default();
    while !stop.load(Ordering::Relaxed) {
        let Some(list) = cli.run(&["task", "list", "--json"], &mut tally.unanswered) else {
            continue;
        };
        let doc: Value = serde_json::from_str(&list).expect("task list --json is JSON");
        let listed: Vec<String> = doc["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["task_id"].as_str().map(str::to_string))
            .collect();
        for id in listed {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            {
                let mut claimed = claimed.lock().unwrap();
                if claimed.len() >= CANCELS {
                    return tally;
                }
                if !claimed.insert(id.clone()) {
                    continue;
                }
            }
            let mut unanswered = 0;
            match cli.run(&["task", "cancel", &id], &mut unanswered) {
                Some(_) => tally.cancelled += 1,
                None if unanswered == 0 => tally.ended += 1,
                None => tally.unanswered += 1,
            }
        }
    }
    tally
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_a_storm_of_deliveries_revokes_and_cancels_leaves_the_worker_serving() {
    let (lane, root, plugins) = setup!("amqp_revoke_storm");
    rust_plugin(&plugins, "instances = 2\nconcurrency = 4\n");
    let mut w = lane.worker(&plugins, &root.path().join("w.sock"));
    let pid = w.child.id();

    let tag = format!("{:08x}", fastrand::u32(..));
    let tasks: Vec<Value> = (0..TASKS)
        .map(|i| {
            let id = format!("storm-{i:05}-{tag}");
            match i % SLOW_EVERY {
                0 => json!([id, "rust.count", [10, 10]]),
                _ => json!([id, "rust.noop", []]),
            }
        })
        .collect();
    let mut revoked: Vec<&Value> = tasks.iter().map(|t| &t[0]).collect();
    fastrand::shuffle(&mut revoked);
    revoked.truncate(REVOKED);
    let tasks_file = root.path().join("tasks.json");
    let revoked_file = root.path().join("revoked.json");
    std::fs::write(&tasks_file, json!(tasks).to_string()).unwrap();
    std::fs::write(&revoked_file, json!(revoked).to_string()).unwrap();

    let began = Instant::now();
    let deadline = began + LIMIT;
    let tasks_arg = tasks_file.display().to_string();
    let mut publisher = hostile(&lane, &["publish_tasks", &lane.queue, &tasks_arg])
        .spawn()
        .expect("the publisher starts");
    let revoked_arg = revoked_file.display().to_string();
    let batch = BATCH.to_string();
    let mut revoker = hostile(
        &lane,
        &[
            "revoke_ids",
            &lane.node,
            &revoked_arg,
            &batch,
            REVOKE_SECONDS,
        ],
    )
    .spawn()
    .expect("the revoker starts");
    let cli = Cli {
        socket: w.socket.clone(),
        plugins: w.plugins.clone(),
        state: w.state.clone(),
    };
    let claimed = Mutex::new(HashSet::new());
    let stop = AtomicBool::new(false);
    let (published, revokes_sent, drained, tally) = std::thread::scope(|s| {
        let cancellers: Vec<_> = (0..CANCEL_THREADS)
            .map(|_| s.spawn(|| cancel_in_flight(&cli, &claimed, &stop)))
            .collect();
        let published = wait_until(&mut publisher, deadline).map(|s| (s, began.elapsed()));
        let revokes_sent = wait_until(&mut revoker, deadline).map(|s| (s, began.elapsed()));
        // Drained: every message acked (run, revoked or cancelled), none held. Each look is a
        // `rabbitmqctl` process, which paces the looks.
        let mut last = queue_counts(&lane.queue);
        let mut changed = Instant::now();
        while last != Some((0, 0)) && Instant::now() < deadline && changed.elapsed() < STALL {
            let now = queue_counts(&lane.queue);
            if now != last {
                changed = Instant::now();
            }
            last = now;
        }
        let drained = (last, began.elapsed(), changed.elapsed() >= STALL);
        stop.store(true, Ordering::Relaxed);
        let tally: Vec<Cancels> = cancellers.into_iter().map(|t| t.join().unwrap()).collect();
        (published, revokes_sent, drained, tally)
    });
    let log = w.drain_log();
    let tail = log[log.len().saturating_sub(30)..].join("\n");
    assert!(
        published.is_some_and(|(s, _)| s.success()),
        "the publisher did not finish within {LIMIT:?}: {published:?}"
    );
    assert!(
        revokes_sent.is_some_and(|(s, _)| s.success()),
        "the revoker did not finish within {LIMIT:?} (a revoke broadcast is a plain publish: \
         it cannot wait on the worker): {revokes_sent:?}"
    );
    let publisher_said = last_json(publisher, "the publisher");
    let revoker_said = last_json(revoker, "the revoker");
    let cancelled: usize = tally.iter().map(|t| t.cancelled).sum();
    let unanswered: usize = tally.iter().map(|t| t.unanswered).sum();
    eprintln!(
        "storm: {TASKS} tasks published in {:.2} s (done at {:.2?}); {REVOKED} ids revoked in {} \
         broadcasts over {:.2} s (done at {:.2?}); {cancelled} running tasks cancelled on the \
         control socket ({tally:?}); queue (ready, unacked) {:?} at {:.2?}",
        publisher_said["seconds"].as_f64().unwrap_or(f64::NAN),
        published.map(|(_, t)| t).unwrap_or_default(),
        revoker_said["batches"],
        revoker_said["seconds"].as_f64().unwrap_or(f64::NAN),
        revokes_sent.map(|(_, t)| t).unwrap_or_default(),
        drained.0,
        drained.1,
    );
    assert_eq!(
        drained.0,
        Some((0, 0)),
        "{} still holds (ready, unacked) {:?} {:.0?} after the storm began ({}); the worker's \
         last log lines:\n{tail}",
        lane.queue,
        drained.0,
        drained.1,
        match drained.2 {
            true => format!("no message acked for {STALL:?}: the worker is hung"),
            false => format!("not drained within {LIMIT:?}"),
        }
    );
    assert_eq!(
        unanswered, 0,
        "control-socket calls left unanswered for 10 s: {tally:?}; the worker's last log lines:\n{tail}"
    );
    let ping = lane.celery_cli(&["inspect", "ping", "-d", &lane.node]);
    assert!(
        ping.contains(&format!("{}: OK", lane.node)) && ping.contains("pong"),
        "inspect ping after the storm: {ping}; the worker's last log lines:\n{tail}"
    );
    let exited = w.child.try_wait().unwrap();
    assert!(
        w.child.id() == pid && exited.is_none() && !process_gone(pid),
        "the worker (pid {pid}) is no longer running: {exited:?}"
    );
}
