//! The child process of one plugin instance: spawning with process hygiene, signalling its
//! process group, and its stdio: the stderr reader (to the log), the stdout reader (to
//! protocol messages) and a batching writer for stdin.
//!
//! Hygiene: each instance leads its own process group (so a stop reaches every process it
//! forked), gets `PR_SET_PDEATHSIG` (so it dies with the worker), and has stderr drained at all
//! times (so a chatty plugin never blocks on a full pipe).

use super::identity::{self, Identity};
use super::{containment, sandbox};
use crate::framed::{read_log_line, FramedReader};
use crate::manifest::Manifest;
use crate::manifest::Sandbox;
use crate::task::TaskEvent;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use plugin_protocol::{Frame, Message, ParseError};
use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::BufReader;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Messages an instance reads from a dead process's stdout for the answers it wrote before it
/// died, at most (a grandchild that kept the pipe open cannot keep the instance reading).
pub const STDOUT_AFTER_DEATH: usize = 64;

/// Stderr lines kept per instance for crash reports and `plugins inspect`.
const STDERR_TAIL_LINES: usize = 20;
/// Longest stderr line kept; the rest of a longer line is dropped from the log.
const STDERR_MAX_LINE: usize = 64 * 1024;

/// What a plugin inherits from the worker's environment, besides `env_passthrough`: never a
/// worker setting or credential (`WORKER_BROKER` may hold a password).
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "TZ", "TMPDIR", "USER", "LOGNAME"];

/// What a plugin's processes (and its install steps) start from: the allowlist above, `LC_*`,
/// what `also` admits, the variables the manifest passes on (`env_passthrough`), a default
/// `PATH`, then the manifest's own `env`.
pub fn inherited_env(manifest: &Manifest, also: impl Fn(&str) -> bool) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            INHERITED_ENV.contains(&k.as_str())
                || k.starts_with("LC_")
                || also(k)
                || manifest.env_passthrough.iter().any(|p| p == k)
        })
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    env.extend(manifest.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// The plugin's environment: `inherited_env`, and the `WORKER_PLUGIN_*` variables.
fn plugin_env(manifest: &Manifest, launch: &Launch) -> Vec<(String, String)> {
    let mut env = inherited_env(manifest, |_| false);
    env.push(("WORKER_PLUGIN_NAME".into(), manifest.name.clone()));
    env.push(("WORKER_PLUGIN_INSTANCE".into(), launch.instance.to_string()));
    env.push((containment::MARKER_VAR.into(), launch.marker.into()));
    if let Some(data) = launch.data {
        env.push(("WORKER_PLUGIN_DATA".into(), data.display().to_string()));
    }
    if let Some(id) = launch.identity {
        env.retain(|(k, _)| !matches!(k.as_str(), "HOME" | "USER" | "LOGNAME"));
        env.push(("HOME".into(), id.home.display().to_string()));
        env.push(("USER".into(), id.name.clone()));
        env.push(("LOGNAME".into(), id.name.clone()));
    }
    if let Some(tmp) = launch.tmp {
        env.retain(|(k, _)| k != "TMPDIR");
        env.push(("TMPDIR".into(), tmp.display().to_string()));
    }
    env
}

/// What differs between two processes of one plugin.
pub struct Launch<'a> {
    pub instance: u32,
    /// See [`containment`].
    pub marker: &'a str,
    /// `WORKER_PLUGIN_DATA`: the one place the plugin may write besides its tmp.
    pub data: Option<&'a Path>,
    /// Its private `TMPDIR` under `sandbox = "strict"`.
    pub tmp: Option<&'a Path>,
    /// The user to switch to (a worker running as root; see `identity`).
    pub identity: Option<&'a Identity>,
    /// The cgroup the process enters before exec, where the worker has a cgroup tree.
    pub cgroup: Option<&'a super::cgroup::InstanceCgroup>,
}

/// `<state_dir>/<kind>/<name>/`, a directory of the plugin's own: `data` (its writable data
/// directory, kept across versions, restarts and reinstalls) or `tmp` (the private tmp of a
/// strict plugin). Made (0700) where missing, never through a symlink.
pub fn plugin_dir(state_dir: &Path, kind: &str, name: &str) -> io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    // `worker run` of a plugin that was never installed may find no state directory yet.
    std::fs::create_dir_all(state_dir)?;
    let dir = crate::install::safe::dir_under(state_dir, &Path::new(kind).join(name))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// Spawns the plugin's command in its own process group (and its own cgroup, where there is a
/// cgroup tree), with piped stdio, a clean environment, its user (a root worker), no way to gain privileges (`PR_SET_NO_NEW_PRIVS`),
/// no capabilities, its `[limits]`, its sandbox, and `PR_SET_PDEATHSIG` so it dies with the
/// worker.
pub fn spawn(manifest: &Manifest, launch: Launch) -> io::Result<Child> {
    let mut cmd = Command::new(manifest.program());
    cmd.args(&manifest.command[1..])
        .current_dir(&manifest.dir)
        .env_clear()
        .envs(plugin_env(manifest, &launch))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let parent = nix::unistd::getpid();
    let limits = manifest.limits.clone();
    let identity = launch.identity.cloned();
    let mut ruleset = match (manifest.sandbox, launch.data, launch.tmp) {
        (Sandbox::None, _, _) => None,
        (Sandbox::Strict, Some(data), Some(tmp)) => Some(sandbox::strict(&manifest.dir, data, tmp)?),
        (Sandbox::Strict, _, _) => {
            return Err(io::Error::other(
                "sandbox = \"strict\" needs a data directory and a private tmp (run it from a daemon or `worker run`)",
            ))
        }
    };
    let cgroup_procs = launch.cgroup.map(|c| c.procs_fd());
    // SAFETY: runs in the forked child before exec and only makes async-signal-safe calls
    // (write, prctl, capset, setrlimit, landlock_restrict_self, getppid, _exit); `limits` was
    // cloned, the ruleset built and the cgroup opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Into its cgroup first, while still the worker's user: all it starts follows.
            if let Some(procs) = cgroup_procs {
                super::cgroup::enter(procs)?;
            }
            // The bounding set first: shrinking it needs CAP_SETPCAP, gone after setuid.
            drop_bounding_set()?;
            if let Some(identity) = &identity {
                identity::enter(identity)?;
            }
            // After the switch: changing credentials clears the parent-death signal.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            nix::sys::prctl::set_no_new_privs().map_err(io::Error::from)?;
            clear_capabilities()?;
            apply_limits(&limits)?;
            if let Some(ruleset) = ruleset.take() {
                sandbox::enter(ruleset)?;
            }
            // The worker may have died between fork and prctl; then nobody would kill us.
            if nix::unistd::getppid() != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
    let spawning = containment::spawning();
    let child = cmd.spawn()?;
    spawning.spawned(child.id());
    Ok(child)
}

/// Empties the capability bounding set, so that an exec as uid 0 gains no capability back.
/// Only raw syscalls: this runs between fork and exec.
fn drop_bounding_set() -> io::Result<()> {
    use nix::libc;
    // SAFETY: prctl with plain integer arguments.
    unsafe {
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                match *libc::__errno_location() {
                    // Past the kernel's last capability.
                    libc::EINVAL => break,
                    // Without CAP_SETPCAP (not root) the bounding set cannot shrink, and the
                    // sets below are already empty for a plain user.
                    libc::EPERM => break,
                    _ => return Err(io::Error::last_os_error()),
                }
            }
        }
    }
    Ok(())
}

/// Drops every capability left (the worker may run as root): the ambient set, then the
/// effective, permitted and inheritable sets. Only raw syscalls: this runs between fork and exec.
fn clear_capabilities() -> io::Result<()> {
    use nix::libc;
    // SAFETY: prctl and capset with plain integer arguments and a pointer to stack data.
    unsafe {
        // Fails with EINVAL on kernels without ambient capabilities: nothing to clear then.
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// setrlimit for each limit the manifest sets (soft = hard); core dumps off by default.
fn apply_limits(limits: &crate::manifest::Limits) -> io::Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    let set = |resource, value: u64| setrlimit(resource, value, value).map_err(io::Error::from);
    set(Resource::RLIMIT_CORE, limits.core)?;
    if let Some(v) = limits.memory {
        set(Resource::RLIMIT_AS, v)?;
    }
    if let Some(v) = limits.open_files {
        set(Resource::RLIMIT_NOFILE, v)?;
    }
    if let Some(v) = limits.processes {
        set(Resource::RLIMIT_NPROC, v)?;
    }
    if let Some(v) = limits.cpu_time {
        // SIGXCPU at the limit (named in the crash report), SIGKILL a second later.
        setrlimit(Resource::RLIMIT_CPU, v, v.saturating_add(1)).map_err(io::Error::from)?;
    }
    if limits.nice > 0 {
        // SAFETY: a plain syscall on this process (async-signal-safe, as `pre_exec` needs).
        let set =
            unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS as _, 0, limits.nice.into()) };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if limits.idle_cpu {
        let param = nix::libc::sched_param { sched_priority: 0 };
        // SAFETY: a plain syscall on this process, with a parameter it only reads.
        let set = unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_IDLE, &param) };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends `signal` to every process in the group led by `pid`. A group that is already gone
/// is not an error.
/// How long process `pid`'s threads have waited, in all, for a CPU while runnable (the
/// scheduler's `run_delay` in `/proc/<pid>/task/*/schedstat`); `None` without that file (no
/// such process, or a kernel without scheduler statistics).
pub fn cpu_wait(pid: u32) -> Option<std::time::Duration> {
    if pid == 0 {
        return None;
    }
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut waited_ns = None::<u64>;
    for thread in threads.flatten() {
        let Ok(stat) = std::fs::read_to_string(thread.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = stat
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
        {
            waited_ns = Some(waited_ns.unwrap_or(0) + ns);
        }
    }
    waited_ns.map(std::time::Duration::from_nanos)
}

pub fn signal_group(pid: u32, signal: Signal) {
    // killpg(0) would signal the worker's own group: never do that for an unknown pid.
    if pid == 0 {
        return;
    }
    let _ = killpg(Pid::from_raw(pid as i32), signal);
}

/// The last stderr lines of an instance slot, each with the pid that wrote it, shared between
/// the stderr reader of each of its processes and whoever reports on it. Crash reports quote only the
/// lines of the process that crashed.
#[derive(Debug, Clone, Default)]
pub struct StderrTail(Arc<Mutex<VecDeque<(u32, String)>>>);

impl StderrTail {
    fn push(&self, pid: u32, line: String) {
        let mut tail = crate::sync::lock(&self.0);
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back((pid, line));
    }

    /// Every kept line, oldest first; lines of another process than `current` (an earlier
    /// process of the slot) are marked with their pid.
    pub fn lines(&self, current: Option<u32>) -> Vec<String> {
        let tail = crate::sync::lock(&self.0);
        tail.iter()
            .map(|(pid, line)| match Some(*pid) == current {
                true => line.clone(),
                false => format!("[pid {pid}] {line}"),
            })
            .collect()
    }

    /// `"; last stderr: a | b"` with the last `n` lines of process `pid`, or nothing when it
    /// wrote none.
    pub fn summary(&self, pid: u32, n: usize) -> String {
        let lines: Vec<String> = {
            let tail = crate::sync::lock(&self.0);
            tail.iter()
                .filter(|(p, _)| *p == pid)
                .map(|(_, l)| l.clone())
                .collect()
        };
        if lines.is_empty() {
            return String::new();
        }
        let start = lines.len().saturating_sub(n);
        format!("; last stderr: {}", lines[start..].join(" | "))
    }
}

/// Where a process's stderr lines also go while one task that asked for its log
/// ([`TaskRequest::capture_log`](crate::task::TaskRequest)) runs alone on it: set by the
/// instance, read by the stderr reader. Weak, so it never keeps a finished task's event
/// channel open; a full channel drops the line (stderr is never held back).
#[derive(Debug, Clone, Default)]
pub struct TaskLog(Arc<Mutex<Option<mpsc::WeakSender<Box<TaskEvent>>>>>);

impl TaskLog {
    pub fn set(&self, to: Option<mpsc::WeakSender<Box<TaskEvent>>>) {
        *crate::sync::lock(&self.0) = to;
    }

    fn offer(&self, line: &str) {
        let sink = crate::sync::lock(&self.0)
            .as_ref()
            .and_then(|w| w.upgrade());
        if let Some(tx) = sink {
            let _ = tx.try_send(Box::new(TaskEvent::Log {
                line: line.to_string(),
            }));
        }
    }
}

/// Who a log line comes from.
#[derive(Debug, Clone)]
pub struct LogOrigin {
    pub plugin: String,
    pub instance: u32,
    pub pid: u32,
}

/// Reads stderr to the end, logging each line and keeping the tail.
pub fn read_stderr<R>(
    stderr: R,
    origin: LogOrigin,
    tail: StderrTail,
    task_log: TaskLog,
) -> JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr);
        while let Ok(Some((line, _))) = read_log_line(&mut reader, STDERR_MAX_LINE).await {
            tracing::info!(
                target: "plugin",
                plugin = %origin.plugin,
                instance = origin.instance,
                pid = origin.pid,
                "{line}"
            );
            task_log.offer(&line);
            tail.push(origin.pid, line);
        }
    })
}

/// What the stdout reader saw.
#[derive(Debug)]
pub enum StdoutEvent {
    Message(Message),
    /// A stray line (not JSON-RPC): logged and counted, never fatal.
    Stray {
        line: String,
        error: ParseError,
    },
    /// A line over the limit: a protocol violation.
    TooLong {
        seen: usize,
    },
    /// End of stdout, or a read error.
    Closed,
}

/// The next thing a plugin's stdout says, read by its instance itself (no reader task in
/// between: one hop less per answer). Blank lines are skipped. Cancel-safe, as
/// [`FramedReader::next`] is: the instance reads only while nothing holds its output back, so
/// a slow submitter stops the reading and the plugin blocks on its pipe.
pub async fn next_stdout_event<R: tokio::io::AsyncRead + Unpin>(
    frames: &mut FramedReader<R>,
) -> StdoutEvent {
    loop {
        return match frames.next().await {
            Ok(Some(Frame::Line(line))) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Some(Frame::Line(line))) => parse(&line),
            // Nothing a process writes after breaking the protocol is read: the instance ends it.
            Ok(Some(Frame::TooLong { seen })) => StdoutEvent::TooLong { seen },
            Ok(None) | Err(_) => StdoutEvent::Closed,
        };
    }
}

/// `future`'s output if it is ready without waiting (polled once, with a waker that does
/// nothing: whoever waits on the same source later polls it again with its own).
pub fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

fn parse(line: &[u8]) -> StdoutEvent {
    match Message::parse(line) {
        Ok(msg) => StdoutEvent::Message(msg),
        Err(error) => {
            let mut line = String::from_utf8_lossy(line).into_owned();
            if line.len() > 200 {
                let mut cut = 200;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
                line.push('…');
            }
            StdoutEvent::Stray { line, error }
        }
    }
}

/// Describes how a process ended, for humans: "exited with status 3", "was killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("unknown");
        let why = match Signal::try_from(sig) {
            Ok(Signal::SIGXCPU) => ": it reached its CPU time limit (`limits.cpu_time`)",
            Ok(Signal::SIGXFSZ) => ": it reached a file size limit",
            _ => "",
        };
        format!("was killed by signal {sig} ({name}){why}")
    } else {
        format!("ended ({status})")
    }
}
