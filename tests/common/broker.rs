//! RabbitMQ test support: the broker and Celery-client requirements, a per-test queue and node
//! name (a "lane"), and the Python plugin used by several tests.

use super::*;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672//";

/// The venv's Python, if the broker and the Celery client are both there.
pub fn requirements(test: &str) -> Option<PathBuf> {
    let python = repo().join(".venv/bin/python");
    let broker_up =
        TcpStream::connect_timeout(&"127.0.0.1:5672".parse().unwrap(), Duration::from_secs(2))
            .is_ok();
    let celery = python.exists()
        && Command::new(&python)
            .args(["-c", "import celery"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    let missing = match (broker_up, celery) {
        (true, true) => return Some(python),
        (false, _) => "RabbitMQ at 127.0.0.1:5672 (start it: rabbitmq-server -detached)",
        (true, false) => "the Celery client venv (create it: python3 -m venv .venv && .venv/bin/pip install 'celery>=5.4,<6')",
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs {missing}");
    }
    eprintln!("SKIPPED {test}: needs {missing}");
    None
}

/// A test's own queue and node name, so tests never see each other's messages; the queue and
/// its exchange are deleted when the test ends.
pub struct Lane {
    pub queue: String,
    pub node: String,
    pub python: PathBuf,
}

impl Lane {
    pub fn new(test: &str, python: PathBuf) -> Lane {
        let tag = format!("{test}-{:08x}", fastrand::u32(..));
        Lane {
            queue: format!("t.{tag}"),
            node: format!("{tag}@test"),
            python,
        }
    }

    pub fn client(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(repo().join("tests/celery/client.py"))
            .arg(&self.queue)
            .args(args)
            .current_dir(repo().join("tests/celery"))
            .env("BROKER_URL", BROKER)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the client and returns the JSON of its last stdout line.
    pub fn run(&self, args: &[&str]) -> Value {
        let out = self.client(args).output().expect("python runs");
        let stdout = text(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last)
            .unwrap_or_else(|_| panic!("client said {stdout:?}, stderr {}", text(&out.stderr)))
    }

    pub fn celery_cli(&self, args: &[&str]) -> String {
        let out = Command::new(self.python.parent().unwrap().join("celery"))
            .args(["-A", "capp"])
            .args(args)
            .current_dir(repo().join("tests/celery"))
            .env("BROKER_URL", BROKER)
            .stdin(Stdio::null())
            .output()
            .expect("celery cli runs");
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    pub fn worker(&self, plugins: &Path, socket: &Path) -> Daemon {
        let mut d = Daemon::start_with(
            plugins,
            socket,
            &["--broker", BROKER, "-Q", &self.queue, "-n", &self.node],
        );
        d.wait_log("consuming Celery tasks");
        d
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let script = format!(
            "from capp import app\nwith app.connection_for_write() as c:\n ch = c.channel()\n ch.queue_delete({q:?})\n ch.exchange_delete({q:?})",
            q = self.queue
        );
        let _ = Command::new(&self.python)
            .args(["-c", &script])
            .current_dir(repo().join("tests/celery"))
            .env("BROKER_URL", BROKER)
            .output();
    }
}

pub fn fib_plugin(root: &Path) {
    let dir = root.join("python-fibonacci");
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "name = \"python-fibonacci\"\nversion = \"1.0.0\"\ncommand = [\"/usr/bin/python3\", {:?}]\nconcurrency = 4\n[env]\nPYTHONPATH = {:?}\n[[tasks]]\nname = \"fibonacci\"\n[[tasks]]\nname = \"py.noop\"\n",
        repo().join("examples/python-fibonacci/main.py").display().to_string(),
        repo().join("plugin-protocol/python").display().to_string()
    );
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
}

#[macro_export]
macro_rules! setup {
    ($test:literal) => {{
        let Some(python) = common::broker::requirements($test) else {
            return;
        };
        let root = tempfile::tempdir().unwrap();
        let plugins = root.path().join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        (common::broker::Lane::new($test, python), root, plugins)
    }};
}
