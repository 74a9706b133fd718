//! `amqps://` through a real TLS endpoint made by the test: certificates from `openssl`, and
//! `stunnel4` terminating TLS in front of RabbitMQ on 127.0.0.1:5672. The worker verifies the
//! broker against `broker_ca` and `broker_tls_server_name`; a wrong CA is refused with a clear
//! error; and a broker password never shows in a log line, `plugins list` or `inspect ping`.

mod common;

use common::broker::*;
use common::tls::{certificates, run};
use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// stunnel4 listening with TLS on a free port, forwarding to RabbitMQ; killed on drop.
struct Terminator {
    child: Child,
    port: u16,
}

impl Drop for Terminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `extra` goes into the service section (e.g. client-certificate verification).
fn stunnel(dir: &Path, cert: &Path, key: &Path, extra: &str) -> Option<Terminator> {
    if Command::new("stunnel4")
        .arg("-version")
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "stunnel4 is missing: apt-get install stunnel4 (.ci/run does)"
        );
        eprintln!("skipped: stunnel4 is not installed (apt-get install stunnel4)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("stunnel.conf");
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\n[amqps]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:5672\ncert = {}\nkey = {}\n{extra}\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let child = Command::new("stunnel4")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let terminator = Terminator { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "stunnel4 did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(terminator)
}

/// `worker serve` against `url` with TLS flags, without waiting for the broker.
fn serve(lane: &Lane, plugins: &Path, socket: &Path, url: &str, tls: &[&str]) -> Daemon {
    let mut args = vec!["--broker", url, "-Q", &lane.queue, "-n", &lane.node];
    args.extend_from_slice(tls);
    Daemon::start_with(plugins, socket, &args)
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_tls_verifies_the_broker_and_never_shows_the_password() {
    let (lane, root, plugins) = setup!("amqp_tls");
    fib_plugin(&plugins);
    let (ca, cert, key) = certificates(root.path(), "test-ca", "broker.test");
    let Some(tunnel) = stunnel(root.path(), &cert, &key, "") else {
        return;
    };
    let ca_flag = ca.display().to_string();

    // The right CA and server name: tasks flow over TLS.
    let url = format!("amqps://guest:guest@127.0.0.1:{}//", tunnel.port);
    let mut d = serve(
        &lane,
        &plugins,
        &root.path().join("ok.sock"),
        &url,
        &[
            "--broker-ca",
            &ca_flag,
            "--broker-tls-server-name",
            "broker.test",
        ],
    );
    d.wait_log("consuming Celery tasks");
    assert_eq!(
        lane.run(&["call", "fibonacci", "[20]"]),
        json!({"ok": 6765})
    );
    let list = text(&output(&mut d.cli(&["plugins", "list", "--json"])).stdout);
    let ping = lane.celery_cli(&["inspect", "ping", "-d", &lane.node]);
    assert!(ping.contains("pong"), "{ping}");
    for (what, said) in [
        ("plugins list", &list),
        ("inspect ping", &ping),
        ("log", &d.drain_log().join("\n")),
    ] {
        assert!(
            !said.contains("guest:guest@") && !said.contains(":guest@"),
            "{what} shows the password: {said}"
        );
    }
    drop(d);

    // Another CA: refused, with the cause, and never consuming.
    let other = root.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (wrong_ca, _, _) = certificates(&other, "other-ca", "broker.test");
    let mut d = serve(
        &lane,
        &plugins,
        &root.path().join("wrong.sock"),
        &url,
        &[
            "--broker-ca",
            &wrong_ca.display().to_string(),
            "--broker-tls-server-name",
            "broker.test",
        ],
    );
    let refused = d.wait_log("broker connection lost or refused");
    assert!(
        refused.contains("certificate") && refused.contains("broker_ca"),
        "{refused}"
    );
    assert!(!d
        .drain_log()
        .iter()
        .any(|l| l.contains("consuming Celery tasks")));
    drop(d);

    // The right CA but the URL's host (127.0.0.1) is not the certificate's name.
    let mut d = serve(
        &lane,
        &plugins,
        &root.path().join("name.sock"),
        &url,
        &["--broker-ca", &ca_flag],
    );
    let refused = d.wait_log("broker connection lost or refused");
    assert!(refused.contains("broker_tls_server_name"), "{refused}");
    drop(d);

    // A wrong password over TLS: the error names the failure, never the password.
    let secret = "s3cret-not-the-password";
    let bad = format!("amqps://guest:{secret}@127.0.0.1:{}//", tunnel.port);
    let mut d = serve(
        &lane,
        &plugins,
        &root.path().join("auth.sock"),
        &bad,
        &[
            "--broker-ca",
            &ca_flag,
            "--broker-tls-server-name",
            "broker.test",
        ],
    );
    d.wait_log("broker connection lost or refused");
    let list = text(&output(&mut d.cli(&["plugins", "list", "--json"])).stdout);
    for (what, said) in [("plugins list", &list), ("log", &d.drain_log().join("\n"))] {
        assert!(!said.contains(secret), "{what} shows the password: {said}");
    }
}

#[test]
fn a_missing_ca_file_stops_serve_with_the_setting_and_path() {
    let root = tempfile::tempdir().unwrap();
    let out = worker()
        .args([
            "serve",
            "--broker",
            "amqps://u:p@127.0.0.1:5671//",
            "--broker-ca",
            "/nonexistent/ca.pem",
            "--state-dir",
        ])
        .arg(root.path().join("state"))
        .arg("--socket")
        .arg(root.path().join("w.sock"))
        .arg("--plugins")
        .arg(root.path().join("plugins"))
        .output()
        .unwrap();
    let said = text(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("`broker_ca` /nonexistent/ca.pem"), "{said}");
    assert!(!said.contains("u:p@"), "{said}");
}

/// A client certificate for `worker`, signed by the CA `ca` made by [`certificates`] in `dir`.
fn client_certificate(dir: &Path, ca: &str) -> (PathBuf, PathBuf) {
    let p = |name: &str| dir.join(name);
    // X.509 v3 (rustls accepts no v1 certificate): extensions make it so.
    std::fs::write(p("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(Command::new("openssl")
        .current_dir(dir)
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=worker",
            "-keyout",
        ])
        .arg(p("client.key"))
        .arg("-out")
        .arg(p("client.csr")));
    run(Command::new("openssl")
        .current_dir(dir)
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(p("client.csr"))
        .arg("-CA")
        .arg(p(&format!("{ca}.pem")))
        .arg("-CAkey")
        .arg(p(&format!("{ca}.key")))
        .args(["-CAcreateserial", "-extfile"])
        .arg(p("client.ext"))
        .arg("-out")
        .arg(p("client.pem")));
    (p("client.pem"), p("client.key"))
}

#[test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
fn amqp_tls_presents_the_client_certificate_a_broker_requires() {
    let (lane, root, plugins) = setup!("amqp_tls_client");
    fib_plugin(&plugins);
    let (ca, cert, key) = certificates(root.path(), "test-ca", "broker.test");
    let (client_cert, client_key) = client_certificate(root.path(), "test-ca");
    // The terminator accepts only clients with a certificate signed by the test CA.
    let verify = format!("verify = 2\nCAfile = {}", ca.display());
    let Some(tunnel) = stunnel(root.path(), &cert, &key, &verify) else {
        return;
    };
    let url = format!("amqps://guest:guest@127.0.0.1:{}//", tunnel.port);
    let ca = ca.display().to_string();
    let tls = [
        "--broker-ca",
        &ca,
        "--broker-tls-server-name",
        "broker.test",
    ];

    let mut d = serve(&lane, &plugins, &root.path().join("none.sock"), &url, &tls);
    d.wait_log("broker connection lost or refused");
    assert!(!d
        .drain_log()
        .iter()
        .any(|l| l.contains("consuming Celery tasks")));
    drop(d);

    let (cert, key) = (
        client_cert.display().to_string(),
        client_key.display().to_string(),
    );
    let mut with_cert = tls.to_vec();
    with_cert.extend(["--broker-cert", &cert, "--broker-key", &key]);
    let mut d = serve(
        &lane,
        &plugins,
        &root.path().join("cert.sock"),
        &url,
        &with_cert,
    );
    d.wait_log("consuming Celery tasks");
    assert_eq!(lane.run(&["call", "fibonacci", "[10]"]), json!({"ok": 55}));
}
