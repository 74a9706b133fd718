//! How an instance's process ends: why it must end now ([`Crash`]), the stop sequence after
//! a drain (`exit`, SIGTERM, SIGKILL, each given its grace) or the kill after a crash; then
//! the sweep of whatever it left (its process group, its cgroup, processes that escaped both
//! but carry its marker).

use super::io::Io;
use super::shell::Shell;
use super::{process, Step};
use crate::framed::FramedReader;
use crate::supervisor::containment;
use crate::supervisor::instance::ExitReason;
use crate::supervisor::now::Now;
use crate::supervisor::process::StdoutEvent;
use crate::task::Failure;
use nix::sys::signal::Signal;
use plugin_protocol::{method, Message};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin};
use tokio::time::timeout;

/// How long to wait for the stderr reader to catch up after the process died.
const STDERR_SETTLE: Duration = Duration::from_millis(250);

impl Shell {
    /// Ends the process after the final step: buries it after a crash, or finishes the stop
    /// sequence. Then sweeps its process group and says why it ended.
    pub(super) async fn end(&mut self, step: Step, child: &mut Child, mut io: Io) -> ExitReason {
        let crash = match step {
            Step::Crash(crash) => {
                process::signal_group(self.core.pid, Signal::SIGKILL);
                let _ = child.wait().await;
                Some(crash)
            }
            Step::Drained { grace, exited } => {
                self.finish_stop(child, &mut io.stdin, grace, exited).await;
                None
            }
            Step::Continue | Step::StdoutClosed => unreachable!("drive returns only a final step"),
        };
        // The group may still hold forked grandchildren: sweep it. Once they are gone stderr
        // reaches EOF, so the crash report carries the plugin's last words.
        process::signal_group(self.core.pid, Signal::SIGKILL);
        // Everything in its cgroup, wherever it went and whatever it did to its environment.
        if let Some(cgroup) = io.cgroup.take() {
            let dir = cgroup.dir().to_path_buf();
            match tokio::task::spawn_blocking(move || cgroup.kill_and_remove()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(plugin = %self.core.name(), instance = self.core.spec.index, "could not kill and remove the cgroup {}: {e}", dir.display())
                }
                Err(e) => tracing::warn!(plugin = %self.core.name(), "cgroup cleanup failed: {e}"),
            }
        }
        // And what left the group (`setsid()`) but still carries the marker.
        let marker = io.marker.clone();
        let escaped = tokio::task::spawn_blocking(move || containment::kill_marked(&marker))
            .await
            .unwrap_or_default();
        if !escaped.is_empty() {
            tracing::warn!(plugin = %self.core.name(), instance = self.core.spec.index, pid = self.core.pid, "killed {} process(es) that had left the plugin's process group: {escaped:?}", escaped.len());
        }
        containment::waited(self.core.pid);
        let _ = timeout(STDERR_SETTLE, &mut io.stderr_reader).await;
        let reason = match crash {
            Some(crash) => self.bury(&mut io.stdout, *crash),
            None => ExitReason::Stopped,
        };
        self.core.summarize_stray_lines();
        reason
    }

    /// After `shutdown` was answered (or not in time): `exit`, SIGTERM, SIGKILL, each given
    /// `grace`; then the tasks still in flight were interrupted by the worker.
    async fn finish_stop(
        &mut self,
        child: &mut Child,
        stdin: &mut ChildStdin,
        grace: Duration,
        mut exited: bool,
    ) {
        if !exited {
            self.core.notify(method::EXIT, serde_json::Value::Null);
            // What still waits for stdin goes first (`exit` last), within the same grace.
            let pending = std::mem::take(&mut self.core.out);
            let flushed_then_exited = async {
                let _ = stdin.write_all(pending.pending()).await;
                child.wait().await
            };
            exited = timeout(grace, flushed_then_exited).await.is_ok();
        }
        if !exited {
            tracing::warn!(plugin = %self.core.name(), instance = self.core.spec.index, pid = self.core.pid, "plugin did not exit within {grace:?} of `exit`; sending SIGTERM");
            process::signal_group(self.core.pid, Signal::SIGTERM);
            exited = timeout(grace, child.wait()).await.is_ok();
        }
        if !exited {
            tracing::warn!(plugin = %self.core.name(), instance = self.core.spec.index, pid = self.core.pid, "plugin ignored SIGTERM for {grace:?}; sending SIGKILL");
            process::signal_group(self.core.pid, Signal::SIGKILL);
            let _ = child.wait().await;
        }
        self.core.interrupt_all();
        self.carry_out();
        tracing::info!(plugin = %self.core.name(), instance = self.core.spec.index, pid = self.core.pid, "plugin instance stopped");
    }

    /// After the process died: the answers its pipe still holds (it is dead: only what the
    /// pipe holds is read, at most `STDOUT_AFTER_DEATH` messages), for the core to bury it.
    fn bury<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        stdout: &mut FramedReader<R>,
        crash: Crash,
    ) -> ExitReason {
        let mut answers = Vec::new();
        for _ in 0..process::STDOUT_AFTER_DEATH {
            match process::ready_now(process::next_stdout_event(stdout)) {
                Some(StdoutEvent::Message(Message::Response(r))) => answers.push(r),
                Some(StdoutEvent::Closed | StdoutEvent::TooLong { .. }) | None => break,
                Some(_) => {}
            }
        }
        let reason = self.core.bury(crash, answers, Now::current());
        self.carry_out();
        reason
    }
}

/// Why the process must end now.
pub(super) struct Crash {
    pub(super) reason: String,
    /// A task whose own fault this is (request id and its failure); the others are crashed.
    pub(super) culprit: Option<(u64, Failure)>,
    /// The process broke the protocol: nothing it wrote after that is accepted.
    pub(super) violation: bool,
    /// The handshake showed it can never work with its manifest: no restart.
    pub(super) incompatible: bool,
}

impl Crash {
    pub(super) fn new(reason: String) -> Box<Crash> {
        Box::new(Crash {
            reason,
            culprit: None,
            violation: false,
            incompatible: false,
        })
    }

    pub(super) fn violation(reason: String) -> Box<Crash> {
        Box::new(Crash {
            violation: true,
            ..*Crash::new(reason)
        })
    }

    pub(super) fn incompatible(reason: String) -> Box<Crash> {
        Box::new(Crash {
            incompatible: true,
            ..*Crash::new(reason)
        })
    }
}

impl From<Box<Crash>> for Step {
    fn from(crash: Box<Crash>) -> Step {
        Step::Crash(crash)
    }
}
