//! Redis as a Celery broker, spoken as kombu's Redis transport speaks it, so an unmodified
//! Celery client, `celery inspect/control` and Flower use plugin tasks through Redis: the
//! names of keys and channels ([`keys`]), the message envelope ([`envelope`]) and the atomic
//! operations on queues and unacked messages ([`ops`]); then the source that consumes with
//! them as the Celery engine's transport (`Worker<Redis>`).
//!
//! Delivery guarantees: a message is taken and recorded unacked in one script, so it is at
//! every moment in a queue or in `unacked`; it is acked only after its final state is
//! stored; the lease of every task still held here is renewed, so no worker restores (and
//! runs again) a task that is only long; a worker killed at any moment leaves its messages in
//! `unacked`, restored by any worker (this one or Celery's) once `visibility_timeout` passes.

pub mod envelope;
pub mod keys;
pub mod ops;

mod broadcast;
mod consume;
mod lease;
mod server;
mod transport;

use crate::dispatch::Dispatcher;
use crate::source::engine::worker::{Worker, WorkerOptions};
use crate::source::redact;
use keys::Keys;
use redis::aio::ConnectionManager;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a command may take before the connection counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a Redis broker source is built from.
pub struct RedisOptions {
    /// `redis://[:password@]host:port/db`, `rediss://...`, or Celery's Sentinel list
    /// (`sentinel://host:26379;sentinel://...`).
    pub url: String,
    /// The master's name for a Sentinel broker (Celery's `master_name` transport option).
    pub master_name: Option<String>,
    pub queues: Vec<String>,
    /// Messages taken and not yet settled, at most (as AMQP's prefetch).
    pub prefetch: u16,
    /// How long a message taken and not acked stays with its worker (kombu's
    /// `visibility_timeout`); this worker renews the lease of what it holds.
    pub visibility_timeout: Duration,
    /// kombu's `global_keyprefix`.
    pub global_keyprefix: String,
    /// The largest message read; a larger one is dropped unread.
    pub max_message_size: usize,
    /// For `rediss://`: `broker_ca` (then the only roots trusted, as the redis crate takes
    /// it) and the client certificate, as read at start.
    pub tls: redis::TlsCertificates,
    /// What every broker's worker is built from.
    pub worker: WorkerOptions,
}

impl RedisOptions {
    /// Checks a Redis broker URL as the config is read.
    pub fn check_url(url: &str) -> Result<(), String> {
        server::check_url(url)
    }

    /// The options `worker.toml` (with env and flags) gives the source for broker `url`;
    /// `prefetch_count` unset means twice the plugins' capacity.
    pub fn from_config(
        config: &crate::config::Config,
        url: &str,
        dispatcher: &Dispatcher,
        tls: redis::TlsCertificates,
    ) -> RedisOptions {
        let prefetch = config
            .prefetch_count
            .unwrap_or_else(|| (dispatcher.capacity() * 2).clamp(4, u16::MAX as usize) as u16);
        RedisOptions {
            url: url.to_string(),
            master_name: config.master_name.clone(),
            queues: config.queues.clone(),
            prefetch,
            visibility_timeout: Duration::from_secs_f64(config.visibility_timeout),
            global_keyprefix: config.global_keyprefix.clone(),
            max_message_size: config.max_message_size,
            tls,
            worker: WorkerOptions {
                nodename: config.name.clone(),
                result_memory: config.result_memory,
                task_events: config.task_events,
                result_backend: config.redis_backend().map(str::to_string),
                result_expires: config.result_expires as u64,
                girder_job_urls: config.girder_job_urls.clone(),
            },
        }
    }
}

/// The Redis broker's worker: the Celery engine over the [`Redis`] transport.
pub type SourceState = Worker<Redis>;

/// The Redis side of the worker: its connection, names, wanted queues and what it holds.
pub struct Redis {
    server: server::Server,
    /// The URL without its password, for logs and status.
    url: String,
    /// The URL as configured (remote control's `conf` masks its password).
    configured_url: String,
    keys: Keys,
    prefetch: u16,
    visibility_timeout: Duration,
    max_message_size: usize,
    /// One multiplexed, reconnecting connection, made on first use.
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// The task queues to consume now: `queues` at start, changed by `add_consumer` and
    /// `cancel_consumer`.
    queues: watch::Sender<Vec<String>>,
    /// The delivery tags taken here and not yet settled: their leases are renewed, and no
    /// restore of expired messages touches them.
    held: Mutex<HashSet<String>>,
    /// At most `prefetch` messages taken and not yet settled.
    window: Arc<tokio::sync::Semaphore>,
    connected: watch::Sender<bool>,
}

impl Redis {
    fn new(options: &RedisOptions) -> Redis {
        let urls = crate::config::broker_urls(&options.url);
        let server = server::Server::open(&urls, &options.tls, options.master_name.as_deref())
            .expect("the broker URL was checked with the config");
        let db = server.db() as u32;
        Redis {
            server,
            url: urls.iter().map(|u| redact(u)).collect::<Vec<_>>().join(";"),
            configured_url: options.url.clone(),
            keys: Keys::new(&options.global_keyprefix, db),
            prefetch: options.prefetch,
            visibility_timeout: options.visibility_timeout,
            max_message_size: options.max_message_size,
            connection: tokio::sync::Mutex::new(None),
            queues: watch::channel(options.queues.clone()).0,
            held: Mutex::new(HashSet::new()),
            window: Arc::new(tokio::sync::Semaphore::new(options.prefetch.max(1) as usize)),
            connected: watch::channel(false).0,
        }
    }

    /// The connection, made now if there is none yet (it reconnects by itself afterwards).
    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        // A script may wait behind others on a busy server: far longer than the crate's
        // 0.5 s default, which would make a taken message look lost.
        // Reconnects at most a second apart, so leases are renewed soon after an outage
        // (the crate's backoff grows to ~10 s, longer than a short visibility timeout).
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_max_delay(Duration::from_secs(1));
        let c = self
            .server
            .client()
            .await?
            .get_connection_manager_with_config(config)
            .await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// After a failure: with Sentinel, the next connection asks the sentinels which server is
    /// the master now; a plain server's connection reconnects by itself.
    async fn connection_failed(&self) {
        if self.server.follows_failover() {
            *self.connection.lock().await = None;
        }
    }

    fn hold(&self, tag: &str) {
        crate::sync::lock(&self.held).insert(tag.to_string());
    }

    fn release(&self, tag: &str) {
        crate::sync::lock(&self.held).remove(tag);
    }

    fn held(&self) -> Vec<String> {
        crate::sync::lock(&self.held).iter().cloned().collect()
    }
}

/// A running Redis broker source.
pub struct RedisSource {
    shared: Arc<SourceState>,
    loops: Vec<JoinHandle<()>>,
}

impl RedisSource {
    pub fn start(options: RedisOptions, dispatcher: Arc<Dispatcher>) -> RedisSource {
        let transport = Redis::new(&options);
        let shared = Arc::new(Worker::new(options.worker, dispatcher, transport));
        let board = shared.engine.dispatcher.metrics().broker();
        board.connecting(&shared.transport.url);
        board.want(options.queues.iter().map(String::as_str));
        let loops = vec![
            tokio::spawn(consume::consume_loop(shared.clone())),
            tokio::spawn(lease::lease_loop(shared.clone())),
            tokio::spawn(broadcast::pidbox_loop(shared.clone())),
            tokio::spawn(broadcast::events_loop(shared.clone())),
        ];
        RedisSource { shared, loops }
    }
}

impl crate::source::Source for RedisSource {
    fn shutdown_requested(&self) -> CancellationToken {
        self.shared.engine.shutdown_requested.clone()
    }

    fn connected(&self) -> watch::Receiver<bool> {
        self.shared.transport.connected.subscribe()
    }

    /// Takes no more messages; held eta tasks and tasks not started go back to their queue.
    fn stop_consuming(&self) {
        self.shared.stop_consuming();
    }

    /// Waits (up to `timeout`) for every message handler to store its result and ack, puts
    /// back what is still held (at the front of its queue, as kombu's shutdown does), says
    /// `worker-offline`, and stops.
    fn finish(self: Box<Self>, timeout: Duration) -> crate::source::Finishing {
        Box::pin(async move {
            let shared = &self.shared;
            if !shared.wait_for_handlers(timeout).await {
                tracing::warn!("some task messages were still being answered at shutdown; they go back to their queue");
            }
            transport::restore_held(shared).await;
            broadcast::offline(shared).await;
            shared.engine.finished.cancel();
            for task in &self.loops {
                task.abort();
            }
        })
    }
}
