//! `rediss://`: the Redis broker over TLS, against a `redis-server` of the test's own with its
//! TLS port on and certificates from `openssl`. The worker verifies the server against
//! `broker_ca`; the real Celery client sends a task over TLS and gets its result; a worker
//! given another CA is refused with the cause and never consumes.

mod common;

use common::broker::*;
use common::tls::certificates;
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` listening with TLS only, on a free port; killed when dropped.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsRedis {
    fn start(dir: &Path, ca: &Path, cert: &Path, key: &Path) -> TlsRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--tls-auth-clients",
                "no",
            ])
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .arg("--tls-ca-cert-file")
            .arg(ca)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (Debian's redis-server; .ci/run installs it)");
        let server = TlsRedis { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn url(&self) -> String {
        format!("rediss://localhost:{}/0", self.port)
    }
}

/// The Celery client sends `f.ok` over TLS (trusting `ca`) and prints its result.
const CLIENT: &str = r#"
import ssl, sys
from celery import Celery
url, ca = sys.argv[1], sys.argv[2]
app = Celery(broker=url, backend="rpc://",
             broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca})
print(app.send_task("f.ok", args=[7], kwargs={"over": "tls"}).get(timeout=30))
"#;

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn rediss_verifies_the_server_and_carries_tasks() {
    let python = redis_python("redis_tls");
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    let (ca, cert, key) = certificates(root.path(), "test-ca", "localhost");
    let redis = TlsRedis::start(root.path(), &ca, &cert, &key);
    let ca_flag = ca.display().to_string();

    let mut d = Daemon::start_with(
        &plugins,
        &root.path().join("ok.sock"),
        &["--broker", &redis.url(), "--broker-ca", &ca_flag],
    );
    d.wait_log("consuming from Redis");
    let out = Command::new(&python)
        .args(["-c", CLIENT, &redis.url(), &ca_flag])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "[7]");
    drop(d);

    // Another CA: refused, with the cause, and never consuming.
    let other = root.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (wrong_ca, _, _) = certificates(&other, "other-ca", "localhost");
    let mut d = Daemon::start_with(
        &plugins,
        &root.path().join("wrong.sock"),
        &[
            "--broker",
            &redis.url(),
            "--broker-ca",
            &wrong_ca.display().to_string(),
        ],
    );
    let refused = d.wait_log("Redis failed");
    assert!(
        refused.to_lowercase().contains("certificate"),
        "the cause is named: {refused}"
    );
    assert!(
        !d.drain_log()
            .iter()
            .any(|l| l.contains("consuming from Redis")),
        "a worker that cannot verify the server never consumes"
    );
}
