//! Settling a delivery with the broker: ack, or reject (with or without requeue), counted in
//! the metrics. A failure means the channel is gone: the broker redelivers, and the ledger
//! makes the copy an answered one.

use super::SourceState;
use crate::metrics::Settled;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::Acker;

pub(super) async fn ack(shared: &SourceState, acker: &Acker) {
    if let Err(e) = acker.ack(BasicAckOptions::default()).await {
        // The channel is gone (connection lost): RabbitMQ redelivers, and the copy is acked
        // as answered without publishing again.
        tracing::debug!(
            "ack failed ({e}); the broker will redeliver and the copy will be acked as answered"
        );
        return;
    }
    shared
        .engine
        .dispatcher
        .metrics()
        .delivery_settled(Settled::Acked);
}

/// Rejects with requeue for [`Settled::Requeued`], without it otherwise.
pub(super) async fn reject(shared: &SourceState, acker: &Acker, how: Settled) {
    let requeue = how == Settled::Requeued;
    match acker.reject(BasicRejectOptions { requeue }).await {
        Ok(_) => shared.engine.dispatcher.metrics().delivery_settled(how),
        Err(e) => tracing::debug!("reject failed ({e})"),
    }
}
