//! AMQP benchmark: drain rate of N no-op Celery tasks preloaded in a queue, with rpc results,
//! for the Celery worker (prefork -c 2 and threads), `worker` with the Rust SDK plugin and with
//! the Python SDK plugin, and a raw lapin consume-reply-ack loop (the ceiling). Also each
//! contender's memory. Run with `benches/run-amqp.sh` (builds first; needs RabbitMQ and the
//! Celery venv in `target/celery-venv`, which the broker tests create).
//!
//! Every contender consumes the same messages, published here in Celery's protocol v2 exactly
//! as the Python client does, with reply_to = a queue this program counts SUCCESS replies on.
//! Rate = replies / (time of last reply - time of first reply), so start-up is excluded.

use futures_lite::stream::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672//";
const QUEUE: &str = "bench.tasks";
const REPLIES: &str = "bench.replies";

fn n_tasks() -> usize {
    std::env::var("BENCH_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000)
}

/// BENCH_PREFETCH sets the prefetch of `worker` and of the raw loop (default: theirs).
fn prefetch() -> Option<u32> {
    std::env::var("BENCH_PREFETCH")
        .ok()
        .and_then(|v| v.parse().ok())
}

fn env_or(key: &str, default: u32) -> u32 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
}

async fn declare(ch: &Channel) {
    let ex = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        QUEUE.into(),
        ExchangeKind::Direct,
        ex,
        FieldTable::default(),
    )
    .await
    .unwrap();
    let q = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(QUEUE.into(), q, FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        QUEUE.into(),
        QUEUE.into(),
        QUEUE.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        REPLIES.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    ch.queue_purge(REPLIES.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
}

/// Publishes N protocol-v2 task messages for `task`.
async fn preload(ch: &Channel, task: &str, n: usize) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .ok();
    let body = br#"[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;
    let mut pending = Vec::with_capacity(1000);
    for i in 0..n {
        let id = format!("bench-{i}-{}", fastrand::u64(..));
        let mut h = FieldTable::default();
        h.insert("lang".into(), s("py"));
        h.insert("task".into(), s(task));
        h.insert("id".into(), s(&id));
        h.insert("root_id".into(), s(&id));
        h.insert("retries".into(), AMQPValue::LongInt(0));
        let mut tl = FieldArray::default();
        tl.push(AMQPValue::Void);
        tl.push(AMQPValue::Void);
        h.insert("timelimit".into(), AMQPValue::FieldArray(tl));
        for k in ["eta", "expires", "group", "parent_id", "shadow"] {
            h.insert(k.into(), AMQPValue::Void);
        }
        h.insert("argsrepr".into(), s("()"));
        h.insert("kwargsrepr".into(), s("{}"));
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_correlation_id(id.as_str().into())
            .with_reply_to(REPLIES.into())
            .with_delivery_mode(2)
            .with_priority(0)
            .with_headers(h);
        pending.push(
            ch.basic_publish(
                "".into(),
                QUEUE.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap(),
        );
        if pending.len() == 1000 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
}

/// Counts SUCCESS replies until `n` arrived; returns (first, last) reply times.
async fn count_replies(ch: &Channel, n: usize, limit: Duration) -> Option<(Instant, Instant)> {
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            REPLIES.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + limit;
    let (mut first, mut seen) = (None, 0);
    while seen < n {
        let left = deadline.checked_duration_since(Instant::now())?;
        let d = tokio::time::timeout(left, consumer.next())
            .await
            .ok()??
            .ok()?;
        if d.data.windows(9).any(|w| w == b"\"SUCCESS\"") {
            first.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    Some((first?, Instant::now()))
}

/// RSS in KiB of `pid` and all its descendants.
fn tree_rss_kib(pid: u32) -> (u64, u64) {
    let rss = |p: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    };
    let mut children = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        // Children hang off whichever thread spawned them.
        let threads = std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten();
        for t in threads {
            let list = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in list.split_whitespace().filter_map(|c| c.parse().ok()) {
                children.push(c);
                stack.push(c);
            }
        }
    }
    (rss(pid), children.iter().map(|&c| rss(c)).sum())
}

struct Contender {
    name: &'static str,
    task: &'static str,
    start: Box<dyn Fn() -> Child>,
}

fn stop(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    for _ in 0..100 {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One drain: preload, start the contender, count replies, stop it.
async fn run_once(c: &Contender, n: usize) -> (Option<f64>, (u64, u64)) {
    let conn = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    declare(&ch).await;
    preload(&ch, c.task, n).await;
    let counter = conn.create_channel().await.unwrap();
    let child = (c.start)();
    let pid = child.id();
    // Sample memory once the drain is under way.
    let sampler = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tree_rss_kib(pid)
    });
    let times = count_replies(&counter, n, Duration::from_secs(600)).await;
    let rss = sampler.await.unwrap();
    stop(child);
    let _ = conn.close(200, "bench done".into()).await;
    (
        times.map(|(a, b)| (n - 1) as f64 / (b - a).as_secs_f64()),
        rss,
    )
}

fn plugin_dir(root: &std::path::Path, name: &str, manifest: String) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plugin.toml"), manifest).unwrap();
    root.to_path_buf()
}

fn main() {
    let n = n_tasks();
    let venv = repo().join("target/celery-venv/bin");
    assert!(
        venv.join("celery").exists(),
        "needs the Celery venv in target/celery-venv: `cargo test --test amqp` creates it (or: /usr/bin/python3 -m venv target/celery-venv && target/celery-venv/bin/pip install 'celery>=5.4,<6')"
    );
    let worker_bin = repo().join("target/release/worker");
    let rust_plugin = repo().join("target/release/examples/rust-echo");
    let ceiling_bin = repo().join("target/release/examples/amqp-ceiling");
    for b in [&worker_bin, &rust_plugin, &ceiling_bin] {
        assert!(
            b.exists(),
            "{} missing: run benches/run-amqp.sh",
            b.display()
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let rust_dir = plugin_dir(
        &tmp.path().join("rust"),
        "rust-echo",
        format!("name = \"rust-echo\"\nversion = \"1\"\ncommand = [{:?}]\ninstances = {}\nconcurrency = {}\n[[tasks]]\nname = \"rust.noop\"\n[[tasks]]\nname = \"rust.echo\"\n[[tasks]]\nname = \"rust.count\"\n[[tasks]]\nname = \"rust.flood\"\n", rust_plugin.display().to_string(), env_or("BENCH_RUST_INSTANCES", 2), env_or("BENCH_RUST_CONCURRENCY", 16)),
    );
    let py_dir = plugin_dir(
        &tmp.path().join("py"),
        "python-fibonacci",
        format!(
            "name = \"python-fibonacci\"\nversion = \"1\"\ncommand = [\"/usr/bin/python3\", {:?}]\ninstances = 2\nconcurrency = 8\n[env]\nPYTHONPATH = {:?}\n[[tasks]]\nname = \"fibonacci\"\n[[tasks]]\nname = \"py.noop\"\n",
            repo().join("examples/python-fibonacci/main.py").display().to_string(),
            repo().join("plugin-protocol/python").display().to_string()
        ),
    );
    let celery = move |pool: &'static str, c: &'static str| -> Box<dyn Fn() -> Child> {
        let venv = venv.clone();
        Box::new(move || {
            Command::new(venv.join("celery"))
                .args([
                    "-A",
                    "benchapp",
                    "worker",
                    "-P",
                    pool,
                    "-c",
                    c,
                    "-Q",
                    QUEUE,
                    "-l",
                    "warning",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "-n",
                    &format!("celery-bench-{pool}@%h"),
                ])
                .current_dir(repo().join("benches/celery"))
                .env("BROKER_URL", BROKER)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
    };
    let ours = move |dir: PathBuf,
                     tag: &'static str,
                     extra: &'static [&'static str]|
          -> Box<dyn Fn() -> Child> {
        let bin = worker_bin.clone();
        Box::new(move || {
            // The daemon runs installed plugins (a no-op after the first round).
            let state = dir.with_file_name(format!("{tag}-state"));
            let installed = Command::new(&bin)
                .args(["plugins", "install", "--plugins"])
                .arg(&dir)
                .arg("--state-dir")
                .arg(&state)
                .arg("--socket")
                .arg(dir.join("w.sock"))
                .output()
                .unwrap();
            assert!(
                installed.status.success(),
                "plugins install failed: {}",
                String::from_utf8_lossy(&installed.stdout)
            );
            Command::new(&bin)
                .args([
                    "serve",
                    "--log-level",
                    "warn",
                    "--broker",
                    BROKER,
                    "-Q",
                    QUEUE,
                    "-n",
                    &format!("worker-bench-{tag}@host"),
                    "--plugins",
                ])
                .arg(&dir)
                .arg("--state-dir")
                .arg(&state)
                .arg("--socket")
                .arg(dir.join("w.sock"))
                .args(extra)
                .args(
                    prefetch()
                        .map(|p| vec!["--prefetch-count".to_string(), p.to_string()])
                        .unwrap_or_default(),
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
    };
    let contenders = [
        Contender {
            name: "celery prefork -c 2",
            task: "bench.noop",
            start: celery("prefork", "2"),
        },
        Contender {
            name: "celery threads -c 8",
            task: "bench.noop",
            start: celery("threads", "8"),
        },
        Contender {
            name: "worker + rust plugin",
            task: "rust.noop",
            start: ours(rust_dir.clone(), "rust", &[]),
        },
        Contender {
            // Celery's task events on (`-E`): every task also publishes received, started
            // and succeeded to `celeryev`.
            name: "worker + rust plugin, task events on",
            task: "rust.noop",
            start: ours(rust_dir, "rust-events", &["-E"]),
        },
        Contender {
            name: "worker + python SDK plugin",
            task: "py.noop",
            start: ours(py_dir, "py", &[]),
        },
        Contender {
            name: "raw lapin consume-reply-ack",
            task: "bench.noop",
            start: Box::new(move || {
                Command::new(&ceiling_bin)
                    .arg(BROKER)
                    .arg(QUEUE)
                    .arg(prefetch().unwrap_or(64).to_string())
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap()
            }),
        },
    ];

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    // BENCH_ONLY=rust,raw (substrings of contenders' names) runs just the matching ones.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let selected: Vec<&Contender> = contenders
        .iter()
        .filter(|c| only.split(',').any(|o| c.name.contains(o)))
        .collect();
    // Rounds are interleaved (every contender once per round) so that drift in the broker's
    // speed hits all of them alike; each contender's figure is its median round.
    let rounds = env_or("BENCH_ROUNDS", 3).max(1) as usize;
    let mut samples: Vec<Vec<(f64, (u64, u64))>> = vec![Vec::new(); selected.len()];
    for round in 1..=rounds {
        for (i, c) in selected.iter().enumerate() {
            let (rate, rss) = rt.block_on(run_once(c, n));
            match rate {
                Some(r) => eprintln!("round {round}: {:<30} {:>9.0} tasks/s", c.name, r),
                None => eprintln!("round {round}: {:<30} did not finish", c.name),
            }
            samples[i].push((rate.unwrap_or(0.0), rss));
        }
    }
    for (c, mut s) in selected.iter().zip(samples) {
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (rate, rss) = s[s.len() / 2];
        rows.push((c.name, rate, rss));
    }
    let best_celery = rows
        .iter()
        .filter(|r| r.0.starts_with("celery"))
        .map(|r| r.1)
        .fold(0.0, f64::max);
    let ceiling = rows
        .iter()
        .find(|r| r.0.starts_with("raw"))
        .map(|r| r.1)
        .unwrap_or(f64::NAN);
    let celery_rss = rows
        .iter()
        .filter(|r| r.0.starts_with("celery"))
        .map(|r| r.2 .0 + r.2 .1)
        .max()
        .unwrap_or(0);
    println!("\n{n} no-op tasks preloaded, rpc results; rate from first to last reply; median of {rounds} interleaved rounds");
    println!(
        "{:<30} {:>10} {:>12} {:>12} {:>14} {:>14}",
        "contender", "tasks/s", "x best celery", "x raw lapin", "main RSS MiB", "children MiB"
    );
    for (name, rate, (main, children)) in &rows {
        println!(
            "{:<30} {:>10.0} {:>12.2} {:>12.2} {:>14.1} {:>14.1}",
            name,
            rate,
            rate / best_celery,
            rate / ceiling,
            *main as f64 / 1024.0,
            *children as f64 / 1024.0
        );
    }
    println!(
        "largest Celery worker RSS (main + pool children): {:.1} MiB",
        celery_rss as f64 / 1024.0
    );
}
