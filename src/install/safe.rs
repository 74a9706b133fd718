//! Paths under the state directory, handled so that nothing planted there can redirect a write
//! or a removal elsewhere: no component is followed if it is a symlink, files are opened with
//! `O_NOFOLLOW`, and a directory writable by another user is not trusted at all.

use nix::unistd::geteuid;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// A directory may be trusted when it is a real directory, owned by this user or root, and
/// writable by nobody else; the error says how to fix it.
pub fn check_trusted(dir: &Path) -> Result<(), String> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    if meta.file_type().is_symlink() || !meta.is_dir() {
        return Err(format!(
            "{} is not a directory (a symlink?); remove it and install again",
            dir.display()
        ));
    }
    let me = geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "{} is owned by uid {}, not by this user (uid {me}) or root, so its owner could redirect what is written or deleted there; fix it with `chown {me} {}`",
            dir.display(),
            meta.uid(),
            dir.display()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by other users (mode {:o}), who could plant symlinks in it; fix it with `chmod go-w {}`",
            dir.display(),
            meta.mode() & 0o777,
            dir.display()
        ));
    }
    Ok(())
}

/// `root/rel` as a directory, created (0755) where missing; any existing component that is a
/// symlink or not a directory is refused, naming it. `rel` must be relative and plain.
pub fn dir_under(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    let mut path = root.to_path_buf();
    for part in rel.components() {
        let Component::Normal(part) = part else {
            return Err(refused(&root.join(rel), "is not a plain relative path"));
        };
        path.push(part);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => return Err(refused(&path, "is a symlink")),
            Ok(m) if !m.is_dir() => return Err(refused(&path, "is not a directory")),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&path)?,
            Err(e) => return Err(e),
        }
    }
    Ok(path)
}

/// Opens `path` with `options`, never through a symlink at its last component.
pub fn open_nofollow(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    options
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(nix::libc::ELOOP) => refused(path, "is a symlink"),
            _ => e,
        })
}

fn refused(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} {what}; the state directory must hold only what the worker put there (remove it)",
            path.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn symlinks_are_never_followed_and_open_dirs_not_trusted() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let state = root.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_trusted(&state).is_ok());
        assert_eq!(
            dir_under(&state, Path::new("a/b")).unwrap(),
            state.join("a/b")
        );

        std::os::unix::fs::symlink(outside.path(), state.join("evil")).unwrap();
        let e = dir_under(&state, Path::new("evil/x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("evil is a symlink"), "{e}");
        assert!(!outside.path().join("x").exists());

        let victim = outside.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, state.join("log")).unwrap();
        let e = open_nofollow(
            &state.join("log"),
            File::options().write(true).truncate(true),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("is a symlink"), "{e}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");

        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_trusted(&state).unwrap_err();
        assert!(
            e.contains("writable by other users") && e.contains("chmod go-w"),
            "{e}"
        );
    }
}
