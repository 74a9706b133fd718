//! The real daemon for the benches: `worker serve` (release build) on its own plugins
//! directory, state directory and control socket, started as systemd starts it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `worker serve` on its own plugins, state directory and control socket.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    /// Since `serve` was started, when it told READY=1.
    pub ready_after: Duration,
}

impl Daemon {
    /// Installs every plugin in `plugins`, starts `serve` with `extra` arguments and
    /// waits for READY=1, received as systemd receives it (Type=notify).
    pub fn start(root: &Path, plugins: &Path, extra: &[&str]) -> Daemon {
        let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/worker");
        assert!(
            bin.exists(),
            "{} missing: run benches/run.sh",
            bin.display()
        );
        let tag = plugins.file_name().unwrap().to_string_lossy().to_string();
        let socket = root.join(format!("{tag}.sock"));
        let args = |c: &mut Command| {
            c.arg("--plugins")
                .arg(plugins)
                .arg("--state-dir")
                .arg(root.join(format!("{tag}-state")))
                .arg("--socket")
                .arg(&socket);
        };
        let mut install = Command::new(&bin);
        install.args(["plugins", "install"]);
        args(&mut install);
        let out = install.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let notify_path = root.join(format!("{tag}-notify.sock"));
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut serve = Command::new(&bin);
        serve.args(["serve", "--log-level", "warn"]).args(extra);
        args(&mut serve);
        let started = Instant::now();
        let child = serve
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 4096];
        let ready_after = loop {
            let n = notify.recv(&mut buf).expect("READY=1 within 120 s");
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break started.elapsed();
            }
        };
        Daemon {
            child,
            socket,
            ready_after,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many instances it reports ready (`plugins.status` on the control socket).
    pub fn ready_instances(&self) -> usize {
        let Ok(mut s) = UnixStream::connect(&self.socket) else {
            return 0;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"plugins.status\",\"params\":{}}\n",
        );
        let mut line = String::new();
        let _ = BufReader::new(s).read_line(&mut line);
        line.matches("\"state\":\"ready\"").count()
    }

    pub fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}
