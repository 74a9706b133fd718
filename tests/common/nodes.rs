//! Private RabbitMQ nodes for one test, started on this machine beside the system broker on
//! 5672 (which is never touched): each node on ports of its own, with its data, logs, config
//! and pid file in one temp dir; two or more are clustered with the first. Every node is
//! stopped when the test ends, passed or not.
//!
//! Needs Debian's `rabbitmq-server` installed and the tests run as root: the nodes run as the
//! `rabbitmq` user (Debian's `rabbitmq-server` wrapper switches to it; `rabbitmqctl` is run as
//! that user here), so they and the CLI share its Erlang cookie; their files are given to that
//! user.

use super::broker::{parse_queue_counts, LIST_QUEUE_COUNTS};
use super::{process_gone, text};
use serde_json::Value;
use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One RabbitMQ node started for the test: its name, ports and directory.
pub struct Node {
    pub name: String,
    pub port: u16,
    pub dist: u16,
    pub dir: PathBuf,
}

impl Node {
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}//", self.port)
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// `rabbitmqctl -n NODE ARGS`, its stdout; the node's log tail in the error.
    pub fn ctl(&self, args: &[&str], limit: Duration) -> Result<String, String> {
        ctl(&self.name, args, limit).map_err(|e| format!("{e}\n{}", self.log_tail()))
    }

    /// The node's log file.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.name))
    }

    /// The last lines of the node's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log_file();
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
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn conf_file(&self) -> PathBuf {
        self.dir.join("rabbitmq.conf")
    }

    fn advanced_file(&self) -> PathBuf {
        self.dir.join("advanced.config")
    }

    /// Creates the node's directories and config files, all owned by `rabbitmq`.
    fn configure(&self, setup: &NodeSetup) {
        for d in [&self.dir, &self.dir.join("mnesia"), &self.dir.join("log")] {
            std::fs::create_dir_all(d).unwrap();
            give_to_rabbitmq(d);
        }
        let mut conf = format!("listeners.tcp.default = 127.0.0.1:{}\n", self.port);
        conf.push_str(setup.conf);
        if !conf.ends_with('\n') {
            conf.push('\n');
        }
        write_for_rabbitmq(&self.conf_file(), &conf);
        if let Some(advanced) = setup.advanced {
            write_for_rabbitmq(&self.advanced_file(), advanced);
        }
    }

    /// `rabbitmq-server -detached` for this node (it returns at once; the boot goes on).
    fn launch(&self, setup: &NodeSetup, plugins: &Path) {
        let mut server = Command::new("rabbitmq-server");
        server
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.pid_file())
            .env("RABBITMQ_CONFIG_FILE", self.conf_file())
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", plugins)
            .env("ERL_CRASH_DUMP", self.dir.join("erl_crash.dump"))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if setup.advanced.is_some() {
            server.env("RABBITMQ_ADVANCED_CONFIG_FILE", self.advanced_file());
        }
        let status = server
            .status()
            .expect("rabbitmq-server runs (Debian's rabbitmq-server package)");
        assert!(
            status.success(),
            "rabbitmq-server -detached for {}: {status}",
            self.name
        );
    }
}

/// What [`Cluster::start`] starts: how many nodes, and what every node's configuration adds
/// to its listener line. `NodeSetup::default()` is one node as RabbitMQ configures it.
pub struct NodeSetup<'a> {
    /// Nodes to start (at least one); from the second on, each joins the first's cluster.
    pub nodes: usize,
    /// Lines added to each node's `rabbitmq.conf` (e.g. `"consumer_timeout = 2000\n"`).
    pub conf: &'a str,
    /// The text of each node's `advanced.config` (Erlang terms: app env that `rabbitmq.conf`
    /// cannot set, e.g. `[{rabbit, [{channel_tick_interval, 500}]}].`), if any.
    pub advanced: Option<&'a str>,
}

impl Default for NodeSetup<'_> {
    fn default() -> Self {
        NodeSetup {
            nodes: 1,
            conf: "",
            advanced: None,
        }
    }
}

/// RabbitMQ nodes `wtc1x<tag>@localhost` ..., clustered together if more than one, each on its
/// own ports with its data, logs, config and pid file in one temp dir owned by `rabbitmq`.
/// Stopped (and the dir removed) when dropped, also when the test panics.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// Declared last: removed after the nodes are stopped.
    _dir: tempfile::TempDir,
}

/// Ports the system node and `rabbitmqctl` use: never given to a test node.
pub fn reserved(port: u16) -> bool {
    matches!(port, 4369 | 5672 | 25672) || (35672..=35682).contains(&port)
}

/// `n` distinct ports free right now (all held until all are chosen).
pub fn free_ports(n: usize) -> Vec<u16> {
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
pub fn rabbitmq_user() -> nix::unistd::User {
    nix::unistd::User::from_name("rabbitmq")
        .expect("the user database reads")
        .expect("a `rabbitmq` user (Debian's rabbitmq-server package)")
}

/// Gives `path` to the `rabbitmq` user (the tests run as root).
fn give_to_rabbitmq(path: &Path) {
    let rabbitmq = rabbitmq_user();
    nix::unistd::chown(path, Some(rabbitmq.uid), Some(rabbitmq.gid))
        .unwrap_or_else(|e| panic!("chown {} to rabbitmq: {e} (run as root)", path.display()))
}

/// Writes `text` to `path`, owned by `rabbitmq`.
fn write_for_rabbitmq(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    give_to_rabbitmq(path);
}

/// Runs `rabbitmqctl -n NODE ARGS` as `rabbitmq` (what Debian's wrapper does, but without `su`,
/// which would start it in a session of its own) in its own process group, killed (the group,
/// the CLI's Erlang VM included) if it takes longer than `limit`. Its stdout, or what went wrong.
pub fn ctl(node: &str, args: &[&str], limit: Duration) -> Result<String, String> {
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
    /// Starts `setup.nodes` nodes at once, waits for each, joins the second and later ones to
    /// the first (a single node joins nothing), and checks that all run in one cluster.
    pub fn start(setup: NodeSetup) -> Cluster {
        assert!(setup.nodes >= 1, "a cluster of no nodes");
        let dir = tempfile::Builder::new()
            .prefix("worker-rabbitmq-")
            .tempdir()
            .unwrap();
        give_to_rabbitmq(dir.path());
        let plugins = dir.path().join("enabled_plugins");
        write_for_rabbitmq(&plugins, "");
        let tag = format!("{:08x}", fastrand::u32(..));
        let ports = free_ports(2 * setup.nodes);
        let nodes: Vec<Node> = (0..setup.nodes)
            .map(|i| Node {
                name: format!("wtc{}x{tag}@localhost", i + 1),
                port: ports[2 * i],
                dist: ports[2 * i + 1],
                dir: dir.path().join(format!("n{}", i + 1)),
            })
            .collect();
        let cluster = Cluster { nodes, _dir: dir };
        // All boot at once; each is then waited for through its pid file, which also notices
        // a node that died while booting (e.g. a port taken meanwhile).
        for node in &cluster.nodes {
            node.configure(&setup);
            node.launch(&setup, &plugins);
        }
        // Booted and clustered within this (about 20 s for three nodes on an idle 2-core
        // machine).
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
        cluster.check_running(left());
        cluster
    }

    /// Asserts that the first node lists every node as running in its cluster.
    fn check_running(&self, limit: Duration) {
        let status = self.nodes[0]
            .ctl(&["cluster_status", "--formatter", "json"], limit)
            .unwrap_or_else(|e| panic!("cluster_status: {e}"));
        let status: Value = serde_json::from_str(&status)
            .unwrap_or_else(|e| panic!("cluster_status is not JSON ({e}): {status}"));
        let running: HashSet<&str> = status["running_nodes"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for node in &self.nodes {
            assert!(
                running.contains(node.name.as_str()),
                "{} is not running in the cluster: {status}",
                node.name
            );
        }
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
pub fn queue_depth(node: &Node, queue: &str) -> Option<u64> {
    let listing = node.ctl(&LIST_QUEUE_COUNTS, Duration::from_secs(30)).ok()?;
    parse_queue_counts(&listing, queue).map(|(ready, unacked)| ready + unacked)
}

/// The type and leader of `queue`, as `node` lists them.
pub fn queue_type_and_leader(node: &Node, queue: &str) -> Result<(String, String), String> {
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

/// Polls `pred` (a counter fed by a reply reader, or a node's listing) until it holds, failing
/// at `deadline`.
pub fn wait_until(what: &str, deadline: Instant, mut pred: impl FnMut() -> bool) {
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// [`wait_until`] for at most `limit` from now.
pub fn wait_within(what: &str, limit: Duration, pred: impl FnMut() -> bool) {
    wait_until(what, Instant::now() + limit, pred)
}
