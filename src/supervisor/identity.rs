//! Which user a plugin's processes run as. Only a worker running as root can choose: then a
//! plugin runs as its manifest's `user` (and `group`), else as the worker config's
//! `plugin_user`; root only when the manifest says `user = "root"`. Names are resolved before
//! the fork (the password database allocates); the child only calls setgroups/setgid/setuid.

use crate::manifest::Manifest;
use nix::unistd::{Gid, Group, Uid, User};
use std::io;
use std::path::PathBuf;

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
        (None, None) => return Ok(None),
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

/// Says once per plugin and process that it runs as root because nothing chose another user.
pub fn warn_root_once(plugin: &str) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().expect("warned lock");
    if !warned.iter().any(|p| p == plugin) {
        warned.push(plugin.to_string());
        tracing::warn!(plugin, "plugin `{plugin}` runs as root (without capabilities): set `plugin_user` in worker.toml, or `user` in its plugin.toml");
    }
}
