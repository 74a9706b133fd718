//! systemd's notify protocol (`Type=notify`): READY once the plugins have settled and the broker
//! is consumed, a one-line STATUS kept current, RELOADING around a SIGHUP reload, STOPPING when
//! draining starts, and WATCHDOG pings sent only after a round trip through the dispatcher and
//! every pool actor succeeded, so a wedged daemon stops pinging and systemd restarts it.
//! Without `NOTIFY_SOCKET` every call does nothing.

use crate::dispatch::Dispatcher;
use sd_notify::NotifyState;
use std::time::Duration;

/// Talks to the service manager, if there is one.
#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if self.enabled {
            if let Err(e) = sd_notify::notify(false, states) {
                tracing::warn!("cannot notify the service manager: {e}");
            }
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// READY again after a reload (STATUS is kept current by `supervise`).
    pub fn ready_again(&self) {
        self.send(&[NotifyState::Ready]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// RELOADING with the monotonic time systemd (v253+) needs beside it.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// The watchdog interval systemd asks for (`WATCHDOG_USEC`; `WATCHDOG_PID`, when set,
    /// must be this process).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        (usec > 0).then(|| Duration::from_micros(usec))
    }
}

/// "3 plugins (1 failed), 5 instances, 2 tasks in flight, broker connected".
pub async fn status_line(dispatcher: &Dispatcher, broker: Option<bool>) -> String {
    let plugins = dispatcher.status().await;
    let failed = plugins
        .iter()
        .filter(|p| matches!(p.state, crate::supervisor::status::PluginState::Failed(_)))
        .count();
    let instances: usize = plugins
        .iter()
        .map(|p| p.instances.iter().filter(|i| i.pid.is_some()).count())
        .sum();
    let mut line = format!("{} plugins", plugins.len());
    if failed > 0 {
        line.push_str(&format!(" ({failed} failed)"));
    }
    line.push_str(&format!(
        ", {instances} instances, {} tasks in flight",
        dispatcher.in_flight()
    ));
    // The board says more (why it is down, refused queues); the flag is the fallback.
    match (dispatcher.metrics().broker().snapshot(), broker) {
        (Some(b), Some(_)) => line.push_str(&format!(", broker {}", b.summary())),
        (_, Some(true)) => line.push_str(", broker connected"),
        (_, Some(false)) => line.push_str(", broker disconnected"),
        (_, None) => {}
    }
    line
}

/// Keeps the service manager informed for the daemon's life: READY once settled, STATUS on
/// change, WATCHDOG while the actors answer within half the interval.
pub async fn supervise(
    notifier: Notifier,
    dispatcher: std::sync::Arc<Dispatcher>,
    broker: Option<tokio::sync::watch::Receiver<bool>>,
) {
    // Without a service manager there is nobody to tell: no periodic work at all.
    if !notifier.is_enabled() {
        return;
    }
    let connected =
        |b: &Option<tokio::sync::watch::Receiver<bool>>| b.as_ref().map(|r| *r.borrow());
    // Ready means every plugin has a ready instance (or has failed) and the broker is consumed.
    dispatcher.wait_ready(Duration::from_secs(120)).await;
    if let Some(mut b) = broker.clone() {
        let _ = tokio::time::timeout(Duration::from_secs(60), b.wait_for(|c| *c)).await;
    }
    let mut last = status_line(&dispatcher, connected(&broker)).await;
    notifier.ready(&last);
    let watchdog = notifier.watchdog_interval();
    let beat = watchdog.map(|i| i / 2).unwrap_or(Duration::from_secs(1));
    let mut tick = tokio::time::interval(beat.min(Duration::from_secs(1)));
    loop {
        tick.tick().await;
        // The round trip through every pool actor is the liveness check.
        let probe = tokio::time::timeout(beat, status_line(&dispatcher, connected(&broker))).await;
        let Ok(line) = probe else {
            tracing::error!("the daemon's actors did not answer within {beat:?}; no watchdog ping");
            continue;
        };
        if watchdog.is_some() {
            notifier.watchdog();
        }
        if line != last {
            notifier.status(&line);
            last = line;
        }
    }
}
