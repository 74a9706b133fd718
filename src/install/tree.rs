//! A plugin's source tree as install sees it: which files belong to it, their digest, and a
//! self-contained copy of them.
//!
//! Symlinks are followed, so a copy never points back into the source (or anywhere else):
//! an installed plugin keeps working when its source changes or goes away. Version-control
//! metadata and the usual outputs of install steps are skipped: install steps rebuild those in
//! the copy, against the copy's own path.

use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Directory names never copied or digested: VCS metadata, and what install steps build
/// (virtualenvs, `node_modules`, Cargo's `target`, bytecode caches).
pub const SKIPPED: &[&str] = &[
    ".git",
    ".hg",
    ".svn",
    ".venv",
    "venv",
    "node_modules",
    "target",
    "__pycache__",
];

/// Followed symlinks can form a loop; no real plugin nests this deep.
const MAX_DEPTH: usize = 32;

/// The SHA-256 of a file's bytes, in hex.
pub fn file_sha256(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// The SHA-256 of the whole tree: every kept file's relative path, executable bit and bytes,
/// in path order. Equal digests mean an install would copy identical files.
pub fn digest(src: &Path, symlinks: Symlinks) -> io::Result<String> {
    walk(src, None, symlinks)
}

/// Where a plugin's symlinks may point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symlinks {
    /// Only inside the plugin's directory (the default): a link out of it is refused, so an
    /// install as root cannot be made to copy, say, `/etc/shadow` into a plugin.
    Inside,
    /// Anywhere (`allow_outside_symlinks = true` in plugin.toml).
    Anywhere,
}

impl Symlinks {
    pub fn of(m: &crate::manifest::Manifest) -> Symlinks {
        match m.allow_outside_symlinks {
            true => Symlinks::Anywhere,
            false => Symlinks::Inside,
        }
    }
}

/// Copies the tree into `dst` (which must not exist) and returns its digest, computed from
/// the bytes copied. Modes keep their permission bits only: setuid, setgid and sticky bits are
/// dropped, and the files belong to the installing user.
/// Makes an installed copy read-only (every write bit cleared, symlinks never followed), so
/// the plugin running from it cannot change its own code: what it writes goes to its data
/// directory. `registry::remove_tree` makes it writable again before deleting it.
pub fn seal(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.is_dir() {
        for entry in fs::read_dir(dir)? {
            seal(&entry?.path())?;
        }
    }
    let mode = meta.permissions().mode() & !0o222;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

pub fn copy(src: &Path, dst: &Path, symlinks: Symlinks) -> io::Result<String> {
    fs::create_dir_all(dst.parent().unwrap_or(Path::new("/")))?;
    fs::create_dir(dst)?;
    walk(src, Some(dst), symlinks)
}

fn walk(src: &Path, dst: Option<&Path>, symlinks: Symlinks) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut files = Vec::new();
    let root = Root {
        dir: src,
        real: fs::canonicalize(src).map_err(|e| named(e, src))?,
        symlinks,
    };
    collect(&root, PathBuf::new(), 0, &mut files)?;
    files.sort();
    let mut buf = vec![0u8; 64 * 1024];
    for rel in files {
        let from = src.join(&rel);
        let meta = fs::metadata(&from)?;
        let executable = meta.permissions().mode() & 0o111 != 0;
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update([0, executable as u8]);
        let mut reader = File::open(&from).map_err(|e| named(e, &from))?;
        let mut writer = match dst {
            Some(dst) => {
                let to = dst.join(&rel);
                if let Some(parent) = to.parent() {
                    fs::create_dir_all(parent)?;
                }
                let f = File::create(&to).map_err(|e| named(e, &to))?;
                f.set_permissions(fs::Permissions::from_mode(
                    meta.permissions().mode() & 0o777,
                ))?;
                Some(f)
            }
            None => None,
        };
        loop {
            let n = reader.read(&mut buf).map_err(|e| named(e, &from))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if let Some(w) = writer.as_mut() {
                w.write_all(&buf[..n])?;
            }
        }
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// The tree being read: its path, its real path, and where its symlinks may point.
struct Root<'a> {
    dir: &'a Path,
    real: PathBuf,
    symlinks: Symlinks,
}

/// Relative paths of every regular file under `dir` (following symlinks that the rule
/// allows), skipping [`SKIPPED`] directories.
fn collect(root: &Root, rel: PathBuf, depth: usize, out: &mut Vec<PathBuf>) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other(format!(
            "{} is nested more than {MAX_DEPTH} directories deep (a symlink loop?)",
            root.dir.join(&rel).display()
        )));
    }
    let dir = root.dir.join(&rel);
    for entry in fs::read_dir(&dir).map_err(|e| named(e, &dir))? {
        let entry = entry?;
        let name = entry.file_name();
        let path = entry.path();
        if entry.file_type()?.is_symlink() {
            check_link(root, &path)?;
        }
        // Follows symlinks; a dangling one is an error naming it.
        let meta = fs::metadata(&path).map_err(|e| named(e, &path))?;
        if meta.is_dir() {
            if SKIPPED.iter().any(|s| name == *s) {
                continue;
            }
            collect(root, rel.join(&name), depth + 1, out)?;
        } else if meta.is_file() {
            out.push(rel.join(&name));
        }
        // Sockets, fifos and devices are not plugin files.
    }
    Ok(())
}

/// A symlink must point inside the plugin's directory unless the manifest allows otherwise.
fn check_link(root: &Root, path: &Path) -> io::Result<()> {
    if root.symlinks == Symlinks::Anywhere {
        return Ok(());
    }
    let target = fs::canonicalize(path).map_err(|e| named(e, path))?;
    if target.starts_with(&root.real) {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} is a symlink to {}, outside the plugin's directory; copy the file in, or set `allow_outside_symlinks = true` in plugin.toml",
            path.display(),
            target.display()
        ),
    ))
}

fn named(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_follows_symlinks_skips_build_outputs_and_keeps_the_digest() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("src");
        fs::create_dir_all(src.join("lib")).unwrap();
        fs::create_dir_all(src.join("node_modules/x")).unwrap();
        fs::write(src.join("main.py"), "print(1)").unwrap();
        fs::write(src.join("lib/a.txt"), "a").unwrap();
        fs::write(src.join("node_modules/x/big"), "skipped").unwrap();
        fs::write(root.path().join("shared.py"), "shared").unwrap();
        std::os::unix::fs::symlink(root.path().join("shared.py"), src.join("sdk.py")).unwrap();
        fs::set_permissions(src.join("main.py"), fs::Permissions::from_mode(0o755)).unwrap();

        let before = digest(&src, Symlinks::Anywhere).unwrap();
        let dst = root.path().join("out/copy");
        assert_eq!(copy(&src, &dst, Symlinks::Anywhere).unwrap(), before);
        assert_eq!(digest(&dst, Symlinks::Anywhere).unwrap(), before);
        assert!(!dst.join("node_modules").exists());
        let sdk = fs::symlink_metadata(dst.join("sdk.py")).unwrap();
        assert!(sdk.is_file(), "symlinks become files");
        assert_eq!(fs::read_to_string(dst.join("sdk.py")).unwrap(), "shared");
        let mode = fs::metadata(dst.join("main.py"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "the executable bit is kept");

        fs::write(src.join("lib/a.txt"), "b").unwrap();
        assert_ne!(
            digest(&src, Symlinks::Anywhere).unwrap(),
            before,
            "content changes change the digest"
        );
        assert!(
            copy(&src, &dst, Symlinks::Anywhere).is_err(),
            "never copies over an existing dir"
        );
    }

    #[test]
    fn a_symlink_loop_is_an_error_not_a_hang() {
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(root.path(), root.path().join("me")).unwrap();
        let e = digest(root.path(), Symlinks::Anywhere).unwrap_err();
        assert!(e.to_string().contains("symlink loop"), "{e}");
    }

    #[test]
    fn a_link_out_of_the_plugin_is_refused_and_setuid_bits_are_dropped() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("plugin");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("run"), "#!/bin/sh").unwrap();
        fs::set_permissions(src.join("run"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::write(src.join("inside.txt"), "in").unwrap();
        std::os::unix::fs::symlink(src.join("inside.txt"), src.join("alias.txt")).unwrap();
        let dst = root.path().join("copy");
        copy(&src, &dst, Symlinks::Inside).expect("a link inside the plugin is fine");
        let mode = fs::metadata(dst.join("run")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755, "setuid dropped, the rest kept");

        fs::write(root.path().join("shadow"), "secret").unwrap();
        std::os::unix::fs::symlink(root.path().join("shadow"), src.join("shadow")).unwrap();
        let e = digest(&src, Symlinks::Inside).unwrap_err().to_string();
        assert!(
            e.contains("outside the plugin's directory") && e.contains("allow_outside_symlinks"),
            "{e}"
        );
        assert!(copy(&src, &root.path().join("copy2"), Symlinks::Inside).is_err());
        assert!(
            digest(&src, Symlinks::Anywhere).is_ok(),
            "allowed when the manifest says so"
        );
    }
}
