//! The `worker` binary end to end: one-shot `run`, and a live `serve` daemon driven through
//! `task run`, `task cancel`, `plugins list` and signals.

mod common;

use common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn run_fibonacci_from_the_bundled_examples() {
    let out = output(worker().args(["run", "fibonacci", "26"]));
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "121393\n");
    let err = text(&out.stderr);
    assert!(err.contains("progress: 26/26"), "{err}");
    // Not installed: built (venv, SDK package) in a scratch copy, which is gone afterwards.
    let said = "running 2 install step(s) of python-fibonacci in a scratch copy (";
    let at = err.find(said).expect(&err) + said.len();
    let copy = &err[at..at + err[at..].find(')').unwrap()];
    assert!(copy.ends_with("/python-fibonacci"), "{copy}");
    assert!(
        !std::path::Path::new(copy).exists(),
        "{copy} is left behind"
    );
    assert!(
        !empty_state_dir().join("installed").exists(),
        "nothing is recorded"
    );
}

#[test]
fn run_reports_task_errors_and_unknown_tasks() {
    let out = output(worker().args(["run", "fibonacci", "-1"]));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("error: ValueError: n must be a non-negative integer, got -1"),
        "{err}"
    );
    assert!(err.contains("Traceback"), "{err}");

    let out = output(worker().args(["run", "no.such.task"]));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("serves task `no.such.task`") && err.contains("fibonacci"),
        "{err}"
    );
}

#[test]
fn run_a_rust_sdk_plugin_with_streaming() {
    let root = tempfile::tempdir().unwrap();
    rust_plugin(root.path(), "");
    let out = output(
        worker()
            .args(["run", "rust.count", "3", "1", "--plugins"])
            .arg(root.path()),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "1\n2\n3\n3\n");
}

#[test]
fn run_ignores_other_broken_plugins() {
    let root = tempfile::tempdir().unwrap();
    rust_plugin(root.path(), "");
    std::fs::create_dir_all(root.path().join("broken")).unwrap();
    std::fs::write(
        root.path().join("broken/plugin.toml"),
        "name = \"broken\"\nversion = 3\n",
    )
    .unwrap();
    let out = output(
        worker()
            .args(["run", "rust.echo", "x", "--plugins"])
            .arg(root.path()),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "{\"args\":[\"x\"],\"kwargs\":{}}\n");
}

#[test]
fn serve_answers_task_run_and_plugins_list() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "instances = 2", "");
    std::fs::create_dir_all(plugins.join("broken")).unwrap();
    std::fs::write(
        plugins.join("broken/plugin.toml"),
        "name = \"broken\"\nversion = \"1\"\ncommand = []\n[[tasks]]\nname = \"b\"\n",
    )
    .unwrap();
    let (socket, state) = (root.path().join("w.sock"), root.path().join("state"));
    let (ok, said) = install_all(&plugins, &state, &socket);
    assert!(!ok, "a broken manifest fails its install: {said}");
    assert!(
        said.contains("FAILED")
            && said.contains("broken")
            && said.contains("key `command` (line 3)"),
        "{said}"
    );
    assert!(said.contains("faulty 0.0.1: installed"), "{said}");
    let mut d = Daemon::serve(&plugins, &state, &socket, &[]);
    let doc = d.wait_list("faulty ready", |doc| plugin_ready(doc, "faulty"));
    assert_eq!(doc["daemon"]["pid"], d.child.id());
    assert_eq!(live_pids(&doc).len(), 2);
    assert!(doc["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("command"));

    let out = output(&mut d.cli(&["task", "run", "f.progress"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "\"a\"\n\"b\"\n\"c\"\n\"done\"\n");
    assert!(text(&out.stderr).contains("progress: 1/2 half"));

    let out = output(&mut d.cli(&["task", "run", "f.raise", "3"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("error: ValueError: bad value: [3]"),
        "{}",
        text(&out.stderr)
    );

    let out = output(&mut d.cli(&["task", "run", "nope"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("NotRegistered"));

    let out = output(&mut d.cli(&["plugins", "list"]));
    let list = text(&out.stdout);
    assert!(list.contains(&format!("daemon: {}", "worker@")), "{list}");
    assert!(
        list.contains("faulty 0.0.1  [running]  2 instance(s)"),
        "{list}"
    );
    assert!(
        list.contains("#0 ready pid") && list.contains("#1 ready pid"),
        "{list}"
    );
    assert!(list.contains("done 1") || list.contains("done 2"), "{list}");
    assert!(list.contains("BROKEN"), "{list}");

    // Cancel through the socket.
    let sleeper = d
        .cli(&["task", "run", "f.sleep", "30", "--id", "sleepy"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    d.wait_list("sleeper running", |doc| {
        doc["installed"][0]["live"]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["in_flight"] == 1)
    });
    let out = output(&mut d.cli(&["task", "cancel", "sleepy"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = sleeper.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("TaskCancelled"),
        "{}",
        text(&out.stderr)
    );

    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit().success());
}

#[test]
fn plugins_list_without_a_daemon_and_into_a_closed_pipe() {
    let root = tempfile::tempdir().unwrap();
    faulty_plugin(root.path(), "faulty", &[], "", "");
    let out = output(
        worker()
            .args([
                "plugins",
                "list",
                "--socket",
                "/nonexistent/w.sock",
                "--plugins",
            ])
            .arg(root.path()),
    );
    assert!(out.status.success());
    let list = text(&out.stdout);
    assert!(
        list.contains("daemon: none answering")
            && list.contains("Installed (")
            && list.contains("Available (")
            && list.contains("faulty 0.0.1  [not installed]"),
        "{list}"
    );
    // `| head -c1`: the reader goes away; the writer must exit quietly, not panic.
    let mut child = worker()
        .args([
            "plugins",
            "list",
            "--json",
            "--socket",
            "/nonexistent/w.sock",
            "--plugins",
        ])
        .arg(root.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("panicked"));
}

#[test]
fn sigterm_drains_in_flight_tasks_then_stops() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(
        &plugins,
        "faulty",
        &[("FAULT_FORK", root.path().join("gc.pid").to_str().unwrap())],
        "concurrency = 2",
        "",
    );
    let socket = root.path().join("w.sock");
    let mut d = Daemon::start(&plugins, &socket);
    let doc = d.wait_list("ready", |doc| plugin_ready(doc, "faulty"));
    let pid = live_pids(&doc)[0];
    let grandchild: u32 = std::fs::read_to_string(root.path().join("gc.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let in_flight = d
        .cli(&["task", "run", "f.sleep", "1.5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    d.wait_list("task in flight", |doc| {
        doc["daemon"].is_object() && doc["installed"][0]["live"]["instances"][0]["in_flight"] == 1
    });
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_log("draining");
    // New work is refused while draining.
    let out = output(&mut d.cli(&["task", "run", "f.ok"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("WorkerShuttingDown"),
        "{}",
        text(&out.stderr)
    );
    // The task in flight finishes.
    let out = in_flight.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "\"slept\"\n");
    assert!(d.wait_exit().success());
    assert!(!socket.exists(), "the socket file is removed");
    assert!(process_gone(pid), "plugin {pid} is gone");
    assert!(
        wait_gone_blocking(grandchild, Duration::from_secs(5)),
        "grandchild {grandchild} is gone"
    );
}

#[test]
fn second_signal_stops_at_once() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(
        &plugins,
        "faulty",
        &[("FAULT_TERM", "ignore")],
        "",
        "[timeouts]\nshutdown_grace = 30\n",
    );
    let mut d = Daemon::start(&plugins, &root.path().join("w.sock"));
    let doc = d.wait_list("ready", |doc| plugin_ready(doc, "faulty"));
    let pid = live_pids(&doc)[0];
    let mut stuck = d
        .cli(&["task", "run", "f.sleep_nocancel", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    d.wait_list("task in flight", |doc| {
        doc["installed"][0]["live"]["instances"][0]["in_flight"] == 1
    });
    let started = Instant::now();
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_log("draining");
    d.signal(nix::sys::signal::Signal::SIGINT);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(130));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "forced stop took {:?}",
        started.elapsed()
    );
    assert!(
        wait_gone_blocking(pid, Duration::from_secs(5)),
        "plugin {pid} is gone"
    );
    // Its client sees the connection close and fails.
    assert!(!stuck.wait().unwrap().success());
}

#[test]
fn serve_refuses_a_socket_another_worker_serves() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let socket = root.path().join("w.sock");
    let mut d = Daemon::start(&plugins, &socket);
    let out = output(
        worker()
            .args(["serve", "--plugins"])
            .arg(&plugins)
            .arg("--socket")
            .arg(&socket),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("a worker is already serving on"),
        "{}",
        text(&out.stderr)
    );
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit().success());
}

#[test]
fn run_a_raw_protocol_node_plugin_and_the_same_on_the_node_sdk() {
    let out = output(worker().args(["run", "raw.echo", "a", "2"]));
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "\"a\"\n2\n\"a 2\"\n");
    // node-echo npm-installs the SDK in a scratch copy first.
    let out = output(worker().args(["run", "node.echo", "a", "2"]));
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "\"a\"\n2\n\"a 2\"\n");
    assert!(text(&out.stderr).contains("install step(s) of node-echo in a scratch copy"));
}

#[test]
fn bundled_config_example_is_valid() {
    let out = output(
        worker()
            .args(["plugins", "list", "--config"])
            .arg(repo().join("packaging/worker.toml"))
            .args(["--plugins", "/nonexistent"]),
    );
    // The plugins dir is overridden to one that does not exist: the config itself must parse.
    assert!(
        !text(&out.stderr).contains("invalid config"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("cannot read the plugins directory /nonexistent"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn runtime_threads_comes_from_the_flag_or_the_environment_and_is_bounded() {
    let out = output(worker().args(["--runtime-threads", "0", "plugins", "list"]));
    assert_eq!(out.status.code(), Some(2));
    let said = "key `runtime_threads`: 0 is not a number of threads from 1 to 256";
    assert!(text(&out.stderr).contains(said), "{}", text(&out.stderr));
    let out = output(
        worker()
            .env("WORKER_RUNTIME_THREADS", "257")
            .args(["plugins", "list"]),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("257 is not a number of threads"));
    // A one-shot task on four threads works as on the default one.
    let out = output(
        worker()
            .env("WORKER_RUNTIME_THREADS", "4")
            .args(["run", "fibonacci", "10"]),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "55\n");
}

#[test]
fn plugins_inspect_shows_manifest_instances_exits_and_stderr() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(
        &plugins,
        "faulty",
        &[],
        "max_attempts = 1",
        "[settings]\ncolour = \"blue\"\n",
    );
    let d = Daemon::start(&plugins, &root.path().join("w.sock"));
    d.wait_list("ready", |doc| plugin_ready(doc, "faulty"));
    let out = output(&mut d.cli(&["task", "run", "f.crash"]));
    assert_eq!(out.status.code(), Some(1));
    d.wait_list("restarted", |doc| {
        plugin_ready(doc, "faulty") && doc["installed"][0]["live"]["instances"][0]["restarts"] == 1
    });
    let out = output(&mut d.cli(&["task", "run", "f.stderr", "3"]));
    assert!(out.status.success());
    // The stderr pump logs asynchronously: wait until inspect shows the last line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let shown = loop {
        let out = output(&mut d.cli(&["plugins", "inspect", "faulty"]));
        let shown = text(&out.stdout);
        if shown.contains("stderr line 2") || Instant::now() > deadline {
            break shown;
        }
    };
    for part in [
        "faulty 0.0.1",
        "tasks:",
        "f.sleep",
        "state: running",
        "#0 ready pid",
        "was killed by signal 9",
        "last stderr:",
        "stderr line 2",
    ] {
        assert!(shown.contains(part), "missing {part:?} in:\n{shown}");
    }
    let out = output(&mut d.cli(&["plugins", "inspect", "faulty", "--json"]));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["settings"]["colour"], "blue");
    assert_eq!(
        doc["limits"]["nice"], 0,
        "the priority it runs at, not null"
    );
    assert_eq!(
        doc["live"]["instances"][0]["recent_exits"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let out = output(&mut d.cli(&["plugins", "inspect", "nope"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no plugin named `nope`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn plugins_test_passes_good_plugins_and_names_what_fails() {
    let out = output(worker().args(["plugins", "test", "python-fibonacci"]));
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}");
    for part in [
        "ok    handshake",
        "ok    unknown method answered with -32601",
        "ok    self-test 1 fibonacci(26): returned 121393",
        "raised ValueError",
        "ok    exits after `exit`",
        "PASS",
    ] {
        assert!(said.contains(part), "missing {part:?} in:\n{said}");
    }
    for raw_or_sdk in ["raw-echo", "node-echo"] {
        let out = output(worker().args(["plugins", "test", raw_or_sdk]));
        assert!(out.status.success(), "{}", text(&out.stdout));
    }

    let root = tempfile::tempdir().unwrap();
    rust_plugin(
        root.path(),
        "[[tests]]\ntask = \"rust.count\"\nargs = [2, 1]\nexpect = 2\n",
    );
    let out = output(
        worker()
            .args(["plugins", "test", "rust-echo", "--plugins"])
            .arg(root.path()),
    );
    assert!(out.status.success(), "{}", text(&out.stdout));

    faulty_plugin(root.path(), "faulty", &[], "", "[[tests]]\ntask = \"f.ok\"\nargs = [1]\nexpect = [2]\n\n[[tests]]\ntask = \"f.raise\"\nexpect_error = \"ValueError\"\n");
    let out = output(
        worker()
            .args(["plugins", "test", "faulty", "--plugins"])
            .arg(root.path()),
    );
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("FAIL  self-test 1 f.ok(1): expected [2], got [1]"),
        "{said}"
    );
    assert!(
        said.contains("ok    self-test 2 f.raise(): raised ValueError"),
        "{said}"
    );
    assert!(said.contains("FAILED: 1 check(s)"), "{said}");

    let bad = tempfile::tempdir().unwrap();
    faulty_plugin(
        bad.path(),
        "faulty",
        &[("FAULT_HANDSHAKE", "version")],
        "",
        "",
    );
    let out = output(
        worker()
            .args(["plugins", "test", "faulty", "--plugins"])
            .arg(bad.path()),
    );
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("FAIL  handshake: it speaks protocol version 2.0"),
        "{said}"
    );
}

#[test]
fn plugins_create_scaffolds_that_pass_plugins_test_and_install() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let state = state.path();
    // Under root the scaffolds run as `nobody`, who must reach the state directory; their
    // sources are private, so `plugins test` and `run` use readable copies.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o755)).unwrap();
    for lang in ["python", "node"] {
        let name = format!("hello-{lang}");
        let out = output(
            worker()
                .args(["plugins", "create", &name, "--lang", lang, "--plugins"])
                .arg(root.path()),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(root.path().join(&name).join("README.md").exists());
        let out = output(
            worker()
                .args(["plugins", "test", &name, "--plugins"])
                .arg(root.path()),
        );
        let said = text(&out.stdout);
        assert!(out.status.success(), "{said}");
        assert!(
            said.contains(&format!(
                "self-test 1 {name}.hello(\"world\"): returned \"hello, world\""
            )),
            "{said}"
        );
        let out = output(
            worker()
                .args(["plugins", "install", &name, "--plugins"])
                .arg(root.path())
                .arg("--state-dir")
                .arg(state),
        );
        assert!(out.status.success(), "{}", text(&out.stdout));
        let out = output(
            worker()
                .args(["run", &format!("{name}.hello"), "you", "--plugins"])
                .arg(root.path())
                .arg("--state-dir")
                .arg(state),
        );
        assert_eq!(
            text(&out.stdout),
            "\"hello, you\"\n",
            "{}",
            text(&out.stderr)
        );
    }
    let out = output(
        worker()
            .args(["plugins", "create", "hello-python", "--plugins"])
            .arg(root.path()),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    let out = output(
        worker()
            .args(["plugins", "create", "../escape", "--plugins"])
            .arg(root.path()),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is not a valid plugin name"),
        "{}",
        text(&out.stderr)
    );
}

/// The Rust scaffold builds with `cargo build --release` as its install step; `plugins test`
/// runs that in a scratch copy, so it passes with no manual build.
#[test]
fn rust_scaffold_passes_plugins_test_unchanged() {
    if std::process::Command::new("cargo")
        .arg("--version")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        eprintln!("SKIPPED rust_scaffold_passes_plugins_test_unchanged: no cargo on PATH");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let out = output(
        worker()
            .args([
                "plugins",
                "create",
                "hello-rust",
                "--lang",
                "rust",
                "--plugins",
            ])
            .arg(root.path()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = output(
        worker()
            .args(["plugins", "test", "hello-rust", "--plugins"])
            .arg(root.path()),
    );
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}\n{}", text(&out.stderr));
    assert!(
        said.contains("running 1 install step(s) of hello-rust in a scratch copy"),
        "{said}"
    );
    assert!(
        said.contains("self-test 1 hello-rust.hello(\"world\"): returned \"hello, world\""),
        "{said}"
    );
    assert!(
        !root.path().join("hello-rust/target").exists(),
        "the source directory is left as the author wrote it"
    );
}

#[test]
fn a_node_sdk_plugin_runs_under_the_worker_and_streams_before_its_result() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("plugins/fixture");
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = repo().join("plugin-protocol/node/fixtures/plugin.js");
    write_manifest(
        &dir,
        &format!(
            "name = \"fixture\"\nversion = \"0.1.0\"\ncommand = [\"/usr/bin/node\", {:?}]\n[settings]\ngreeting = \"from settings\"\n{}",
            fixture.display().to_string(),
            ["t.add", "t.report", "t.kwargs", "t.fail", "t.typed", "t.wait", "t.bigint", "t.events", "t.context", "t.queue"]
                .map(|t| format!("[[tasks]]\nname = {t:?}\n"))
                .concat()
        ),
    );
    let run = |task: &str, arg: &str| {
        output(
            worker()
                .args(["run", task, arg, "--plugins"])
                .arg(root.path().join("plugins")),
        )
    };
    let out = run("t.report", "2");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "1\n2\n\"from settings\"\n");
    // console.log went to stderr (logged at info, hidden by `run`), not to the protocol.
    assert!(
        !text(&out.stderr).contains("stray"),
        "{}",
        text(&out.stderr)
    );
    // `worker run` tells the SDK where the task came from: nowhere (no queue), on this node.
    let out = run("t.context", "0");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["queue"], serde_json::Value::Null, "{seen}");
    assert!(
        seen["request"]["hostname"]
            .as_str()
            .unwrap()
            .starts_with("worker@"),
        "{seen}"
    );
    let out = run("t.fail", "0");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("RangeError") && text(&out.stderr).contains("too far"),
        "{}",
        text(&out.stderr)
    );
}

/// Paths typed relative to the current directory (`--plugins plugins`, the natural thing in a
/// checkout) reach install steps and plugins absolute: a step runs inside the installed copy,
/// where a relative `WORKER_PLUGIN_SOURCE` would name nothing.
#[test]
fn relative_plugins_and_state_dirs_reach_install_steps_and_plugins_absolute() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    // An install step that needs its source: it copies a file from there into the copy.
    let step = r#"install = [["/bin/sh", "-c", "cp \"$WORKER_PLUGIN_SOURCE/from-source\" . && echo \"$WORKER_PLUGIN_SOURCE\" > source-was"]]"#;
    let dir = faulty_plugin(&plugins, "faulty", &[], step, "");
    std::fs::write(dir.join("from-source"), "x").unwrap();
    let relative = |args: &[&str]| {
        let mut cmd = worker();
        cmd.current_dir(root.path()).args(args).args([
            "--plugins",
            "plugins",
            "--state-dir",
            "state",
            "--socket",
            "w.sock",
        ]);
        output(&mut cmd)
    };
    let out = relative(&["plugins", "install", "faulty"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let copies: Vec<_> = std::fs::read_dir(root.path().join("state/installed/faulty"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let [copy] = &copies[..] else {
        panic!("one installed copy: {copies:?}")
    };
    let source = std::fs::read_to_string(copy.join("source-was")).unwrap();
    assert_eq!(
        source.trim(),
        plugins.join("faulty").display().to_string(),
        "the step saw its source as an absolute path"
    );
    // A task through `worker run` with the same relative directories.
    let out = relative(&["run", "f.ok", "7"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "[7]");
}
