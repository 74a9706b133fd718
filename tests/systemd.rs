//! systemd's notify protocol from a real `worker serve`: a datagram socket given as
//! `NOTIFY_SOCKET` receives READY (with STATUS) once the plugins are up, WATCHDOG pings while
//! the actors answer, RELOADING then READY around SIGHUP, STOPPING when draining starts; and the
//! pings stop when a pool actor is wedged (a test-only hook).

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

struct Notified {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Notified {
    fn bind(path: &Path) -> Notified {
        let socket = UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notified {
            socket,
            seen: Vec::new(),
        }
    }

    /// Waits for a message containing `needle`; returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if msg.contains(needle) {
                    return msg;
                }
            }
        }
        panic!("no notification with {needle:?}; seen {:?}", self.seen);
    }

    /// Counts messages containing `needle` over `window`.
    fn count_over(&mut self, needle: &str, window: Duration) -> usize {
        let end = Instant::now() + window;
        let mut n = 0;
        while Instant::now() < end {
            let mut buf = [0u8; 4096];
            if let Ok(len) = self.socket.recv(&mut buf) {
                n += String::from_utf8_lossy(&buf[..len]).contains(needle) as usize;
            }
        }
        n
    }
}

fn serve(root: &Path, notify: &Path) -> Child {
    let plugins = root.join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let (state, socket) = (root.join("w.state"), root.join("w.sock"));
    let (ok, said) = install_all(&plugins, &state, &socket);
    assert!(ok, "{said}");
    worker()
        .args(["serve", "--plugins"])
        .arg(&plugins)
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", "400000")
        .env("WORKER_TEST_HOOKS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

#[test]
fn ready_status_watchdog_reloading_and_stopping_reach_the_service_manager() {
    let root = tempfile::tempdir().unwrap();
    let mut n = Notified::bind(&root.path().join("notify.sock"));
    let mut child = serve(root.path(), &root.path().join("notify.sock"));
    let ready = n.wait_for("READY=1");
    assert!(
        ready.contains("STATUS=1 plugins, 1 instances, 0 tasks in flight"),
        "{ready}"
    );
    // Every 200 ms with a 400 ms watchdog.
    assert!(n.count_over("WATCHDOG=1", Duration::from_millis(2000)) >= 3);
    signal(&child, Signal::SIGHUP);
    let reloading = n.wait_for("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    n.wait_for("READY=1");
    signal(&child, Signal::SIGTERM);
    n.wait_for("STOPPING=1");
    assert!(child.wait().unwrap().success());
}

#[test]
fn watchdog_pings_stop_when_an_actor_is_wedged() {
    let root = tempfile::tempdir().unwrap();
    let mut n = Notified::bind(&root.path().join("notify.sock"));
    let mut child = serve(root.path(), &root.path().join("notify.sock"));
    n.wait_for("READY=1");
    n.wait_for("WATCHDOG=1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = worker::control::Client::connect(&root.path().join("w.sock"))
            .await
            .unwrap();
        let frozen = client
            .call(
                "debug.freeze",
                serde_json::json!({"plugin": "faulty"}),
                |_| {},
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(frozen["frozen"], true);
    });
    // A probe already under way may still complete; after that, silence.
    let _ = n.count_over("WATCHDOG=1", Duration::from_millis(400));
    assert_eq!(n.count_over("WATCHDOG=1", Duration::from_millis(1500)), 0);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn log_lines_to_the_journal_carry_priorities_and_no_timestamps() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::MetadataExt;
    let root = tempfile::tempdir().unwrap();
    let (read, write) = nix::unistd::pipe().unwrap();
    let meta = std::fs::metadata(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        write.as_raw_fd()
    }))
    .unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let mut child = worker()
        .args(["serve", "--plugins"])
        .arg(&plugins)
        .arg("--state-dir")
        .arg(root.path().join("state"))
        .arg("--socket")
        .arg(root.path().join("w.sock"))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(write))
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(std::fs::File::from(read)).lines();
    let mut seen = Vec::new();
    let (mut warn, mut info) = (None, None);
    while warn.is_none() || info.is_none() {
        let line = lines.next().expect("a log line").unwrap();
        if line.contains("no plugins installed") {
            warn = Some(line.clone());
        } else if line.contains("serving") {
            info = Some(line.clone());
        }
        seen.push(line);
        assert!(seen.len() < 50, "{seen:?}");
    }
    assert!(warn.unwrap().starts_with("<4>"), "{seen:?}");
    let info = info.unwrap();
    let timestamp = regex::Regex::new(r"\d{4}-\d{2}-\d{2}T\d{2}:").unwrap();
    assert!(
        info.starts_with("<6>") && !timestamp.is_match(&info),
        "{info}"
    );
    signal(&child, Signal::SIGTERM);
    let _ = child.wait();
}

/// `systemd-analyze`, or `None` (with a message) where it is absent and `CI` is unset.
fn systemd_analyze() -> Option<&'static str> {
    let found = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if found {
        return Some("systemd-analyze");
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "systemd-analyze is missing: install Debian's `systemd` package (.ci/run does)"
    );
    eprintln!("skipped: systemd-analyze is not installed (apt-get install systemd)");
    None
}

#[test]
fn the_packaged_unit_scores_1_5_or_better_in_systemd_analyze_security() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/worker.service");
    let out = std::process::Command::new(analyze)
        .args(["security", "--offline=yes", "--threshold=15", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find(|line| line.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall level in:\n{text}"));
    let level: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("unreadable level: {overall}"));
    assert!(level <= 1.5, "{overall}\n{text}");
    assert!(out.status.success(), "--threshold=15 refused: {overall}");
}

#[test]
fn the_packaged_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/worker.service"),
    )
    .unwrap()
    .replace("/usr/bin/worker", env!("CARGO_BIN_EXE_worker"));
    let path = dir.path().join("worker.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
