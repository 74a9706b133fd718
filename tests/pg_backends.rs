//! Queue and result backends (protocol 1.5, §4a) over a real PostgreSQL: `examples/pg-queue` and
//! `examples/pg-results`, installed by their own install steps (a venv, the SDK from this
//! checkout, psycopg from the registry) into real daemons. Every test works in a database of its
//! own, created on the PostgreSQL at 127.0.0.1:5432 and dropped when it ends; without that server
//! the tests fail loudly, naming it.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PG: &[&str] = &["-h", "127.0.0.1", "-p", "5432"];

/// A database of the test's own, dropped (connections and all) when the test ends.
struct Database {
    name: String,
}

impl Database {
    fn create(test: &str) -> Database {
        let name = format!(
            "worker_{test}_{}_{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        let out = psql("postgres", &format!("CREATE DATABASE {name}"));
        assert!(
            out.status.success(),
            "these tests need PostgreSQL on 127.0.0.1:5432 (trust auth): {}",
            text(&out.stderr)
        );
        Database { name }
    }

    /// What a plugin connects with.
    fn dsn(&self) -> String {
        format!("host=127.0.0.1 port=5432 dbname={}", self.name)
    }

    /// One statement's rows, `|`-separated, one per line.
    fn query(&self, sql: &str) -> String {
        let out = psql(&self.name, sql);
        assert!(out.status.success(), "{sql}: {}", text(&out.stderr));
        text(&out.stdout).trim_end().to_string()
    }

    /// Polls `sql` until its answer satisfies `done`; the last answer.
    fn wait(&self, what: &str, limit: Duration, sql: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let answer = self.query(sql);
            if done(&answer) {
                return answer;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: `{sql}` still answers {answer:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn count(&self, sql: &str) -> u64 {
        self.query(sql).parse().expect("a count")
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(db: &str, sql: &str) -> Output {
    output(Command::new("psql").args(PG).args([
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        db,
        "-c",
        sql,
    ]))
}

/// `examples/<name>` as one of the test's plugins: its own files, manifest and install steps,
/// with `settings` for the test's database.
fn pg_example(plugins: &Path, name: &str, settings: toml::Table) {
    let source = repo().join("examples").join(name);
    let dir = plugins.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    // The install step finds the SDK beside the example in the checkout; this copy is elsewhere.
    let text = std::fs::read_to_string(source.join("plugin.toml"))
        .unwrap()
        .replace("$WORKER_PLUGIN_SOURCE/../..", &repo().display().to_string());
    let mut manifest: toml::Table = text.parse().expect("the example's plugin.toml");
    manifest["settings"]
        .as_table_mut()
        .expect("[settings]")
        .extend(settings);
    if let Some(results) = manifest
        .get_mut("result_backend")
        .and_then(|t| t.as_table_mut())
    {
        // The example stores `pg.*` by default; the test stores every task's.
        results.insert("tasks".into(), toml::Value::Array(vec!["*".into()]));
    }
    if !own_user().is_empty() {
        manifest.insert("user".into(), "root".into());
    }
    std::fs::write(dir.join("plugin.toml"), toml::to_string(&manifest).unwrap()).unwrap();
}

fn settings(db: &Database, table: &str) -> toml::Table {
    let mut s = toml::Table::new();
    s.insert("dsn".into(), db.dsn().into());
    s.insert("table".into(), table.into());
    s
}

fn fibonacci(n: u64) -> u64 {
    (0..n).fold((0u64, 1u64), |(a, b), _| (b, a + b)).0
}

/// The pids of `plugin`'s live instances.
fn pids_of(doc: &Value, plugin: &str) -> Vec<u32> {
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
        .filter_map(|i| i["pid"].as_u64().map(|p| p as u32))
        .collect()
}

/// `plugin`'s backend counters in `plugins list --json` (offers answered, results stored, ...).
fn backends<'a>(doc: &'a Value, plugin: &str) -> &'a Value {
    let entry = doc["installed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == plugin)
        .unwrap_or_else(|| panic!("{plugin} is not installed: {doc:#}"));
    &entry["live"]["backends"]
}

/// For [`Database::wait`] on a count.
fn at_least(n: u64) -> impl Fn(&str) -> bool {
    move |count| count.parse::<u64>().expect("a count") >= n
}

fn all_ready(doc: &Value) -> bool {
    plugin_ready(doc, "pg-queue") && plugin_ready(doc, "python-fibonacci")
}

/// Two workers take 5,000 tasks from one table while one of them is SIGKILLed (and later
/// restarted) and the other loses its queue backend process: a lock held by a dead connection
/// goes with it, so every task is still run, and recorded exactly once, with its result.
#[test]
fn pg_queue_survives_killed_workers_and_backends() {
    const TASKS: u64 = 5000;
    let db = Database::create("queue");
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    common::broker::fib_plugin(&plugins);
    let mut queue = settings(&db, "jobs");
    // Rows freed by a dead consumer send no NOTIFY: look again soon.
    queue.insert("poll_interval".into(), 0.2.into());
    pg_example(&plugins, "pg-queue", queue);

    let sockets = [root.path().join("a.sock"), root.path().join("b.sock")];
    let states = sockets.clone().map(|s| s.with_extension("state"));
    // Both installs (each builds its own venv) at once.
    std::thread::scope(|s| {
        for (socket, state) in sockets.iter().zip(&states) {
            let plugins = &plugins;
            s.spawn(move || {
                let (ok, said) = install_all(plugins, state, socket);
                assert!(ok, "install failed:\n{said}");
            });
        }
    });
    let mut a = Daemon::serve(&plugins, &states[0], &sockets[0], &[]);
    let b = Daemon::serve(&plugins, &states[1], &sockets[1], &[]);
    a.wait_list("a ready", all_ready);
    b.wait_list("b ready", all_ready);
    // The backends create their tables when they start.
    db.wait(
        "the queue table",
        Duration::from_secs(20),
        "SELECT to_regclass('jobs_outcomes') IS NOT NULL",
        |t| t == "t",
    );

    db.query(&format!(
        "INSERT INTO jobs (task_id, task, args) \
         SELECT 'jobs-' || i, 'fibonacci', jsonb_build_array(i % 31) FROM generate_series(1, {TASKS}) i"
    ));
    let outcomes = "SELECT count(*) FROM jobs_outcomes";
    db.wait(
        "300 outcomes",
        Duration::from_secs(60),
        outcomes,
        at_least(300),
    );
    a.child.kill().unwrap(); // SIGKILL: its plugins die with it (PDEATHSIG), locks and all
    a.child.wait().unwrap();
    assert!(
        db.count("SELECT count(*) FROM jobs") > 0,
        "the kill must come mid-run: the queue is empty already"
    );

    let done = db.count(outcomes);
    db.wait(
        "b alone",
        Duration::from_secs(60),
        outcomes,
        at_least(done + 300),
    );
    let old = pids_of(&b.list_json(), "pg-queue");
    assert_eq!(old.len(), 1, "one pg-queue instance");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        db.count("SELECT count(*) FROM jobs") > 0,
        "the kill must come mid-run: the queue is empty already"
    );
    b.wait_list("b's pg-queue back", |doc| {
        all_ready(doc) && !pids_of(doc, "pg-queue").is_empty() && pids_of(doc, "pg-queue") != old
    });

    let a = Daemon::serve(&plugins, &states[0], &sockets[0], &[]);
    a.wait_list("a ready again", all_ready);
    db.wait(
        "an empty queue",
        Duration::from_secs(90),
        "SELECT count(*) FROM jobs",
        |c| c == "0",
    );

    let answered = backends(&a.list_json(), "pg-queue")["offers_answered"].clone();
    assert!(
        answered.as_u64().is_some_and(|n| n > 0),
        "the restarted worker took its share: {answered}"
    );

    let rows = db.query("SELECT task_id, state, result::text FROM jobs_outcomes");
    let mut seen: HashMap<String, (String, String)> = HashMap::new();
    for line in rows.lines() {
        let mut cols = line.splitn(3, '|');
        let (id, state, result) = (
            cols.next().unwrap(),
            cols.next().unwrap(),
            cols.next().unwrap(),
        );
        let earlier = seen.insert(id.to_string(), (state.to_string(), result.to_string()));
        assert!(earlier.is_none(), "{id} recorded twice");
    }
    assert_eq!(seen.len() as u64, TASKS, "one outcome per task");
    for i in 1..=TASKS {
        let id = format!("jobs-{i}");
        let (state, result) = seen
            .get(&id)
            .unwrap_or_else(|| panic!("{id} has no outcome"));
        assert_eq!(state, "SUCCESS", "{id}");
        assert_eq!(result, &fibonacci(i % 31).to_string(), "{id}");
    }
}

/// A `task run` through `d.cli`, running in the background; its output comes on the receiver.
fn run_in_background(d: &Daemon, args: &[&str]) -> mpsc::Receiver<Output> {
    let child = d
        .cli(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker runs");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output().expect("task run ends"));
    });
    rx
}

/// Every final state, of a task that succeeded or failed, is in the results table before the
/// control socket answers; while the table cannot be written the answer waits, and once it can,
/// every held result arrives.
#[test]
fn pg_results_stores_every_final_state_before_the_answer() {
    let db = Database::create("results");
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    faulty_plugin(&plugins, "faulty", &[], "", "");
    pg_example(&plugins, "pg-results", settings(&db, "results"));
    let mut d = Daemon::start(&plugins, &root.path().join("w.sock"));
    d.wait_list("ready", |doc| {
        plugin_ready(doc, "faulty") && plugin_ready(doc, "pg-results")
    });
    let row = |id: &str| -> Value {
        let json = db.query(&format!(
            "SELECT row_to_json(r) FROM results r WHERE task_id = '{id}'"
        ));
        assert!(!json.is_empty(), "no row for {id}");
        serde_json::from_str(&json).unwrap()
    };

    let out = output(&mut d.cli(&["task", "run", "f.ok", "1", "two", "--id", "ok-1"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Stored before the answer: no waiting here.
    let r = row("ok-1");
    assert_eq!(r["task"], "f.ok");
    assert_eq!(r["state"], "SUCCESS");
    assert_eq!(r["result"], serde_json::json!([1, "two"]));
    assert_eq!(r["args"], serde_json::json!([1, "two"]));
    assert_eq!(r["attempts"], 1);
    assert!(r["error"].is_null(), "{r}");

    let out = output(&mut d.cli(&["task", "run", "f.raise", "3", "--id", "bad-1"]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let r = row("bad-1");
    assert_eq!(r["state"], "FAILURE");
    assert_eq!(r["error"]["type"], "ValueError", "{r}");
    assert_eq!(r["error"]["message"], "bad value: [3]", "{r}");
    assert!(r["result"].is_null(), "{r}");

    // The sink goes down: its table is renamed away.
    db.query("ALTER TABLE results RENAME TO results_away");
    let late_ok = run_in_background(&d, &["task", "run", "f.ok", "7", "--id", "late-ok"]);
    let late_bad = run_in_background(&d, &["task", "run", "f.raise", "8", "--id", "late-bad"]);
    d.wait_log("cannot store late-ok in results");
    d.wait_log("cannot store late-bad in results");
    assert!(
        late_ok.try_recv().is_err(),
        "answered before its result was stored"
    );
    assert!(
        late_bad.try_recv().is_err(),
        "answered before its result was stored"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM results_away WHERE task_id LIKE 'late-%'"),
        0
    );
    let held = d.wait_list("both results held back", |doc| {
        backends(doc, "pg-results")["results_pending"] == 2
    });
    assert_eq!(
        backends(&held, "pg-results")["results_stored"],
        2,
        "{held:#}"
    );

    // Back up: the retries store both, then the answers come.
    db.query("ALTER TABLE results_away RENAME TO results");
    let limit = Duration::from_secs(30);
    let out = late_ok.recv_timeout(limit).expect("late-ok answered");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "[7]\n");
    let out = late_bad.recv_timeout(limit).expect("late-bad answered");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(row("late-ok")["result"], serde_json::json!([7]));
    assert_eq!(row("late-bad")["error"]["type"], "ValueError");
    assert_eq!(
        db.count("SELECT count(*) FROM results"),
        4,
        "nothing lost, nothing doubled"
    );
    let doc = d.list_json();
    let counters = backends(&doc, "pg-results");
    assert_eq!(counters["results_stored"], 4, "{counters:#}");
    assert_eq!(counters["results_pending"], 0, "{counters:#}");
    assert!(
        counters["result_store_failures"].as_u64().unwrap() >= 2,
        "{counters:#}"
    );
}
