//! The visibility timeout, both ways. Every message held here (running, or an eta task
//! waiting) has its lease renewed four times per `visibility_timeout`, so no worker, this one
//! or Celery's, restores a task that is only long (Celery's own worker does not renew, which
//! is how a task longer than the timeout runs twice there). And like kombu's workers, this
//! one restores what other workers took and left past the timeout (a worker killed mid-task),
//! unless a kombu worker holds `unacked_mutex` for that round.

use super::ops;
use super::SourceState;
use crate::source::engine::monitor::now_epoch;
use std::sync::Arc;
use std::time::Duration;

/// Renewals per visibility timeout: a lease survives three missed renewals (Redis away).
const RENEWALS: u32 = 4;

/// Runs until the worker finishes.
pub(super) async fn lease_loop(shared: Arc<SourceState>) {
    let t = &shared.transport;
    let timeout = t.visibility_timeout;
    let renew_every =
        (timeout / RENEWALS).clamp(Duration::from_millis(200), Duration::from_secs(60));
    // kombu looks every 10 s; a short timeout is looked at twice as often as it runs out.
    let restore_every = (timeout / 2).clamp(Duration::from_millis(500), Duration::from_secs(10));
    let mut renew = tokio::time::interval(renew_every);
    let mut restore = tokio::time::interval(restore_every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    restore.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = renew.tick() => renew_held(&shared).await,
            _ = restore.tick(), if !shared.engine.stopping.is_cancelled() => restore_expired(&shared).await,
            _ = shared.engine.finished.cancelled() => return,
        }
    }
}

async fn renew_held(shared: &SourceState) {
    let t = &shared.transport;
    let held = t.held();
    if held.is_empty() {
        return;
    }
    let Ok(mut conn) = t.connection().await else {
        return;
    };
    if let Err(e) = ops::renew(&mut conn, &t.keys, &held, now_epoch()).await {
        tracing::warn!(messages = held.len(), "cannot renew the lease of the tasks held here ({e}); they are restored to their queue if Redis stays away past the visibility timeout");
    }
}

async fn restore_expired(shared: &SourceState) {
    let t = &shared.transport;
    let Ok(mut conn) = t.connection().await else {
        return;
    };
    let held = t.held();
    let timeout = t.visibility_timeout.as_secs_f64();
    match ops::restore_expired(&mut conn, &t.keys, timeout, now_epoch(), &held).await {
        Ok(round) => {
            if round.restored > 0 {
                tracing::warn!(restored = round.restored, "restored messages another worker took and left unacked past the visibility timeout ({timeout} s); they run again");
            }
            for (tag, why) in round.stuck {
                tracing::error!(delivery_tag = %tag, "an expired unacked message cannot go back to its queue ({why:?}); it stays in `unacked`");
            }
        }
        Err(e) => tracing::debug!("cannot look for expired unacked messages ({e})"),
    }
}
