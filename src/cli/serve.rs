//! `worker serve`: runs the [`Daemon`](crate::daemon::Daemon) with the process's signals wired
//! to it: SIGTERM/SIGINT stop it gracefully (a second one stops it at once, exit status 130),
//! SIGHUP applies the install record.

use crate::config::Config;
use crate::daemon::{Daemon, Stopped};
use anyhow::Context;
use std::process::ExitCode;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

pub use crate::daemon::pool_options;

pub async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let state_dir = config.state_dir.clone();
    let daemon = Daemon::start(config).await?;
    let handle = daemon.handle();
    let reloads = tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!(
                "SIGHUP received: reloading the plugins installed in {}",
                state_dir.display()
            );
            if let Err(e) = handle.reload().await {
                tracing::error!("reload failed: {e}");
            }
        }
    });
    // The first SIGTERM/SIGINT starts a graceful stop; a second one forces it.
    let (first_tx, first) = oneshot::channel::<()>();
    let (second_tx, second) = oneshot::channel::<()>();
    let signals = tokio::spawn(async move {
        for (n, tx) in [first_tx, second_tx].into_iter().enumerate() {
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
            }
            if n == 1 {
                tracing::warn!("second signal: stopping at once");
            }
            let _ = tx.send(());
        }
    });
    let first = async {
        let _ = first.await;
    };
    let second = async {
        let _ = second.await;
    };
    let stopped = daemon.run(first, second).await;
    reloads.abort();
    signals.abort();
    Ok(match stopped {
        Stopped::Graceful => ExitCode::SUCCESS,
        Stopped::Forced => ExitCode::from(130),
    })
}
