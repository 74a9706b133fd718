//! Plugins run with least privilege: a clean environment (never a worker setting or
//! credential), no way to gain privileges, and the resource limits of their manifest.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Runs `f.env` through `worker run` with `worker_env` in the worker's environment.
fn plugin_view(extra: &str, tables: &str, worker_env: &[(&str, &str)]) -> Value {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(
        &plugins,
        "faulty",
        &[("FROM_MANIFEST", "yes")],
        extra,
        tables,
    );
    let mut cmd = worker();
    cmd.args(["run", "f.env", "--plugins"]).arg(&plugins);
    for (k, v) in worker_env {
        cmd.env(k, v);
    }
    let out = output(&mut cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("f.env prints JSON")
}

#[test]
fn a_plugin_gets_a_clean_environment_no_new_privileges_and_no_capabilities() {
    let view = plugin_view(
        "env_passthrough = [\"PASS_ME\"]",
        "",
        &[
            ("WORKER_BROKER", "amqp://user:s3cret@broker:5672//"),
            ("AWS_SECRET_ACCESS_KEY", "leak"),
            ("PASS_ME", "passed"),
        ],
    );
    let env = view["env"].as_object().unwrap();
    let dump = serde_json::to_string(env).unwrap();
    assert!(!dump.contains("s3cret") && !dump.contains("leak"), "{dump}");
    assert!(!env.contains_key("WORKER_BROKER") && !env.contains_key("WORKER_STATE_DIR"));
    assert_eq!(env["PASS_ME"], "passed", "env_passthrough");
    assert_eq!(env["FROM_MANIFEST"], "yes", "the manifest's env");
    assert_eq!(env["WORKER_PLUGIN_NAME"], "faulty");
    assert!(env.contains_key("PATH"));
    assert_eq!(view["no_new_privs"], "1");
    let caps = &view["caps"];
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(caps[set], "0000000000000000", "{set}: {caps}");
    }
    // Only a worker holding CAP_SETPCAP (root) can empty the bounding set; then it must, or
    // an exec as uid 0 would get every capability back.
    if nix::unistd::geteuid().is_root() {
        assert_eq!(view["uid"], 0);
        assert_eq!(caps["CapBnd"], "0000000000000000", "{caps}");
    }
    assert_eq!(
        view["limits"]["core"],
        serde_json::json!([0, 0]),
        "no core dumps by default"
    );
}

#[test]
fn the_manifest_limits_apply_and_a_cpu_limit_is_named_when_it_kills() {
    let view = plugin_view("", "[limits]\nmemory = \"1GiB\"\nopen_files = 64\n", &[]);
    assert_eq!(
        view["limits"]["as"],
        serde_json::json!([1u64 << 30, 1u64 << 30])
    );
    assert_eq!(view["limits"]["nofile"], serde_json::json!([64, 64]));

    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(
        &plugins,
        "faulty",
        &[],
        "max_attempts = 1",
        "[limits]\ncpu_time = 1\n",
    );
    let out = output(worker().args(["run", "f.spin", "--plugins"]).arg(&plugins));
    assert!(!out.status.success());
    let said = text(&out.stderr);
    assert!(
        said.contains("SIGXCPU") && said.contains("CPU time limit (`limits.cpu_time`)"),
        "{said}"
    );
}

#[test]
fn install_refuses_a_symlink_out_of_the_plugin() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    let dir = faulty_plugin(&plugins, "faulty", &[], "", "");
    std::os::unix::fs::symlink("/etc/passwd", dir.join("shadow")).unwrap();
    let state = root.path().join("state");
    let (ok, said) = install_all(&plugins, &state, &root.path().join("w.sock"));
    assert!(!ok, "{said}");
    assert!(
        said.contains("shadow is a symlink to /etc/passwd, outside the plugin's directory"),
        "{said}"
    );
    assert!(
        !state.join("installed/faulty").exists()
            || std::fs::read_dir(state.join("installed/faulty"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[test]
fn install_steps_get_a_clean_environment_with_what_package_tools_need() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(
        &plugins,
        "faulty",
        &[("FROM_MANIFEST", "m")],
        "env_passthrough = [\"PASSED_ON\"]\ninstall = [[\"/bin/sh\", \"-c\", \"env > install-env.txt\"]]",
        "",
    );
    let state = root.path().join("state");
    let out = output(
        worker()
            .args(["plugins", "install", "--plugins"])
            .arg(&plugins)
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(root.path().join("w.sock"))
            .env("WORKER_BROKER", "amqp://user:s3cret@broker/")
            .env("SOME_API_TOKEN", "s3cret")
            .env("PASSED_ON", "yes")
            .env("PIP_INDEX_URL", "https://mirror.invalid/simple")
            .env("HTTPS_PROXY", "http://proxy.invalid:3128")
            .env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let versions = state.join("installed/faulty");
    let copy = std::fs::read_dir(&versions)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let env = std::fs::read_to_string(copy.join("install-env.txt")).unwrap();
    for present in [
        "PIP_INDEX_URL=https://mirror.invalid/simple",
        "HTTPS_PROXY=http://proxy.invalid:3128",
        "SSL_CERT_FILE=",
        "PASSED_ON=yes",
        "FROM_MANIFEST=m",
        "WORKER_PLUGIN_NAME=faulty",
        "WORKER_PLUGIN_SOURCE=",
        "PATH=",
        "HOME=",
    ] {
        assert!(
            env.lines().any(|l| l.starts_with(present)),
            "no {present} in:\n{env}"
        );
    }
    assert!(
        !env.contains("s3cret"),
        "a credential reached an install step:\n{env}"
    );
    assert!(
        !env.contains("WORKER_STATE_DIR"),
        "a worker setting reached it:\n{env}"
    );
}

/// A state directory, root-owned 0755 as the worker would make it, and a plugins directory.
fn state_setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let state = root.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    (root, plugins, state)
}

#[test]
fn a_state_directory_others_can_write_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let (root, plugins, state) = state_setup();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (ok, said) = install_all(&plugins, &state, &root.path().join("w.sock"));
    assert!(
        !ok && said.contains("writable by other users") && said.contains("chmod go-w"),
        "{said}"
    );
    assert!(!state.join("installed").exists(), "nothing written");
    let out = output(
        worker()
            .args(["serve", "--plugins"])
            .arg(&plugins)
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(root.path().join("w.sock")),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("untrusted state directory"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn symlinks_planted_in_the_state_directory_redirect_nothing() {
    let (root, plugins, state) = state_setup();
    let outside = tempfile::tempdir().unwrap();
    let socket = root.path().join("w.sock");

    // The install log: a link to a victim file is not written through.
    std::fs::create_dir_all(state.join("logs")).unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    std::os::unix::fs::symlink(&victim, state.join("logs/faulty.install.log")).unwrap();
    let (ok, said) = install_all(&plugins, &state, &socket);
    assert!(!ok && said.contains("is a symlink"), "{said}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    std::fs::remove_file(state.join("logs/faulty.install.log")).unwrap();

    // installed/<name>: a link to another directory gets no copy, and no removal.
    let _ = std::fs::remove_dir_all(state.join("installed/faulty"));
    std::fs::create_dir_all(state.join("installed")).unwrap();
    std::fs::create_dir_all(outside.path().join("0.0.0-old")).unwrap();
    std::os::unix::fs::symlink(outside.path(), state.join("installed/faulty")).unwrap();
    let (ok, said) = install_all(&plugins, &state, &socket);
    assert!(
        !ok && said.contains("installed/faulty is a symlink"),
        "{said}"
    );
    let entries: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
    assert_eq!(entries.len(), 2, "only victim and 0.0.0-old: {entries:?}");

    // Garbage collection after another install walks past the link: nothing outside goes.
    let other = root.path().join("other");
    faulty_plugin(&other, "second", &[], "", "");
    let (ok, said) = install_all(&other, &state, &socket);
    assert!(ok, "{said}");
    assert!(
        outside.path().join("0.0.0-old").exists(),
        "nothing deleted outside"
    );
}

/// The session id of `pid` (field 6 of /proc/<pid>/stat).
fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

#[test]
fn a_grandchild_that_calls_setsid_is_killed_and_reaped_when_its_instance_ends() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let d = Daemon::start(&plugins, &root.path().join("w.sock"));
    let out = output(&mut d.cli(&["task", "run", "f.escape"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let escaped: u32 = text(&out.stdout).trim().parse().unwrap();
    let plugin = live_pids(&d.list_json())[0];
    assert!(!process_gone(escaped));
    assert_ne!(
        session_of(escaped),
        session_of(plugin),
        "it left the plugin's session and process group"
    );

    // The instance crashes: its group is killed, and the escaped process with it.
    let out = output(&mut d.cli(&["task", "run", "f.crash"]));
    assert!(!out.status.success());
    assert!(
        wait_gone_blocking(escaped, Duration::from_secs(10)),
        "the process that called setsid() outlived its instance"
    );
    // The daemon adopted it (child subreaper) and reaped it: no zombie stays behind.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{escaped}")).exists() {
        assert!(
            Instant::now() < deadline,
            "pid {escaped} stayed a zombie: {:?}",
            std::fs::read_to_string(format!("/proc/{escaped}/stat"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let list = output(&mut d.cli(&["plugins", "list"]));
    assert!(
        text(&list.stdout).contains("containment: process groups")
            && text(&list.stdout).contains("subreaper"),
        "{}",
        text(&list.stdout)
    );
}

#[test]
fn a_plugin_writes_only_its_data_directory_which_outlives_its_processes() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let d = Daemon::start(&plugins, &root.path().join("w.sock"));
    let write = |content: &str| -> Value {
        let out = output(&mut d.cli(&["task", "run", "f.write", &format!("{content:?}")]));
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = write("one");
    let data = d.state.join("data/faulty");
    assert_eq!(first["data"], data.display().to_string());
    assert_eq!(first["before"], Value::Null);
    // Sealed at install: not even its owner can change the code it runs.
    assert_eq!(first["own_dir"], "PermissionError", "{first}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o700,
        "the data directory is private to the plugin's user"
    );
    // A new process (after a crash) finds what the last one wrote.
    let out = output(&mut d.cli(&["task", "run", "f.crash"]));
    assert!(!out.status.success());
    assert_eq!(write("two")["before"], "one");
}

#[test]
fn a_strict_plugin_reads_its_code_and_the_system_and_writes_only_its_data_and_tmp() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    let dir = plugins.join("strict");
    std::fs::create_dir_all(&dir).unwrap();
    // The script inside the plugin (what a sandboxed plugin can read), not in this checkout.
    std::fs::copy(
        repo().join("tests/plugins/faulty.py"),
        dir.join("faulty.py"),
    )
    .unwrap();
    let tasks: String = FAULTY_TASKS
        .iter()
        .map(|t| format!("[[tasks]]\nname = \"{t}\"\n"))
        .collect();
    write_manifest(
        &dir,
        &format!("name = \"strict\"\nversion = \"1.0.0\"\ncommand = [\"/usr/bin/python3\", \"-u\", \"faulty.py\"]\nsandbox = \"strict\"\n{tasks}"),
    );
    let secret = root.path().join("secret.txt");
    std::fs::write(&secret, "not for plugins").unwrap();
    let d = Daemon::start(&plugins, &root.path().join("w.sock"));
    let list = text(&output(&mut d.cli(&["plugins", "list"])).stdout);
    if !list.contains("Landlock ABI") {
        assert!(list.contains("no Landlock in this kernel"), "{list}");
        eprintln!("skipped: this kernel has no Landlock, and the daemon says so");
        return;
    }
    let data = d.state.join("data/strict");
    let tmp = d.state.join("tmp/strict");
    let outside = std::env::temp_dir().join(format!("worker-escape-{}", std::process::id()));
    let ops = serde_json::json!([
        ["read", "plugin.toml"],
        ["read", "/etc/passwd"],
        ["read", secret],
        ["write", data.join("kept")],
        ["write", tmp.join("scratch")],
        ["write", outside],
        ["write", "faulty.py.new"],
        ["list", root.path()],
    ]);
    let out = output(&mut d.cli(&["task", "run", "f.fs", &ops.to_string()]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        view["results"],
        serde_json::json!([
            "ok",
            "ok",
            "PermissionError",
            "ok",
            "ok",
            "PermissionError",
            "PermissionError",
            "PermissionError"
        ]),
        "{view}"
    );
    assert_eq!(
        view["tmp"],
        tmp.display().to_string(),
        "TMPDIR is its private tmp"
    );
    assert!(!outside.exists());
}

#[test]
fn a_root_worker_runs_each_plugin_as_its_user_nobody_by_default_and_never_root_by_config() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only a worker running as root switches users");
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a `nobody` user");
    let root = tempfile::tempdir().unwrap();
    // The plugin's user must reach its directory.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = root.path().join("state");
    let view = |plugins: &std::path::Path, extra: &[&str]| -> Value {
        let out = output(
            worker()
                .args(["run", "f.env", "--plugins"])
                .arg(plugins)
                .arg("--state-dir")
                .arg(&state)
                .args(extra),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };

    // The manifest names the user.
    let named = root.path().join("named");
    faulty_plugin(&named, "faulty", &[], "user = \"nobody\"", "");
    let seen = view(&named, &[]);
    assert_eq!(seen["uid"], nobody.uid.as_raw(), "{seen}");
    assert_eq!(seen["gid"], nobody.gid.as_raw());
    assert_eq!(
        seen["groups"],
        serde_json::json!([]),
        "supplementary groups cleared"
    );
    assert_eq!(seen["env"]["HOME"], nobody.dir.display().to_string());
    assert_eq!(seen["env"]["USER"], "nobody");
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(seen["caps"][set], "0000000000000000", "{set}");
    }
    let data = std::fs::metadata(state.join("data/faulty")).unwrap();
    assert_eq!(
        data.uid(),
        nobody.uid.as_raw(),
        "its data directory is its own"
    );

    // The worker config names it for plugins that do not; unnamed, it is `nobody`.
    let plain = root.path().join("plain");
    let dir = faulty_plugin(&plain, "faulty", &[], "", "");
    let manifest = std::fs::read_to_string(dir.join("plugin.toml")).unwrap();
    std::fs::write(dir.join("plugin.toml"), manifest.replace(own_user(), "")).unwrap();
    let daemon = nix::unistd::User::from_name("daemon").unwrap().unwrap();
    assert_eq!(
        view(&plain, &["--plugin-user", "daemon"])["uid"],
        daemon.uid.as_raw()
    );
    assert_eq!(view(&plain, &[])["uid"], nobody.uid.as_raw());

    // A source its user cannot enter: `worker run` runs a readable copy, `plugins install`
    // into a state directory that user cannot enter says which directory and how to fix it.
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let hidden = faulty_plugin(private.path(), "faulty", &[], "", "");
    let manifest = std::fs::read_to_string(hidden.join("plugin.toml")).unwrap();
    std::fs::write(hidden.join("plugin.toml"), manifest.replace(own_user(), "")).unwrap();
    let out = output(
        worker()
            .args(["run", "f.env", "--plugins"])
            .arg(private.path())
            .arg("--state-dir")
            .arg(&state),
    );
    assert!(
        out.status.success(),
        "{:?} {}",
        out.status,
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("copying faulty where its user can read it"),
        "{}",
        text(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["uid"], nobody.uid.as_raw());
    let closed = tempfile::tempdir().unwrap();
    std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = output(
        worker()
            .args(["plugins", "install", "faulty", "--plugins"])
            .arg(&plain)
            .arg("--state-dir")
            .arg(closed.path()),
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("user `nobody` cannot enter")
            && said.contains(&format!("{} (mode 0700", closed.path().display())),
        "{said}"
    );

    // Root only by the plugin's own word, never by the worker config.
    let out = output(
        worker()
            .args(["run", "f.env", "--plugin-user", "root", "--plugins"])
            .arg(&plain),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("key `plugin_user`"),
        "{}",
        text(&out.stderr)
    );
    let explicit = root.path().join("explicit");
    faulty_plugin(&explicit, "faulty", &[], "user = \"root\"", "");
    assert_eq!(view(&explicit, &["--plugin-user", "nobody"])["uid"], 0);
}

/// A cgroup v2 hierarchy mounted for one test (this machine class mounts none), with a
/// directory in it the worker may manage; unmounted when dropped.
struct CgroupMount {
    mount: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl CgroupMount {
    fn new(root: &std::path::Path) -> CgroupMount {
        let mount = root.join("cgroup2");
        std::fs::create_dir_all(&mount).unwrap();
        let out = output(
            std::process::Command::new("mount")
                .args(["-t", "cgroup2", "none"])
                .arg(&mount),
        );
        assert!(
            out.status.success(),
            "cannot mount a cgroup2 hierarchy at {} (needs root and a kernel with cgroup v2): {}",
            mount.display(),
            text(&out.stderr)
        );
        let dir = mount.join(format!("worker-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        CgroupMount { mount, dir }
    }

    /// The instance cgroups in it now.
    fn children(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for CgroupMount {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mount)
            .status();
    }
}

#[test]
fn with_a_cgroup_tree_a_process_that_clears_its_environment_is_still_killed() {
    let root = tempfile::tempdir().unwrap();
    let cgroups = CgroupMount::new(root.path());
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let dir = cgroups.dir.display().to_string();
    let mut d = Daemon::start_with(&plugins, &root.path().join("w.sock"), &["--cgroup", &dir]);
    let containment = d.list_json()["daemon"]["containment"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        containment.contains(&format!("a cgroup v2 per plugin process under {dir}")),
        "{containment}"
    );
    let first = cgroups.children();
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0].starts_with("faulty.0."), "{first:?}");

    let out = output(&mut d.cli(&["task", "run", "f.escape_clean"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let escaped: u32 = text(&out.stdout).trim().parse().unwrap();
    let environ = std::fs::read(format!("/proc/{escaped}/environ")).unwrap();
    assert!(environ.is_empty(), "no marker to find it by");
    let its_cgroup = std::fs::read_to_string(format!("/proc/{escaped}/cgroup")).unwrap();
    assert!(
        its_cgroup.contains(&format!(
            "0::/worker-test-{}/{}",
            std::process::id(),
            first[0]
        )),
        "{its_cgroup}"
    );

    // The instance crashes: cgroup.kill ends the escaped process, and the cgroup goes.
    let out = output(&mut d.cli(&["task", "run", "f.crash"]));
    assert!(!out.status.success());
    assert!(
        wait_gone_blocking(escaped, Duration::from_secs(10)),
        "the process with no marker outlived its instance"
    );
    d.wait_log("restarting");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = cgroups.children();
        if now.len() == 1 && now[0] != first[0] {
            break;
        }
        assert!(Instant::now() < deadline, "the old cgroup stays: {now:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit().success());
    assert_eq!(
        cgroups.children(),
        Vec::<String>::new(),
        "every cgroup removed at stop"
    );
}
