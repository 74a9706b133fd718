//! Installing plugins: from a source in the plugins directory to an immutable, self-contained
//! copy in the state directory that the daemon runs.
//!
//! An install never touches what is installed until it has fully succeeded: the new version
//! is copied into a directory of its own (`installed/<name>/<version>-<time>/`), its install
//! steps run there (so a venv, `node_modules` or build output belongs to that copy alone), and
//! it must start and handshake before the caller records it. The previous version's files stay
//! untouched and running throughout; a failure at any stage removes only the new copy.

pub mod daemons;
pub mod registry;
pub mod safe;
pub mod steps;
pub mod tree;
pub mod version;

use crate::manifest::{Manifest, MANIFEST_FILE};
use registry::{Installed, Record, StateDir};
use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};

/// The stage at which an install failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    /// Finding and validating the manifest, and deciding whether to install.
    Manifest,
    Copy,
    /// An install step: its number (1-based) and argv.
    Step(usize, Vec<String>),
    Handshake,
    /// Starting the new version in the running daemon.
    Daemon,
    /// Writing the install record.
    Record,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Manifest => write!(f, "manifest"),
            Stage::Copy => write!(f, "copy"),
            Stage::Step(n, argv) => write!(f, "install step {n} (`{}`)", argv.join(" ")),
            Stage::Handshake => write!(f, "handshake"),
            Stage::Daemon => write!(f, "start in the running daemon"),
            Stage::Record => write!(f, "install record"),
        }
    }
}

/// Why installing one plugin failed; what was installed before stays installed.
#[derive(Debug, Clone, PartialEq)]
pub struct InstallError {
    pub name: String,
    pub stage: Stage,
    pub reason: String,
}

impl fmt::Display for InstallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed at {}: {}", self.name, self.stage, self.reason)
    }
}

/// How an available plugin relates to what is installed under its name.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    NotInstalled,
    /// Newer than the installed version.
    Upgrade {
        from: String,
    },
    /// The same version with the same files.
    Same,
    /// The same version with different files.
    Modified,
    /// Older than the installed version.
    Downgrade {
        from: String,
    },
}

impl Change {
    /// Compares `version` with what is installed; `content_sha256` (the digest of the files,
    /// costly to compute) is asked for only when the versions are equal.
    pub fn of(
        installed: Option<&Installed>,
        version: &str,
        content_sha256: impl FnOnce() -> std::io::Result<String>,
    ) -> std::io::Result<Change> {
        let Some(i) = installed else {
            return Ok(Change::NotInstalled);
        };
        Ok(match version::compare(version, &i.version) {
            Ordering::Greater => Change::Upgrade {
                from: i.version.clone(),
            },
            Ordering::Less => Change::Downgrade {
                from: i.version.clone(),
            },
            Ordering::Equal if i.content_sha256 == content_sha256()? => Change::Same,
            Ordering::Equal => Change::Modified,
        })
    }

    /// Short label for listings (`list`'s Available section, `--json` `status`).
    pub fn label(&self) -> &'static str {
        match self {
            Change::NotInstalled => "not-installed",
            Change::Upgrade { .. } => "update-available",
            Change::Same => "installed",
            Change::Modified => "modified",
            Change::Downgrade { .. } => "older-than-installed",
        }
    }
}

/// Installs plugins into one state directory.
pub struct Installer<'a> {
    pub state: &'a StateDir,
    /// Sent in the install-time `initialize`.
    pub worker_name: &'a str,
    pub max_line_bytes: usize,
    /// `plugin_user` of the worker config: who the handshake runs as when installing as root.
    pub plugin_user: Option<&'a str>,
}

/// A new version copied, built and handshaken: ready to be recorded.
#[derive(Debug, Clone)]
pub struct Staged {
    pub entry: Installed,
    pub change: Change,
}

impl Installer<'_> {
    /// Copies `source` into a new directory, runs its install steps there and handshakes with
    /// it. `Ok(None)` means the same version with the same files is already installed. Refuses
    /// a downgrade, or different files under an installed version, unless `force`.
    pub async fn stage(
        &self,
        source: &Manifest,
        record: &Record,
        force: bool,
    ) -> Result<Option<Staged>, InstallError> {
        let fail = |stage: Stage, reason: String| InstallError {
            name: source.name.clone(),
            stage,
            reason,
        };
        if let Some((task, owner)) = record
            .plugins
            .iter()
            .filter(|p| p.name != source.name)
            .find_map(|p| {
                let clash = p
                    .tasks
                    .iter()
                    .find(|t| source.task_names().any(|s| s == t.name))?;
                Some((clash.name.clone(), p.name.clone()))
            })
        {
            return Err(fail(
                Stage::Manifest,
                format!("task `{task}` is already served by installed plugin `{owner}`; rename the task or uninstall `{owner}` first"),
            ));
        }
        let change = Change::of(record.get(&source.name), &source.version, || {
            tree::digest(&source.dir, tree::Symlinks::of(source))
        })
        .map_err(|e| fail(Stage::Copy, format!("cannot read the source: {e}")))?;
        match (&change, force) {
            (Change::Same, false) => return Ok(None),
            (Change::Downgrade { from }, false) => {
                return Err(fail(
                    Stage::Manifest,
                    format!(
                        "version {} is older than the installed {from}; pass --force to downgrade",
                        source.version
                    ),
                ))
            }
            (Change::Modified, false) => {
                return Err(fail(
                    Stage::Manifest,
                    format!(
                        "version {} is installed with different files; bump `version` in plugin.toml, or pass --force to reinstall it",
                        source.version
                    ),
                ))
            }
            _ => {}
        }
        // `installed/<name>` must be a real directory before anything is copied into it, or
        // removed from it on failure: a symlink there could point anywhere.
        let plugin_root = Path::new("installed").join(&source.name);
        if let Err(e) = safe::dir_under(self.state.root(), &plugin_root) {
            return Err(fail(Stage::Copy, e.to_string()));
        }
        let dir = self.new_copy_dir(&source.name, &source.version);
        let staged = self.build(source, &dir, change).await;
        if staged.is_err() {
            let _ = registry::remove_tree(&dir);
        }
        staged
            .map(Some)
            .map_err(|(stage, reason)| fail(stage, reason))
    }

    /// Copy, steps, handshake, into `dir`.
    async fn build(
        &self,
        source: &Manifest,
        dir: &Path,
        change: Change,
    ) -> Result<Staged, (Stage, String)> {
        let content_sha256 =
            tree::copy(&source.dir, dir, tree::Symlinks::of(source)).map_err(|e| {
                (
                    Stage::Copy,
                    format!("cannot copy into {}: {e}", dir.display()),
                )
            })?;
        // What runs is the copy, so its manifest is the one that counts.
        let m = Manifest::load(dir).map_err(|e| (Stage::Manifest, e.to_string()))?;
        if m.name != source.name {
            return Err((
                Stage::Manifest,
                format!(
                    "the source changed during the install: its manifest now names `{}`",
                    m.name
                ),
            ));
        }
        let log_path = self.state.install_log(&m.name);
        let mut log = open_log(self.state, &log_path).map_err(|e| {
            (
                Stage::Copy,
                format!("cannot write {}: {e}", log_path.display()),
            )
        })?;
        steps::run(&m, &source.dir, &mut log).await.map_err(|f| {
            let reason = format!("{f}\n    (full output: {})", log_path.display());
            (Stage::Step(f.step, f.argv), reason)
        })?;
        let hello =
            crate::probe::handshake(&m, self.worker_name, self.max_line_bytes, self.plugin_user)
                .await
                .map_err(|e| (Stage::Handshake, e.to_string()))?;
        if let Some(warning) = crate::supervisor::handshake::version_mismatch(&hello, &m) {
            tracing::warn!(plugin = %m.name, "{warning}");
        }
        tree::seal(dir).map_err(|e| {
            (
                Stage::Copy,
                format!("cannot make {} read-only: {e}", dir.display()),
            )
        })?;
        let manifest_sha256 = tree::file_sha256(&dir.join(MANIFEST_FILE))
            .map_err(|e| (Stage::Copy, e.to_string()))?;
        Ok(Staged {
            entry: Installed {
                name: m.name.clone(),
                version: m.version.clone(),
                dir: dir.to_path_buf(),
                source: source.dir.clone(),
                manifest_sha256,
                content_sha256,
                installed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                tasks: hello.tasks,
            },
            change,
        })
    }

    /// `installed/<name>/<version>-<UTC time>`: a fresh directory per install, so the running
    /// version's files are never written to.
    fn new_copy_dir(&self, name: &str, version: &str) -> PathBuf {
        let safe: String = version
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        let base = self.state.plugin_root(name);
        let mut dir = base.join(format!("{safe}-{stamp}"));
        while dir.exists() {
            dir = base.join(format!("{safe}-{stamp}-{:04x}", fastrand::u16(..)));
        }
        dir
    }
}

/// Opens the install log for writing, never through a symlink planted in the state dir.
fn open_log(state: &registry::StateDir, path: &Path) -> std::io::Result<std::fs::File> {
    safe::dir_under(state.root(), Path::new("logs"))?;
    let mut options = std::fs::File::options();
    options.write(true).create(true).truncate(true);
    safe::open_nofollow(path, &mut options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installed(version: &str, content: &str) -> Installed {
        Installed {
            name: "p".into(),
            version: version.into(),
            dir: "/s/installed/p/x".into(),
            source: "/src/p".into(),
            manifest_sha256: String::new(),
            content_sha256: content.into(),
            installed_at: String::new(),
            tasks: vec![],
        }
    }

    #[test]
    fn change_tells_update_downgrade_same_and_modified_apart() {
        let i = installed("1.2.0", "abc");
        let of = |installed, version, content: &str| {
            Change::of(installed, version, || Ok(content.to_string())).unwrap()
        };
        let unread = || -> std::io::Result<String> { panic!("files read for unequal versions") };
        assert_eq!(
            Change::of(None, "1.0", unread).unwrap(),
            Change::NotInstalled
        );
        assert_eq!(
            Change::of(Some(&i), "1.10.0", unread).unwrap(),
            Change::Upgrade {
                from: "1.2.0".into()
            }
        );
        assert_eq!(
            Change::of(Some(&i), "1.1.9", unread).unwrap(),
            Change::Downgrade {
                from: "1.2.0".into()
            }
        );
        assert_eq!(of(Some(&i), "1.2.0", "abc"), Change::Same);
        assert_eq!(of(Some(&i), "1.2.0", "def"), Change::Modified);
    }
}
