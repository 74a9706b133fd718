//! Redis Sentinel as Celery spells it (`sentinel://host:26379` and `master_name`): a master, a
//! replica and a sentinel of the test's own. The worker finds the master through the
//! sentinel, the real Celery client's task is answered, and after the sentinel fails the
//! master over to the replica the worker follows it: the next task is answered from the new
//! master.

mod common;

use common::broker::*;
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` process of the test's own (a replica, or a sentinel); killed on drop.
struct Process {
    child: Child,
    port: u16,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn spawn(args: &[&str], port: u16) -> Process {
        let child = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (Debian's redis-server; .ci/run installs it)");
        let p = Process { child, port };
        p.wait_until(|| cli(port, &["ping"]) == "PONG", "answers PING");
        p
    }

    fn wait_until(&self, done: impl Fn() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        // Each look is a redis-cli process, which paces the looks.
        while !done() {
            assert!(
                Instant::now() < deadline,
                "port {}: never {what}",
                self.port
            );
        }
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs (Debian's redis-tools)");
    text(&out.stdout).trim().to_string()
}

/// A replica of the server on `master`, its data in `dir`.
fn replica(dir: &Path, master: u16) -> Process {
    let port = free_port();
    let dir = dir.display().to_string();
    let (port_s, master_s) = (port.to_string(), master.to_string());
    let p = Process::spawn(
        &[
            "--port",
            &port_s,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            &dir,
            "--replicaof",
            "127.0.0.1",
            &master_s,
        ],
        port,
    );
    p.wait_until(
        || cli(port, &["info", "replication"]).contains("master_link_status:up"),
        "in sync with its master",
    );
    p
}

/// A sentinel watching `master` as `mymaster`, deciding alone (quorum 1) and quickly.
fn sentinel(dir: &Path, master: u16) -> Process {
    let port = free_port();
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {master} 1\nsentinel down-after-milliseconds mymaster 2000\nsentinel failover-timeout mymaster 10000\n",
            dir.display()
        ),
    )
    .unwrap();
    Process::spawn(&[&conf.display().to_string(), "--sentinel"], port)
}

/// The port of the master the sentinel names now.
fn master_port(sentinel: u16) -> String {
    let addr = cli(
        sentinel,
        &["sentinel", "get-master-addr-by-name", "mymaster"],
    );
    addr.lines().nth(1).unwrap_or_default().to_string()
}

/// The Celery client sends `f.ok` through the sentinel and prints its result.
const CLIENT: &str = r#"
import sys
from celery import Celery
app = Celery(broker=sys.argv[1], backend="rpc://",
             broker_transport_options={"master_name": "mymaster"})
print(app.send_task("f.ok", args=[int(sys.argv[2])]).get(timeout=60))
"#;

fn send(python: &Path, url: &str, n: u32) -> String {
    let out = Command::new(python)
        .args(["-c", CLIENT, url, &n.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn sentinel_finds_the_master_and_follows_a_failover() {
    let python = redis_python("redis_sentinel");
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let master = RedisServer::start();
    let replica_dir = root.path().join("replica");
    let sentinel_dir = root.path().join("sentinel");
    std::fs::create_dir_all(&replica_dir).unwrap();
    std::fs::create_dir_all(&sentinel_dir).unwrap();
    let replica = replica(&replica_dir, master.port);
    let sentinel = sentinel(&sentinel_dir, master.port);
    let url = format!("sentinel://127.0.0.1:{}/0", sentinel.port);

    let mut d = Daemon::start_with(
        &plugins,
        &root.path().join("w.sock"),
        &["--broker", &url, "--master-name", "mymaster"],
    );
    d.wait_log("consuming from Redis");
    assert_eq!(send(&python, &url, 1), "[1]");

    // The sentinel makes the replica the master; the old master becomes its replica.
    assert_eq!(
        cli(sentinel.port, &["sentinel", "failover", "mymaster"]),
        "OK"
    );
    let new_master = replica.port.to_string();
    sentinel.wait_until(
        || master_port(sentinel.port) == new_master,
        "moved the master",
    );
    replica.wait_until(
        || cli(replica.port, &["role"]).starts_with("master"),
        "became the master",
    );
    assert_eq!(
        send(&python, &url, 2),
        "[2]",
        "answered from the new master"
    );
    assert!(
        cli(replica.port, &["dbsize"]) != "0",
        "the broker's keys live on the new master"
    );
    drop(d);
}
