//! The RabbitMQ task source: consumes Celery task messages, runs them through the dispatcher,
//! and answers through Celery's rpc:// result backend, so an unmodified Celery client cannot
//! tell this worker from a Celery worker.
//!
//! Delivery guarantees: a task message is acked only after its final state is published and
//! confirmed by the broker; a worker killed at any moment loses nothing (RabbitMQ redelivers).
//! After a lost connection the worker reconnects at once (then with backoff), without touching
//! plugins; tasks already running finish and their results are published on the new
//! connection; each task id has one owner (`ledger`), so redelivered copies are acked with
//! it, or without publishing again once its result was confirmed.

mod acks;
mod connection;
mod consumers;
mod delayed;
mod frame_guard;
mod inbound;
mod monitor;
mod publish;
mod receive;
mod remote;
pub mod tls;
mod value;

use crate::dispatch::Dispatcher;
use crate::source::engine::worker::{Worker, WorkerOptions};
use lapin::Channel;
use publish::ResultsChannel;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::config::QueueDeclare as Declare;

#[derive(Debug, Clone)]
pub struct AmqpOptions {
    pub url: String,
    pub queues: Vec<String>,
    pub declare: Declare,
    /// Arguments of the task queues declared here (`x-queue-type`, `x-max-priority`, ...).
    pub queue_arguments: Map<String, Value>,
    /// The type of the exchange named after each task queue (`direct`, `topic`, ...).
    pub exchange_type: String,
    /// Per-consumer prefetch (never global).
    pub prefetch: u16,
    pub nodename: String,
    /// Answered task ids remembered, so redelivered copies are acked without running again.
    pub result_memory: usize,
    /// How long a final state whose reply queue does not exist is retried before it is
    /// logged as undeliverable.
    pub result_retry_timeout: Duration,
    /// Certificates for `amqps://` (empty for `amqp://`).
    pub tls: tls::BrokerTls,
    /// Send Celery's `task-*` events from the start (`-E`); worker heartbeats go always.
    pub task_events: bool,
    /// `redis://...` to store results in Redis as Celery's Redis backend does; `None` answers
    /// through rpc:// (reply queues).
    pub result_backend: Option<String>,
    /// Seconds a result stays in Redis (`result_expires`; 0 keeps it).
    pub result_expires: u64,
    /// The largest task message body read; a larger one is rejected unread.
    pub max_message_size: usize,
    /// URL prefixes of the Girder jobs kept up to date (`*` any; empty none).
    pub girder_job_urls: Vec<String>,
}

/// A running AMQP source.
pub struct AmqpSource {
    shared: Arc<SourceState>,
    task: JoinHandle<()>,
}

impl AmqpSource {
    pub fn start(options: AmqpOptions, dispatcher: Arc<Dispatcher>) -> AmqpSource {
        let (session_tx, session_rx) = mpsc::channel(64);
        let worker = WorkerOptions {
            nodename: options.nodename.clone(),
            result_memory: options.result_memory,
            task_events: options.task_events,
            result_backend: options.result_backend.clone(),
            result_expires: options.result_expires,
            girder_job_urls: options.girder_job_urls.clone(),
        };
        let transport = Amqp {
            broker_at: Default::default(),
            queues: watch::channel(
                options
                    .queues
                    .iter()
                    .map(|q| QueueSpec {
                        exchange_type: options.exchange_type.clone(),
                        ..QueueSpec::named(q)
                    })
                    .collect(),
            )
            .0,
            options,
            results: watch::channel(None).0,
            connected: watch::channel(false).0,
            channel_numbers: AtomicU64::new(0),
            parking: AtomicBool::new(false),
            session_requests: session_tx,
            session_inbox: tokio::sync::Mutex::new(session_rx),
        };
        let shared = Arc::new(Worker::new(worker, dispatcher, transport));
        let board = shared.engine.dispatcher.metrics().broker();
        board.connecting(&redact(shared.broker_url()));
        board.want(shared.queue_names().iter().map(String::as_str));
        let task = tokio::spawn(connection::connection_loop(shared.clone()));
        AmqpSource { shared, task }
    }

    pub fn nodename(&self) -> String {
        self.shared.engine.nodename()
    }
}

impl crate::source::Source for AmqpSource {
    /// Fires when a `celery control shutdown` asks this worker to stop.
    fn shutdown_requested(&self) -> CancellationToken {
        self.shared.engine.shutdown_requested.clone()
    }

    fn connected(&self) -> watch::Receiver<bool> {
        self.shared.transport.connected.subscribe()
    }

    /// Tasks not yet started go back to the queue.
    fn stop_consuming(&self) {
        self.shared.stop_consuming();
    }

    /// Waits (up to `timeout`) for every message handler to publish and ack, then closes the
    /// connection.
    fn finish(self: Box<Self>, timeout: Duration) -> crate::source::Finishing {
        Box::pin(async move {
            if !self.shared.wait_for_handlers(timeout).await {
                tracing::warn!("some task messages were still being answered at shutdown; RabbitMQ will redeliver them");
            }
            self.shared.engine.finished.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        })
    }
}

impl AmqpOptions {
    /// The options `worker.toml` (with env and flags) gives the source for broker `url`;
    /// `prefetch_count` unset means twice the plugins' capacity.
    pub fn from_config(
        config: &crate::config::Config,
        url: &str,
        dispatcher: &Dispatcher,
        tls: tls::BrokerTls,
    ) -> AmqpOptions {
        let prefetch = config
            .prefetch_count
            .unwrap_or_else(|| (dispatcher.capacity() * 2).clamp(4, u16::MAX as usize) as u16);
        let mut queue_arguments: serde_json::Map<_, _> = config
            .queue_arguments
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if config.queue_type == crate::config::QueueType::Quorum {
            queue_arguments.insert("x-queue-type".into(), "quorum".into());
        }
        AmqpOptions {
            url: url.to_string(),
            queues: config.queues.clone(),
            declare: config.queue_declare,
            queue_arguments,
            exchange_type: config.exchange_type.clone(),
            prefetch,
            nodename: config.name.clone(),
            result_memory: config.result_memory,
            result_retry_timeout: config.result_retry_timeout(),
            tls,
            task_events: config.task_events,
            result_backend: config.redis_backend().map(str::to_string),
            result_expires: config.result_expires as u64,
            max_message_size: config.max_message_size,
            girder_job_urls: config.girder_job_urls.clone(),
        }
    }
}

/// The AMQP source's worker: the Celery engine over the [`Amqp`] transport.
pub type SourceState = Worker<Amqp>;

/// The RabbitMQ side of the worker: its options and its connection's state.
pub struct Amqp {
    options: AmqpOptions,
    /// The current result channel (publisher confirms on) and its connection's number;
    /// `None` while disconnected.
    results: watch::Sender<ResultsChannel>,
    connected: watch::Sender<bool>,
    /// The task queues to consume now: `queues` at start, changed by `add_consumer` and
    /// `cancel_consumer`; the live session follows it, and a new one starts from it.
    queues: watch::Sender<Vec<QueueSpec>>,
    /// Whether the broker's delay topology is declared on this session (eta tasks are parked
    /// there; without it they are held here).
    parking: AtomicBool,
    /// Numbers the results channels, so a publisher can wait for one other than the channel
    /// that just failed.
    channel_numbers: AtomicU64,
    /// Which URL of the broker's failover list is in use.
    broker_at: std::sync::atomic::AtomicUsize,
    /// What publishers and remote control ask of the live session (it owns the connection).
    session_requests: mpsc::Sender<SessionRequest>,
    /// Read by one session at a time.
    session_inbox: tokio::sync::Mutex<mpsc::Receiver<SessionRequest>>,
}

/// A request to the live broker session.
pub(super) enum SessionRequest {
    /// A channel of the caller's own (a throwaway one: declaring a queue that may be refused,
    /// or a publish that may be), closed when the caller drops it.
    Channel(oneshot::Sender<lapin::Result<Channel>>),
    /// The results channel with this number failed: if the broker closed it and the
    /// connection lives on, open another; if the connection is gone, the session ends.
    ResultsFailed(u64),
}

/// A task queue to consume, declared (unless passive) as Celery declares it: a durable queue
/// bound to a durable exchange (by default direct, named as the queue) with a routing key (by
/// default the queue's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    pub exchange: String,
    pub exchange_type: String,
    pub routing_key: String,
}

impl QueueSpec {
    pub fn named(name: &str) -> QueueSpec {
        QueueSpec {
            name: name.to_string(),
            exchange: name.to_string(),
            exchange_type: "direct".into(),
            routing_key: name.to_string(),
        }
    }
}

impl SourceState {
    /// The names of the queues consumed now.
    fn queue_names(&self) -> Vec<String> {
        self.transport
            .queues
            .borrow()
            .iter()
            .map(|q| q.name.clone())
            .collect()
    }

    fn next_channel_number(&self) -> u64 {
        self.transport
            .channel_numbers
            .fetch_add(1, Ordering::Relaxed)
            + 1
    }

    /// A channel of the caller's own on the live connection; an error if there is none now.
    pub(super) async fn own_channel(&self) -> Result<Channel, String> {
        if !*self.transport.connected.borrow() {
            return Err("not connected to the broker".into());
        }
        let (tx, rx) = oneshot::channel();
        if self
            .transport
            .session_requests
            .try_send(SessionRequest::Channel(tx))
            .is_err()
        {
            return Err("the broker session is busy; try again".into());
        }
        match rx.await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the broker connection ended".into()),
        }
    }

    /// Tells the session that the results channel `number` failed.
    fn results_failed(&self, number: u64) {
        // A full inbox already holds a request that makes the session look at its channels.
        let _ = self
            .transport
            .session_requests
            .try_send(SessionRequest::ResultsFailed(number));
    }

    /// The broker URL this session uses (or the next tries): one of `options.url`'s
    /// failover list.
    fn broker_url(&self) -> &str {
        let urls = crate::config::broker_urls(&self.transport.options.url);
        let at = self
            .transport
            .broker_at
            .load(std::sync::atomic::Ordering::Relaxed);
        urls.get(at % urls.len().max(1))
            .copied()
            .unwrap_or(&self.transport.options.url)
    }

    /// Moves to the next URL of the failover list (round robin).
    fn next_broker(&self) {
        self.transport
            .broker_at
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

pub(super) use crate::source::redact;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672//"),
            "amqp://host:5672//"
        );
        assert_eq!(redact("amqp://host//"), "amqp://host//");
    }
}
