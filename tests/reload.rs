//! Hot reload on a live daemon (`worker reload`, SIGHUP): new plugins start, removed ones stop,
//! changed ones are replaced blue/green, unchanged ones are not touched.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use worker::control::Client;

fn pids_of(doc: &Value, plugin: &str) -> Vec<u64> {
    doc["installed"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == plugin)
        .flat_map(|p| {
            p["live"]["instances"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|i| i["pid"].as_u64())
        .collect()
}

fn reload(d: &Daemon) -> (bool, String) {
    let out = output(&mut d.cli(&["reload"]));
    (out.status.success(), text(&out.stdout))
}

fn cli(d: &Daemon, args: &[&str]) -> (bool, String) {
    let out = output(&mut d.cli(args));
    (out.status.success(), text(&out.stdout) + &text(&out.stderr))
}

fn installed_versions(state: &Path, name: &str) -> Vec<String> {
    std::fs::read_dir(state.join("installed").join(name))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn install_and_uninstall_reach_a_running_daemon_and_leave_other_plugins_alone() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let mut d = Daemon::start(&plugins, &root.path().join("w.sock"));
    let before = d.wait_list("faulty ready", |doc| plugin_ready(doc, "faulty"));
    let faulty_pids = pids_of(&before, "faulty");

    rust_plugin(&plugins, "");
    let (ok, said) = cli(&d, &["plugins", "install", "rust-echo"]);
    assert!(ok, "{said}");
    assert!(
        said.contains("daemon: started rust-echo") && said.contains("rust-echo 0.1.0: installed"),
        "{said}"
    );
    let after = d.wait_list("rust-echo ready", |doc| plugin_ready(doc, "rust-echo"));
    assert_eq!(
        pids_of(&after, "faulty"),
        faulty_pids,
        "unchanged plugin untouched"
    );
    let out = output(&mut d.cli(&["task", "run", "rust.echo", "1"]));
    assert!(out.status.success(), "{}", text(&out.stderr));

    let rust_pid = pids_of(&after, "rust-echo")[0];
    let (ok, said) = cli(&d, &["plugins", "uninstall", "rust-echo", "--yes"]);
    assert!(ok, "{said}");
    assert!(
        said.contains("daemon: stopped rust-echo") && said.contains("rust-echo 0.1.0: uninstalled"),
        "{said}"
    );
    // The daemon answered only after the plugin stopped, and then its copy was deleted.
    assert!(wait_gone_blocking(rust_pid as u32, Duration::from_secs(1)));
    assert!(!d.state.join("installed/rust-echo").exists());
    assert!(
        plugins.join("rust-echo/plugin.toml").exists(),
        "the source is kept"
    );
    let gone = d.list_json();
    assert!(pids_of(&gone, "rust-echo").is_empty());
    assert_eq!(pids_of(&gone, "faulty"), faulty_pids);
    let out = output(&mut d.cli(&["task", "run", "rust.echo", "1"]));
    assert!(
        text(&out.stderr).contains("NotRegistered"),
        "{}",
        text(&out.stderr)
    );

    // An install that no daemon applied (another socket) is picked up by SIGHUP.
    let (ok, said) = install_all(&plugins, &d.state, &root.path().join("elsewhere.sock"));
    assert!(ok && said.contains("no daemon answers"), "{said}");
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_log("plugins reloaded");
    let after = d.wait_list("rust-echo back", |doc| plugin_ready(doc, "rust-echo"));
    assert_eq!(pids_of(&after, "faulty"), faulty_pids);
    // `worker reload` with nothing changed touches nothing.
    let (ok, said) = reload(&d);
    assert!(ok, "{said}");
    assert!(said.contains("unchanged: faulty, rust-echo"), "{said}");
    assert_eq!(pids_of(&d.list_json(), "faulty"), faulty_pids);
}

fn set_version(dir: &Path, version: &str, env: &str) {
    let manifest = dir.join("plugin.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let text = text.replace("version = \"0.0.1\"", &format!("version = \"{version}\""));
    let text = text.replace("[env]\n", &format!("[env]\n{env}"));
    std::fs::write(manifest, text).unwrap();
}

#[test]
fn upgrade_under_continuous_load_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    let dir = faulty_plugin(
        &plugins,
        "faulty",
        &[],
        "instances = 2\nconcurrency = 4",
        "",
    );
    let d = Daemon::start(&plugins, &root.path().join("w.sock"));
    let before = d.wait_list("ready", |doc| {
        plugin_ready(doc, "faulty") && pids_of(doc, "faulty").len() == 2
    });
    let old_pids = pids_of(&before, "faulty");
    let socket = d.socket.clone();
    let mut install_cmd = d.cli(&["plugins", "install", "faulty"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let results = rt.block_on(async move {
        let stop = tokio_util::sync::CancellationToken::new();
        // Tasks done so far: the test waits on counts, not on time.
        let (done_tx, mut done) = tokio::sync::watch::channel(0usize);
        let done_tx = std::sync::Arc::new(done_tx);
        let mut loops = Vec::new();
        for _ in 0..4 {
            let (socket, stop, done_tx) = (socket.clone(), stop.clone(), done_tx.clone());
            loops.push(tokio::spawn(async move {
                let mut client = Client::connect(&socket).await.unwrap();
                let mut seen = Vec::new();
                while !stop.is_cancelled() {
                    let started = Instant::now();
                    let reply = client
                        .call("task.submit", json!({"name": "f.pid"}), |_| {})
                        .await
                        .unwrap();
                    seen.push((started, reply));
                    done_tx.send_modify(|n| *n += 1);
                }
                seen
            }));
        }
        let wait_done = Duration::from_secs(30);
        within(wait_done, done.wait_for(|n| *n >= 100))
            .await
            .unwrap();
        set_version(&dir, "0.0.2", "UPGRADED = \"1\"\n");
        let reload_started = Instant::now();
        let out = tokio::task::spawn_blocking(move || output(&mut install_cmd))
            .await
            .unwrap();
        let reloaded = Instant::now();
        let said = text(&out.stdout);
        assert!(out.status.success(), "{said}");
        assert!(
            said.contains("daemon: replaced faulty")
                && said.contains("faulty 0.0.2: updated from 0.0.1"),
            "{said}"
        );
        let target = *done.borrow() + 100;
        within(wait_done, done.wait_for(|n| *n >= target))
            .await
            .unwrap();
        stop.cancel();
        let mut all = Vec::new();
        for l in loops {
            all.extend(l.await.unwrap());
        }
        (all, reload_started, reloaded)
    });
    let (all, reload_started, reloaded) = results;
    // The old version drained and stopped before install returned; its copy is gone.
    for pid in &old_pids {
        assert!(process_gone(*pid as u32), "old instance {pid} stopped");
    }
    let versions = installed_versions(&d.state, "faulty");
    assert!(
        versions.len() == 1 && versions[0].starts_with("0.0.2-"),
        "{versions:?}"
    );
    drop(d);
    assert!(all.len() > 50, "continuous load: {} tasks", all.len());
    let mut before_reload = 0;
    let mut after_reload = 0;
    for (started, reply) in &all {
        let pid = match reply {
            Ok(v) => v["result"].as_u64().unwrap(),
            Err(e) => panic!("a task failed during the upgrade: {e:?}"),
        };
        if *started < reload_started {
            assert!(
                old_pids.contains(&pid),
                "tasks before the reload ran on the old version"
            );
            before_reload += 1;
        } else if *started > reloaded {
            assert!(
                !old_pids.contains(&pid),
                "tasks after the reload ran on the new version"
            );
            after_reload += 1;
        }
    }
    assert!(
        before_reload > 0 && after_reload > 0,
        "{before_reload} before, {after_reload} after"
    );
    eprintln!(
        "upgrade under load: {} tasks, 0 failed; {before_reload} started before the install (old pids), {after_reload} after it returned (new pids)",
        all.len()
    );
}

#[test]
fn every_failed_upgrade_leaves_the_old_version_serving() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    let marker = root.path().join("started-once");
    let dir = faulty_plugin(&plugins, "faulty", &[], "", "[restart]\nmax_restarts = 0\n");
    let d = Daemon::start(&plugins, &root.path().join("w.sock"));
    let before = d.wait_list("ready", |doc| plugin_ready(doc, "faulty"));
    let old = pids_of(&before, "faulty");
    let original = std::fs::read_to_string(dir.join("plugin.toml")).unwrap();
    let still_serving = |what: &str| {
        let doc = d.list_json();
        assert_eq!(
            pids_of(&doc, "faulty"),
            old,
            "{what}: old instances untouched"
        );
        assert_eq!(
            doc["installed"][0]["version"], "0.0.1",
            "{what}: record unchanged"
        );
        let out = output(&mut d.cli(&["task", "run", "f.pid"]));
        assert!(out.status.success(), "{what}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), old[0].to_string(), "{what}");
        assert_eq!(
            installed_versions(&d.state, "faulty").len(),
            1,
            "{what}: no new copy left"
        );
    };

    let hang_marker = root.path().join("started-once-then-hangs");
    let cases: [(&str, String, &[&str]); 5] = [
        (
            "bad manifest",
            original.replace("version = \"0.0.1\"", "version = \"0.0.2\"\ninstances = 0"),
            &["at manifest", "key `instances` (line 3): must be at least 1"],
        ),
        (
            "failing install step",
            original.replace(
                "version = \"0.0.1\"",
                "version = \"0.0.2\"\ninstall = [[\"/bin/sh\", \"-c\", \"echo fetching; echo 'no such package: left-pad' >&2; exit 7\"]]",
            ),
            &["at install step 1 (`/bin/sh -c", "exited with status 7", "| no such package: left-pad"],
        ),
        (
            "handshake mismatch",
            original
                .replace("version = \"0.0.1\"", "version = \"0.0.2\"")
                .replace("[env]\n", "[env]\nFAULT_HANDSHAKE = \"version\"\n"),
            &["at handshake", "protocol version 2.0"],
        ),
        (
            "fails only in the daemon",
            original
                .replace("version = \"0.0.1\"", "version = \"0.0.2\"")
                .replace("[env]\n", &format!("[env]\nFAULT_SECOND_START = \"{}\"\n", marker.display())),
            &["at start in the running daemon", "exited with status 3"],
        ),
        (
            // Never failed, never ready: the report still names the cause it last saw.
            "hangs only in the daemon",
            original
                .replace("version = \"0.0.1\"", "version = \"0.0.2\"")
                .replace("max_restarts = 0", "max_restarts = 50")
                .replace(
                    "[env]\n",
                    &format!(
                        "[env]\nFAULT_SECOND_START = \"{}\"\nFAULT_SECOND_START_MODE = \"hang\"\n",
                        hang_marker.display()
                    ),
                )
                + "\n[timeouts]\ninit = 0.5\n",
            &[
                "at start in the running daemon",
                "not ready within",
                "last exit",
                "did not answer `initialize` within the init timeout",
            ],
        ),
    ];
    for (what, manifest, expected) in cases {
        std::fs::write(dir.join("plugin.toml"), manifest).unwrap();
        let (ok, said) = cli(&d, &["plugins", "install", "faulty"]);
        assert!(!ok, "{what}: install must fail\n{said}");
        for e in expected {
            assert!(said.contains(e), "{what}: expected {e:?} in\n{said}");
        }
        assert!(
            said.contains("faulty 0.0.1 stays installed"),
            "{what}: {said}"
        );
        still_serving(what);
    }
}

#[test]
fn an_install_through_another_socket_never_deletes_what_a_daemon_runs() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    let dir = faulty_plugin(&plugins, "faulty", &[], "", "");
    let d = Daemon::start(&plugins, &root.path().join("w.sock"));
    let before = d.wait_list("ready", |doc| plugin_ready(doc, "faulty"));
    let old_pids = pids_of(&before, "faulty");
    let old_copy = installed_versions(&d.state, "faulty");
    // An admin's CLI with another socket: no daemon answers there.
    set_version(&dir, "0.0.2", "");
    let out = output(
        worker()
            .args(["plugins", "install", "faulty", "--plugins"])
            .arg(&plugins)
            .arg("--state-dir")
            .arg(&d.state)
            .arg("--socket")
            .arg(root.path().join("elsewhere.sock")),
    );
    assert!(
        out.status.success(),
        "{}",
        text(&out.stdout) + &text(&out.stderr)
    );
    // The daemon registered in the state directory was asked too: it runs the new version,
    // and only then did the old copy go.
    let after = d.wait_list("the new version", |doc| {
        doc["installed"][0]["live"]["version"] == "0.0.2"
    });
    assert_ne!(pids_of(&after, "faulty"), old_pids);
    let copies = installed_versions(&d.state, "faulty");
    assert!(
        copies.len() == 1 && copies[0].starts_with("0.0.2-") && !copies.contains(&old_copy[0]),
        "{copies:?}"
    );
    let out = output(&mut d.cli(&["task", "run", "f.pid"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
}
