//! The worker's own configuration: `worker.toml`, overridden by `WORKER_*` variables and flags.
//!
//! Every key has a default, so no file is needed. Precedence, lowest first: built-in default,
//! `worker.toml`, environment variable, command-line flag (clap merges the last two).

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// RabbitMQ's default `max_message_size` (128 MiB): what it accepts unless configured.
const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 << 20;
/// RabbitMQ's largest `max_message_size` (512 MiB).
const MAX_MESSAGE_SIZE: usize = 512 << 20;
/// The most threads `runtime_threads` may ask for.
const MAX_RUNTIME_THREADS: usize = 256;

/// Settings of the worker process (not of any one plugin).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This worker's node name, shown in logs and `plugins list` (default `worker@<hostname>`).
    pub name: String,
    /// Directory holding one sub-directory per plugin, each with a `plugin.toml`: the plugins
    /// available to install.
    pub plugins_dir: PathBuf,
    /// Where installed plugins (`installed/<name>/<version>-<id>/`), the install record
    /// (`installed.json`) and install logs live. The daemon runs what is recorded here.
    pub state_dir: PathBuf,
    /// Unix socket of the control API.
    pub socket: PathBuf,
    /// Longest stdout line accepted from a plugin, in bytes.
    pub max_line_bytes: usize,
    /// Tasks a plugin may hold waiting for a free instance before new ones are refused.
    pub queue_capacity: usize,
    /// How long a graceful stop waits for in-flight tasks, in seconds.
    pub drain_timeout: f64,
    /// Threads of the worker's own async runtime. Plugins are processes of their own, so this
    /// is only the worker's bookkeeping (a few microseconds per task): one thread leaves every
    /// other core to the plugins and spares the hand-offs between threads, which cost more
    /// than the work they share (see the book's benchmarks page). More help only a worker
    /// that parses very large messages, so that one does not hold up the others meanwhile.
    pub runtime_threads: usize,
    /// `trace`, `debug`, `info`, `warn` or `error`, or a tracing filter directive. Unset, it
    /// is `info` for `serve` and `warn` for the one-shot commands.
    pub log_level: Option<String>,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// RabbitMQ URL (`amqp://user:pass@host:port/vhost`); unset = embedded mode only. Several
    /// (`amqp://a;amqp://b`, or a list in the file) are tried in turn, as Celery's failover
    /// does: the next one after each lost or refused connection.
    #[serde(deserialize_with = "one_or_many_urls")]
    pub broker: Option<String>,
    /// A file holding the broker URL (e.g. systemd's `LoadCredential=`), read when `broker` is
    /// unset, so the password need not sit in the config or the environment.
    pub broker_file: Option<PathBuf>,
    /// PEM file of the CA(s) that sign the broker's certificate (`amqps://`), trusted besides
    /// the system's roots. Celery: `broker_use_ssl.ca_certs`.
    pub broker_ca: Option<PathBuf>,
    /// PEM client certificate for `amqps://`, with `broker_key`. Celery: `certfile`.
    pub broker_cert: Option<PathBuf>,
    /// PEM (PKCS#8) private key of `broker_cert`. Celery: `keyfile`.
    pub broker_key: Option<PathBuf>,
    /// The name the broker's certificate must carry, when it is not the URL's host.
    /// Celery: `server_hostname`.
    pub broker_tls_server_name: Option<String>,
    /// Queues to consume from the broker.
    pub queues: Vec<String>,
    /// `kombu` (declare exactly as Celery clients do) or `passive` (queues must exist).
    pub queue_declare: QueueDeclare,
    /// The type of the task queues the worker declares (Celery's `task_default_queue_type`):
    /// `classic` or `quorum`. A queue that exists already is consumed as it is.
    #[serde(alias = "task_default_queue_type")]
    pub queue_type: QueueType,
    /// Arguments of the task queues the worker declares (a Celery `Queue`'s
    /// `queue_arguments`), e.g. `{ "x-max-priority" = 10, "x-dead-letter-exchange" = "dlx" }`.
    pub queue_arguments: std::collections::BTreeMap<String, serde_json::Value>,
    /// The type of the exchange the worker declares for each task queue (Celery's
    /// `task_default_exchange_type`): `direct`, `topic` (what Celery 5.5's native delayed
    /// delivery needs on quorum queues), `fanout` or `headers`.
    #[serde(alias = "task_default_exchange_type")]
    pub exchange_type: String,
    /// Per-consumer prefetch; unset = twice the plugins' total capacity (at least 4).
    pub prefetch_count: Option<u16>,
    /// Recent results remembered to answer redelivered copies without running them again.
    pub result_memory: usize,
    /// Seconds a final state is retried while its reply queue does not exist (the broker
    /// returns it as unroutable), before it is logged as undeliverable.
    pub result_retry_timeout: f64,
    /// Seconds a control connection may stay idle (no request in flight, nothing received)
    /// before the daemon closes it, so idle clients cannot hold every connection slot.
    pub control_idle_timeout: f64,
    /// When the worker runs as root: the user plugins run as unless their manifest names one
    /// (`user`); unset, `nobody`. Never root: a plugin that needs root says `user = "root"`.
    pub plugin_user: Option<String>,
    /// Where `serve` gives each plugin process a cgroup v2 of its own: `auto` (the worker's own
    /// cgroup when systemd delegated it, `Delegate=yes`; else none), `off`, or the absolute path
    /// of a cgroup v2 directory the worker may manage.
    pub cgroup: String,
    /// Address of the Prometheus endpoint (`http://<addr>/metrics`); unset = not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Send Celery's `task-*` events (for Flower and `celery events`) from the start, as a
    /// Celery worker with `-E`; the `enable_events` control command turns them on at run time.
    #[serde(alias = "worker_send_task_events")]
    pub task_events: bool,
    /// Where Celery task results go: `rpc://` (each client's reply queue, the default) or a
    /// Redis URL, `redis://host:6379/0`, stored as Celery's Redis backend stores them.
    pub result_backend: String,
    /// Seconds a result stays in the Redis backend (Celery's `result_expires`); 0 keeps it.
    pub result_expires: f64,
    /// The largest task message (body bytes) the worker reads from the broker; a larger one is
    /// rejected without requeue. The default is RabbitMQ's own `max_message_size` (128 MiB).
    pub max_message_size: usize,
    /// URL prefixes of the Girder jobs the worker keeps up to date (a task message's
    /// `jobInfoSpec` names the job's URL); `["*"]` allows any http(s) URL. Empty (the default):
    /// no job is updated, since any broker user could otherwise make the worker send requests
    /// to a URL of their choosing.
    pub girder_job_urls: Vec<String>,
    /// Redis broker: seconds a message taken but not acked stays with its worker before any
    /// worker may restore it to its queue (kombu's `visibility_timeout`, 3600 by default).
    /// This worker renews the lease of every task it still runs, so a longer task is never
    /// run twice; it only bounds how long a killed worker's tasks wait to come back.
    pub visibility_timeout: f64,
    /// Redis broker: a prefix before every key and channel (kombu's `global_keyprefix`), the
    /// same as the clients' transport option.
    pub global_keyprefix: String,
    /// Redis Sentinel broker (`sentinel://...`): the name of the master the sentinels watch
    /// (Celery's `broker_transport_options["master_name"]`).
    pub master_name: Option<String>,
}

/// How the worker declares the task queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QueueDeclare {
    /// Exactly as kombu does: durable queue, durable direct exchange of the same name, bound
    /// with the queue name as routing key, no arguments.
    Kombu,
    /// Passive: the queue must already exist (any flags or arguments).
    Passive,
}

/// `broker` as a string or a list of URLs, kept as Celery's `;`-separated string.
fn one_or_many_urls<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<Urls>::deserialize(d)? {
        None => None,
        Some(Urls::One(s)) => Some(s),
        Some(Urls::Many(list)) => Some(list.join(";")),
    })
}

/// The URLs of a `broker` setting, in failover order (Celery's `amqp://a;amqp://b`).
pub fn broker_urls(broker: &str) -> Vec<&str> {
    broker
        .split(';')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// The type of the task queues the worker declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// RabbitMQ's default (`x-queue-type` not set).
    Classic,
    /// Replicated across a cluster's nodes (`x-queue-type = "quorum"`); durable.
    Quorum,
}

/// The queue arguments the worker may declare: RabbitMQ's current ones for classic and quorum
/// queues (none deprecated in RabbitMQ 4).
pub const QUEUE_ARGUMENTS: &[&str] = &[
    "x-max-priority",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-delivery-limit",
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-single-active-consumer",
    "x-queue-leader-locator",
];

/// The format of the worker's log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: format!("worker@{}", hostname()),
            plugins_dir: default_plugins_dir(),
            state_dir: default_state_dir(),
            socket: default_socket(),
            max_line_bytes: plugin_protocol::DEFAULT_MAX_LINE_BYTES,
            queue_capacity: 1024,
            drain_timeout: 30.0,
            runtime_threads: 1,
            log_level: None,
            log_format: LogFormat::Text,
            broker: None,
            broker_file: None,
            broker_ca: None,
            broker_cert: None,
            broker_key: None,
            broker_tls_server_name: None,
            queues: vec!["celery".into()],
            queue_declare: QueueDeclare::Kombu,
            queue_type: QueueType::Classic,
            queue_arguments: Default::default(),
            exchange_type: "direct".into(),
            prefetch_count: None,
            result_memory: 10_000,
            result_retry_timeout: 60.0,
            control_idle_timeout: 300.0,
            metrics_listen: None,
            task_events: false,
            result_backend: "rpc://".into(),
            result_expires: 86400.0,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            girder_job_urls: Vec::new(),
            visibility_timeout: 3600.0,
            global_keyprefix: String::new(),
            master_name: None,
            plugin_user: None,
            cgroup: "auto".into(),
        }
    }
}

/// A setting out of its allowed range; the message names the key and what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSetting(pub String);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Loads `path` if given; otherwise `./worker.toml` if present; otherwise the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (default_config_file(), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default())
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        config.absolutize();
        config.validate().map_err(|e| ConfigError::Invalid {
            path,
            message: e.to_string(),
        })?;
        Ok(config)
    }

    /// Makes every path absolute, against the current directory (where a relative one means
    /// something now): plugins and install steps run elsewhere (an installed copy, their data
    /// directory), so a path handed to them must not depend on where they run.
    pub fn absolutize(&mut self) {
        let absolute = |p: &mut PathBuf| {
            if let Ok(a) = std::path::absolute(&*p) {
                *p = a;
            }
        };
        absolute(&mut self.plugins_dir);
        absolute(&mut self.state_dir);
        absolute(&mut self.socket);
        for p in [
            &mut self.broker_file,
            &mut self.broker_ca,
            &mut self.broker_cert,
            &mut self.broker_key,
        ]
        .into_iter()
        .flatten()
        {
            absolute(p);
        }
    }

    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.check().map_err(InvalidSetting)
    }

    fn check(&self) -> Result<(), String> {
        if self.state_dir.starts_with(&self.plugins_dir) {
            return Err(format!(
                "key `state_dir`: {} is inside plugins_dir {}; installed copies must live apart from the plugins available to install",
                self.state_dir.display(),
                self.plugins_dir.display()
            ));
        }
        if self.max_line_bytes < 1024 {
            return Err("key `max_line_bytes`: must be at least 1024".into());
        }
        if self.queue_capacity == 0 {
            return Err("key `queue_capacity`: must be at least 1".into());
        }
        if !(1..=MAX_RUNTIME_THREADS).contains(&self.runtime_threads) {
            return Err(format!(
                "key `runtime_threads`: {} is not a number of threads from 1 to {MAX_RUNTIME_THREADS}",
                self.runtime_threads
            ));
        }
        seconds("drain_timeout", self.drain_timeout)?;
        seconds("result_retry_timeout", self.result_retry_timeout)?;
        seconds("control_idle_timeout", self.control_idle_timeout)?;
        seconds("visibility_timeout", self.visibility_timeout)?;
        if self.visibility_timeout < 1.0 {
            return Err("key `visibility_timeout`: must be at least 1 second".into());
        }
        if self.queues.is_empty() || self.queues.iter().any(|q| q.trim().is_empty()) {
            return Err("key `queues`: give at least one non-empty queue name".into());
        }
        if let Some(user) = &self.plugin_user {
            let root = nix::unistd::User::from_name(user)
                .ok()
                .flatten()
                .is_some_and(|u| u.uid.is_root());
            if user.is_empty() || root {
                return Err(format!("key `plugin_user`: `{user}` is not a non-root user name; plugins run as root only when their plugin.toml says `user = \"root\"`"));
            }
        }
        if self.result_backend != "rpc://" {
            if !self.result_backend.starts_with("redis://") {
                return Err(format!(
                    "key `result_backend`: `{}` is not rpc:// or a redis:// URL",
                    crate::source::redact(&self.result_backend)
                ));
            }
            crate::source::redis_backend::RedisBackend::new(&self.result_backend, None)?;
        }
        if !(self.result_expires.is_finite()
            && (0.0..=crate::task::MAX_DURATION_SECS * 12.0).contains(&self.result_expires))
        {
            return Err(format!(
                "key `result_expires`: {} is not a number of seconds from 0 (keep results) to 31104000 (a year)",
                self.result_expires
            ));
        }
        if !matches!(self.cgroup.as_str(), "auto" | "off") && !Path::new(&self.cgroup).is_absolute()
        {
            return Err(format!(
                "key `cgroup`: `{}` is not \"auto\", \"off\" or an absolute cgroup v2 directory",
                self.cgroup
            ));
        }
        self.check_broker()
    }

    /// The keys of the Celery source: the broker, its queues and what its messages may ask.
    fn check_broker(&self) -> Result<(), String> {
        if !["direct", "topic", "fanout", "headers"].contains(&self.exchange_type.as_str()) {
            return Err(format!(
                "key `exchange_type`: `{}` is not direct, topic, fanout or headers",
                self.exchange_type
            ));
        }
        for (key, value) in &self.queue_arguments {
            if !QUEUE_ARGUMENTS.contains(&key.as_str()) {
                return Err(format!(
                    "key `queue_arguments`: `{key}` is not one of {}; the queue type is `queue_type`",
                    QUEUE_ARGUMENTS.join(", ")
                ));
            }
            if !(value.is_string() || value.is_i64() || value.is_u64() || value.is_boolean()) {
                return Err(format!(
                    "key `queue_arguments`: `{key}` = {value} is not a string, integer or boolean"
                ));
            }
        }
        for entry in &self.girder_job_urls {
            crate::source::girder::url_prefix(entry)
                .map_err(|e| format!("key `girder_job_urls`: {e}"))?;
        }
        if !(1024..=MAX_MESSAGE_SIZE).contains(&self.max_message_size) {
            return Err(format!(
                "key `max_message_size`: {} is not a number of bytes from 1024 to {MAX_MESSAGE_SIZE} (RabbitMQ's largest)",
                self.max_message_size
            ));
        }
        if self.prefetch_count == Some(0) {
            return Err("key `prefetch_count`: must be at least 1".into());
        }
        if let Some(b) = &self.broker {
            let urls = broker_urls(b);
            if urls.is_empty() {
                return Err("key `broker`: no URL given".into());
            }
            let redis = |u: &&str| u.starts_with("redis://") || u.starts_with("rediss://");
            let sentinel = |u: &&str| u.starts_with("sentinel://");
            if urls.iter().any(sentinel) {
                if !urls.iter().all(sentinel) {
                    return Err("key `broker`: a Sentinel broker lists sentinels only (sentinel://a:26379;sentinel://b:26379)".into());
                }
                if self.master_name.as_deref().unwrap_or_default().is_empty() {
                    return Err("key `master_name`: a sentinel:// broker needs the name of the master the sentinels watch (Celery's broker_transport_options['master_name'])".into());
                }
                for url in &urls {
                    crate::source::redis_broker::RedisOptions::check_url(url)
                        .map_err(|e| format!("key `broker`: {e}"))?;
                }
            } else if urls.iter().any(redis) {
                if urls.len() > 1 {
                    return Err("key `broker`: a Redis broker is one URL (redis://host:6379/0), not a failover list; for failover use Sentinel (sentinel://...)".into());
                }
                crate::source::redis_broker::RedisOptions::check_url(urls[0])
                    .map_err(|e| format!("key `broker`: {e}"))?;
                if self.broker_tls_server_name.is_some() {
                    return Err("key `broker_tls_server_name`: not supported with a Redis broker; use the name the certificate carries as the URL's host (rediss://name:6380/0)".into());
                }
            } else if let Some(bad) = urls
                .iter()
                .find(|u| !(u.starts_with("amqp://") || u.starts_with("amqps://")))
            {
                return Err(format!(
                    "key `broker`: `{}` is not an amqp://, amqps://, redis:// or rediss:// URL",
                    crate::source::redact(bad)
                ));
            }
        }
        Ok(())
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.drain_timeout)
    }

    pub fn control_idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.control_idle_timeout)
    }

    pub fn result_retry_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.result_retry_timeout)
    }

    /// Whether `broker` is a Redis broker (`redis://`, `rediss://`, `sentinel://`).
    pub fn redis_broker(&self) -> bool {
        self.broker.as_deref().is_some_and(|b| {
            ["redis://", "rediss://", "sentinel://"]
                .iter()
                .any(|s| b.starts_with(s))
        })
    }

    /// The Redis result backend's URL, `None` for rpc://.
    pub fn redis_backend(&self) -> Option<&str> {
        (self.result_backend != "rpc://").then_some(self.result_backend.as_str())
    }
}

/// Longest duration any setting accepts: 30 days.
const MAX_SECONDS: f64 = crate::task::MAX_DURATION_SECS;

/// A duration key must be a finite number of seconds in [0, 30 days].
fn seconds(key: &str, value: f64) -> Result<(), String> {
    if value.is_finite() && (0.0..=MAX_SECONDS).contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "key `{key}`: {value} is not a number of seconds from 0 to {MAX_SECONDS}"
        ))
    }
}

/// This machine's host name (`localhost` if it cannot be read).
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The bundled examples when the binary runs from a checkout that still exists, else the
/// system plugins directory.
/// Whether this build runs from a checkout (its `examples/` are the default plugins). A
/// packaged build (`--features packaged`, as `packaging/build-deb.sh` makes) never looks for the
/// checkout it was built from: its defaults are the system paths.
fn in_checkout() -> bool {
    !cfg!(feature = "packaged")
        && Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .is_dir()
}

/// `./worker.toml`; in a packaged build, `/etc/worker/worker.toml` when there is no
/// `./worker.toml`, so the operator's CLI finds the service's socket and state directory.
fn default_config_file() -> PathBuf {
    let local = PathBuf::from("worker.toml");
    let system = PathBuf::from("/etc/worker/worker.toml");
    if cfg!(feature = "packaged") && !local.exists() && system.exists() {
        system
    } else {
        local
    }
}

fn default_plugins_dir() -> PathBuf {
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    if in_checkout() {
        bundled
    } else {
        PathBuf::from("/var/lib/worker/plugins")
    }
}

/// This checkout's `target/worker-state` while the bundled examples are the default plugins
/// directory; else systemd's `$STATE_DIRECTORY` (from `StateDirectory=`); else `/var/lib/worker`.
fn default_state_dir() -> PathBuf {
    if in_checkout() {
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
        return checkout.join("target").join("worker-state");
    }
    match std::env::var_os("STATE_DIRECTORY") {
        // systemd may pass several, colon-separated; the first is ours.
        Some(dirs) if !dirs.is_empty() => {
            let dirs = dirs.to_string_lossy().into_owned();
            PathBuf::from(dirs.split(':').next().unwrap_or_default())
        }
        _ => PathBuf::from("/var/lib/worker"),
    }
}

/// `$XDG_RUNTIME_DIR/worker.sock`, else `/tmp/worker-<uid>/worker.sock`.
fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("worker.sock"),
        _ => PathBuf::from(format!("/tmp/worker-{}", nix::unistd::getuid())).join("worker.sock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.queue_capacity, 1024);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn runtime_threads_is_one_by_default_and_at_most_256() {
        assert_eq!(Config::default().runtime_threads, 1);
        let four: Config = toml::from_str("runtime_threads = 4").unwrap();
        assert!(four.validate().is_ok());
        for bad in ["runtime_threads = 0", "runtime_threads = 257"] {
            let c: Config = toml::from_str(bad).unwrap();
            let e = c.validate().unwrap_err();
            assert!(e.0.contains("key `runtime_threads`"), "{bad}: {e}");
        }
    }

    #[test]
    fn queue_type_and_arguments_take_celerys_names_and_only_known_arguments() {
        let c: Config = toml::from_str(
            "task_default_queue_type = \"quorum\"\n[queue_arguments]\n\"x-max-priority\" = 10\n\"x-dead-letter-exchange\" = \"dlx\"\n",
        )
        .unwrap();
        assert_eq!(c.queue_type, QueueType::Quorum);
        assert!(c.validate().is_ok());
        for bad in [
            "\"x-queue-type\" = \"quorum\"",
            "\"x-ha-policy\" = \"all\"",
            "\"x-max-priority\" = 1.5",
        ] {
            let c: Config = toml::from_str(&format!("[queue_arguments]\n{bad}\n")).unwrap();
            let e = c.validate().unwrap_err();
            assert!(e.0.contains("key `queue_arguments`"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_redis_broker_is_one_url_or_sentinels_with_a_master_name() {
        let ok = |text: &str| toml::from_str::<Config>(text).unwrap().validate();
        for good in [
            r#"broker = "redis://:pw@h:6379/0""#,
            r#"broker = "rediss://h:6380/0""#,
            "broker = \"sentinel://a:26379;sentinel://b:26379\"\nmaster_name = \"m\"",
        ] {
            assert!(ok(good).is_ok(), "{good}");
            let c: Config = toml::from_str(good).unwrap();
            assert!(c.redis_broker(), "{good}");
        }
        for (bad, key) in [
            (r#"broker = "sentinel://a:26379""#, "key `master_name`"),
            (r#"broker = "redis://a/0;redis://b/0""#, "failover list"),
            (
                "broker = \"sentinel://a:1;redis://b/0\"\nmaster_name = \"m\"",
                "sentinels only",
            ),
            (
                "broker = \"redis://h/0\"\nbroker_tls_server_name = \"x\"",
                "key `broker_tls_server_name`",
            ),
            (
                "broker = \"redis://h/0\"\nvisibility_timeout = 0.5",
                "key `visibility_timeout`",
            ),
        ] {
            let e = ok(bad).unwrap_err();
            assert!(e.0.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn broker_takes_celerys_failover_list_as_a_string_or_a_list() {
        let one: Config = toml::from_str(r#"broker = "amqp://a//;amqps://b//""#).unwrap();
        let many: Config = toml::from_str(r#"broker = ["amqp://a//", "amqps://b//"]"#).unwrap();
        assert_eq!(one.broker, many.broker);
        assert_eq!(
            broker_urls(one.broker.as_deref().unwrap()),
            ["amqp://a//", "amqps://b//"]
        );
        assert!(one.validate().is_ok());
        let bad: Config = toml::from_str(r#"broker = "amqp://a//;redis://:secret@b/0""#).unwrap();
        let e = bad.validate().unwrap_err();
        assert!(
            e.0.contains("key `broker`") && !e.0.contains("secret"),
            "{e}"
        );
    }

    #[test]
    fn girder_job_urls_are_off_by_default_and_must_be_http_prefixes() {
        assert!(Config::default().girder_job_urls.is_empty());
        let ok: Config =
            toml::from_str(r#"girder_job_urls = ["*", "https://girder.example/api/v1/"]"#).unwrap();
        assert!(ok.validate().is_ok());
        let bad: Config = toml::from_str(r#"girder_job_urls = ["girder.example"]"#).unwrap();
        let e = bad.validate().unwrap_err();
        assert!(e.0.contains("key `girder_job_urls`"), "{e}");
    }

    #[test]
    fn task_events_is_off_by_default_and_takes_celerys_name_too() {
        assert!(!Config::default().task_events);
        for text in ["task_events = true", "worker_send_task_events = true"] {
            let c: Config = toml::from_str(text).unwrap();
            assert!(c.task_events, "{text}");
        }
    }

    #[test]
    fn result_backend_is_rpc_or_redis_and_its_password_is_never_shown() {
        let with = |backend: &str, expires: f64| {
            Config {
                result_backend: backend.into(),
                result_expires: expires,
                ..Config::default()
            }
            .validate()
        };
        assert_eq!(Config::default().redis_backend(), None);
        assert!(with("redis://127.0.0.1:6379/0", 0.0).is_ok());
        let e = with("rediss://:secret@host/0", 86400.0).unwrap_err();
        assert!(
            e.0.contains("key `result_backend`") && !e.0.contains("secret"),
            "{e}"
        );
        let e = with("rpc://", -1.0).unwrap_err();
        assert!(e.0.contains("key `result_expires`"), "{e}");
        let c: Config = toml::from_str("result_backend = \"redis://h:6379/1\"").unwrap();
        assert_eq!(c.redis_backend(), Some("redis://h:6379/1"));
    }

    #[test]
    fn cgroup_is_auto_off_or_an_absolute_directory() {
        let with = |cgroup: &str| {
            Config {
                cgroup: cgroup.into(),
                ..Config::default()
            }
            .validate()
        };
        assert_eq!(Config::default().cgroup, "auto");
        for ok in ["auto", "off", "/sys/fs/cgroup/system.slice/worker.service"] {
            assert!(with(ok).is_ok(), "{ok}");
        }
        let e = with("system.slice").unwrap_err();
        assert!(
            e.0.contains("key `cgroup`") && e.0.contains("absolute"),
            "{e}"
        );
    }

    #[test]
    fn state_dir_inside_plugins_dir_is_refused() {
        let mut c = Config {
            plugins_dir: "/srv/plugins".into(),
            state_dir: "/srv/plugins/state".into(),
            ..Config::default()
        };
        let e = c.validate().unwrap_err();
        assert!(
            e.0.contains("key `state_dir`") && e.0.contains("inside plugins_dir"),
            "{e}"
        );
        c.state_dir = "/srv".into();
        assert!(
            c.validate().is_ok(),
            "plugins_dir may live inside state_dir"
        );
    }

    #[test]
    fn max_message_size_is_rabbitmqs_by_default_and_bounded() {
        assert_eq!(Config::default().max_message_size, 128 << 20);
        let c: Config = toml::from_str("max_message_size = 4096").unwrap();
        assert!(c.validate().is_ok());
        for bad in ["max_message_size = 10", "max_message_size = 1073741824"] {
            let c: Config = toml::from_str(bad).unwrap();
            let e = c.validate().unwrap_err();
            assert!(e.0.contains("key `max_message_size`"), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = toml::from_str::<Config>("plugin_dir = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("plugin_dir"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }
}
