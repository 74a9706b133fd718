//! `worker plugins install|uninstall|list|inspect` without a daemon: versions and their rules,
//! the install record, per-plugin isolation, what uninstall refuses, and the state lock.
//! (With a daemon, see tests/reload.rs.)

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A plugins dir and a state dir, and the worker pointed at both (no daemon).
struct Setup {
    _root: tempfile::TempDir,
    plugins: PathBuf,
    state: PathBuf,
    socket: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let root = tempfile::tempdir().unwrap();
        let plugins = root.path().join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        Setup {
            plugins,
            state: root.path().join("state"),
            socket: root.path().join("none.sock"),
            _root: root,
        }
    }

    fn run(&self, args: &[&str]) -> (i32, String) {
        let out = output(
            worker()
                .args(args)
                .arg("--plugins")
                .arg(&self.plugins)
                .arg("--state-dir")
                .arg(&self.state)
                .arg("--socket")
                .arg(&self.socket),
        );
        (
            out.status.code().unwrap_or(-1),
            text(&out.stdout) + &text(&out.stderr),
        )
    }

    fn list(&self) -> Value {
        let (code, said) = self.run(&["plugins", "list", "--json"]);
        assert_eq!(code, 0, "{said}");
        serde_json::from_str(&said).expect("list --json is JSON")
    }

    fn record(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.state.join("installed.json")).unwrap()).unwrap()
    }
}

fn set_version(dir: &Path, version: &str) {
    let path = dir.join("plugin.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text.lines().find(|l| l.starts_with("version = ")).unwrap();
    let text = text.replace(line, &format!("version = \"{version}\""));
    std::fs::write(path, text).unwrap();
}

#[test]
fn install_update_downgrade_and_reinstall_follow_the_version_rules() {
    let s = Setup::new();
    let dir = faulty_plugin(&s.plugins, "faulty", &[], "", "");

    let (code, said) = s.run(&["plugins", "install", "faulty"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("faulty 0.0.1: installed"), "{said}");
    assert!(said.contains("no daemon answers"), "{said}");
    let rec = s.record();
    let entry = &rec["plugins"][0];
    assert_eq!(entry["name"], "faulty");
    assert_eq!(entry["version"], "0.0.1");
    assert_eq!(entry["manifest_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(entry["content_sha256"].as_str().unwrap().len(), 64);
    assert!(entry["installed_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(entry["tasks"].as_array().unwrap().len(), FAULTY_TASKS.len());
    let first_dir = PathBuf::from(entry["dir"].as_str().unwrap());
    assert!(first_dir.starts_with(s.state.join("installed/faulty")));

    // Same version, same files: nothing to do.
    let (code, said) = s.run(&["plugins", "install", "faulty"]);
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains("already installed with the same files"),
        "{said}"
    );
    assert_eq!(s.record(), rec, "the record is untouched");

    // Same version, different files: refused unless --force.
    std::fs::write(dir.join("notes.txt"), "changed").unwrap();
    let (code, said) = s.run(&["plugins", "install", "faulty"]);
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains("FAILED faulty: at manifest: version 0.0.1 is installed with different files; bump `version`"),
        "{said}"
    );
    assert_eq!(s.list()["available"][0]["status"], "modified");

    // A newer version is an update; the replaced copy is removed (no daemon runs it).
    set_version(&dir, "0.0.10");
    assert_eq!(s.list()["available"][0]["status"], "update-available");
    let (code, said) = s.run(&["plugins", "install"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("faulty 0.0.10: updated from 0.0.1"), "{said}");
    assert!(!first_dir.exists(), "the replaced copy is gone");
    assert_eq!(s.list()["available"][0]["status"], "installed");

    // An older one is refused without --force, then allowed with it.
    set_version(&dir, "0.0.9");
    let list = s.list();
    assert_eq!(list["available"][0]["status"], "older-than-installed");
    assert_eq!(list["available"][0]["installed_version"], "0.0.10");
    let (_, text_list) = s.run(&["plugins", "list"]);
    assert!(
        text_list.contains("faulty 0.0.9  [older than installed 0.0.10]"),
        "{text_list}"
    );
    let (code, said) = s.run(&["plugins", "install", "faulty"]);
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains(
            "version 0.0.9 is older than the installed 0.0.10; pass --force to downgrade"
        ) && said.contains("faulty 0.0.10 stays installed"),
        "{said}"
    );
    let (code, said) = s.run(&["plugins", "install", "faulty", "--force"]);
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains("faulty 0.0.9: downgraded from 0.0.10"),
        "{said}"
    );
    assert_eq!(s.record()["plugins"][0]["version"], "0.0.9");

    // The installed copy runs (not the source), and `plugins test --installed` tests it.
    let (code, said) = s.run(&["run", "f.where"]);
    assert_eq!(code, 0, "{said}");
    let cwd = serde_json::from_str::<Value>(said.lines().next().unwrap()).unwrap()["cwd"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        cwd.starts_with(
            &s.state
                .join("installed/faulty/0.0.9-")
                .display()
                .to_string()
        ),
        "{cwd}"
    );
    let (code, said) = s.run(&["plugins", "test", "faulty", "--installed"]);
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains(&format!("testing faulty 0.0.9 ({cwd})")),
        "{said}"
    );

    // Unknown names and broken manifests fail with the reason; the rest still installs.
    std::fs::create_dir_all(s.plugins.join("broken")).unwrap();
    std::fs::write(s.plugins.join("broken/plugin.toml"), "name = \"broken\"\n").unwrap();
    let (code, said) = s.run(&["plugins", "install", "nope", "broken"]);
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains("FAILED nope: at manifest: no plugin named `nope`")
            && said.contains("(available: faulty)"),
        "{said}"
    );
    assert!(
        said.contains("FAILED broken: at manifest:") && said.contains("version"),
        "{said}"
    );
}

#[test]
fn install_steps_give_each_plugin_its_own_environment() {
    let s = Setup::new();
    // Two plugins, each with its own virtualenv built by its install steps; a step's output
    // lands in the installed copy, never in the source.
    let venv_step = r#"install = [["/usr/bin/python3", "-m", "venv", "--without-pip", ".venv"], ["/bin/sh", "-c", "echo built-for-$WORKER_PLUGIN_NAME > built.txt"]]"#;
    for (name, tag) in [("alpha", "a"), ("beta", "b")] {
        let dir = faulty_plugin(&s.plugins, name, &[("FAULT_TAG", tag)], venv_step, "");
        // Its own interpreter: the venv's, relative to the installed copy.
        let manifest = std::fs::read_to_string(dir.join("plugin.toml")).unwrap();
        let manifest = manifest.replace(
            "\"/usr/bin/python3\", \"-u\"",
            "\".venv/bin/python\", \"-u\"",
        );
        // Tasks must be unique across plugins: beta serves the same script under other names.
        let manifest = if name == "beta" {
            manifest.replace("name = \"f.", "name = \"f2.")
        } else {
            manifest
        };
        std::fs::write(dir.join("plugin.toml"), manifest).unwrap();
    }
    // beta's script must answer with the f2.* names it declares.
    let script = std::fs::read_to_string(repo().join("tests/plugins/faulty.py"))
        .unwrap()
        .replace("\"f.", "\"f2.");
    std::fs::write(s.plugins.join("beta/faulty2.py"), script).unwrap();
    let m = std::fs::read_to_string(s.plugins.join("beta/plugin.toml")).unwrap();
    let script_path = repo().join("tests/plugins/faulty.py").display().to_string();
    std::fs::write(
        s.plugins.join("beta/plugin.toml"),
        m.replace(&script_path, "faulty2.py"),
    )
    .unwrap();

    let (code, said) = s.run(&["plugins", "install"]);
    assert_eq!(code, 0, "{said}");
    assert!(!s.plugins.join("alpha/.venv").exists() && !s.plugins.join("alpha/built.txt").exists());
    let record = s.record();
    for (name, task, tag) in [("alpha", "f.where", "a"), ("beta", "f2.where", "b")] {
        let entry = record["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap();
        let dir = PathBuf::from(entry["dir"].as_str().unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.join("built.txt")).unwrap(),
            format!("built-for-{name}\n")
        );
        let (code, said) = s.run(&["run", task]);
        assert_eq!(code, 0, "{said}");
        let got: Value = serde_json::from_str(said.lines().next().unwrap()).unwrap();
        assert_eq!(
            Path::new(got["prefix"].as_str().unwrap()),
            dir.join(".venv"),
            "{name} runs on its own interpreter"
        );
        assert_eq!(got["tag"], tag);
    }
}

#[test]
fn uninstall_takes_only_exact_installed_names() {
    let s = Setup::new();
    faulty_plugin(&s.plugins, "faulty", &[], "", "");
    rust_plugin(&s.plugins, "");
    let (code, said) = s.run(&["plugins", "install"]);
    assert_eq!(code, 0, "{said}");
    let record = s.record();
    let sentinel = s.state.join("installed.json");

    for (arg, why) in [
        ("../state", "is a path"),
        ("/etc", "is a path"),
        (".", "is a path"),
        ("installed/faulty", "is a path"),
        ("*", "is a pattern"),
        ("fault?", "is a pattern"),
        ("rust-*", "is a pattern"),
        ("Faulty", "is not a plugin name"),
        ("worker", "no installed plugin is named `worker`"),
        ("nope", "no installed plugin is named `nope`"),
    ] {
        let (code, said) = s.run(&["plugins", "uninstall", "--yes", "faulty", arg]);
        assert_eq!(code, 2, "{arg}: {said}");
        assert!(said.contains(why), "{arg}: expected {why:?} in {said}");
        assert!(said.contains("(installed: faulty, rust-echo)"), "{said}");
        assert!(said.contains("nothing was uninstalled"), "{said}");
        assert_eq!(s.record(), record, "{arg}: nothing changed");
    }
    // Without a terminal, confirmation cannot be asked: --yes is required.
    let (code, said) = s.run(&["plugins", "uninstall", "faulty"]);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("pass --yes"), "{said}");
    assert_eq!(s.record(), record);
    let (code, said) = s.run(&["plugins", "uninstall"]);
    assert_eq!(code, 1);
    assert!(said.contains("or pass --all"), "{said}");

    let (code, said) = s.run(&["plugins", "uninstall", "faulty", "--yes"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("faulty 0.0.1: uninstalled"), "{said}");
    assert!(!s.state.join("installed/faulty").exists());
    assert!(s.state.join("installed/rust-echo").exists());
    assert!(
        s.plugins.join("faulty/plugin.toml").exists(),
        "sources are never touched"
    );
    assert_eq!(s.list()["available"][0]["status"], "not-installed");

    let (code, said) = s.run(&["plugins", "uninstall", "--all", "-y"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("rust-echo 0.1.0: uninstalled"), "{said}");
    assert!(s.list()["installed"].as_array().unwrap().is_empty());
    assert!(sentinel.exists() && s.plugins.join("rust-echo/plugin.toml").exists());
}

#[test]
fn inspect_shows_the_install_record_tasks_and_params() {
    let s = Setup::new();
    let (code, said) = s.run(&["plugins", "create", "greeter", "--lang", "node"]);
    assert_eq!(code, 0, "{said}");
    let (code, said) = s.run(&["plugins", "inspect", "greeter"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("not installed (this is the source"), "{said}");
    let (code, said) = s.run(&["plugins", "install", "greeter"]);
    assert_eq!(code, 0, "{said}");
    let (code, said) = s.run(&["plugins", "inspect", "greeter"]);
    assert_eq!(code, 0, "{said}");
    for want in [
        "greeter 0.1.0  (",
        "installed 20",
        "manifest sha256 ",
        "greeter.hello - Greets someone",
        "params: {\"who\":\"string: whom to greet (default: world)\"}",
        "not running in a daemon",
    ] {
        assert!(said.contains(want), "expected {want:?} in\n{said}");
    }
    let (code, said) = s.run(&["plugins", "inspect", "greeter", "--json"]);
    assert_eq!(code, 0, "{said}");
    let doc: Value = serde_json::from_str(&said).unwrap();
    assert_eq!(doc["installed"]["version"], "0.1.0");
    assert_eq!(
        doc["tasks"][0]["params"]["who"],
        "string: whom to greet (default: world)"
    );
    let (code, said) = s.run(&["plugins", "inspect", "nope"]);
    assert_eq!(code, 1);
    assert!(
        said.contains("no plugin named `nope` is installed or in"),
        "{said}"
    );
}

#[test]
fn installs_wait_for_each_other() {
    let s = Setup::new();
    faulty_plugin(&s.plugins, "faulty", &[], "", "");
    let lock = worker::install::registry::StateDir::new(&s.state)
        .lock(|| panic!("nobody else holds it"))
        .unwrap();
    let mut child = worker()
        .args(["plugins", "install", "--plugins"])
        .arg(&s.plugins)
        .arg("--state-dir")
        .arg(&s.state)
        .arg("--socket")
        .arg(&s.socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It says it is waiting, and installs nothing while the lock is held.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.contains("waiting for another install"), "{line}");
    assert!(!s.state.join("installed.json").exists());
    drop(lock);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "install never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert_eq!(s.record()["plugins"][0]["name"], "faulty");
}

/// On a terminal, uninstall asks first; only "y" goes ahead. (`script` gives it a pty.)
#[test]
fn uninstall_asks_on_a_terminal() {
    let s = Setup::new();
    faulty_plugin(&s.plugins, "faulty", &[], "", "");
    let (code, said) = s.run(&["plugins", "install"]);
    assert_eq!(code, 0, "{said}");
    let uninstall = |answer: &str| {
        let command = format!(
            "{} plugins uninstall faulty --plugins {} --state-dir {} --socket {}",
            env!("CARGO_BIN_EXE_worker"),
            s.plugins.display(),
            s.state.display(),
            s.socket.display()
        );
        let mut child = std::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("script (util-linux) runs");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{answer}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status.code(), text(&out.stdout))
    };
    let (code, said) = uninstall("n");
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("Uninstall faulty 0.0.1? A running daemon drains and stops them")
            && said.contains("nothing was uninstalled"),
        "{said}"
    );
    assert_eq!(s.record()["plugins"][0]["name"], "faulty");
    let (code, said) = uninstall("y");
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("faulty 0.0.1: uninstalled"), "{said}");
    assert!(s.record()["plugins"].as_array().unwrap().is_empty());
}
