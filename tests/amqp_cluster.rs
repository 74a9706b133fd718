//! Failover across a real RabbitMQ cluster: three fresh nodes started on this machine for the
//! test (the system broker on 5672 is left alone), a quorum task queue, and 2,000 tasks through
//! the worker while the node it is connected to is stopped. Counted where the client would
//! read them, as in `tests/amqp_faults.rs`: the test consumes a raw reply queue (quorum too, so
//! it outlives any one node) and every task id must have exactly one final state there, or two
//! only for the ids the worker logged as possibly published twice.
//!
//! Needs Debian's `rabbitmq-server` installed and the tests run as root: the nodes run as the
//! `rabbitmq` user (Debian's `rabbitmq-server` wrapper switches to it; `rabbitmqctl` is run as
//! that user here), so they and the CLI share its Erlang cookie; their directories are given
//! to that user. Every node is stopped when the test ends, passed or not.

mod common;

use common::broker::*;
use common::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::Value;
use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One RabbitMQ node of the test's cluster: its name, ports and directory.
struct Node {
    name: String,
    port: u16,
    dist: u16,
    dir: PathBuf,
}

impl Node {
    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}//", self.port)
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// `rabbitmqctl -n NODE ARGS`, its stdout; the node's log tail in the error.
    fn ctl(&self, args: &[&str], limit: Duration) -> Result<String, String> {
        ctl(&self.name, args, limit).map_err(|e| format!("{e}\n{}", self.log_tail()))
    }

    /// The last lines of the node's log, for failure messages.
    fn log_tail(&self) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.name));
        match std::fs::read_to_string(&log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                format!("last lines of {}:\n{tail}", log.display())
            }
            Err(e) => format!("(no log at {}: {e})", log.display()),
        }
    }

    /// The node's OS process, from its pid file (written early in its boot).
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Three RabbitMQ nodes clustered together, each on its own ports with its data, logs and pid
/// file in one temp dir owned by `rabbitmq`. Stopped (and the dir removed) when dropped, also
/// when the test panics.
struct Cluster {
    nodes: Vec<Node>,
    /// Declared last: removed after the nodes are stopped.
    _dir: tempfile::TempDir,
}

/// Ports the system node and `rabbitmqctl` use: never given to a test node.
fn reserved(port: u16) -> bool {
    matches!(port, 4369 | 5672 | 25672) || (35672..=35682).contains(&port)
}

/// `n` distinct ports free right now (all held until all are chosen).
fn free_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    while held.len() < n {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        if !reserved(l.local_addr().unwrap().port()) {
            held.push(l);
        }
    }
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// The `rabbitmq` user, who owns the nodes' files and runs them and the CLI (with its Erlang
/// cookie).
fn rabbitmq_user() -> nix::unistd::User {
    nix::unistd::User::from_name("rabbitmq")
        .expect("the user database reads")
        .expect("a `rabbitmq` user (Debian's rabbitmq-server package)")
}

/// Runs `rabbitmqctl -n NODE ARGS` as `rabbitmq` (what Debian's wrapper does, but without `su`,
/// which would start it in a session of its own) in its own process group, killed (the group,
/// the CLI's Erlang VM included) if it takes longer than `limit`. Its stdout, or what went wrong.
fn ctl(node: &str, args: &[&str], limit: Duration) -> Result<String, String> {
    let rabbitmq = rabbitmq_user();
    let child = Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl")
        .args(["-n", node])
        .args(args)
        .uid(rabbitmq.uid.as_raw())
        .gid(rabbitmq.gid.as_raw())
        .env("HOME", &rabbitmq.dir)
        .current_dir(&rabbitmq.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("rabbitmqctl does not run: {e}"))?;
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let what = format!("rabbitmqctl -n {node} {}", args.join(" "));
    match rx.recv_timeout(limit) {
        Ok(Ok(out)) if out.status.success() => Ok(text(&out.stdout)),
        Ok(Ok(out)) => Err(format!(
            "`{what}` failed ({}): {}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        )),
        Ok(Err(e)) => Err(format!("`{what}`: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            Err(format!("`{what}` took more than {limit:?}"))
        }
    }
}

impl Cluster {
    /// Starts three nodes `wtc1x<tag>@localhost` ... and joins the second and third to the first.
    fn start() -> Cluster {
        let rabbitmq = rabbitmq_user();
        let dir = tempfile::Builder::new()
            .prefix("worker-cluster-")
            .tempdir()
            .unwrap();
        let owned = |p: &Path| {
            nix::unistd::chown(p, Some(rabbitmq.uid), Some(rabbitmq.gid))
                .unwrap_or_else(|e| panic!("chown {} to rabbitmq: {e} (run as root)", p.display()))
        };
        owned(dir.path());
        let plugins = dir.path().join("enabled_plugins");
        std::fs::write(&plugins, "").unwrap();
        owned(&plugins);
        let tag = format!("{:08x}", fastrand::u32(..));
        let ports = free_ports(6);
        let nodes: Vec<Node> = (0..3)
            .map(|i| {
                let node = Node {
                    name: format!("wtc{}x{tag}@localhost", i + 1),
                    port: ports[2 * i],
                    dist: ports[2 * i + 1],
                    dir: dir.path().join(format!("n{}", i + 1)),
                };
                for d in [&node.dir, &node.dir.join("mnesia"), &node.dir.join("log")] {
                    std::fs::create_dir_all(d).unwrap();
                    owned(d);
                }
                let conf = node.dir.join("rabbitmq.conf");
                std::fs::write(
                    &conf,
                    format!("listeners.tcp.default = 127.0.0.1:{}\n", node.port),
                )
                .unwrap();
                owned(&conf);
                node
            })
            .collect();
        let cluster = Cluster { nodes, _dir: dir };
        // All three boot at once; each is then waited for through its pid file, which also
        // notices a node that died while booting (e.g. a port taken meanwhile).
        for node in &cluster.nodes {
            let status = Command::new("rabbitmq-server")
                .arg("-detached")
                .env("RABBITMQ_NODENAME", &node.name)
                .env("RABBITMQ_NODE_PORT", node.port.to_string())
                .env("RABBITMQ_DIST_PORT", node.dist.to_string())
                .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
                .env("RABBITMQ_PID_FILE", node.pid_file())
                .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", &plugins)
                .env("ERL_CRASH_DUMP", node.dir.join("erl_crash.dump"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .expect("rabbitmq-server runs (Debian's rabbitmq-server package)");
            assert!(
                status.success(),
                "rabbitmq-server -detached for {}: {status}",
                node.name
            );
        }
        // Booted and clustered within this (about 20 s on an idle 2-core machine).
        let by = Instant::now() + Duration::from_secs(90);
        let left = || by.saturating_duration_since(Instant::now());
        for node in &cluster.nodes {
            let pid_file = node.pid_file().display().to_string();
            let seconds = left().as_secs().max(1).to_string();
            node.ctl(&["wait", &pid_file, "--timeout", &seconds], left())
                .unwrap_or_else(|e| panic!("node {} did not start: {e}", node.name));
        }
        let first = &cluster.nodes[0];
        for node in &cluster.nodes[1..] {
            for args in [
                &["stop_app"][..],
                &["join_cluster", &first.name],
                &["start_app"],
            ] {
                node.ctl(args, left())
                    .unwrap_or_else(|e| panic!("{} joining {}: {e}", node.name, first.name));
            }
        }
        let status = first
            .ctl(&["cluster_status", "--formatter", "json"], left())
            .unwrap_or_else(|e| panic!("cluster_status: {e}"));
        let status: Value = serde_json::from_str(&status)
            .unwrap_or_else(|e| panic!("cluster_status is not JSON ({e}): {status}"));
        let running: HashSet<&str> = status["running_nodes"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for node in &cluster.nodes {
            assert!(
                running.contains(node.name.as_str()),
                "{} is not running in the cluster: {status}",
                node.name
            );
        }
        cluster
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            // Only nodes still running (`stop` with the pid file of a stopped node waits).
            let Some(pid) = node.pid().filter(|p| !process_gone(*p)) else {
                continue;
            };
            let pid_file = node.pid_file().display().to_string();
            // With the pid file, `stop` returns once the node's process has exited.
            let _ = ctl(&node.name, &["stop", &pid_file], Duration::from_secs(60));
            if !process_gone(pid) {
                eprintln!(
                    "node {} (pid {pid}) still runs after `stop`: killed",
                    node.name
                );
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Messages (ready and unacked) in `queue`, as `node` lists them.
fn queue_depth(node: &Node, queue: &str) -> Option<u64> {
    let listing = node
        .ctl(
            &[
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ],
            Duration::from_secs(30),
        )
        .ok()?;
    parse_queue_counts(&listing, queue).map(|(ready, unacked)| ready + unacked)
}

/// The type and leader of `queue`, as `node` lists them.
fn queue_type_and_leader(node: &Node, queue: &str) -> Result<(String, String), String> {
    let listing = node.ctl(
        &[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "type",
            "leader",
        ],
        Duration::from_secs(30),
    )?;
    listing
        .lines()
        .find_map(|l| {
            let mut f = l.split('\t');
            if f.next()? != queue {
                return None;
            }
            Some((f.next()?.trim().to_string(), f.next()?.trim().to_string()))
        })
        .ok_or_else(|| format!("{queue} is not listed:\n{listing}"))
}

/// Polls `pred` (a counter fed by the reader, or a broker listing) until it holds, failing at
/// `deadline`.
fn wait_until(what: &str, deadline: Instant, mut pred: impl FnMut() -> bool) {
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_stopping_the_workers_cluster_node_under_load_leaves_exactly_one_final_state_per_task() {
    const TASKS: usize = 2000;
    // The whole test, cluster included, ends within this (or fails saying what it waited for).
    const BUDGET: Duration = Duration::from_secs(170);
    let began = Instant::now();
    let deadline = began + BUDGET;
    let (lane, root, plugins) = setup!("amqp_cluster");
    // 8 tasks of 20 ms at a time: a few hundred answers a second, so the stop comes with
    // well over a thousand tasks still to run.
    faulty_plugin(
        &plugins,
        "faulty",
        &[],
        "instances = 2\nconcurrency = 4",
        "",
    );
    let cluster = Cluster::start();
    let formed = began.elapsed();
    let [first, second, third] = &cluster.nodes[..] else {
        unreachable!("three nodes")
    };

    // The reply queue lives on the third node, which stays up, and is replicated anyway.
    let replies = format!("replies-{}", lane.queue);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let counts: Counts = Arc::default();
    let stop = CancellationToken::new();
    let (ready, consuming) = tokio::sync::oneshot::channel();
    // Quorum, so the reply queue and its consumer outlive the node the worker is connected to.
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    let reader = rt.spawn(read_replies(
        third.url(),
        replies.clone(),
        quorum,
        counts.clone(),
        Some(ready),
        stop.clone(),
    ));
    rt.block_on(within(Duration::from_secs(30), consuming))
        .expect("the reply reader consumes");

    // The worker on the cluster's failover list, the first node first: it declares the task
    // queue quorum (its leader on the first node), and takes the next URL after a loss.
    let failover: Vec<String> = cluster.nodes.iter().map(Node::url).collect();
    let failover = failover.join(";");
    let starting = Instant::now();
    let mut worker = Daemon::start_with(
        &plugins,
        &root.path().join("w.sock"),
        &[
            "--broker",
            &failover,
            "--queue-type",
            "quorum",
            "-Q",
            &lane.queue,
            "-n",
            &lane.node,
        ],
    );
    let consuming = worker.wait_log("consuming Celery tasks");
    let worker_up = starting.elapsed();
    assert!(
        consuming.contains(&format!("127.0.0.1:{}", first.port)),
        "the worker starts on the first URL: {consuming}"
    );

    let (kind, leader) = queue_type_and_leader(third, &lane.queue).unwrap();
    assert_eq!(kind, "quorum", "the task queue's type");

    // The client, on the third node, declares the task queue quorum as well.
    let mut flood = lane.client(&["flood", "f.sleep", "[0.02]", &TASKS.to_string(), &replies]);
    flood
        .env("BROKER_URL", third.url())
        .env("QUEUE_TYPE", "quorum");
    let sending = Instant::now();
    let mut flood = Watched::spawn(flood);

    // The stop comes while the client may still be sending (to the third node, which stays).
    let answered = || counts.lock().unwrap().len();
    wait_until("a quarter of the tasks answered", deadline, || {
        answered() >= TASKS / 4
    });
    let mark = worker.drain_log().len();
    let answered_at_stop = answered();
    let stopping = Instant::now();
    // With the pid file, `stop` returns once the node's process has exited.
    let pid_file = first.pid_file().display().to_string();
    first
        .ctl(&["stop", &pid_file], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("stopping {}: {e}", first.name));
    let stopped_in = stopping.elapsed();
    let failover_to = format!("reconnecting to amqp://127.0.0.1:{}//", second.port);
    let lost = worker.wait_log_from(mark, &failover_to);
    let at = worker
        .seen
        .iter()
        .skip(mark)
        .position(|l| *l == lost)
        .map(|i| mark + i + 1)
        .unwrap();
    let back = worker.wait_log_from(at, "consuming Celery tasks");
    let logged_at = |line: &str| {
        chrono::DateTime::parse_from_rfc3339(line.split_whitespace().next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("log lines start with an RFC 3339 time ({e}): {line}"))
    };
    let back_after = (logged_at(&back) - logged_at(&lost)).num_milliseconds();
    let sent = flood.wait("with the ids of the tasks sent", |l| l.starts_with('{'));
    let sent: Value = serde_json::from_str(&sent).expect("the client prints JSON");
    let ids: Vec<String> = serde_json::from_value(sent["ids"].clone()).unwrap();
    assert_eq!(ids.len(), TASKS, "{sent}");

    while answered() < TASKS {
        if Instant::now() > deadline {
            let seen = counts.lock().unwrap().clone();
            let missing: Vec<&String> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
            let about_missing: Vec<String> = worker
                .drain_log()
                .into_iter()
                .filter(|l| missing.iter().any(|id| l.contains(id.as_str())))
                .collect();
            panic!(
                "timed out waiting for every task answered: {} answered, no final state for \
                 {} ({:?}...); task queue depth {:?}, reply queue depth {:?}; {answered_at_stop} \
                 answered when {} stopped; what the worker logged about them:\n{}",
                seen.len(),
                missing.len(),
                &missing[..missing.len().min(20)],
                queue_depth(third, &lane.queue),
                queue_depth(third, &replies),
                first.name,
                about_missing.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let all_in = sending.elapsed();
    // Once no task message is left (ready or unacked), nothing more can be published; then
    // read what is still in the reply queue.
    wait_until("the task queue empty", deadline, || {
        queue_depth(third, &lane.queue) == Some(0)
    });
    wait_until("the reply queue read", deadline, || {
        queue_depth(third, &replies) == Some(0)
    });
    stop.cancel();
    rt.block_on(async { within(Duration::from_secs(30), reader).await.unwrap() });

    let log = worker.drain_log();
    let ambiguous = ambiguous_ids(&log);
    let counts = counts.lock().unwrap().clone();
    let mut twice = 0;
    for id in &ids {
        match counts.get(id).map(Vec::len).unwrap_or(0) {
            1 => {}
            2 if ambiguous.contains(id) => twice += 1,
            n => panic!(
                "task {id} has {n} final states in the reply queue ({:?}); ambiguous ids: \
                 {ambiguous:?}; {answered_at_stop} answered when {} stopped",
                counts.get(id),
                first.name
            ),
        }
    }
    assert_eq!(counts.len(), TASKS, "no final state for an unknown id");
    assert!(
        answered_at_stop < TASKS / 2,
        "the stop came with most tasks still to run: {answered_at_stop} of {TASKS} answered"
    );
    let undeliverable: Vec<&String> = log.iter().filter(|l| l.contains("undeliverable")).collect();
    assert!(undeliverable.is_empty(), "{undeliverable:?}");
    eprintln!(
        "cluster failover: {TASKS} tasks in {all_in:.1?} (cluster formed in {formed:.1?}, the \
         worker consuming {worker_up:.1?} after its start); {} (the task queue's leader: \
         {leader}) stopped at {answered_at_stop} answered, `stop` took {stopped_in:.1?}; the \
         worker consuming again {back_after} ms after it logged the loss ({}); {} \
         published-then-lost-before-confirm, {twice} of them seen twice",
        first.name,
        back.split_whitespace()
            .find(|w| w.starts_with("broker="))
            .unwrap_or("?"),
        ambiguous.len()
    );
}
