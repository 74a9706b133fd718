//! The control socket and CLI around a live daemon: `worker task list` shows every task in
//! flight, a submitter that disconnects cancels its tasks (unless it detached), `plugins
//! restart` revives a failed plugin, and `plugins test` judges replies by the same rules.

mod common;

use common::*;
use serde_json::Value;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn task_list(d: &Daemon) -> Vec<Value> {
    let out = output(&mut d.cli(&["task", "list", "--json"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("task list --json is JSON");
    doc["tasks"].as_array().cloned().unwrap_or_default()
}

/// Polls `worker task list` until `pred` holds.
fn wait_tasks(d: &Daemon, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tasks = task_list(d);
        if pred(&tasks) {
            return tasks;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {tasks:#?}"
        );
    }
}

fn submit(d: &Daemon, args: &[&str]) -> Child {
    d.cli(&[&["task", "run"], args].concat())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn task_list_shows_each_task_and_a_disconnected_submitter_cancels_its_own() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "concurrency = 4", "");
    let d = Daemon::start(&plugins, &root.path().join("w.sock"));
    assert!(task_list(&d).is_empty());

    let mut attached = submit(&d, &["f.sleep", "60", "--id", "attached-1"]);
    let mut detached = submit(&d, &["f.sleep", "60", "--id", "detached-1", "--detach"]);
    let tasks = wait_tasks(&d, "both running", |t| {
        t.len() == 2 && t.iter().all(|t| t["state"] == "running")
    });
    let row = tasks.iter().find(|t| t["task_id"] == "attached-1").unwrap();
    assert_eq!(row["task"], "f.sleep");
    assert_eq!(row["plugin"], "faulty");
    assert_eq!(row["instance"], 0);
    assert_eq!(row["attempt"], 1);
    assert!(row["pid"].as_u64().is_some() && row["age_secs"].as_f64().is_some());
    let who = format!("control socket (pid {}", attached.id());
    assert!(
        row["submitter"].as_str().unwrap().starts_with(&who),
        "{row}"
    );
    let table = text(&output(&mut d.cli(&["task", "list"])).stdout);
    assert!(
        table.contains("attached-1") && table.contains("SUBMITTER"),
        "{table}"
    );

    // Its client is gone: nobody can receive the result, so the task is cancelled...
    attached.kill().unwrap();
    attached.wait().unwrap();
    let tasks = wait_tasks(&d, "the attached task cancelled", |t| {
        t.iter().all(|t| t["task_id"] != "attached-1")
    });
    // ...but a detached one keeps running.
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    detached.kill().unwrap();
    detached.wait().unwrap();
    let out = output(&mut d.cli(&["task", "cancel", "detached-1"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_tasks(&d, "no task left", |t| t.is_empty());
}

#[test]
fn plugins_restart_revives_a_failed_plugin_and_list_shows_the_next_try() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    let blocker = root.path().join("broken");
    faulty_plugin(
        &plugins,
        "faulty",
        &[("FAULT_EXIT_IF", blocker.to_str().unwrap())],
        "",
        "[restart]\nmax_restarts = 1\nbackoff_initial = 0.01\nfailed_retry = 600\n",
    );
    let mut d = Daemon::start(&plugins, &root.path().join("w.sock"));
    std::fs::write(&blocker, "").unwrap();
    let out = output(&mut d.cli(&["task", "run", "f.exit", "1"]));
    assert!(!out.status.success());
    d.wait_log("plugin failed");
    let listed = text(&output(&mut d.cli(&["plugins", "list"])).stdout);
    assert!(
        listed.contains("next try in 9m") && listed.contains("worker plugins restart faulty"),
        "{listed}"
    );
    let doc = d.list_json();
    assert!(doc["installed"][0]["live"]["next_try_at"]
        .as_f64()
        .is_some());
    // A reload of an unchanged failed plugin would restart it too; here the operator asks.
    std::fs::remove_file(&blocker).unwrap();
    let out = output(&mut d.cli(&["plugins", "restart", "faulty"]));
    assert!(
        text(&out.stdout).contains("faulty: restarting (was failed)"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    d.wait_list("faulty ready", |doc| plugin_ready(doc, "faulty"));
    let out = output(&mut d.cli(&["task", "run", "f.ok", "1"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = output(&mut d.cli(&["plugins", "restart", "nope"]));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no plugin `nope`"));
}

#[test]
fn plugins_test_reports_a_string_id_a_wrong_name_and_a_wrong_version() {
    let root = tempfile::tempdir().unwrap();
    // Each in a plugins directory of its own: they all serve the same tasks.
    let test = |name: &str, env: &[(&str, &str)], tables: &str| {
        let plugins = root.path().join(name);
        faulty_plugin(&plugins, name, env, "", tables);
        let started = Instant::now();
        let out = output(
            worker()
                .args(["plugins", "test", name, "--plugins"])
                .arg(&plugins),
        );
        (out.status.success(), text(&out.stdout), started.elapsed())
    };
    let (ok, said, took) = test("strid", &[], "[[tests]]\ntask = \"f.string_id\"\n");
    assert!(!ok, "{said}");
    assert!(
        said.contains("answered task.run with id \"") && said.contains("(a string)"),
        "{said}"
    );
    assert!(
        took < Duration::from_secs(8),
        "reported at once, not after a timeout"
    );

    let (ok, said, _) = test("named", &[("FAULT_NAME", "someone-else")], "");
    assert!(!ok);
    assert!(
        said.contains("introduces itself as `someone-else` but plugin.toml names it `named`"),
        "{said}"
    );

    let (ok, said, _) = test("versioned", &[("FAULT_VERSION", "9.9")], "");
    assert!(ok, "a version mismatch is flagged, not refused: {said}");
    assert!(
        said.contains("WARN  version: it reports version 9.9 but plugin.toml says 0.0.1"),
        "{said}"
    );
}

#[test]
fn one_connection_carries_many_submits_and_each_accepted_names_its_request() {
    use std::io::{BufRead, BufReader, Write};
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "concurrency = 2", "");
    let d = Daemon::start(&plugins, &root.path().join("w.sock"));
    let mut conn = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Two submits written at once; the slower one first.
    let submits = concat!(
        r#"{"jsonrpc":"2.0","id":7,"method":"task.submit","params":{"name":"f.sleep","args":[0.3]}}"#,
        "\n",
        r#"{"jsonrpc":"2.0","id":"eight","method":"task.submit","params":{"name":"f.ok","args":[8]}}"#,
        "\n"
    );
    conn.write_all(submits.as_bytes()).unwrap();
    let mut accepted = std::collections::HashMap::new();
    let mut results = std::collections::HashMap::new();
    let mut lines = BufReader::new(conn).lines();
    while results.len() < 2 {
        let msg: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        if msg["method"] == "task.accepted" {
            accepted.insert(
                msg["params"]["request"].to_string(),
                msg["params"]["task_id"].clone(),
            );
        } else if msg.get("id").is_some() {
            let id = msg["id"].to_string();
            assert!(
                accepted.contains_key(&id),
                "accepted before its response: {msg}"
            );
            assert_eq!(msg["result"]["task_id"], accepted[&id], "{msg}");
            results.insert(id, msg["result"]["result"].clone());
        }
    }
    assert_eq!(results["7"], "slept");
    assert_eq!(results["\"eight\""], serde_json::json!([8]));
}

/// Makes `path` belong to another user (nobody), as an attacker's file would.
fn give_away(path: &std::path::Path) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test plants files owned by another user: run it as root (CI does)"
    );
    let nobody = nix::unistd::Uid::from_raw(65534);
    nix::unistd::chown(path, Some(nobody), None).unwrap();
}

#[test]
fn serve_refuses_a_socket_directory_it_does_not_own_or_that_others_can_enter() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let serve = |dir: &std::path::Path| {
        let out = output(
            worker()
                .args(["serve", "--plugins"])
                .arg(&plugins)
                .arg("--socket")
                .arg(dir.join("w.sock")),
        );
        (out.status.success(), text(&out.stderr))
    };
    let open = root.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (ok, said) = serve(&open);
    assert!(
        !ok && said.contains("mode is 777") && said.contains("chmod 700"),
        "{said}"
    );
    assert!(!open.join("w.sock").exists());

    let planted = root.path().join("planted");
    std::fs::create_dir(&planted).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o700)).unwrap();
    give_away(&planted);
    let (ok, said) = serve(&planted);
    assert!(!ok && said.contains("owned by uid 65534"), "{said}");
}

#[test]
fn the_cli_refuses_a_socket_owned_by_another_user() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("fake.sock");
    // Someone else's listener, pretending to be the worker.
    let fake = std::os::unix::net::UnixListener::bind(&path).unwrap();
    fake.set_nonblocking(true).unwrap();
    give_away(&path);
    let out = output(
        worker()
            .args(["task", "run", "f.ok", "secret", "--socket"])
            .arg(&path),
    );
    assert!(!out.status.success());
    let said = text(&out.stderr);
    assert!(said.contains("owned by uid 65534, not by you"), "{said}");
    assert!(
        matches!(fake.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the CLI never connected, so nothing was sent to the impostor"
    );
}

#[test]
fn out_of_range_numbers_get_a_clear_error_and_crash_nothing() {
    use std::io::{BufRead, BufReader, Write};
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let d = Daemon::start(&plugins, &root.path().join("w.sock"));
    // Over the control socket: the handler answers, naming the field and the range.
    let mut conn = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"task.submit","params":{"name":"f.ok","hard_time_limit":1e308}}"#)
        .unwrap();
    conn.write_all(b"\n").unwrap();
    let line = BufReader::new(&conn).lines().next().unwrap().unwrap();
    let reply: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`hard_time_limit` is 1e308") && message.contains("30 days"),
        "{message}"
    );
    let out = output(&mut d.cli(&["task", "run", "f.ok", "1"]));
    assert!(
        out.status.success(),
        "the daemon still serves: {}",
        text(&out.stderr)
    );

    // In one plugin's manifest: that plugin is reported broken, the others still list and run.
    let other = root.path().join("more");
    faulty_plugin(&other, "huge", &[], "", "[timeouts]\ntask_hard = 1e300\n");
    rust_plugin(&other, "");
    let out = output(worker().args(["plugins", "list", "--plugins"]).arg(&other));
    let listed = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        listed.contains("BROKEN") && listed.contains("timeouts.task_hard"),
        "{listed}"
    );
    let out = output(
        worker()
            .args(["run", "rust.echo", "1", "--plugins"])
            .arg(&other),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}
