//! Publishing to reply queues. A final state is published with publisher confirms and
//! `mandatory`, retried across reconnects, and retried with backoff while the reply queue does
//! not exist (the broker returns it: the client may be reconnecting), for up to
//! `result_retry_timeout`. Progress and streamed items are published without confirms.
//!
//! The one window no AMQP worker can close: a state published on a connection that died
//! before the broker confirmed it may or may not have reached the queue. It is published again
//! on the next connection (never lost), and logged, because the client may then see it twice.

use super::SourceState;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// First wait before publishing a returned result again; it doubles up to the maximum.
const RETURN_RETRY_MIN: Duration = Duration::from_millis(50);
const RETURN_RETRY_MAX: Duration = Duration::from_secs(2);

/// How a final-state publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The broker confirmed it into the reply queue.
    Confirmed,
    /// The reply queue did not exist for `result_retry_timeout`; logged as undeliverable.
    Undeliverable,
    /// The worker is stopping for good before it could be confirmed.
    GaveUp,
}

/// The results channel of the current connection; the number tells connections apart.
pub(super) type ResultsChannel = Option<(u64, Channel)>;

fn properties(correlation_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_correlation_id(correlation_id.into())
        .with_delivery_mode(1)
}

impl SourceState {
    /// Waits for a connected results channel other than `not` (the one that just failed).
    async fn channel(
        &self,
        channels: &mut watch::Receiver<ResultsChannel>,
        not: Option<u64>,
    ) -> Option<(u64, Channel)> {
        loop {
            if let Some((n, ch)) = channels.borrow_and_update().clone() {
                if Some(n) != not {
                    return Some((n, ch));
                }
            }
            tokio::select! {
                changed = channels.changed() => if changed.is_err() { return None },
                _ = self.finished.cancelled() => return None,
            }
        }
    }

    /// Publishes a task's final state until the broker confirms it (see the module doc).
    pub(super) async fn publish_final(
        &self,
        task_id: &str,
        reply_to: &str,
        correlation_id: &str,
        body: &[u8],
    ) -> Delivered {
        let mut channels = self.results.subscribe();
        let mut failed_on = None;
        let mut returned_since: Option<Instant> = None;
        let mut wait = RETURN_RETRY_MIN;
        loop {
            let Some((n, channel)) = self.channel(&mut channels, failed_on).await else {
                return Delivered::GaveUp;
            };
            let options = BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            };
            let sent_at = Instant::now();
            let sent = channel
                .basic_publish(
                    "".into(),
                    reply_to.into(),
                    options,
                    body,
                    properties(correlation_id),
                )
                .await;
            let confirmed = match sent {
                Ok(pending) => pending.await,
                Err(e) => {
                    tracing::warn!(
                        task_id,
                        "cannot publish the result ({e}); publishing it after reconnecting"
                    );
                    failed_on = Some(n);
                    continue;
                }
            };
            match confirmed {
                Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => {
                    self.dispatcher
                        .metrics()
                        .result_confirmed(sent_at.elapsed());
                    return Delivered::Confirmed;
                }
                Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_))) => {
                    let since = *returned_since.get_or_insert_with(|| {
                        tracing::warn!(task_id, reply_to, "the reply queue does not exist (the client may be reconnecting); retrying for up to {:?} (`result_retry_timeout`)", self.options.result_retry_timeout);
                        Instant::now()
                    });
                    if since.elapsed() >= self.options.result_retry_timeout {
                        tracing::error!(task_id, reply_to, "result undeliverable: the reply queue did not exist for {:?} (`result_retry_timeout`); the task message is acked and the result dropped", self.options.result_retry_timeout);
                        return Delivered::Undeliverable;
                    }
                }
                Ok(Confirmation::Nack(None)) => {
                    tracing::warn!(
                        task_id,
                        "the broker refused (nack) the result; publishing it again"
                    );
                }
                Err(e) => {
                    tracing::warn!(task_id, "the result was published but the connection closed before the broker confirmed it ({e}); publishing it again after reconnecting, so the client may receive this result twice");
                    failed_on = Some(n);
                    continue;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.finished.cancelled() => return Delivered::GaveUp,
            }
            wait = (wait * 2).min(RETURN_RETRY_MAX);
        }
    }

    /// Publishes a task message (a chain's next step, a callback, an errback) until the broker
    /// confirms it, across reconnects; false only if the worker stopped for good first.
    pub(super) async fn publish_task(&self, message: &crate::source::canvas::Outgoing) -> bool {
        let mut headers = lapin::types::FieldTable::default();
        for (k, v) in &message.headers {
            headers.insert(k.as_str().into(), super::value::json_to_amqp(v));
        }
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_correlation_id(message.id.as_str().into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(message.priority.unwrap_or(0));
        if let Some(reply_to) = &message.reply_to {
            props = props.with_reply_to(reply_to.as_str().into());
        }
        let body = serde_json::to_vec(&message.body).expect("a task body serializes");
        let mut channels = self.results.subscribe();
        let mut failed_on = None;
        loop {
            let Some((n, channel)) = self.channel(&mut channels, failed_on).await else {
                return false;
            };
            let sent = channel
                .basic_publish(
                    message.exchange.as_str().into(),
                    message.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props.clone(),
                )
                .await;
            match sent {
                Ok(pending) => match pending.await {
                    Ok(Confirmation::Nack(_)) => {
                        tracing::warn!(task_id = %message.id, "the broker refused (nack) a workflow step; publishing it again");
                    }
                    Ok(_) => return true,
                    Err(e) => {
                        tracing::warn!(task_id = %message.id, "a workflow step was published but the connection closed before the broker confirmed it ({e}); publishing it again after reconnecting");
                        failed_on = Some(n);
                    }
                },
                Err(e) => {
                    tracing::warn!(task_id = %message.id, "cannot publish a workflow step ({e}); publishing it after reconnecting");
                    failed_on = Some(n);
                }
            }
        }
    }

    /// A task's final state to where its client reads it: stored in the Redis result backend
    /// when there is one, else published to its reply queue (nothing without one).
    pub(super) async fn deliver_final(
        &self,
        task_id: &str,
        reply_to: Option<&str>,
        correlation_id: &str,
        body: &[u8],
    ) -> Delivered {
        match (&self.redis, reply_to) {
            (Some(redis), _) => {
                let meta = std::str::from_utf8(body).expect("result bodies are JSON text");
                match redis.store_final(task_id, meta, &self.finished).await {
                    true => Delivered::Confirmed,
                    false => Delivered::GaveUp,
                }
            }
            (None, Some(reply_to)) => {
                self.publish_final(task_id, reply_to, correlation_id, body)
                    .await
            }
            (None, None) => Delivered::Confirmed,
        }
    }

    /// A progress or stream state, best effort: stored once in Redis, or published to the
    /// reply queue.
    pub(super) async fn deliver_event(
        &self,
        task_id: &str,
        reply_to: Option<&str>,
        correlation_id: &str,
        body: &[u8],
    ) {
        match (&self.redis, reply_to) {
            (Some(redis), _) => {
                let meta = std::str::from_utf8(body).expect("result bodies are JSON text");
                if let Err(e) = redis.store(task_id, meta).await {
                    tracing::debug!(
                        task_id,
                        "cannot store a progress state in Redis ({e}); dropped"
                    );
                }
            }
            (None, Some(reply_to)) => self.publish_event(reply_to, correlation_id, body).await,
            (None, None) => {}
        }
    }

    /// Publishes a progress or stream state, waiting for a connection if there is none.
    async fn publish_event(&self, reply_to: &str, correlation_id: &str, body: &[u8]) {
        let mut channels = self.results.subscribe();
        let mut failed_on = None;
        loop {
            let Some((n, channel)) = self.channel(&mut channels, failed_on).await else {
                return;
            };
            let sent = channel
                .basic_publish(
                    "".into(),
                    reply_to.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties(correlation_id),
                )
                .await;
            match sent {
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(
                        "cannot publish a progress message ({e}); retrying after reconnecting"
                    );
                    failed_on = Some(n);
                }
            }
        }
    }
}
