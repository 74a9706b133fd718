//! Publishing to reply queues. A final state is published with publisher confirms and
//! `mandatory`, retried across reconnects, and retried with backoff while the reply queue does
//! not exist (the broker returns it: the client may be reconnecting), for up to
//! `result_retry_timeout`. Progress and streamed items are published without confirms.
//!
//! The one window no AMQP worker can close: a state published on a connection that died
//! before the broker confirmed it may or may not have reached the queue. It is published again
//! on the next connection (never lost), and logged, because the client may then see it twice.

use super::SourceState;
use crate::source::engine::transport::{Delivered, Published, Returns};
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// First wait before publishing a returned result again; it doubles up to the maximum.
const RETURN_RETRY_MIN: Duration = Duration::from_millis(50);
const RETURN_RETRY_MAX: Duration = Duration::from_secs(2);

/// True for a channel-level error the broker raised about what was sent (403, 404, 406...):
/// the channel is closed, the connection lives on.
pub(super) fn refused_by_broker(e: &lapin::Error) -> bool {
    use lapin::protocol::AMQPErrorKind;
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if matches!(p.kind(), AMQPErrorKind::Soft(_)))
}

/// A short string for the wire, or why it cannot be one.
fn short(what: &str, s: &str) -> Result<lapin::types::ShortString, String> {
    lapin::types::ShortString::try_new(s)
        .map_err(|_| format!("its {what} is longer than AMQP's 255-byte limit"))
}

/// The results channel of the current connection; the number tells channels apart.
pub(super) type ResultsChannel = Option<(u64, Channel)>;

fn properties(correlation_id: ShortString) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_correlation_id(correlation_id)
        .with_delivery_mode(1)
}

/// The routing key and correlation id of a reply, if both fit a short string (ids of the
/// message itself were checked when it was read; a workflow step's come from its options).
fn reply_names(reply_to: &str, correlation_id: &str) -> Option<(ShortString, ShortString)> {
    Some((
        ShortString::try_new(reply_to).ok()?,
        ShortString::try_new(correlation_id).ok()?,
    ))
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
                _ = self.engine.finished.cancelled() => return None,
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
        returns: Returns,
    ) -> Delivered {
        let Some((key, corr)) = reply_names(reply_to, correlation_id) else {
            tracing::error!(task_id, "result undeliverable: its reply queue or correlation id is longer than AMQP's 255-byte limit");
            return Delivered::Undeliverable;
        };
        let mut channels = self.transport.results.subscribe();
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
                    key.clone(),
                    options,
                    body,
                    properties(corr.clone()),
                )
                .await;
            let confirmed = match sent {
                Ok(pending) => pending.await,
                Err(e) => Err(e),
            };
            match confirmed {
                Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => {
                    self.engine
                        .dispatcher
                        .metrics()
                        .result_confirmed(sent_at.elapsed());
                    return Delivered::Confirmed;
                }
                Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_))) => {
                    if let Some(end) =
                        self.returned(task_id, reply_to, returns, &mut returned_since)
                    {
                        return end;
                    }
                }
                Ok(Confirmation::Nack(None)) => {
                    tracing::warn!(
                        task_id,
                        "the broker refused (nack) the result; publishing it again"
                    );
                }
                Err(e) => {
                    tracing::warn!(task_id, "the result was not confirmed: its channel failed ({e}); publishing it again on a new channel, so the client may receive this result twice");
                    self.results_failed(n);
                    failed_on = Some(n);
                    continue;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.engine.finished.cancelled() => return Delivered::GaveUp,
                _ = self.engine.stopping.cancelled(), if returns == Returns::Retry => {}
            }
            wait = (wait * 2).min(RETURN_RETRY_MAX);
        }
    }

    /// The broker returned a result (its reply queue does not exist): `Some` ends the publish
    /// with that, `None` retries after the backoff.
    fn returned(
        &self,
        task_id: &str,
        reply_to: &str,
        returns: Returns,
        since: &mut Option<Instant>,
    ) -> Option<Delivered> {
        if returns == Returns::Report {
            return Some(Delivered::Returned);
        }
        if self.engine.stopping.is_cancelled() {
            tracing::error!(
                task_id,
                reply_to,
                "result undeliverable: its reply queue does not exist and the worker is stopping"
            );
            return Some(Delivered::Undeliverable);
        }
        let timeout = self.transport.options.result_retry_timeout;
        let since = *since.get_or_insert_with(|| {
            tracing::warn!(task_id, reply_to, "the reply queue does not exist (the client may be reconnecting); retrying for up to {timeout:?} (`result_retry_timeout`)");
            Instant::now()
        });
        if since.elapsed() >= timeout {
            tracing::error!(task_id, reply_to, "result undeliverable: the reply queue did not exist for {timeout:?} (`result_retry_timeout`); the result is dropped");
            return Some(Delivered::Undeliverable);
        }
        None
    }

    /// Publishes a task message (a chain's next step, a callback, an errback) until the broker
    /// confirms it, across reconnects. A step the broker refuses (it closes the channel: no
    /// such exchange, access refused) is tried once more alone, on a channel of its own, so a
    /// step that was only caught in another's refusal goes through; refused again, it is
    /// `Refused` with the broker's reason, and the results channel it closed is replaced.
    pub(super) async fn publish_task(
        &self,
        message: &crate::source::canvas::Outgoing,
    ) -> Published {
        let mut headers = lapin::types::FieldTable::default();
        for (k, v) in &message.headers {
            if let Ok(key) = lapin::types::ShortString::try_new(k.as_str()) {
                headers.insert(key, super::value::json_to_amqp(v));
            }
        }
        let names = (|| {
            let mut props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("utf-8".into())
                .with_correlation_id(short("task id", &message.id)?)
                .with_headers(headers)
                .with_delivery_mode(2)
                .with_priority(message.priority.unwrap_or(0));
            if let Some(reply_to) = &message.reply_to {
                props = props.with_reply_to(short("reply_to", reply_to)?);
            }
            let exchange = short("exchange", &message.exchange)?;
            let key = short("routing key", &message.routing_key)?;
            Ok::<_, String>((props, exchange, key))
        })();
        let (props, exchange, key) = match names {
            Ok(n) => n,
            Err(why) => return Published::Refused(why),
        };
        let body = message.body_bytes();
        self.publish_confirmed(&message.id, exchange, key, props, &body)
            .await
    }

    /// Publishes one message until the broker confirms it, across reconnects (see
    /// `publish_task`: a refusal is told apart from a step caught in another's).
    pub(super) async fn publish_confirmed(
        &self,
        task_id: &str,
        exchange: ShortString,
        key: ShortString,
        props: BasicProperties,
        body: &[u8],
    ) -> Published {
        let mut channels = self.transport.results.subscribe();
        let mut failed_on = None;
        loop {
            let Some((n, channel)) = self.channel(&mut channels, failed_on).await else {
                return Published::Stopped;
            };
            let publish = |channel: Channel| {
                let (exchange, key, props) = (exchange.clone(), key.clone(), props.clone());
                async move {
                    let pending = channel
                        .basic_publish(exchange, key, BasicPublishOptions::default(), body, props)
                        .await?;
                    pending.await
                }
            };
            match publish(channel).await {
                Ok(Confirmation::Nack(_)) => {
                    tracing::warn!(
                        task_id,
                        "the broker refused (nack) a message; publishing it again"
                    );
                }
                Ok(_) => return Published::Confirmed,
                Err(e) => {
                    self.results_failed(n);
                    failed_on = Some(n);
                    if !refused_by_broker(&e) {
                        tracing::warn!(task_id, "a message was not confirmed ({e}); publishing it again after reconnecting");
                        continue;
                    }
                    // Alone on a channel of its own: refused again, it is this message's fault.
                    let alone = async {
                        let channel = self.own_channel().await.map_err(|e| (false, e))?;
                        channel
                            .confirm_select(lapin::options::ConfirmSelectOptions::default())
                            .await
                            .map_err(|e| (false, e.to_string()))?;
                        let sent = publish(channel.clone()).await;
                        let _ = channel.close(200, "done".into()).await;
                        sent.map_err(|e| (refused_by_broker(&e), e.to_string()))
                    };
                    match alone.await {
                        Ok(Confirmation::Nack(_)) => {}
                        Ok(_) => return Published::Confirmed,
                        Err((true, why)) => {
                            tracing::error!(task_id, exchange = %exchange, "the broker refused a message: {why}");
                            return Published::Refused(format!("the broker refused it: {why}"));
                        }
                        Err((false, why)) => {
                            tracing::warn!(
                                task_id,
                                "a message was not confirmed ({why}); publishing it again"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Publishes a progress or stream state, waiting for a connection if there is none.
    pub(super) async fn publish_event(&self, reply_to: &str, correlation_id: &str, body: &[u8]) {
        let Some((key, corr)) = reply_names(reply_to, correlation_id) else {
            return;
        };
        let mut channels = self.transport.results.subscribe();
        let mut failed_on = None;
        loop {
            let Some((n, channel)) = self.channel(&mut channels, failed_on).await else {
                return;
            };
            let sent = channel
                .basic_publish(
                    "".into(),
                    key.clone(),
                    BasicPublishOptions::default(),
                    body,
                    properties(corr.clone()),
                )
                .await;
            match sent {
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(
                        "cannot publish a progress message ({e}); retrying on a new channel"
                    );
                    self.results_failed(n);
                    failed_on = Some(n);
                }
            }
        }
    }
}

/// A message as it arrived, to publish again (parked until its eta, or retried).
pub struct Raw {
    pub(super) properties: lapin::BasicProperties,
    pub(super) body: Vec<u8>,
    /// Where it was published to.
    pub(super) exchange: String,
    pub(super) routing_key: String,
}
