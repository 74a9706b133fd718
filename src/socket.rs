//! Where the control socket lives and whom it trusts. The daemon binds only in a directory that
//! is its own and writable by nobody else (created 0700, or refused with how to fix it), under a restrictive
//! umask so the socket is never reachable by others even for a moment; the CLI talks only to a
//! socket owned by itself or root, since anyone who could replace the socket could answer as
//! the daemon and read the tasks sent to it.

use nix::sys::stat::{umask, Mode};
use nix::unistd::geteuid;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot use {} for the control socket: {reason}", dir.display())]
    UntrustedDir { dir: PathBuf, reason: String },
    #[error("refusing the control socket {}: it is owned by uid {owner}, not by you (uid {me}) or root, so another user could answer as the worker; use --socket to name your worker's socket", path.display())]
    ForeignOwner { path: PathBuf, owner: u32, me: u32 },
    #[error("refusing the control socket {}: it is a symlink; use --socket with the real path", path.display())]
    Symlink { path: PathBuf },
    #[error("cannot prepare the control socket {}: {cause}", path.display())]
    Io { path: PathBuf, cause: io::Error },
}

/// Creates `dir` (mode 0700) if missing; otherwise it must be a real directory owned by this
/// user and writable by nobody else: whoever can write to it could replace the socket or plant
/// one before the daemon binds. (Read access for others is harmless: the socket is 0600.)
pub fn prepare_dir(dir: &Path) -> Result<(), SocketError> {
    let untrusted = |reason: String| SocketError::UntrustedDir {
        dir: dir.to_path_buf(),
        reason,
    };
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|cause| SocketError::Io {
                path: dir.to_path_buf(),
                cause,
            })?;
    }
    let meta = fs::symlink_metadata(dir).map_err(|cause| SocketError::Io {
        path: dir.to_path_buf(),
        cause,
    })?;
    if meta.file_type().is_symlink() || !meta.is_dir() {
        return Err(untrusted("it is not a directory (or is a symlink)".into()));
    }
    let me = geteuid().as_raw();
    if meta.uid() != me {
        return Err(untrusted(format!(
            "it is owned by uid {}, not by you (uid {me}): another user created it first; remove it or choose another --socket",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "its mode is {:o}: other users can write to it and replace the socket; fix it with `chmod 700 {}`",
            meta.mode() & 0o777,
            dir.display()
        )));
    }
    Ok(())
}

/// Binds `path` so that only this user can ever connect: the directory is checked first and
/// the socket is created under umask 0177 (mode 0600), never chmodded afterwards.
pub fn bind_private(path: &Path) -> Result<std::os::unix::net::UnixListener, SocketError> {
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    umask(old);
    bound.map_err(|cause| SocketError::Io {
        path: path.to_path_buf(),
        cause,
    })
}

/// Before talking to a socket: it must not be a symlink and must be owned by this user or root.
pub fn check_owner(path: &Path) -> Result<(), SocketError> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        // Missing: connecting says so, with how to start a worker.
        return Ok(());
    };
    if meta.file_type().is_symlink() {
        return Err(SocketError::Symlink {
            path: path.to_path_buf(),
        });
    }
    let me = geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(SocketError::ForeignOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_directory_open_to_others_is_refused_with_the_fix() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("sock");
        prepare_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().mode() & 0o777,
            0o700,
            "created 0700"
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("mode is 777") && e.contains("chmod 700"), "{e}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&dir, root.path().join("link")).unwrap();
        let e = prepare_dir(&root.path().join("link"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("symlink"), "{e}");
    }

    #[test]
    fn a_socket_is_created_0600_and_a_symlink_to_one_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("w.sock");
        let _l = bind_private(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(check_owner(&path).is_ok());
        std::os::unix::fs::symlink(&path, root.path().join("alias.sock")).unwrap();
        assert!(matches!(
            check_owner(&root.path().join("alias.sock")),
            Err(SocketError::Symlink { .. })
        ));
    }
}
