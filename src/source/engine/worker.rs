//! A Celery worker on one broker: the [`Engine`] (what it decides and keeps), what it tells
//! monitors, where results go, and the [`Transport`] that carries its messages. The engine's
//! handlers ([`delivery`](super::delivery), [`workflow`](super::workflow),
//! [`retry`](super::retry)) take a `&Worker<T>` and reach the broker only through `T`.
//!
//! Each transport function takes the whole `Worker`, so a transport reaches its connection
//! state (`worker.transport`) and the engine's stop tokens and metrics alike.

use super::monitor::Monitor;
use super::transport::{BrokerSettings, Delivered, Published, Returns, WantedQueue};
use super::Engine;
use crate::metrics::Settled;
use crate::source::canvas::Outgoing;
use crate::source::celery::CeleryTask;
use crate::source::girder::reporter::GirderJobs;
use crate::source::redis_backend::RedisBackend;
use serde_json::Value;
use std::future::Future;

/// At most this many results are retried at once while their reply queue does not exist;
/// their task messages are acked first, so they hold no prefetch slot.
pub const MAX_RETURNED_RESULTS: usize = 1000;

/// State shared by a broker source's connection loop, its message handlers and remote control.
pub struct Worker<T: Transport> {
    /// What a Celery worker keeps whatever the transport (see [`Engine`]).
    pub(crate) engine: Engine<T::Ack>,
    /// Celery's event stream (Flower, `celery events`).
    pub(crate) monitor: Monitor,
    /// The Redis result backend, when results go there instead of reply queues.
    pub(crate) result_backend: Option<RedisBackend>,
    /// Results retried while their reply queue does not exist (their messages already acked).
    pub(crate) returned_results: tokio::sync::Semaphore,
    /// Girder jobs named by task messages, kept up to date over HTTP.
    pub(crate) girder: GirderJobs,
    /// The broker's side: its connection state and options.
    pub(crate) transport: T,
}

/// What every broker's worker is built from besides its transport.
pub struct WorkerOptions {
    pub nodename: String,
    /// Answered task ids remembered, so redelivered copies are settled without running again.
    pub result_memory: usize,
    /// Send Celery's `task-*` events from the start (`-E`); worker heartbeats go always.
    pub task_events: bool,
    /// `redis://...` to store results as Celery's Redis backend does; `None` answers through
    /// the broker's reply queues (rpc://).
    pub result_backend: Option<String>,
    /// Seconds a result stays in Redis (`result_expires`; 0 keeps it).
    pub result_expires: u64,
    /// URL prefixes of the Girder jobs kept up to date (`*` any; empty none).
    pub girder_job_urls: Vec<String>,
}

impl<T: Transport> Worker<T> {
    pub(crate) fn new(
        options: WorkerOptions,
        dispatcher: std::sync::Arc<crate::dispatch::Dispatcher>,
        transport: T,
    ) -> Worker<T> {
        let result_backend = options.result_backend.as_deref().map(|url| {
            RedisBackend::new(url, Some(options.result_expires))
                .expect("result_backend was checked with the config")
        });
        Worker {
            engine: Engine::new(dispatcher, options.nodename, options.result_memory),
            monitor: Monitor::new(options.task_events),
            result_backend,
            returned_results: tokio::sync::Semaphore::new(MAX_RETURNED_RESULTS),
            girder: GirderJobs::new(options.girder_job_urls),
            transport,
        }
    }

    /// Graceful stop, phase 1: consume no more; held eta tasks and tasks not yet started go
    /// back to their queue as their handlers wake.
    pub(crate) fn stop_consuming(&self) {
        self.engine.stopping.cancel();
        self.engine.revoke_signal.notify_waiters();
    }

    /// Phase 2: waits up to `timeout` for every message handler to answer and settle; false
    /// if some were still at work.
    pub(crate) async fn wait_for_handlers(&self, timeout: std::time::Duration) -> bool {
        self.engine.handlers.close();
        tokio::time::timeout(timeout, self.engine.handlers.wait())
            .await
            .is_ok()
    }

    /// Tasks running here now (a heartbeat's `active`).
    pub(crate) fn active_count(&self) -> usize {
        self.engine.tasks().ledger.active_count()
    }

    pub(crate) fn is_revoked(&self, id: &str) -> bool {
        self.engine.tasks().revoked.contains(id)
    }

    /// Acks a delivery, counted in the metrics.
    pub(crate) async fn ack(&self, ack: &T::Ack) {
        if T::ack(self, ack).await {
            self.engine
                .dispatcher
                .metrics()
                .delivery_settled(Settled::Acked);
        }
    }

    /// Rejects a delivery, back to its queue for [`Settled::Requeued`], else not; counted.
    pub(crate) async fn reject(&self, ack: &T::Ack, how: Settled) {
        if T::reject(self, ack, how == Settled::Requeued).await {
            self.engine.dispatcher.metrics().delivery_settled(how);
        }
    }

    /// A task's final state to where its client reads it: stored in the Redis result backend
    /// when there is one, else sent to its reply queue (nothing without one).
    pub(crate) async fn deliver_final(
        &self,
        task_id: &str,
        reply_to: Option<&str>,
        correlation_id: &str,
        body: &[u8],
        returns: Returns,
    ) -> Delivered {
        match (&self.result_backend, reply_to) {
            (Some(redis), _) => {
                let meta = std::str::from_utf8(body).expect("result bodies are JSON text");
                match redis
                    .store_final(task_id, meta, &self.engine.finished)
                    .await
                {
                    true => Delivered::Confirmed,
                    false => Delivered::GaveUp,
                }
            }
            (None, Some(reply_to)) => {
                T::reply(self, task_id, (reply_to, correlation_id), body, returns).await
            }
            (None, None) => Delivered::Confirmed,
        }
    }

    /// A progress or stream state, best effort: stored once in Redis, or sent to the reply
    /// queue.
    pub(crate) async fn deliver_event(
        &self,
        task_id: &str,
        reply_to: Option<&str>,
        correlation_id: &str,
        body: &[u8],
    ) {
        match (&self.result_backend, reply_to) {
            (Some(redis), _) => {
                let meta = std::str::from_utf8(body).expect("result bodies are JSON text");
                if let Err(e) = redis.store(task_id, meta).await {
                    tracing::debug!(
                        task_id,
                        "cannot store a progress state in Redis ({e}); dropped"
                    );
                }
            }
            (None, Some(reply_to)) => {
                T::reply_progress(self, (reply_to, correlation_id), body).await
            }
            (None, None) => {}
        }
    }
}

/// A broker as the Celery engine uses it.
pub trait Transport: Sized + Send + Sync + 'static {
    /// How one delivery is settled (lapin's `Acker`; a Redis delivery tag).
    type Ack: Clone + Send + Sync + 'static;
    /// A message as it arrived, kept to publish it again (parked until its eta, retried).
    type Raw: Send + Sync + 'static;
    /// The broker's name in logs and the submitter of its tasks (`amqp`, `redis`).
    const NAME: &'static str;

    /// Acks a delivery. False if it can no longer be (its channel is gone: the broker gives
    /// it again, and the ledger makes that copy an answered one).
    fn ack(w: &Worker<Self>, ack: &Self::Ack) -> impl Future<Output = bool> + Send;

    /// Rejects a delivery, back to its queue with `requeue`, else dropped or dead-lettered.
    fn reject(
        w: &Worker<Self>,
        ack: &Self::Ack,
        requeue: bool,
    ) -> impl Future<Output = bool> + Send;

    /// Hands an eta task to the broker until it is due (RabbitMQ's delay queues), its message
    /// acked once the broker has the copy. False to hold it here (the message still unacked).
    fn park(
        w: &Worker<Self>,
        queue: &str,
        task: &CeleryTask,
        raw: &Self::Raw,
        ack: &Self::Ack,
    ) -> impl Future<Output = bool> + Send;

    /// Publishes a task message (a workflow step, a callback, an errback) until the broker
    /// confirms it, across reconnects.
    fn publish_task(w: &Worker<Self>, message: &Outgoing)
        -> impl Future<Output = Published> + Send;

    /// Publishes `raw` again as its retry number `retries`, due at `eta` (ISO 8601), to where
    /// it came from, until the broker confirms it.
    fn publish_retry(
        w: &Worker<Self>,
        task: &CeleryTask,
        raw: &Self::Raw,
        retries: u64,
        eta: &str,
    ) -> impl Future<Output = Published> + Send;

    /// A final state to the client's reply queue (rpc://), confirmed.
    fn reply(
        w: &Worker<Self>,
        task_id: &str,
        reply: (&str, &str),
        body: &[u8],
        returns: Returns,
    ) -> impl Future<Output = Delivered> + Send;

    /// A progress or stream state to the client's reply queue, best effort.
    fn reply_progress(
        w: &Worker<Self>,
        reply: (&str, &str),
        body: &[u8],
    ) -> impl Future<Output = ()> + Send;

    /// The queues consumed now, as `inspect active_queues` shows them.
    fn active_queues(w: &Worker<Self>) -> Vec<Value>;

    /// What `inspect stats` and `inspect conf` show of the broker.
    fn settings(w: &Worker<Self>) -> BrokerSettings;

    /// Starts consuming `queue` (remote control's `add_consumer`): `Ok(false)` if it is
    /// consumed already, an error naming why the broker refused it.
    fn add_consumer(
        w: &Worker<Self>,
        queue: WantedQueue,
    ) -> impl Future<Output = Result<bool, String>> + Send;

    /// Stops consuming `queue` (remote control's `cancel_consumer`).
    fn cancel_consumer(w: &Worker<Self>, queue: &str);
}
