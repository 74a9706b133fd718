//! Hot reload on a live daemon (`worker reload`, SIGHUP): new plugins start, removed ones stop,
//! changed ones are replaced blue/green, unchanged ones are not touched.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use worker::control::Client;

fn pids_of(doc: &Value, plugin: &str) -> Vec<u64> {
    doc["plugins"]
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

#[test]
fn reload_starts_new_stops_removed_and_leaves_unchanged_plugins_alone() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let mut d = Daemon::start(&plugins, &root.path().join("w.sock"));
    let before = d.wait_list("faulty ready", |doc| plugin_ready(doc, "faulty"));
    let faulty_pids = pids_of(&before, "faulty");

    rust_plugin(&plugins, "");
    let (ok, said) = reload(&d);
    assert!(ok, "{said}");
    assert!(
        said.contains("started: rust-echo") && said.contains("unchanged: faulty"),
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
    std::fs::remove_dir_all(plugins.join("rust-echo")).unwrap();
    // SIGHUP does the same as `worker reload`.
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_log("plugins reloaded");
    let gone = d.wait_list("rust-echo gone", |doc| pids_of(doc, "rust-echo").is_empty());
    assert_eq!(pids_of(&gone, "faulty"), faulty_pids);
    assert!(wait_gone_blocking(rust_pid as u32, Duration::from_secs(10)));
    let out = output(&mut d.cli(&["task", "run", "rust.echo", "1"]));
    assert!(
        text(&out.stderr).contains("NotRegistered"),
        "{}",
        text(&out.stderr)
    );
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
    let mut reload_cmd = d.cli(&["reload"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let results = rt.block_on(async move {
        let stop = tokio_util::sync::CancellationToken::new();
        let mut loops = Vec::new();
        for _ in 0..4 {
            let (socket, stop) = (socket.clone(), stop.clone());
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
                }
                seen
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        set_version(&dir, "0.0.2", "UPGRADED = \"1\"\n");
        let reload_started = Instant::now();
        let out = tokio::task::spawn_blocking(move || output(&mut reload_cmd))
            .await
            .unwrap();
        let reloaded = Instant::now();
        assert!(out.status.success(), "{}", text(&out.stdout));
        assert!(
            text(&out.stdout).contains("replaced: faulty"),
            "{}",
            text(&out.stdout)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
        let mut all = Vec::new();
        for l in loops {
            all.extend(l.await.unwrap());
        }
        (all, reload_started, reloaded)
    });
    let (all, reload_started, reloaded) = results;
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
}

#[test]
fn a_failed_upgrade_leaves_the_old_version_serving() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    let dir = faulty_plugin(&plugins, "faulty", &[], "", "");
    let d = Daemon::start(&plugins, &root.path().join("w.sock"));
    let before = d.wait_list("ready", |doc| plugin_ready(doc, "faulty"));
    let old = pids_of(&before, "faulty");
    set_version(&dir, "0.0.2", "FAULT_HANDSHAKE = \"version\"\n");
    let (ok, said) = reload(&d);
    assert!(!ok, "a failed reload exits non-zero");
    assert!(
        said.contains("FAILED faulty") && said.contains("protocol version 2.0"),
        "{said}"
    );
    let after = d.list_json();
    assert_eq!(pids_of(&after, "faulty"), old);
    let out = output(&mut d.cli(&["task", "run", "f.pid"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), old[0].to_string());
}
