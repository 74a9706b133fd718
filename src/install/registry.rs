//! The state directory: installed copies, the install record (`installed.json`), install logs,
//! and the lock that serializes installs and uninstalls between processes.
//!
//! The record is the truth about what is installed: the daemon runs exactly the plugins it
//! lists, from the directories it names. It is replaced atomically (write, fsync, rename), so
//! a crash mid-install leaves the previous record whole.

use crate::manifest::{Discovery, Manifest, ManifestError, MANIFEST_FILE};
use plugin_protocol::TaskInfo;
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub const RECORD_FILE: &str = "installed.json";
const RECORD_FORMAT: u32 = 1;

/// One installed plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Installed {
    pub name: String,
    pub version: String,
    /// The installed copy: what the daemon runs.
    pub dir: PathBuf,
    /// The plugins-directory source it was copied from.
    pub source: PathBuf,
    /// SHA-256 of the installed `plugin.toml`.
    pub manifest_sha256: String,
    /// SHA-256 of every file copied (see `tree::digest`).
    pub content_sha256: String,
    /// When the install finished, RFC 3339 UTC.
    pub installed_at: String,
    /// The tasks as the plugin described them in its install-time handshake.
    #[serde(default)]
    pub tasks: Vec<TaskInfo>,
}

/// The whole install record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default)]
    pub format: u32,
    /// Sorted by name.
    #[serde(default)]
    pub plugins: Vec<Installed>,
}

impl Record {
    pub fn get(&self, name: &str) -> Option<&Installed> {
        self.plugins.iter().find(|p| p.name == name)
    }

    /// Adds or replaces the entry of `entry.name`; returns the one it replaced.
    pub fn put(&mut self, entry: Installed) -> Option<Installed> {
        let old = self.remove(&entry.name);
        self.plugins.push(entry);
        self.plugins.sort_by(|a, b| a.name.cmp(&b.name));
        old
    }

    pub fn remove(&mut self, name: &str) -> Option<Installed> {
        let i = self.plugins.iter().position(|p| p.name == name)?;
        Some(self.plugins.remove(i))
    }
}

/// Why the install record could not be read; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read the install record {}: {cause}", path.display())]
    Read { path: PathBuf, cause: io::Error },
    #[error("the install record {} is not valid ({cause}); restore it from a backup or remove it and reinstall", path.display())]
    Invalid {
        path: PathBuf,
        cause: serde_json::Error,
    },
}

/// The state directory (`state_dir`).
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// Held while an install or uninstall changes the state directory; released on drop.
pub struct StateLock {
    _lock: nix::fcntl::Flock<File>,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `installed/<name>`: every installed version of one plugin lives below it.
    pub fn plugin_root(&self, name: &str) -> PathBuf {
        self.root.join("installed").join(name)
    }

    /// Where the output of a plugin's latest install steps is kept.
    pub fn install_log(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.install.log"))
    }

    /// Refuses a state directory that another user could tamper with: it (through any
    /// symlink to it), its `installed/` and `logs/` must be owned by this user or root and
    /// writable by nobody else. The error says how to fix the permissions.
    pub fn check_trusted(&self) -> Result<(), String> {
        let Ok(real) = fs::canonicalize(&self.root) else {
            return Ok(()); // Not created yet: it will be created by this user.
        };
        for dir in [real.clone(), real.join("installed"), real.join("logs")] {
            super::safe::check_trusted(&dir)
                .map_err(|e| format!("untrusted state directory: {e}"))?;
        }
        Ok(())
    }

    /// Reads the record; no file yet means nothing is installed.
    pub fn read(&self) -> Result<Record, RecordError> {
        let path = self.root.join(RECORD_FILE);
        let mut options = File::options();
        options.read(true);
        let opened = super::safe::open_nofollow(&path, &mut options);
        let text = match opened.and_then(|mut f| {
            let mut text = String::new();
            io::Read::read_to_string(&mut f, &mut text).map(|_| text)
        }) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Record::default()),
            Err(cause) => return Err(RecordError::Read { path, cause }),
        };
        serde_json::from_str(&text).map_err(|cause| RecordError::Invalid { path, cause })
    }

    /// Replaces the record atomically.
    pub fn write(&self, record: &Record) -> io::Result<()> {
        fs::create_dir_all(&self.root)?;
        let mut record = record.clone();
        record.format = RECORD_FORMAT;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.root)?;
        tmp.write_all(serde_json::to_string_pretty(&record)?.as_bytes())?;
        tmp.write_all(b"\n")?;
        tmp.as_file().sync_all()?;
        tmp.persist(self.root.join(RECORD_FILE))
            .map_err(|e| e.error)?;
        Ok(())
    }

    /// Takes the state lock, waiting for another install or uninstall to finish first.
    /// `waiting` is called once if the lock is busy.
    pub fn lock(&self, waiting: impl FnOnce()) -> io::Result<StateLock> {
        use nix::fcntl::{Flock, FlockArg};
        fs::create_dir_all(&self.root)?;
        self.check_trusted()
            .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
        let path = self.root.join("lock");
        let open = || {
            let mut options = File::options();
            options.create(true).truncate(false).write(true);
            super::safe::open_nofollow(&path, &mut options)
        };
        match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(StateLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                waiting();
                Flock::lock(open()?, FlockArg::LockExclusive)
                    .map(|lock| StateLock { _lock: lock })
                    .map_err(|(_, e)| io::Error::from(e))
            }
            Err((_, e)) => Err(io::Error::from(e)),
        }
    }

    /// The manifests of the installed plugins, loaded from their installed copies; an entry
    /// whose copy is missing or broken goes to `errors` naming its path.
    pub fn discover(&self) -> Result<Discovery, RecordError> {
        Ok(self.manifests(&self.read()?))
    }

    /// [`StateDir::discover`] for a record already read.
    pub fn manifests(&self, record: &Record) -> Discovery {
        let mut found = Discovery::default();
        for p in &record.plugins {
            match Manifest::load(&p.dir) {
                Ok(m) if m.name == p.name => found.plugins.push(m),
                Ok(m) => found.errors.push(ManifestError {
                    path: p.dir.join(MANIFEST_FILE),
                    message: format!(
                        "installed as `{}` but its manifest names `{}`; reinstall it",
                        p.name, m.name
                    ),
                }),
                Err(e) => found.errors.push(e),
            }
        }
        found
    }

    /// Removes installed copies that no record entry names (replaced or uninstalled versions
    /// nothing runs any more). Only ever deletes below `installed/`.
    pub fn collect_garbage(&self, record: &Record) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let Ok(names) = fs::read_dir(self.root.join("installed")) else {
            return removed;
        };
        // Never through a symlink: a link planted here could point anywhere.
        let real_dirs = |entries: fs::ReadDir| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect::<Vec<_>>()
        };
        for name_dir in real_dirs(names) {
            let keep = name_dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| record.get(n))
                .map(|p| p.dir.clone());
            let Ok(versions) = fs::read_dir(&name_dir) else {
                continue;
            };
            for version in real_dirs(versions) {
                if Some(&version) != keep.as_ref() && remove_tree(&version).is_ok() {
                    removed.push(version);
                }
            }
            // Succeeds only once the plugin has no versions left.
            let _ = fs::remove_dir(&name_dir);
        }
        removed
    }
}

/// Removes a directory tree, making read-only parts (e.g. Go or Cargo caches) writable first.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(path);
            fs::remove_dir_all(path)
        }
        other => other,
    }
}

fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.is_dir() {
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
            if let Ok(entries) = fs::read_dir(path) {
                for e in entries.filter_map(Result::ok) {
                    make_writable(&e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, dir: &Path) -> Installed {
        Installed {
            name: name.into(),
            version: "1.0.0".into(),
            dir: dir.into(),
            source: "/src".into(),
            manifest_sha256: "m".into(),
            content_sha256: "c".into(),
            installed_at: "2026-01-01T00:00:00Z".into(),
            tasks: Vec::new(),
        }
    }

    #[test]
    fn record_round_trips_and_garbage_collection_keeps_recorded_copies() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::new(root.path());
        assert_eq!(state.read().unwrap(), Record::default());
        let current = state.plugin_root("a").join("1.0.0-2");
        let old = state.plugin_root("a").join("1.0.0-1");
        let gone = state.plugin_root("b").join("0.1-1");
        for d in [&current, &old, &gone] {
            fs::create_dir_all(d).unwrap();
        }
        let mut record = Record::default();
        record.put(entry("a", &current));
        state.write(&record).unwrap();
        assert_eq!(state.read().unwrap().get("a").unwrap().dir, current);

        let mut removed = state.collect_garbage(&record);
        removed.sort();
        assert_eq!(removed, vec![old, gone]);
        assert!(current.is_dir());
        assert!(!state.plugin_root("b").exists());
    }

    #[test]
    fn a_corrupt_record_says_what_to_do() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join(RECORD_FILE), "{not json").unwrap();
        let e = StateDir::new(root.path()).read().unwrap_err().to_string();
        assert!(e.contains("is not valid") && e.contains("reinstall"), "{e}");
    }
}
