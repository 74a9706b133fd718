//! Runs a plugin's install steps (`install = [[...], ...]` in `plugin.toml`) in its installed
//! copy's directory.
//!
//! Each step is a child process in its own process group, with a clean environment: what a
//! plugin gets (`process::inherited_env`), what package tools need to reach their registries
//! (proxies, CA bundles, their own `PIP_*`, `NPM_CONFIG_*`, `CARGO_*` settings), and
//! `WORKER_PLUGIN_NAME`, `WORKER_PLUGIN_DIR` (the copy) and `WORKER_PLUGIN_SOURCE` (where it
//! was copied from); never a worker setting or credential such as `WORKER_BROKER`. Its stdout
//! and stderr go to the install log; the last lines are kept for the error message. A step that runs past
//! `timeouts.install` is killed with its whole group, and so is anything a finished step
//! left running.

use crate::framed::read_log_line;
use crate::manifest::Manifest;
use crate::supervisor::process::{describe_exit, signal_group};
use nix::sys::signal::Signal;
use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

/// Variables install steps inherit besides a plugin's own: how package tools reach their
/// registries through this host's proxies and certificate bundles.
const TOOL_ENV: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
];

/// Prefixes of the package tools' own settings (pip, npm, cargo/rustup, uv), also inherited.
const TOOL_ENV_PREFIXES: &[&str] = &[
    "PIP_",
    "NPM_CONFIG_",
    "npm_config_",
    "CARGO_",
    "RUSTUP_",
    "UV_",
];

fn tool_setting(name: &str) -> bool {
    TOOL_ENV.contains(&name) || TOOL_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Lines of a failed step's output quoted in its error.
const TAIL_LINES: usize = 15;

/// A step's output line is kept up to this many bytes: a step that writes megabytes without
/// a newline (a progress bar, a binary dump) must not make the installer hold them all.
const STEP_LINE_BYTES: usize = 16 * 1024;

/// Lines read but not yet logged: past this, the readers wait, and so does the step's pipe.
const STEP_LINES_QUEUED: usize = 256;

/// Why a step failed.
#[derive(Debug, Clone, PartialEq)]
pub struct StepFailure {
    /// 1-based.
    pub step: usize,
    pub argv: Vec<String>,
    pub reason: String,
    /// Its last output lines.
    pub tail: Vec<String>,
}

impl std::fmt::Display for StepFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.reason)?;
        for line in &self.tail {
            write!(f, "\n    | {line}")?;
        }
        Ok(())
    }
}

/// Runs every step of `m` (already relocated to its copy) in order; stops at the first that
/// fails. `log` receives each step's command line and output.
pub async fn run(m: &Manifest, source: &Path, log: &mut impl Write) -> Result<(), StepFailure> {
    for (i, argv) in m.install.iter().enumerate() {
        run_step(m, source, i + 1, argv, log).await?;
    }
    Ok(())
}

/// Starts one step in its own process group, with the plugin's environment and the tools'.
fn spawn_step(
    m: &Manifest,
    source: &Path,
    program: &Path,
    argv: &[String],
) -> std::io::Result<tokio::process::Child> {
    Command::new(program)
        .args(&argv[1..])
        .current_dir(&m.dir)
        .env_clear()
        .envs(crate::supervisor::process::inherited_env(m, tool_setting))
        .env("WORKER_PLUGIN_NAME", &m.name)
        .env("WORKER_PLUGIN_DIR", &m.dir)
        .env("WORKER_PLUGIN_SOURCE", source)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

/// Runs step number `step` to its end (or its timeout), logging its output.
async fn run_step(
    m: &Manifest,
    source: &Path,
    step: usize,
    argv: &[String],
    log: &mut impl Write,
) -> Result<(), StepFailure> {
    let _ = writeln!(log, "$ {}", argv.join(" "));
    let fail = |reason: String, tail: Vec<String>| StepFailure {
        step,
        argv: argv.to_vec(),
        reason,
        tail,
    };
    let program = m.resolve_program(&argv[0]);
    let mut child = spawn_step(m, source, &program, argv)
        .map_err(|e| fail(format!("cannot start `{}`: {e}", program.display()), vec![]))?;
    let pid = child.id().unwrap_or(0);
    let (tx, mut lines) = mpsc::channel(STEP_LINES_QUEUED);
    let readers = [
        tokio::spawn(read_lines(child.stdout.take(), tx.clone())),
        tokio::spawn(read_lines(child.stderr.take(), tx)),
    ];
    let mut tail = VecDeque::new();
    let deadline = tokio::time::sleep(m.timeouts.install);
    tokio::pin!(deadline);
    let mut keep = |line: String| {
        let _ = writeln!(log, "{line}");
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    };
    let status = loop {
        tokio::select! {
            Some(line) = lines.recv() => keep(line),
            status = child.wait() => break Some(status),
            _ = &mut deadline => break None,
        }
    };
    // Whatever the step left running is not part of the plugin; its group goes, which
    // also closes the pipes it may have inherited.
    signal_group(pid, Signal::SIGKILL);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while let Some(line) = lines.recv().await {
            keep(line);
        }
    })
    .await;
    for p in readers {
        p.abort();
    }
    let timed_out = status.is_none();
    let status = match status {
        Some(s) => s,
        None => child.wait().await,
    };
    let tail: Vec<String> = tail.into();
    if timed_out {
        return Err(fail(
            format!(
                "timed out after {:?} (timeouts.install) and was killed",
                m.timeouts.install
            ),
            tail,
        ));
    }
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => return Err(fail(describe_exit(&s), tail)),
        Err(e) => return Err(fail(format!("could not be waited for: {e}"), tail)),
    }
    Ok(())
}

/// Sends each line of `pipe` (the last one even without a newline), each cut at
/// `STEP_LINE_BYTES` with a note of how much was left out.
async fn read_lines(pipe: Option<impl AsyncRead + Unpin>, tx: mpsc::Sender<String>) {
    let Some(pipe) = pipe else { return };
    let mut reader = BufReader::new(pipe);
    while let Ok(Some((mut line, cut))) = read_log_line(&mut reader, STEP_LINE_BYTES).await {
        if cut > 0 {
            line.push_str(&format!(" [{cut} more bytes not kept]"));
        }
        if tx.send(line).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn manifest(dir: &Path, steps: &str) -> Manifest {
        let text = format!(
            "name = \"p\"\nversion = \"1\"\ncommand = [\"x\"]\ninstall = {steps}\n[timeouts]\ninstall = 2\n[[tasks]]\nname = \"t\"\n"
        );
        Manifest::parse(&text, dir).unwrap()
    }

    #[tokio::test]
    async fn steps_run_in_order_in_the_plugin_dir_with_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(
            dir.path(),
            r#"[["/bin/sh", "-c", "echo $WORKER_PLUGIN_NAME > a"], ["/bin/sh", "-c", "cat a > b; echo from $WORKER_PLUGIN_SOURCE in $WORKER_PLUGIN_DIR"]]"#,
        );
        let mut log = Vec::new();
        run(&m, Path::new("/the/source"), &mut log).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("b")).unwrap(),
            "p\n"
        );
        let log = String::from_utf8(log).unwrap();
        let want = format!("from /the/source in {}", dir.path().display());
        assert!(log.contains(&want), "{log}");
    }

    #[tokio::test]
    async fn a_failing_step_is_named_with_its_status_and_last_output() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(
            dir.path(),
            r#"[["/bin/true"], ["/bin/sh", "-c", "echo resolving; echo 'no matching distribution' >&2; exit 3"], ["/bin/sh", "-c", "touch never"]]"#,
        );
        let e = run(&m, dir.path(), &mut Vec::new()).await.unwrap_err();
        assert_eq!(e.step, 2);
        assert!(e.reason.contains("status 3"), "{e}");
        assert!(
            e.tail.iter().any(|l| l == "no matching distribution"),
            "{e:?}"
        );
        assert!(!dir.path().join("never").exists(), "later steps do not run");

        let m = manifest(dir.path(), r#"[["./missing-tool"]]"#);
        let e = run(&m, dir.path(), &mut Vec::new()).await.unwrap_err();
        assert!(
            e.reason.contains("cannot start") && e.reason.contains("missing-tool"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_flood_of_output_is_logged_whole_and_a_huge_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(
            dir.path(),
            r#"[["/bin/sh", "-c", "seq 1 100000; head -c 3000000 /dev/zero | tr '\\0' x; echo; printf 'no newline'; exit 4"]]"#,
        );
        let mut log = Vec::new();
        let e = run(&m, dir.path(), &mut log).await.unwrap_err();
        assert!(e.reason.contains("status 4"), "{e}");
        let log = String::from_utf8(log).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        // Every line of the flood, in order, though the readers waited for the log.
        assert_eq!(lines[1], "1");
        assert_eq!(lines[100_000], "100000");
        let cut = 3_000_000 - STEP_LINE_BYTES;
        assert_eq!(
            lines[100_001],
            format!(
                "{} [{cut} more bytes not kept]",
                "x".repeat(STEP_LINE_BYTES)
            )
        );
        assert_eq!(e.tail.last().map(String::as_str), Some("no newline"));
    }

    #[tokio::test]
    async fn a_hung_step_and_its_children_are_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(
            dir.path(),
            r#"[["/bin/sh", "-c", "sleep 300 & echo $! > child; wait"]]"#,
        );
        let e = tokio::time::timeout(
            Duration::from_secs(30),
            run(&m, dir.path(), &mut Vec::new()),
        )
        .await
        .expect("the timeout ends the step")
        .unwrap_err();
        assert!(e.reason.contains("timed out"), "{e}");
        let child: i32 = std::fs::read_to_string(dir.path().join("child"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed with its group (it may linger as a zombie until init reaps it).
        let gone = || {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            stat.is_empty() || stat.contains(") Z")
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !gone() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gone(), "the step's child still runs");
    }
}
