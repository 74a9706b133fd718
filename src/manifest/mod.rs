//! Plugin manifests (`plugin.toml`): parsing, validation and discovery in the plugins directory.
//!
//! A manifest error names the file, the key and the line, and a broken manifest only removes
//! that one plugin: discovery returns the good plugins and the errors side by side.

mod backends;
mod discover;
mod limits;
mod self_tests;

pub use backends::{Backends, QueueBackend, ResultBackend};
pub use discover::{discover, Discovery};

pub use limits::Limits;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

pub const MANIFEST_FILE: &str = "plugin.toml";

/// The CPU priority of a plugin that only watches events, unless its `[limits]` say otherwise.
pub const WATCHER_NICE: u8 = 10;

/// A validated plugin manifest.
/// A plugin's manifest. Serializes (for `plugins inspect --json`) with durations in seconds
/// and the install steps as `install_steps`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub description: String,
    /// The plugin's directory; the working directory of its processes.
    pub dir: PathBuf,
    /// argv; a relative program path containing `/` is resolved against `dir`.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Variables of the worker's own environment passed on to the plugin (it gets a clean one).
    pub env_passthrough: Vec<String>,
    /// Install may follow symlinks out of the plugin's directory (refused by default).
    pub allow_outside_symlinks: bool,
    /// The filesystem sandbox its processes run in.
    pub sandbox: Sandbox,
    /// The user (and group) its processes run as when the worker runs as root.
    pub user: Option<String>,
    pub group: Option<String>,
    pub tasks: Vec<TaskDecl>,
    /// Event kinds it is sent as `event` notifications (`"task.*"`, `"instance.exited"`,
    /// `"*"`); empty = none. A subscriber may declare no tasks.
    pub events: Vec<String>,
    /// Processes to run.
    pub instances: u32,
    /// In-flight tasks per process.
    pub concurrency: u32,
    /// Runs of one task when the process under it crashes (1 = never retry).
    pub max_attempts: u32,
    pub timeouts: Timeouts,
    pub restart: RestartSettings,
    pub limits: Limits,
    /// Passed verbatim in `initialize`.
    pub settings: Map<String, Value>,
    /// Queue and result backends it provides (protocol 1.5), besides its tasks.
    #[serde(flatten)]
    pub backends: Backends,
    /// Self-tests run by `worker plugins test`.
    #[serde(skip)]
    pub tests: Vec<SelfTest>,
    /// Install steps (argv each), run in order in the installed copy's directory by
    /// `worker plugins install`; empty when the plugin needs nothing built or fetched.
    #[serde(rename = "install_steps")]
    pub install: Vec<Vec<String>>,
}

/// `sandbox` in plugin.toml: what of the filesystem a plugin's processes may touch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sandbox {
    /// What the worker's user may (the systemd unit's sandbox still applies).
    #[default]
    None,
    /// Landlock: read and run the installed copy and the system (`/usr`, `/etc`, ...), write
    /// only the data directory and a private tmp. Best effort: reported where the kernel lacks
    /// Landlock.
    Strict,
}

/// One `[[tests]]` entry: run `task` with `args`/`kwargs`, expect a result or an error type.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfTest {
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub expect: Expect,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// Any successful result.
    Success,
    Result(Value),
    /// An error whose exception type has this name.
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDecl {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Free-form description of the task's parameters (any table or value), shown by
    /// `worker plugins inspect`.
    #[serde(default)]
    pub params: Option<Value>,
}

/// All durations of a plugin's life, resolved from seconds in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeouts {
    #[serde(serialize_with = "seconds")]
    pub init: Duration,
    /// Longest run of one install step.
    #[serde(serialize_with = "seconds")]
    pub install: Duration,
    #[serde(serialize_with = "seconds_opt")]
    pub task_soft: Option<Duration>,
    #[serde(serialize_with = "seconds_opt")]
    pub task_hard: Option<Duration>,
    #[serde(serialize_with = "seconds")]
    pub shutdown_grace: Duration,
    #[serde(serialize_with = "seconds")]
    pub cancel_grace: Duration,
    #[serde(serialize_with = "seconds")]
    pub ping_interval: Duration,
    #[serde(serialize_with = "seconds")]
    pub ping_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestartSettings {
    pub max_restarts: u32,
    #[serde(serialize_with = "seconds")]
    pub window: Duration,
    #[serde(serialize_with = "seconds")]
    pub backoff_initial: Duration,
    #[serde(serialize_with = "seconds")]
    pub backoff_max: Duration,
    #[serde(serialize_with = "seconds")]
    pub stable_after: Duration,
    /// How long a `failed` plugin waits before it is tried again on its own.
    #[serde(serialize_with = "seconds")]
    pub failed_retry: Duration,
}

/// Validates a raw manifest; every error names the key and its line in `text`.
struct Checker<'a> {
    text: &'a str,
}

impl Checker<'_> {
    fn err(&self, key: &str, span: std::ops::Range<usize>, msg: &str) -> String {
        format!(
            "key `{key}` (line {}): {msg}",
            line_of(self.text, span.start)
        )
    }

    /// A duration key: a finite number of seconds from `min` to 30 days (bounded so no
    /// duration arithmetic can overflow).
    fn secs(&self, key: &str, v: &Spanned<f64>, min: f64) -> Result<Duration, String> {
        const MAX: f64 = crate::task::MAX_DURATION_SECS;
        let s = *v.get_ref();
        if !(s.is_finite() && s >= min && s <= MAX) {
            let msg = format!("must be a number of seconds from {min} to {MAX} (30 days)");
            return Err(self.err(key, v.span(), &msg));
        }
        Ok(Duration::from_secs_f64(s))
    }

    fn identity(&self, raw: &RawManifest) -> Result<(), String> {
        if !is_valid_name(raw.name.get_ref()) {
            return Err(self.err(
                "name",
                raw.name.span(),
                "use 1-64 characters from a-z, 0-9, `-`, `_` and `.`, starting with a letter or digit",
            ));
        }
        if raw.version.get_ref().trim().is_empty() {
            return Err(self.err("version", raw.version.span(), "must not be empty"));
        }
        let command = raw.command.get_ref();
        if command.is_empty() || command[0].trim().is_empty() {
            let msg = "must name a program, e.g. [\"./my-plugin\"]";
            return Err(self.err("command", raw.command.span(), msg));
        }
        Ok(())
    }

    fn tasks(&self, raw: &RawManifest) -> Result<(), String> {
        let tasks = raw.tasks.get_ref();
        let provides = raw.provides.as_ref();
        if tasks.is_empty()
            && raw.events.get_ref().is_empty()
            && provides.is_none_or(|p| p.get_ref().is_empty())
        {
            let msg = "declare at least one [[tasks]] entry (or subscribe to `events`, or provide a backend)";
            return Err(self.err("tasks", raw.tasks.span(), msg));
        }
        let mut seen = HashMap::new();
        for t in tasks {
            if t.name.trim().is_empty() {
                let msg = "a task name must not be empty";
                return Err(self.err("tasks.name", raw.tasks.span(), msg));
            }
            if seen.insert(t.name.as_str(), ()).is_some() {
                let msg = format!("task `{}` is declared twice", t.name);
                return Err(self.err("tasks", raw.tasks.span(), &msg));
            }
        }
        Ok(())
    }

    fn events(&self, raw: &RawManifest) -> Result<(), String> {
        for pattern in raw.events.get_ref() {
            if !crate::events::valid_pattern(pattern) {
                let msg = format!(
                    "`{pattern}` is not an event kind; use \"task.*\", \"instance.*\", \"plugin.*\", \"*\" or one of: {}",
                    crate::events::KINDS.join(", ")
                );
                return Err(self.err("events", raw.events.span(), &msg));
            }
        }
        Ok(())
    }

    fn timeouts(&self, t: &RawTimeouts) -> Result<Timeouts, String> {
        let opt = |key: &str, v: &Option<Spanned<f64>>| -> Result<Option<Duration>, String> {
            v.as_ref().map(|v| self.secs(key, v, 0.001)).transpose()
        };
        Ok(Timeouts {
            init: self.secs("timeouts.init", &t.init, 0.001)?,
            install: self.secs("timeouts.install", &t.install, 0.001)?,
            task_soft: opt("timeouts.task_soft", &t.task_soft)?,
            task_hard: opt("timeouts.task_hard", &t.task_hard)?,
            shutdown_grace: self.secs("timeouts.shutdown_grace", &t.shutdown_grace, 0.0)?,
            cancel_grace: self.secs("timeouts.cancel_grace", &t.cancel_grace, 0.0)?,
            ping_interval: self.secs("timeouts.ping_interval", &t.ping_interval, 0.01)?,
            ping_timeout: self.secs("timeouts.ping_timeout", &t.ping_timeout, 0.001)?,
        })
    }

    fn restart(&self, r: &RawRestart) -> Result<RestartSettings, String> {
        Ok(RestartSettings {
            max_restarts: r.max_restarts,
            window: self.secs("restart.window", &r.window, 0.001)?,
            backoff_initial: self.secs("restart.backoff_initial", &r.backoff_initial, 0.0)?,
            backoff_max: self.secs("restart.backoff_max", &r.backoff_max, 0.0)?,
            stable_after: self.secs("restart.stable_after", &r.stable_after, 0.0)?,
            failed_retry: self.secs("restart.failed_retry", &r.failed_retry, 0.001)?,
        })
    }

    fn install(&self, raw: &RawManifest) -> Result<(), String> {
        for (i, step) in raw.install.get_ref().iter().enumerate() {
            if step.is_empty() || step[0].trim().is_empty() {
                let msg = format!(
                    "step {} must name a program, e.g. [\"cargo\", \"build\", \"--release\"]",
                    i + 1
                );
                return Err(self.err("install", raw.install.span(), &msg));
            }
        }
        Ok(())
    }
}

fn seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn seconds_opt<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// What is wrong in a manifest's text: the key, its line, and what is allowed.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("{0}")]
pub struct InvalidManifest(pub String);

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("{}: {message}", path.display())]
pub struct ManifestError {
    pub path: PathBuf,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: Spanned<String>,
    version: Spanned<String>,
    #[serde(default)]
    description: String,
    command: Spanned<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    env_passthrough: Vec<String>,
    #[serde(default)]
    allow_outside_symlinks: bool,
    #[serde(default)]
    sandbox: Sandbox,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default = "no_tasks")]
    tasks: Spanned<Vec<TaskDecl>>,
    #[serde(default = "no_events")]
    events: Spanned<Vec<String>>,
    #[serde(default = "one")]
    instances: Spanned<u32>,
    #[serde(default = "one")]
    concurrency: Spanned<u32>,
    #[serde(default = "three")]
    max_attempts: Spanned<u32>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    restart: RawRestart,
    #[serde(default)]
    limits: limits::RawLimits,
    #[serde(default)]
    settings: toml::Table,
    #[serde(default)]
    tests: Vec<self_tests::RawSelfTest>,
    #[serde(default = "no_steps")]
    install: Spanned<Vec<Vec<String>>>,
    #[serde(default)]
    provides: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    queue_backend: Option<Spanned<backends::RawQueueBackend>>,
    #[serde(default)]
    result_backend: Option<Spanned<backends::RawResultBackend>>,
}

fn one() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}
fn no_tasks() -> Spanned<Vec<TaskDecl>> {
    Spanned::new(0..0, Vec::new())
}
fn no_events() -> Spanned<Vec<String>> {
    Spanned::new(0..0, Vec::new())
}
fn no_steps() -> Spanned<Vec<Vec<String>>> {
    Spanned::new(0..0, Vec::new())
}
fn three() -> Spanned<u32> {
    Spanned::new(0..0, 3)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTimeouts {
    init: Spanned<f64>,
    install: Spanned<f64>,
    task_soft: Option<Spanned<f64>>,
    task_hard: Option<Spanned<f64>>,
    shutdown_grace: Spanned<f64>,
    cancel_grace: Spanned<f64>,
    ping_interval: Spanned<f64>,
    ping_timeout: Spanned<f64>,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        let s = |v| Spanned::new(0..0, v);
        RawTimeouts {
            init: s(10.0),
            install: s(600.0),
            task_soft: None,
            task_hard: None,
            shutdown_grace: s(5.0),
            cancel_grace: s(5.0),
            ping_interval: s(10.0),
            ping_timeout: s(5.0),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRestart {
    max_restarts: u32,
    window: Spanned<f64>,
    backoff_initial: Spanned<f64>,
    backoff_max: Spanned<f64>,
    stable_after: Spanned<f64>,
    failed_retry: Spanned<f64>,
}

impl Default for RawRestart {
    fn default() -> Self {
        let s = |v| Spanned::new(0..0, v);
        RawRestart {
            max_restarts: 5,
            window: s(60.0),
            backoff_initial: s(0.1),
            backoff_max: s(30.0),
            stable_after: s(30.0),
            failed_retry: s(300.0),
        }
    }
}

impl Manifest {
    /// Reads and validates `<dir>/plugin.toml`.
    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| ManifestError {
            path: path.clone(),
            message: format!("cannot read: {e}"),
        })?;
        Manifest::parse(&text, dir).map_err(|e| ManifestError {
            path,
            message: e.to_string(),
        })
    }

    /// Parses manifest text for a plugin living in `dir`. Errors name the key and the line.
    pub fn parse(text: &str, dir: &Path) -> Result<Manifest, InvalidManifest> {
        Self::check(text, dir).map_err(InvalidManifest)
    }

    fn check(text: &str, dir: &Path) -> Result<Manifest, String> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| one_line(&e.to_string()))?;
        let c = Checker { text };
        c.identity(&raw)?;
        c.tasks(&raw)?;
        c.events(&raw)?;
        for (key, v) in [
            ("instances", &raw.instances),
            ("concurrency", &raw.concurrency),
            ("max_attempts", &raw.max_attempts),
        ] {
            if *v.get_ref() == 0 {
                return Err(c.err(key, v.span(), "must be at least 1"));
            }
        }
        let timeouts = c.timeouts(&raw.timeouts)?;
        let restart = c.restart(&raw.restart)?;
        let settings = match serde_json::to_value(&raw.settings) {
            Ok(Value::Object(map)) => map,
            _ => return Err("key `settings`: must be a table of plain values".into()),
        };
        c.install(&raw)?;
        let tests = self_tests::self_tests(raw.tests, raw.tasks.get_ref())?;
        let backends = c.backends(raw.provides, raw.queue_backend, raw.result_backend)?;
        let watches_only = raw.tasks.get_ref().is_empty()
            && backends.queue_backend.is_none()
            && backends.result_backend.is_none()
            && !raw.events.get_ref().is_empty();
        let limits = raw.limits.check(watches_only)?;
        Ok(Manifest {
            backends,
            tests,
            name: raw.name.into_inner(),
            version: raw.version.into_inner(),
            description: raw.description,
            dir: dir.to_path_buf(),
            command: raw.command.into_inner(),
            env: raw.env,
            env_passthrough: raw.env_passthrough,
            allow_outside_symlinks: raw.allow_outside_symlinks,
            sandbox: raw.sandbox,
            user: raw.user,
            group: raw.group,
            tasks: raw.tasks.into_inner(),
            events: raw.events.into_inner(),
            instances: raw.instances.into_inner(),
            concurrency: raw.concurrency.into_inner(),
            max_attempts: raw.max_attempts.into_inner(),
            timeouts,
            restart,
            limits,
            settings,
            install: raw.install.into_inner(),
        })
    }

    /// The program to execute: relative paths with a `/` are taken from the plugin dir.
    pub fn program(&self) -> PathBuf {
        self.resolve_program(&self.command[0])
    }

    /// Resolves an argv[0] the way `command` is: a relative path with a `/` is taken from the
    /// plugin dir; a bare name is left for a `PATH` lookup.
    pub fn resolve_program(&self, program: &str) -> PathBuf {
        let prog = Path::new(program);
        if prog.is_relative() && program.contains('/') {
            self.dir.join(prog)
        } else {
            prog.to_path_buf()
        }
    }

    /// The same manifest for a copy of the plugin living in `dir`.
    pub fn relocated(&self, dir: &Path) -> Manifest {
        Manifest {
            dir: dir.to_path_buf(),
            ..self.clone()
        }
    }

    pub fn task_names(&self) -> impl Iterator<Item = &str> {
        self.tasks.iter().map(|t| t.name.as_str())
    }

    /// Processes x concurrency: how many tasks this plugin runs at once when healthy.
    pub fn capacity(&self) -> usize {
        self.instances as usize * self.concurrency as usize
    }
}

/// TOML values as JSON (datetimes become strings).
fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Plugin names: 1-64 of `a-z 0-9 - _ .`, starting with a letter or digit.
pub fn is_valid_name(name: &str) -> bool {
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.');
    (1..=64).contains(&name.len())
        && name.chars().all(ok_char)
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// toml's errors span several lines with a source excerpt; keep them readable in one log line.
fn one_line(message: &str) -> String {
    let mut lines = message.lines().map(str::trim).filter(|l| {
        !l.is_empty()
            && !l.starts_with('|')
            && !l.chars().next().is_some_and(|c| c.is_ascii_digit())
    });
    let head = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("TOML parse error ")
        .to_string();
    let rest: Vec<&str> = lines.collect();
    if rest.is_empty() {
        head
    } else {
        format!("{head}: {}", rest.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "fib"
version = "1.0.0"
command = ["./run"]

[[tasks]]
name = "fibonacci"
"#;

    #[test]
    fn minimal_manifest_gets_defaults() {
        let m = Manifest::parse(GOOD, Path::new("/p/fib")).unwrap();
        assert_eq!(m.instances, 1);
        assert_eq!(m.max_attempts, 3);
        assert_eq!(m.timeouts.init, Duration::from_secs(10));
        assert_eq!(m.program(), PathBuf::from("/p/fib/./run"));
    }

    #[test]
    fn bare_program_is_left_for_path_lookup() {
        let m = Manifest::parse(&GOOD.replace("./run", "python3"), Path::new("/p")).unwrap();
        assert_eq!(m.program(), PathBuf::from("python3"));
    }

    #[test]
    fn errors_name_key_and_line() {
        let bad = GOOD.replace("command = [\"./run\"]", "command = []");
        let e = Manifest::parse(&bad, Path::new("/p")).unwrap_err().0;
        assert!(e.contains("key `command` (line 4)"), "{e}");

        let bad = format!("{GOOD}instances = 0\n");
        // `instances` after [[tasks]] belongs to the task table: an unknown key there.
        let e = Manifest::parse(&bad, Path::new("/p")).unwrap_err().0;
        assert!(e.contains("instances") && e.contains("line 8"), "{e}");

        let bad = GOOD.replace("version = \"1.0.0\"", "version = \"1.0.0\"\ninstances = 0");
        let e = Manifest::parse(&bad, Path::new("/p")).unwrap_err().0;
        assert!(e.contains("key `instances` (line 4)"), "{e}");

        let bad = GOOD.replace("name = \"fib\"", "name = \"Fib/../x\"");
        let e = Manifest::parse(&bad, Path::new("/p")).unwrap_err().0;
        assert!(e.contains("key `name` (line 2)"), "{e}");
    }

    #[test]
    fn install_steps_params_and_install_timeout() {
        let text = GOOD.replace(
            "command = [\"./run\"]",
            "command = [\"./run\"]\ninstall = [[\"cargo\", \"build\"], [\"./post\"]]",
        ) + "params = { n = \"int\" }\n[timeouts]\ninstall = 30\n";
        let m = Manifest::parse(&text, Path::new("/p")).unwrap();
        assert_eq!(m.install, vec![vec!["cargo", "build"], vec!["./post"]]);
        assert_eq!(m.tasks[0].params, Some(serde_json::json!({"n": "int"})));
        assert_eq!(m.timeouts.install, Duration::from_secs(30));
        assert_eq!(m.resolve_program("./post"), PathBuf::from("/p/./post"));
        assert_eq!(
            Manifest::parse(GOOD, Path::new("/p"))
                .unwrap()
                .timeouts
                .install,
            Duration::from_secs(600)
        );

        let bad = GOOD.replace(
            "command = [\"./run\"]",
            "command = [\"./run\"]\ninstall = [[\"make\"], []]",
        );
        let e = Manifest::parse(&bad, Path::new("/p")).unwrap_err().0;
        assert!(
            e.contains("key `install` (line 5): step 2 must name a program"),
            "{e}"
        );
    }

    #[test]
    fn negative_timeout_is_refused() {
        let bad = format!("{GOOD}\n[timeouts]\ninit = -1\n");
        let e = Manifest::parse(&bad, Path::new("/p")).unwrap_err().0;
        assert!(e.contains("timeouts.init") && e.contains("line 10"), "{e}");
    }

    #[test]
    fn discovery_keeps_good_plugins_beside_broken_ones() {
        let root = tempfile::tempdir().unwrap();
        let write = |dir: &str, text: &str| {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
            std::fs::write(root.path().join(dir).join(MANIFEST_FILE), text).unwrap();
        };
        write("a", GOOD);
        write("b", "name = ");
        write("c", &GOOD.replace("\"fib\"", "\"other\""));
        let found = discover(root.path()).unwrap();
        assert_eq!(found.plugins.len(), 1);
        assert_eq!(found.errors.len(), 2);
        assert!(found
            .errors
            .iter()
            .any(|e| e.message.contains("already served by plugin `fib`")));
    }
}
