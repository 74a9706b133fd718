//! Plugins run with least privilege: a clean environment (never a worker setting or
//! credential), no way to gain privileges, and the resource limits of their manifest.

mod common;

use common::*;
use serde_json::Value;

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
fn a_plugin_gets_a_clean_environment_and_no_new_privileges() {
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
