//! The daemon as a library: [`Daemon::start`] starts the installed plugins, the control socket
//! and (with a broker) its source; [`Daemon::run`] serves until a shutdown future
//! resolves, then stops in three phases: stop accepting (consumers cancelled, new tasks
//! refused), drain in-flight tasks up to `drain_timeout`, stop the plugins. A second future
//! forces an immediate stop. Tests and embedding programs use it without signals;
//! `worker serve` only wires SIGTERM, SIGINT and SIGHUP to it.

use crate::config::Config;
use crate::control::{self, WorkerInfo};
use crate::dispatch::Dispatcher;
use crate::install::registry::StateDir;
use crate::manifest::Manifest;
use crate::notify::Notifier;
use crate::reload::{self, ReloadError, ReloadSettings};
use crate::source::amqp::tls::{BrokerTls, TlsSettings};
use crate::source::Source;
use crate::supervisor::cgroup::CgroupTree;
use crate::supervisor::containment;
use crate::supervisor::pool::PoolOptions;
use crate::supervisor::{ReloadReport, Supervisor};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Plugins(#[from] crate::install::registry::RecordError),
    #[error("{0}")]
    UntrustedState(String),
    #[error("broker TLS: {0}")]
    BrokerTls(String),
    #[error("cannot serve metrics on {addr} (`metrics_listen`): {cause}")]
    Metrics {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    #[error("{0}")]
    Cgroup(String),
    #[error("cannot serve the control socket {path}: {cause}")]
    Socket {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// How a daemon's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Drained and stopped in order.
    Graceful,
    /// The force future fired: every plugin process was killed at once.
    Forced,
}

/// A running daemon.
pub struct Daemon {
    config: Config,
    supervisor: Arc<Supervisor>,
    dispatcher: Arc<Dispatcher>,
    /// The broker's source, when there is a broker.
    broker: Option<Box<dyn Source>>,
    server: JoinHandle<()>,
    stop_server: CancellationToken,
    reload: ReloadSettings,
    /// This daemon's entry in `<state_dir>/daemons/`, removed when it stops.
    _registration: Option<crate::install::daemons::Registration>,
    notifier: Notifier,
    /// Reaps orphaned plugin descendants (the daemon is their subreaper).
    _reaper: Option<AbortOnDropHandle<()>>,
    /// `/metrics`, served until the plugins have stopped.
    metrics: Option<(AbortOnDropHandle<()>, CancellationToken)>,
    /// READY, STATUS and WATCHDOG for systemd; ends with the daemon.
    _notify: AbortOnDropHandle<()>,
    /// Queue backends' offers taken, and the offers running (see `offers`).
    offers: (AbortOnDropHandle<()>, TaskTracker),
}

/// A cheap, cloneable way to reach a running daemon from outside its run (e.g. on SIGHUP).
#[derive(Clone)]
pub struct DaemonHandle {
    dispatcher: Arc<Dispatcher>,
    reload: ReloadSettings,
    notifier: Notifier,
}

impl DaemonHandle {
    /// Applies the install record, as `worker reload` does, telling systemd it reloads.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.notifier.reloading();
        let report = reload::apply_install_record(&self.dispatcher, &self.reload, false).await;
        self.notifier.ready_again();
        report
    }
}

pub fn pool_options(config: &Config) -> PoolOptions {
    PoolOptions {
        worker_name: config.name.clone(),
        max_line_bytes: config.max_line_bytes,
        queue_capacity: config.queue_capacity,
        state_dir: Some(config.state_dir.clone()),
        plugin_user: config.plugin_user.clone(),
        events: crate::events::EventBus::new(),
        cgroups: None,
        offers: Default::default(),
    }
}

/// The installed plugins (see `install::registry`), logging (not failing on) broken ones.
pub fn installed_plugins(config: &Config) -> Result<Vec<Manifest>, DaemonError> {
    let state = StateDir::new(&config.state_dir);
    state.check_trusted().map_err(DaemonError::UntrustedState)?;
    let found = state.discover()?;
    for e in &found.errors {
        tracing::error!("plugin skipped: {e}");
    }
    if found.plugins.is_empty() && found.errors.is_empty() {
        tracing::warn!(
            "no plugins installed in {}; install some with `worker plugins install` (available: {})",
            config.state_dir.display(),
            config.plugins_dir.display()
        );
    }
    Ok(found.plugins)
}

/// Runs a daemon until `shutdown` resolves, then stops it gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let daemon = Daemon::start(config).await?;
    daemon.run(shutdown, std::future::pending()).await;
    Ok(())
}

impl Daemon {
    /// Starts the installed plugins, binds the control socket, and connects to the broker.
    pub async fn start(config: Config) -> Result<Daemon, DaemonError> {
        let plugins = installed_plugins(&config)?;
        let tls = broker_tls(&config)?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                // Bound now, so a taken port fails `serve` at start with the address.
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|cause| DaemonError::Metrics { addr, cause })?,
            ),
            None => None,
        };
        let listener =
            control::bind(&config.socket)
                .await
                .map_err(|cause| DaemonError::Socket {
                    path: config.socket.clone(),
                    cause,
                })?;
        let registration = register(&config);
        let names: Vec<String> = plugins.iter().map(|m| m.name.clone()).collect();
        let (reaper, info, cgroups) = contain(&config)?;
        let (offers, offer_inbox) = crate::supervisor::offer::OfferInbox::channel();
        let options = PoolOptions {
            cgroups,
            offers,
            ..pool_options(&config)
        };
        let supervisor = Arc::new(Supervisor::start(plugins, options));
        let dispatcher = Arc::new(Dispatcher::new(supervisor.clone()));
        let offers = start_offers(&dispatcher, &supervisor, offer_inbox);
        let reload = ReloadSettings {
            state: StateDir::new(&config.state_dir),
            drain: config.drain_timeout(),
        };
        let stop_server = CancellationToken::new();
        let server = tokio::spawn(control::serve(
            listener,
            dispatcher.clone(),
            info,
            reload.clone(),
            config.control_idle_timeout(),
            stop_server.clone(),
        ));
        let metrics = metrics_listener.map(|listener| serve_metrics(listener, &dispatcher));
        let source = config
            .broker
            .as_ref()
            .map(|url| crate::source::start_broker(&config, url, &dispatcher, tls.clone()));
        let notifier = Notifier::from_env();
        let broker = source.as_ref().map(|s| s.connected());
        let notify = tokio::spawn(crate::notify::supervise(
            notifier,
            dispatcher.clone(),
            broker,
        ));
        tracing::info!(
            socket = %config.socket.display(),
            plugins = %names.join(", "),
            "worker {} serving {} plugin(s)",
            config.name,
            names.len()
        );
        Ok(Daemon {
            config,
            supervisor,
            dispatcher,
            broker: source,
            server,
            stop_server,
            reload,
            _registration: registration,
            notifier,
            _reaper: reaper,
            metrics,
            _notify: AbortOnDropHandle::new(notify),
            offers,
        })
    }

    pub fn handle(&self) -> DaemonHandle {
        DaemonHandle {
            dispatcher: self.dispatcher.clone(),
            reload: self.reload.clone(),
            notifier: self.notifier,
        }
    }

    /// For an embedding program: submit tasks to this daemon's plugins directly.
    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    /// Serves until `shutdown` (or a `celery control shutdown`), then stops gracefully; if
    /// `force` fires meanwhile, kills every plugin at once.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()>,
        force: impl Future<Output = ()>,
    ) -> Stopped {
        let remote = self
            .broker
            .as_ref()
            .map(|s| s.shutdown_requested())
            .unwrap_or_default();
        tokio::select! {
            _ = shutdown => {}
            _ = remote.cancelled() => tracing::info!("remote control shutdown received"),
        }
        self.notifier.stopping();
        let mut this = self;
        let stopped = tokio::select! {
            _ = this.stop_gracefully() => Stopped::Graceful,
            _ = force => Stopped::Forced,
        };
        if stopped == Stopped::Forced {
            tracing::warn!("forced stop: killing every plugin at once");
            kill_all(&this.supervisor).await;
        }
        this.stop_server.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), this.server).await;
        let _ = std::fs::remove_file(&this.config.socket);
        if let Some((serving, stop)) = this.metrics.take() {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
        }
        tracing::info!("worker stopped");
        stopped
    }

    /// The three phases: accept nothing new, drain, stop the plugins.
    async fn stop_gracefully(&mut self) {
        if let Some(source) = &self.broker {
            source.stop_consuming();
        }
        self.dispatcher.stop_accepting();
        let drain = self.config.drain_timeout();
        tracing::info!(
            in_flight = self.dispatcher.in_flight(),
            "draining: no new tasks; waiting up to {drain:?} for tasks in flight"
        );
        if !self.dispatcher.wait_idle(drain).await {
            tracing::warn!(
                in_flight = self.dispatcher.in_flight(),
                "drain timeout reached; stopping plugins with tasks still running"
            );
        }
        self.stop_server.cancel();
        if let Some(source) = self.broker.take() {
            // Results of finished tasks are published and their messages acked before the
            // connection closes; anything left is redelivered by the broker.
            source.finish(Duration::from_secs(10)).await;
        }
        // Offers whose tasks ended are answered before their queue backends are stopped;
        // those still running are not, and their backends offer them again.
        let (_, offers) = &self.offers;
        offers.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), offers.wait()).await;
        self.supervisor.stop(None).await;
    }
}

/// This daemon's entry in the state directory, so that an install through another socket
/// keeps the copies this daemon runs.
fn register(config: &Config) -> Option<crate::install::daemons::Registration> {
    crate::install::daemons::register(&config.state_dir, &config.socket)
        .map_err(|e| tracing::warn!("cannot register in {}: {e}; installs through another socket may delete copies this daemon runs", config.state_dir.display()))
        .ok()
}

/// The offer source (see `offers`), taking what instances hand it, and its running offers.
fn start_offers(
    dispatcher: &Arc<Dispatcher>,
    supervisor: &Supervisor,
    inbox: tokio::sync::mpsc::UnboundedReceiver<crate::supervisor::offer::Offer>,
) -> (AbortOnDropHandle<()>, TaskTracker) {
    let tracker = TaskTracker::new();
    let stats = supervisor.backend_stats().clone();
    let serving = crate::offers::serve(dispatcher.clone(), stats, inbox, tracker.clone());
    (AbortOnDropHandle::new(tokio::spawn(serving)), tracker)
}

/// What a daemon's reaper, status and cgroup tree are.
type Containment = (
    Option<AbortOnDropHandle<()>>,
    WorkerInfo,
    Option<Arc<CgroupTree>>,
);

/// Makes the daemon the subreaper of plugin descendants (orphans become ours to kill and reap,
/// not init's), starts reaping them, opens the cgroup tree (`cgroup`), and says how plugins are
/// contained.
fn contain(config: &Config) -> Result<Containment, DaemonError> {
    let cgroups = CgroupTree::open(&config.cgroup)
        .map_err(DaemonError::Cgroup)?
        .map(Arc::new);
    let subreaper = containment::become_subreaper();
    let reaper =
        subreaper.then(|| AbortOnDropHandle::new(tokio::spawn(containment::reap_on_sigchld())));
    let info = WorkerInfo {
        name: config.name.clone(),
        version: crate::WORKER_VERSION.into(),
        pid: std::process::id(),
        state_dir: config.state_dir.clone(),
        containment: containment::describe(subreaper, cgroups.as_deref()),
    };
    tracing::info!("containment: {}", info.containment);
    Ok((reaper, info, cgroups))
}

/// The broker's TLS settings, their files read now: a missing one stops `serve` at start.
fn broker_tls(config: &Config) -> Result<BrokerTls, DaemonError> {
    BrokerTls::load(&TlsSettings {
        ca: config.broker_ca.clone(),
        cert: config.broker_cert.clone(),
        key: config.broker_key.clone(),
        server_name: config.broker_tls_server_name.clone(),
    })
    .map_err(DaemonError::BrokerTls)
}

/// Serves `/metrics` on `listener` until the returned token is cancelled.
fn serve_metrics(
    listener: tokio::net::TcpListener,
    dispatcher: &Arc<Dispatcher>,
) -> (AbortOnDropHandle<()>, CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("metrics at http://{addr}/metrics");
    }
    let stop = CancellationToken::new();
    let serving = tokio::spawn(crate::metrics::http::serve(
        listener,
        dispatcher.clone(),
        stop.clone(),
    ));
    (AbortOnDropHandle::new(serving), stop)
}

/// SIGKILLs every plugin process group.
async fn kill_all(supervisor: &Supervisor) {
    for plugin in supervisor.status().await {
        for pid in plugin.instances.iter().filter_map(|i| i.pid) {
            crate::supervisor::process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}
