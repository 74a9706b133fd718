//! The command line: argument definitions, config resolution and logging setup, then one
//! module per command group.

mod available;
mod daemon_client;
mod docs;
mod install;
mod journal;
mod list;
mod live;
mod output;
mod plugin_test;
pub mod plugins;
pub mod run;
mod scaffold;
pub mod serve;
pub mod task;

use crate::config::Config;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "Runs task plugins out of process",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Commands,
}

/// Whether `args` (the words after `worker`) parse as a command line, checked against the real
/// definitions without running anything; the error is clap's message. The book's runnable
/// examples are checked with it (tests/docs.rs).
pub fn parses(args: &[&str]) -> Result<(), String> {
    use clap::error::ErrorKind;
    match Cli::try_parse_from(std::iter::once("worker").chain(args.iter().copied())) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => Ok(()),
        Err(e) => Err(e.render().to_string()),
    }
}

/// The book's command-line reference (`docs/src/reference/cli.md`) as Markdown, generated from
/// the definitions.
pub fn reference_markdown() -> String {
    docs::markdown()
}

/// Flags every command takes; each is also a `worker.toml` key and a `WORKER_*` variable.
#[derive(Debug, Args, Clone, Default)]
pub struct CommonArgs {
    /// Config file (default: ./worker.toml if present; else, in the packaged build, /etc/worker/worker.toml)
    #[arg(long, env = "WORKER_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Plugins directory (`plugins_dir`)
    #[arg(
        long = "plugins",
        env = "WORKER_PLUGINS",
        global = true,
        value_name = "DIR"
    )]
    pub plugins_dir: Option<PathBuf>,
    /// Installed plugins and their record (`state_dir`)
    #[arg(long, env = "WORKER_STATE_DIR", global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Control socket path (`socket`)
    #[arg(long, env = "WORKER_SOCKET", global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Node name (`name`), e.g. worker@host; Celery's -n/--hostname
    // Its own id: commands have a positional `name` (a task or plugin name), and a shared id
    // made that value the node name.
    #[arg(
        id = "node_name",
        value_name = "NAME",
        short = 'n',
        long = "name",
        visible_alias = "hostname",
        env = "WORKER_NAME",
        global = true
    )]
    pub name: Option<String>,
    /// RabbitMQ URL to consume Celery tasks from (`broker`), e.g. amqp://guest:guest@127.0.0.1:5672//
    #[arg(long, env = "WORKER_BROKER", global = true)]
    pub broker: Option<String>,
    /// File holding the broker URL, read when no broker is given (`broker_file`)
    #[arg(long, env = "WORKER_BROKER_FILE", global = true, value_name = "FILE")]
    pub broker_file: Option<PathBuf>,
    /// CA certificates (PEM) for an amqps:// broker (`broker_ca`)
    #[arg(long, env = "WORKER_BROKER_CA", global = true, value_name = "FILE")]
    pub broker_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an amqps:// broker (`broker_cert`)
    #[arg(long, env = "WORKER_BROKER_CERT", global = true, value_name = "FILE")]
    pub broker_cert: Option<PathBuf>,
    /// Key (PEM) of the client certificate (`broker_key`)
    #[arg(long, env = "WORKER_BROKER_KEY", global = true, value_name = "FILE")]
    pub broker_key: Option<PathBuf>,
    /// Name the broker's certificate must carry, if not the URL's host (`broker_tls_server_name`)
    #[arg(
        long,
        env = "WORKER_BROKER_TLS_SERVER_NAME",
        global = true,
        value_name = "NAME"
    )]
    pub broker_tls_server_name: Option<String>,
    /// Comma-separated queues to consume (`queues`, default celery); Celery's -Q/--queues
    #[arg(
        short = 'Q',
        long,
        env = "WORKER_QUEUES",
        global = true,
        value_delimiter = ','
    )]
    pub queues: Option<Vec<String>>,
    /// Per-consumer prefetch (`prefetch_count`)
    #[arg(long, env = "WORKER_PREFETCH_COUNT", global = true)]
    pub prefetch_count: Option<u16>,
    /// `kombu` or `passive` (`queue_declare`)
    #[arg(long, env = "WORKER_QUEUE_DECLARE", global = true)]
    pub queue_declare: Option<crate::config::QueueDeclare>,
    /// The type of the task queues the worker declares: `classic` or `quorum` (`queue_type`,
    /// Celery's `task_default_queue_type`)
    #[arg(long, env = "WORKER_QUEUE_TYPE", global = true)]
    pub queue_type: Option<crate::config::QueueType>,
    /// The type of each task queue's exchange: direct, topic, fanout or headers
    /// (`exchange_type`, Celery's `task_default_exchange_type`)
    #[arg(long, env = "WORKER_EXCHANGE_TYPE", global = true)]
    pub exchange_type: Option<String>,
    /// Recent results remembered for redelivered copies (`result_memory`)
    #[arg(long, env = "WORKER_RESULT_MEMORY", global = true)]
    pub result_memory: Option<usize>,
    /// Seconds a result whose reply queue does not exist is retried (`result_retry_timeout`)
    #[arg(long, env = "WORKER_RESULT_RETRY_TIMEOUT", global = true)]
    pub result_retry_timeout: Option<f64>,
    /// Seconds an idle control connection is kept open (`control_idle_timeout`)
    #[arg(long, env = "WORKER_CONTROL_IDLE_TIMEOUT", global = true)]
    pub control_idle_timeout: Option<f64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (`metrics_listen`), e.g. 127.0.0.1:9464
    #[arg(
        long,
        env = "WORKER_METRICS_LISTEN",
        global = true,
        value_name = "ADDR"
    )]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where Celery results go: rpc:// or redis://host:6379/0 (`result_backend`)
    #[arg(long, env = "WORKER_RESULT_BACKEND", global = true, value_name = "URL")]
    pub result_backend: Option<String>,
    /// Seconds a result stays in the Redis backend, 0 to keep it (`result_expires`)
    #[arg(long, env = "WORKER_RESULT_EXPIRES", global = true)]
    pub result_expires: Option<f64>,
    /// Redis broker: seconds a taken, unacked message stays with its worker before any worker
    /// may restore it (`visibility_timeout`; this worker renews what it holds)
    #[arg(
        long,
        env = "WORKER_VISIBILITY_TIMEOUT",
        global = true,
        value_name = "SECONDS"
    )]
    pub visibility_timeout: Option<f64>,
    /// Redis broker: a prefix before every key and channel, as the clients'
    /// `global_keyprefix` (`global_keyprefix`)
    #[arg(
        long,
        env = "WORKER_GLOBAL_KEYPREFIX",
        global = true,
        value_name = "PREFIX"
    )]
    pub global_keyprefix: Option<String>,
    /// Redis Sentinel broker: the master's name (`master_name`)
    #[arg(long, env = "WORKER_MASTER_NAME", global = true, value_name = "NAME")]
    pub master_name: Option<String>,
    /// The largest task message (bytes) read from the broker; larger ones are rejected
    /// (`max_message_size`)
    #[arg(long, env = "WORKER_MAX_MESSAGE_SIZE", global = true)]
    pub max_message_size: Option<usize>,
    /// URL prefixes of the Girder jobs to keep up to date, `*` for any (`girder_job_urls`)
    #[arg(
        long = "girder-job-url",
        env = "WORKER_GIRDER_JOB_URLS",
        value_delimiter = ',',
        global = true,
        value_name = "PREFIX"
    )]
    pub girder_job_urls: Vec<String>,
    /// Send Celery task events for Flower and `celery events` (`task_events`), as Celery's `-E`
    #[arg(short = 'E', long, env = "WORKER_TASK_EVENTS", global = true)]
    pub task_events: bool,
    /// When running as root: the user plugins run as unless their manifest names one (`plugin_user`;
    /// default `nobody`)
    #[arg(long, env = "WORKER_PLUGIN_USER", global = true, value_name = "USER")]
    pub plugin_user: Option<String>,
    /// Where `serve` gives each plugin process a cgroup v2: auto, off, or a directory (`cgroup`)
    #[arg(
        long,
        env = "WORKER_CGROUP",
        global = true,
        value_name = "auto|off|DIR"
    )]
    pub cgroup: Option<String>,
    /// Longest plugin stdout line in bytes (`max_line_bytes`)
    #[arg(long, env = "WORKER_MAX_LINE_BYTES", global = true)]
    pub max_line_bytes: Option<usize>,
    /// Waiting tasks per plugin before refusing more (`queue_capacity`)
    #[arg(long, env = "WORKER_QUEUE_CAPACITY", global = true)]
    pub queue_capacity: Option<usize>,
    /// Seconds a graceful stop waits for in-flight tasks (`drain_timeout`)
    #[arg(long, env = "WORKER_DRAIN_TIMEOUT", global = true)]
    pub drain_timeout: Option<f64>,
    /// Threads of the worker's async runtime (`runtime_threads`)
    #[arg(long, env = "WORKER_RUNTIME_THREADS", global = true)]
    pub runtime_threads: Option<usize>,
    /// Log level or tracing filter (`log_level`)
    #[arg(long, env = "WORKER_LOG", global = true)]
    pub log_level: Option<String>,
    /// `text` or `json` (`log_format`)
    #[arg(long, env = "WORKER_LOG_FORMAT", global = true)]
    pub log_format: Option<crate::config::LogFormat>,
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run the daemon: start every plugin and serve the control socket
    Serve,
    /// One-shot: start only the plugin serving NAME, run one task, print the result, stop
    Run(run::RunArgs),
    /// Submit tasks to, or cancel tasks on, a running daemon
    #[command(subcommand)]
    Task(task::TaskCommand),
    /// Manage plugins: list, inspect, test, create, install, uninstall
    #[command(subcommand)]
    Plugins(plugins::PluginsCommand),
    /// Make a running daemon apply the install record: start newly installed plugins, stop
    /// uninstalled ones, replace updated ones blue/green; others are not touched (also: SIGHUP)
    Reload,
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (worker.1, worker-<command>.1) into DIR
    #[command(hide = true)]
    ManPages {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

impl CommonArgs {
    /// `broker_file` and the TLS settings; the URL is read from `broker_file` when no broker
    /// was given.
    fn apply_broker_tls(&self, c: &mut Config) -> anyhow::Result<()> {
        if let Some(v) = &self.broker_file {
            c.broker_file = Some(v.clone());
        }
        if let Some(v) = &self.broker_ca {
            c.broker_ca = Some(v.clone());
        }
        if let Some(v) = &self.broker_cert {
            c.broker_cert = Some(v.clone());
        }
        if let Some(v) = &self.broker_key {
            c.broker_key = Some(v.clone());
        }
        if let Some(v) = &self.broker_tls_server_name {
            c.broker_tls_server_name = Some(v.clone());
        }
        if c.broker.is_none() {
            if let Some(path) = &c.broker_file {
                let url = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read `broker_file` {}: {e}", path.display())
                })?;
                c.broker = Some(url.trim().to_string()).filter(|u| !u.is_empty());
            }
        }
        Ok(())
    }

    /// The keys of the Celery source: queues, results, events and what a message may ask.
    fn apply_celery(&self, c: &mut Config) {
        if let Some(v) = &self.queues {
            c.queues = v.clone();
        }
        if let Some(v) = self.prefetch_count {
            c.prefetch_count = Some(v);
        }
        if let Some(v) = self.queue_declare {
            c.queue_declare = v;
        }
        if let Some(v) = self.queue_type {
            c.queue_type = v;
        }
        if let Some(v) = &self.exchange_type {
            c.exchange_type = v.clone();
        }
        if let Some(v) = self.result_memory {
            c.result_memory = v;
        }
        if let Some(v) = self.result_retry_timeout {
            c.result_retry_timeout = v;
        }
        if let Some(v) = self.control_idle_timeout {
            c.control_idle_timeout = v;
        }
        if let Some(v) = self.metrics_listen {
            c.metrics_listen = Some(v);
        }
        if self.task_events {
            c.task_events = true;
        }
        if let Some(v) = &self.result_backend {
            c.result_backend = v.clone();
        }
        if let Some(v) = self.result_expires {
            c.result_expires = v;
        }
        if let Some(v) = self.max_message_size {
            c.max_message_size = v;
        }
        if let Some(v) = self.visibility_timeout {
            c.visibility_timeout = v;
        }
        if let Some(v) = &self.global_keyprefix {
            c.global_keyprefix = v.clone();
        }
        if let Some(v) = &self.master_name {
            c.master_name = Some(v.clone());
        }
        if !self.girder_job_urls.is_empty() {
            c.girder_job_urls = self.girder_job_urls.clone();
        }
    }

    /// The effective config: file, then environment and flags on top.
    pub fn resolve(&self) -> anyhow::Result<Config> {
        let mut c = Config::load(self.config.as_deref())?;
        if let Some(v) = &self.plugins_dir {
            c.plugins_dir = v.clone();
        }
        if let Some(v) = &self.state_dir {
            c.state_dir = v.clone();
        }
        if let Some(v) = &self.socket {
            c.socket = v.clone();
        }
        if let Some(v) = &self.name {
            c.name = v.clone();
        }
        // As in Celery, `%h` in the node name stands for the host name.
        if c.name.contains("%h") {
            c.name = c.name.replace("%h", &crate::config::hostname());
        }
        if let Some(v) = &self.broker {
            c.broker = Some(v.clone()).filter(|b| !b.is_empty());
        }
        self.apply_broker_tls(&mut c)?;
        self.apply_celery(&mut c);
        if let Some(v) = &self.plugin_user {
            c.plugin_user = Some(v.clone());
        }
        if let Some(v) = &self.cgroup {
            c.cgroup = v.clone();
        }
        if let Some(v) = self.max_line_bytes {
            c.max_line_bytes = v;
        }
        if let Some(v) = self.queue_capacity {
            c.queue_capacity = v;
        }
        if let Some(v) = self.drain_timeout {
            c.drain_timeout = v;
        }
        if let Some(v) = self.runtime_threads {
            c.runtime_threads = v;
        }
        if let Some(v) = &self.log_level {
            c.log_level = Some(v.clone());
        }
        if let Some(v) = self.log_format {
            c.log_format = v;
        }
        c.absolutize();
        c.validate()
            .map_err(|e| anyhow::anyhow!("invalid setting: {e}"))?;
        Ok(c)
    }
}

/// Logs go to stderr; stdout is kept for results.
fn init_logging(config: &Config, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(
        config.log_level.as_deref().unwrap_or(default_level),
    )
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level))
    // lapin logs a message the broker returns (a reply queue that does not exist) at WARN
    // with its whole body: task results in the journal, once per retry. We log our own line
    // without the body, so that one is off whatever the level asked for.
    .add_directive(
        "lapin::returned_messages=error"
            .parse()
            .expect("a valid directive"),
    );
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if config.log_format == crate::config::LogFormat::Text && journal::stderr_is_journal() {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_ansi(false);
        let _ = builder
            .with_ansi(false)
            .event_format(journal::WithPriority(format))
            .try_init();
        return;
    }
    let _ = if config.log_format == crate::config::LogFormat::Json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Generated from the definitions alone: no config is read.
    match &cli.command {
        Commands::Completions { shell } => return docs::completions(*shell),
        Commands::ManPages { dir } => {
            return docs::man_pages(dir).unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            })
        }
        _ => {}
    }
    let config = match cli.common.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let default_level = if matches!(cli.command, Commands::Serve) {
        "info"
    } else {
        "warn"
    };
    init_logging(&config, default_level);
    let runtime = match crate::runtime::build(config.runtime_threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Commands::Serve => serve::serve(config).await,
            Commands::Run(args) => run::run(config, args).await,
            Commands::Task(cmd) => task::task(config, cmd).await,
            Commands::Plugins(cmd) => plugins::plugins(config, cmd).await,
            Commands::Reload => plugins::reload(config).await,
            Commands::Completions { .. } | Commands::ManPages { .. } => unreachable!(),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
