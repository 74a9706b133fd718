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
pub fn digest(src: &Path) -> io::Result<String> {
    walk(src, None)
}

/// Copies the tree into `dst` (which must not exist) and returns its digest, computed from
/// the bytes copied.
pub fn copy(src: &Path, dst: &Path) -> io::Result<String> {
    fs::create_dir_all(dst.parent().unwrap_or(Path::new("/")))?;
    fs::create_dir(dst)?;
    walk(src, Some(dst))
}

fn walk(src: &Path, dst: Option<&Path>) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut files = Vec::new();
    collect(src, PathBuf::new(), 0, &mut files)?;
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
                    meta.permissions().mode() & 0o7777,
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

/// Relative paths of every regular file under `dir` (following symlinks), skipping
/// [`SKIPPED`] directories.
fn collect(root: &Path, rel: PathBuf, depth: usize, out: &mut Vec<PathBuf>) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other(format!(
            "{} is nested more than {MAX_DEPTH} directories deep (a symlink loop?)",
            root.join(&rel).display()
        )));
    }
    let dir = root.join(&rel);
    for entry in fs::read_dir(&dir).map_err(|e| named(e, &dir))? {
        let entry = entry?;
        let name = entry.file_name();
        let path = entry.path();
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

        let before = digest(&src).unwrap();
        let dst = root.path().join("out/copy");
        assert_eq!(copy(&src, &dst).unwrap(), before);
        assert_eq!(digest(&dst).unwrap(), before);
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
            digest(&src).unwrap(),
            before,
            "content changes change the digest"
        );
        assert!(
            copy(&src, &dst).is_err(),
            "never copies over an existing dir"
        );
    }

    #[test]
    fn a_symlink_loop_is_an_error_not_a_hang() {
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(root.path(), root.path().join("me")).unwrap();
        let e = digest(root.path()).unwrap_err();
        assert!(e.to_string().contains("symlink loop"), "{e}");
    }
}
