//! Which daemons run from a state directory: each registers itself in `daemons/<pid>.json`
//! (its socket and process start time, so a reused pid is not mistaken for it) and removes the
//! file when it stops. An install or uninstall deletes an old copy only once every live daemon
//! registered here has applied the new record, whichever socket it listens on.

use super::safe;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A daemon running from the state directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonEntry {
    pub pid: u32,
    pub socket: PathBuf,
    /// Field 22 of /proc/<pid>/stat: tells this process from a later one with the same pid.
    pub start_time: u64,
}

/// Removes the daemon's registration when dropped (the daemon stopped).
pub struct Registration {
    path: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from after its closing parenthesis.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Registers this process as a daemon running from `root`, listening on `socket`.
pub fn register(root: &Path, socket: &Path) -> io::Result<Registration> {
    fs::create_dir_all(root)?;
    let dir = safe::dir_under(root, Path::new("daemons"))?;
    let pid = std::process::id();
    let entry = DaemonEntry {
        pid,
        socket: socket.to_path_buf(),
        start_time: start_time(pid).unwrap_or(0),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
    tmp.write_all(serde_json::to_string(&entry)?.as_bytes())?;
    let path = dir.join(format!("{pid}.json"));
    tmp.persist(&path).map_err(|e| e.error)?;
    Ok(Registration { path })
}

/// The daemons registered in `root` that still run; stale registrations are removed.
pub fn live(root: &Path) -> Vec<DaemonEntry> {
    let dir = root.join("daemons");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut live = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let path = e.path();
        let mut options = fs::File::options();
        options.read(true);
        let entry = safe::open_nofollow(&path, &mut options)
            .ok()
            .and_then(|f| serde_json::from_reader::<_, DaemonEntry>(f).ok());
        match entry {
            Some(d) if start_time(d.pid) == Some(d.start_time) => live.push(d),
            _ => {
                let _ = fs::remove_file(&path);
            }
        }
    }
    live
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_lives_while_held_and_stale_ones_are_dropped() {
        let root = tempfile::tempdir().unwrap();
        let reg = register(root.path(), Path::new("/run/w.sock")).unwrap();
        let found = live(root.path());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].pid, std::process::id());
        // A pid reused by another process (different start time) is not this daemon.
        let stale = DaemonEntry {
            pid: std::process::id(),
            socket: "/x".into(),
            start_time: found[0].start_time + 1,
        };
        fs::write(
            root.path().join("daemons/1.json"),
            serde_json::to_string(&stale).unwrap(),
        )
        .unwrap();
        assert_eq!(live(root.path()).len(), 1);
        assert!(!root.path().join("daemons/1.json").exists());
        drop(reg);
        assert!(live(root.path()).is_empty());
    }
}
