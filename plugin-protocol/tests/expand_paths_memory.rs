//! `files::expand_paths` over a tree of 200,000 files holds one page, not the tree. Alone in
//! its own test binary, so no other test's allocations show in the process's peak RSS.

use plugin_protocol::files::expand_paths;
use serde_json::json;
use std::fs;

/// The process's peak resident set (`VmHWM`), in KiB.
fn peak_rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("a VmHWM line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_tree_of_200000_files_is_paged_with_peak_rss_growing_under_20_mib() {
    // tmpfs when there is one: creating 200,000 files on this kind of disk takes minutes.
    let shm = std::path::Path::new("/dev/shm");
    let tmp = match fs::metadata(shm) {
        Ok(m) if m.is_dir() && !m.permissions().readonly() => shm.to_path_buf(),
        _ => std::env::temp_dir(),
    };
    let root = tmp.join(format!("expand-big-{}", std::process::id()));
    for d in 0..200 {
        let folder = root.join(format!("d{d:03}"));
        fs::create_dir_all(&folder).unwrap();
        for f in 0..1000 {
            fs::File::create(folder.join(format!("f{f:04}"))).unwrap();
        }
    }
    let before = peak_rss_kib();
    let mut count = 0;
    for page in expand_paths(vec![json!(root.display().to_string())], 1000) {
        assert!(page.len() <= 1000);
        count += page.len();
    }
    let grown = peak_rss_kib() - before;
    fs::remove_dir_all(&root).unwrap();
    assert_eq!(count, 200_000);
    assert!(grown < 20 * 1024, "peak RSS grew {grown} KiB");
    eprintln!("200,000 files paged; peak RSS grew {grown} KiB");
}
