//! What keeps a plugin's processes contained beyond its process group: a descendant that
//! calls `setsid()` leaves the group, so every plugin process carries a marker in its
//! environment (`WORKER_PLUGIN_RUN`, inherited by whatever it starts), and when an instance
//! ends every process still carrying its marker is killed. The daemon is a child subreaper,
//! so such orphans become its children instead of init's, and it reaps them (never a process
//! it spawned itself: tokio waits for those).
//!
//! Limits, said plainly: a descendant that clears its environment escapes the marker; only a
//! cgroup holds it, where the worker has one to manage (`cgroup.rs`; the status says which).

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The environment variable that marks every process of one plugin process's tree.
pub const MARKER_VAR: &str = "WORKER_PLUGIN_RUN";

/// Pids this process spawned itself (tokio waits for them): the reaper must never take their
/// exit status. Process-wide because children are.
static SPAWNED: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

/// A marker no other plugin process of this worker has.
pub fn new_marker() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Held while spawning, so the reaper cannot mistake a just-forked child for an orphan.
pub struct Spawning(MutexGuard<'static, Option<HashSet<u32>>>);

pub fn spawning() -> Spawning {
    Spawning(crate::sync::lock(&SPAWNED))
}

impl Spawning {
    pub fn spawned(mut self, pid: Option<u32>) {
        if let Some(pid) = pid {
            self.0.get_or_insert_with(HashSet::new).insert(pid);
        }
    }
}

/// The child `pid` was waited for: it is no longer ours to protect.
pub fn waited(pid: u32) {
    if let Some(set) = crate::sync::lock(&SPAWNED).as_mut() {
        set.remove(&pid);
    }
}

/// SIGKILLs every process (but this one) whose environment carries `marker`; returns their pids.
pub fn kill_marked(marker: &str) -> Vec<u32> {
    let needle = format!("{MARKER_VAR}={marker}");
    let me = std::process::id();
    let mut killed = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes())
            && kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok()
        {
            killed.push(pid);
        }
    }
    killed
}

/// Makes this process the reaper of its orphaned descendants. False where the kernel refuses.
pub fn become_subreaper() -> bool {
    nix::sys::prctl::set_child_subreaper(true).is_ok()
}

/// Reaps adopted orphans that have exited (zombies whose parent is this process and that it
/// did not spawn itself); returns how many.
pub fn reap_orphans() -> usize {
    let me = std::process::id();
    let spawned = crate::sync::lock(&SPAWNED);
    let mut reaped = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if spawned.as_ref().is_some_and(|s| s.contains(&pid)) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let mut fields = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let (state, ppid) = (
            fields.next(),
            fields.next().and_then(|p| p.parse::<u32>().ok()),
        );
        if state == Some("Z") && ppid == Some(me) {
            let reaped_it = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
            reaped += usize::from(reaped_it.is_ok());
        }
    }
    reaped
}

/// Reaps adopted orphans whenever a child exits, until dropped.
pub async fn reap_on_sigchld() {
    let Ok(mut sigchld) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
    else {
        tracing::warn!("cannot watch SIGCHLD; orphaned plugin descendants are not reaped");
        return;
    };
    while sigchld.recv().await.is_some() {
        let n = tokio::task::spawn_blocking(reap_orphans).await.unwrap_or(0);
        if n > 0 {
            tracing::debug!("reaped {n} orphaned plugin process(es)");
        }
    }
}

/// One line for `status` and the start log: how plugin processes are contained here.
pub fn describe(subreaper: bool, cgroups: Option<&super::cgroup::CgroupTree>) -> String {
    let reaper = if subreaper { ", child subreaper" } else { "" };
    let landlock = match super::sandbox::kernel_abi() {
        Some(abi) => format!("Landlock ABI {abi} for sandbox = \"strict\""),
        None => "no Landlock in this kernel: sandbox = \"strict\" plugins run unsandboxed".into(),
    };
    let cgroup = match cgroups {
        Some(tree) => tree.describe(),
        None => "no cgroup v2 to manage (`cgroup` in worker.toml; systemd's Delegate=yes), so no per-plugin cgroup.kill, memory.max or pids.max (use [limits])".into(),
    };
    format!("process groups and an environment marker{reaper}; {landlock}; {cgroup}")
}
