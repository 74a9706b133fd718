//! One cgroup (v2) per plugin process, where the worker has a cgroup tree to manage: its own
//! cgroup when systemd delegated it (`Delegate=yes`), or a directory named by `cgroup` in
//! worker.toml. Each plugin process enters its cgroup before exec, so everything it starts is
//! in it, even a descendant that calls `setsid()` and clears its environment (which escapes the
//! process group and the environment marker); when the instance ends, `cgroup.kill` ends them
//! all at once. Where the `memory` and `pids` controllers are available, the plugin's `[limits]`
//! `memory` and `processes` also become the cgroup's `memory.max` and `pids.max`.

use crate::manifest::Limits;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Controllers the worker enables for plugin cgroups when they are available.
const WANTED: &[&str] = &["memory", "pids"];

/// How long a killed cgroup may take to empty before its directory is left behind (logged).
const EMPTY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where instance cgroups are created, and which controllers they get.
#[derive(Debug)]
pub struct CgroupTree {
    parent: PathBuf,
    controllers: Vec<String>,
}

impl CgroupTree {
    /// The tree `setting` (`cgroup` in worker.toml) names: `"off"`, `"auto"` (the worker's own
    /// cgroup if it was delegated, else none), or a cgroup v2 directory. An error names the
    /// setting and what to do.
    pub fn open(setting: &str) -> Result<Option<CgroupTree>, String> {
        match setting {
            "off" => Ok(None),
            "auto" => match own_delegated_cgroup() {
                Some(own) => Self::adopt_own(&own).map(Some).map_err(|e| {
                    format!("cgroup = \"auto\": cannot use the delegated cgroup {}: {e}; set `cgroup = \"off\"` to run without", own.display())
                }),
                None => Ok(None),
            },
            dir => Self::at(Path::new(dir)).map(Some),
        }
    }

    /// A directory the operator gave: instance cgroups go right under it (or, if the worker is
    /// in it, under a `plugins` child, as with a delegated one).
    fn at(dir: &Path) -> Result<CgroupTree, String> {
        let is_cgroup2 = nix::sys::statfs::statfs(dir)
            .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
            .unwrap_or(false);
        if !is_cgroup2 || !dir.join("cgroup.procs").exists() {
            return Err(format!(
                "cgroup: {} is not a cgroup v2 directory; give one the worker may manage (e.g. its systemd unit with Delegate=yes, and `cgroup = \"auto\"`), or `cgroup = \"off\"`",
                dir.display()
            ));
        }
        if own_cgroup().is_some_and(|own| same_dir(&own, dir)) {
            return Self::adopt_own(dir)
                .map_err(|e| format!("cgroup: cannot use {}: {e}", dir.display()));
        }
        Ok(CgroupTree {
            parent: dir.to_path_buf(),
            controllers: enable_controllers(dir),
        })
    }

    /// The worker's own delegated cgroup. A cgroup with processes cannot hand controllers to
    /// children, so the worker moves itself into a `supervisor` leaf and the plugins go under
    /// a sibling `plugins`.
    fn adopt_own(own: &Path) -> io::Result<CgroupTree> {
        let supervisor = own.join("supervisor");
        make_dir(&supervisor)?;
        fs::write(supervisor.join("cgroup.procs"), "0")?;
        let plugins = own.join("plugins");
        make_dir(&plugins)?;
        enable_controllers(own);
        Ok(CgroupTree {
            controllers: enable_controllers(&plugins),
            parent: plugins,
        })
    }

    /// For `status`: where plugin cgroups are and what they cap.
    pub fn describe(&self) -> String {
        let caps = if self.controllers.is_empty() {
            "kill only: no memory or pids controller available there, use [limits]".to_string()
        } else {
            let caps: Vec<String> = self
                .controllers
                .iter()
                .map(|c| match c.as_str() {
                    "memory" => "memory.max".to_string(),
                    "pids" => "pids.max".to_string(),
                    other => other.to_string(),
                })
                .collect();
            format!("cgroup.kill and {} from [limits]", caps.join(", "))
        };
        format!(
            "a cgroup v2 per plugin process under {} ({caps})",
            self.parent.display()
        )
    }

    /// A new cgroup for one process of `plugin`, with its limits.
    pub fn create(
        &self,
        plugin: &str,
        instance: u32,
        limits: &Limits,
    ) -> io::Result<InstanceCgroup> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = self.parent.join(format!("{plugin}.{instance}.{n}"));
        make_dir(&dir)?;
        let has = |c: &str| self.controllers.iter().any(|x| x == c);
        if let (true, Some(bytes)) = (has("memory"), limits.memory) {
            fs::write(dir.join("memory.max"), bytes.to_string())?;
        }
        if let (true, Some(n)) = (has("pids"), limits.processes) {
            fs::write(dir.join("pids.max"), n.to_string())?;
        }
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?
            .into();
        Ok(InstanceCgroup { dir, procs })
    }
}

/// The cgroup of one plugin process.
#[derive(Debug)]
pub struct InstanceCgroup {
    dir: PathBuf,
    /// Opened before the fork: the child joins with one `write`.
    procs: OwnedFd,
}

impl InstanceCgroup {
    /// The `cgroup.procs` descriptor a child passes to [`enter`] between fork and exec.
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills every process in it, waits (blocking, briefly) until it is empty, and removes it.
    pub fn kill_and_remove(self) -> io::Result<()> {
        fs::write(self.dir.join("cgroup.kill"), "1")?;
        let deadline = Instant::now() + EMPTY_TIMEOUT;
        while populated(&self.dir) {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "{} still has processes {EMPTY_TIMEOUT:?} after cgroup.kill",
                    self.dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        fs::remove_dir(&self.dir)
    }
}

/// In the forked child, before exec: moves it into the cgroup whose `cgroup.procs` is open as
/// `procs` (one async-signal-safe write of "0", which means "the writer").
pub fn enter(procs: RawFd) -> io::Result<()> {
    // SAFETY: `procs` stays open in the child until exec (it is the parent's descriptor,
    // close-on-exec), and write is async-signal-safe.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(procs) };
    nix::unistd::write(fd, b"0")
        .map(|_| ())
        .map_err(io::Error::from)
}

fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|e| e.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Enables the wanted controllers `dir` offers for its children; the ones now enabled.
fn enable_controllers(dir: &Path) -> Vec<String> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<&str> = WANTED
        .iter()
        .copied()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .collect();
    if !wanted.is_empty() {
        let line: Vec<String> = wanted.iter().map(|c| format!("+{c}")).collect();
        if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), line.join(" ")) {
            tracing::warn!(
                "cannot enable {wanted:?} for plugin cgroups in {}: {e}",
                dir.display()
            );
        }
    }
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    enabled
        .split_whitespace()
        .filter(|c| WANTED.contains(c))
        .map(str::to_string)
        .collect()
}

/// The worker's own cgroup v2 directory, where a cgroup2 hierarchy is mounted.
fn own_cgroup() -> Option<PathBuf> {
    let cgroup = fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mountinfo.lines().find_map(cgroup2_mount_point)?;
    Some(Path::new(&mount).join(path.trim_start_matches('/')))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The worker's own cgroup v2 directory, if systemd delegated it (the `trusted.delegate` or
/// `user.delegate` extended attribute, set for `Delegate=yes`).
fn own_delegated_cgroup() -> Option<PathBuf> {
    let dir = own_cgroup()?;
    let delegated = ["trusted.delegate", "user.delegate"]
        .iter()
        .any(|attr| xattr_is_one(&dir, attr));
    delegated.then_some(dir)
}

/// The mount point of a `cgroup2` line of /proc/self/mountinfo.
fn cgroup2_mount_point(line: &str) -> Option<String> {
    let (left, right) = line.split_once(" - ")?;
    if right.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    // Octal escapes (\040 for a space) are rare for cgroup mounts; taken as they are.
    left.split_whitespace().nth(4).map(str::to_string)
}

fn xattr_is_one(path: &Path, name: &str) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(path), Ok(name)) = (
        std::ffi::CString::new(path.as_os_str().as_bytes()),
        std::ffi::CString::new(name),
    ) else {
        return false;
    };
    let mut value = [0u8; 8];
    // SAFETY: both strings are NUL-terminated and `value` is a writable buffer of its length.
    let n = unsafe {
        nix::libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n > 0 && &value[..n as usize] == b"1"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_in_mountinfo() {
        let v2 = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate";
        let v1 =
            "36 25 0:31 / /sys/fs/cgroup/memory rw,relatime shared:10 - cgroup cgroup rw,memory";
        assert_eq!(cgroup2_mount_point(v2).as_deref(), Some("/sys/fs/cgroup"));
        assert_eq!(cgroup2_mount_point(v1), None);
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_refused_naming_the_fix() {
        let err = CgroupTree::open("/tmp").unwrap_err();
        assert!(
            err.contains("/tmp is not a cgroup v2 directory") && err.contains("\"off\""),
            "{err}"
        );
        assert!(CgroupTree::open("off").unwrap().is_none());
    }
}
