//! `worker serve`: the daemon. Starts every plugin, serves the control socket, and stops
//! gracefully on SIGTERM/SIGINT (a second signal stops at once).

use crate::config::Config;
use crate::control::{self, WorkerInfo};
use crate::dispatch::Dispatcher;
use crate::install::registry::StateDir;
use crate::manifest;
use crate::source::amqp::{AmqpOptions, AmqpSource, Declare};
use crate::supervisor::pool::PoolOptions;
use crate::supervisor::Supervisor;
use anyhow::Context;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

pub fn pool_options(config: &Config) -> PoolOptions {
    PoolOptions {
        worker_name: config.name.clone(),
        max_line_bytes: config.max_line_bytes,
        queue_capacity: config.queue_capacity,
    }
}

/// The installed plugins (see `install::registry`), logging (not failing on) broken ones.
pub fn load_plugins(config: &Config) -> anyhow::Result<Vec<manifest::Manifest>> {
    let state = StateDir::new(&config.state_dir);
    let found = state.discover().map_err(anyhow::Error::msg)?;
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

pub async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let plugins = load_plugins(&config)?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let listener = control::bind(&config.socket).await.with_context(|| {
        format!(
            "cannot serve the control socket {}",
            config.socket.display()
        )
    })?;
    let names: Vec<String> = plugins.iter().map(|m| m.name.clone()).collect();
    let supervisor = Arc::new(Supervisor::start(plugins, pool_options(&config)));
    let dispatcher = Arc::new(Dispatcher::new(supervisor.clone()));
    let stop_server = CancellationToken::new();
    let info = WorkerInfo {
        name: config.name.clone(),
        version: crate::WORKER_VERSION.into(),
        pid: std::process::id(),
        state_dir: config.state_dir.clone(),
    };
    let reload = control::ReloadSettings {
        state: StateDir::new(&config.state_dir),
        drain: config.drain_timeout(),
    };
    let server = tokio::spawn(control::serve(
        listener,
        dispatcher.clone(),
        info,
        reload.clone(),
        stop_server.clone(),
    ));
    let amqp = config.broker.as_ref().map(|url| {
        let capacity: usize = supervisor
            .plugins()
            .iter()
            .map(|p| p.manifest().capacity())
            .sum();
        let prefetch = config
            .prefetch_count
            .unwrap_or_else(|| (capacity * 2).clamp(4, u16::MAX as usize) as u16);
        AmqpSource::start(
            AmqpOptions {
                url: url.clone(),
                queues: config.queues.clone(),
                declare: if config.queue_declare == "passive" {
                    Declare::Passive
                } else {
                    Declare::Kombu
                },
                prefetch,
                nodename: config.name.clone(),
                result_memory: config.result_memory,
                result_retry_timeout: config.result_retry_timeout(),
            },
            dispatcher.clone(),
        )
    });
    let remote_shutdown = amqp
        .as_ref()
        .map(|a| a.shutdown_requested())
        .unwrap_or_default();
    tracing::info!(
        socket = %config.socket.display(),
        plugins = %names.join(", "),
        "worker {} serving {} plugin(s)",
        config.name,
        names.len()
    );

    let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM received"); break }
            _ = interrupt.recv() => { tracing::info!("SIGINT received"); break }
            _ = remote_shutdown.cancelled() => { tracing::info!("remote control shutdown received"); break }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP received: reloading the plugins installed in {}", reload.state.root().display());
                if let Err(e) = supervisor.reload_installed(&reload.state, reload.drain, false).await {
                    tracing::error!("reload failed: {e}");
                }
            }
        }
    }
    let second_signal = async {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
    };
    let drain = config.drain_timeout();
    let graceful = async {
        if let Some(a) = &amqp {
            a.stop_consuming();
        }
        dispatcher.stop_accepting();
        tracing::info!(
            in_flight = dispatcher.in_flight(),
            "draining: no new tasks; waiting up to {drain:?} for tasks in flight"
        );
        if !dispatcher.wait_idle(drain).await {
            tracing::warn!(
                in_flight = dispatcher.in_flight(),
                "drain timeout reached; stopping plugins with tasks still running"
            );
        }
        stop_server.cancel();
        if let Some(a) = amqp {
            // Results of finished tasks are published and their messages acked before the
            // connection closes; anything left is redelivered by RabbitMQ.
            a.finish(Duration::from_secs(10)).await;
        }
        supervisor.stop(None).await;
    };
    let forced = tokio::select! {
        _ = graceful => false,
        _ = second_signal => true,
    };
    if forced {
        tracing::warn!("second signal: stopping at once");
        kill_all(&supervisor).await;
    }
    stop_server.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("worker stopped");
    Ok(if forced {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// SIGKILLs every plugin process group.
async fn kill_all(supervisor: &Supervisor) {
    for plugin in supervisor.status().await {
        for pid in plugin.instances.iter().filter_map(|i| i.pid) {
            crate::supervisor::process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}
