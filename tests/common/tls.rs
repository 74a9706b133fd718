//! Certificates for the TLS tests, made with `openssl`.

use super::text;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `cmd`, failing the test with its stderr if it fails.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().expect("the command runs");
    assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
}

/// A CA named `ca`, and a server certificate it signs for the DNS name `host` only (not for
/// 127.0.0.1): the CA's PEM, the server's certificate and key.
pub fn certificates(dir: &Path, ca: &str, host: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |name: &str| dir.join(name);
    let openssl = || {
        let mut cmd = Command::new("openssl");
        cmd.current_dir(dir);
        cmd
    };
    run(openssl()
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", &format!("/CN={ca}"), "-keyout"])
        .arg(p(&format!("{ca}.key")))
        .arg("-out")
        .arg(p(&format!("{ca}.pem"))));
    run(openssl()
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={host}"),
            "-keyout",
        ])
        .arg(p("server.key"))
        .arg("-out")
        .arg(p("server.csr")));
    std::fs::write(p("san.ext"), format!("subjectAltName=DNS:{host}\n")).unwrap();
    run(openssl()
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p(&format!("{ca}.pem")))
        .arg("-CAkey")
        .arg(p(&format!("{ca}.key")))
        .args(["-CAcreateserial", "-extfile"])
        .arg(p("san.ext"))
        .arg("-out")
        .arg(p("server.pem")));
    (p(&format!("{ca}.pem")), p("server.pem"), p("server.key"))
}
