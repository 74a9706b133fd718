//! Which user a plugin's processes run as. Only a worker running as root can choose: then a
//! plugin runs as its manifest's `user` (and `group`), else as the worker config's
//! `plugin_user`, else as `nobody`; root only when the manifest says `user = "root"`. Names are
//! resolved before the fork (the password database allocates); the child only calls
//! setgroups/setgid/setuid. A switched user must be able to enter the plugin's directories,
//! which `check_reach` says before a spawn would fail obscurely.

use crate::manifest::Manifest;
use nix::unistd::{Gid, Group, Uid, User};
use std::io;
use std::path::{Path, PathBuf};

/// Who plugins of a root worker run as when neither their manifest nor `plugin_user` says.
pub const DEFAULT_PLUGIN_USER: &str = "nobody";

/// A resolved user to switch to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
}

fn resolve_user(name: &str, setting: &str) -> io::Result<User> {
    User::from_name(name)
        .map_err(io::Error::from)?
        .ok_or_else(|| {
            io::Error::other(format!(
                "{setting}: no user `{name}` on this system; create it or name another"
            ))
        })
}

/// The identity `manifest`'s processes switch to; `None` to stay the worker's own user (always
/// when the worker is not root, which cannot switch). An error names the setting to fix.
pub fn of(manifest: &Manifest, plugin_user: Option<&str>) -> io::Result<Option<Identity>> {
    if !Uid::effective().is_root() {
        return match &manifest.user {
            Some(user) if resolve_user(user, "plugin.toml `user`")?.uid != Uid::effective() => {
                Err(io::Error::other(format!(
                    "plugin.toml `user`: `{user}` needs a worker running as root to switch to it; remove `user` or run the worker as `{user}`"
                )))
            }
            _ => Ok(None),
        };
    }
    let (user, setting) = match (&manifest.user, plugin_user) {
        (Some(user), _) => (user.as_str(), "plugin.toml `user`"),
        (None, Some(user)) => (user, "worker.toml `plugin_user`"),
        (None, None) => (
            DEFAULT_PLUGIN_USER,
            "the default plugin user (set `plugin_user` in worker.toml)",
        ),
    };
    let entry = resolve_user(user, setting)?;
    let gid = match &manifest.group {
        Some(group) => {
            Group::from_name(group)
                .map_err(io::Error::from)?
                .ok_or_else(|| {
                    io::Error::other(format!(
                        "plugin.toml `group`: no group `{group}` on this system"
                    ))
                })?
                .gid
        }
        None => entry.gid,
    };
    Ok(Some(Identity {
        name: entry.name,
        uid: entry.uid,
        gid,
        home: entry.dir,
    }))
}

/// In the forked child: no supplementary groups, then the group, then the user.
pub fn enter(identity: &Identity) -> io::Result<()> {
    nix::unistd::setgroups(&[]).map_err(io::Error::from)?;
    nix::unistd::setgid(identity.gid).map_err(io::Error::from)?;
    nix::unistd::setuid(identity.uid).map_err(io::Error::from)
}

/// Hands a directory the worker made (data, tmp) to the plugin's user.
pub fn give(dir: &std::path::Path, identity: Option<&Identity>) -> io::Result<()> {
    match identity {
        Some(id) => std::os::unix::fs::chown(dir, Some(id.uid.as_raw()), Some(id.gid.as_raw())),
        None => Ok(()),
    }
}

/// Whether `identity` may enter `dir` (search permission on it and every directory above it,
/// judged by mode bits as that user with no supplementary groups). The error names the
/// directory that stops it and how to fix that.
pub fn check_reach(identity: &Identity, dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    for step in dir.ancestors() {
        let meta = std::fs::metadata(step).map_err(|e| format!("{}: {e}", step.display()))?;
        let bits = if meta.uid() == identity.uid.as_raw() {
            meta.mode() >> 6
        } else if meta.gid() == identity.gid.as_raw() {
            meta.mode() >> 3
        } else {
            meta.mode()
        };
        if bits & 0o1 == 0 {
            return Err(format!(
                "user `{}` cannot enter {} (mode {:04o}, owner uid {}), on the way to {}",
                identity.name,
                step.display(),
                meta.mode() & 0o7777,
                meta.uid(),
                dir.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn someone() -> Identity {
        Identity {
            name: "someone".into(),
            uid: Uid::from_raw(64_999),
            gid: Gid::from_raw(64_999),
            home: "/".into(),
        }
    }

    #[test]
    fn a_closed_directory_on_the_way_is_named() {
        let root = tempfile::tempdir().unwrap();
        let inner = root.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        let open = |p: &Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        open(root.path(), 0o755);
        open(&root.path().join("a"), 0o700);
        let err = check_reach(&someone(), &inner).unwrap_err();
        assert!(
            err.contains("cannot enter") && err.contains("/a (mode 0700"),
            "{err}"
        );
        open(&root.path().join("a"), 0o711);
        assert_eq!(check_reach(&someone(), &inner), Ok(()));
    }
}
