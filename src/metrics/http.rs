//! `metrics_listen`: a small HTTP/1 server answering `GET /metrics` with the OpenMetrics text.
//!
//! Scrapers are peers too: nothing a client of this port does may stop other scrapes for long
//! or burn the worker's CPU. The limits, and what each one bounds:
//!
//! - **Connections**: at most [`MAX_CONNECTIONS`] (16) are served at once. Every connection is
//!   accepted at once, never left in the listen backlog; one that finds every slot taken gets
//!   `503 Service Unavailable` (`Retry-After: 1`, `Connection: close`) and is closed. At most
//!   [`MAX_REFUSALS`] (16) such answers are in progress at once, each holding its place for at
//!   least [`ANSWER_INTERVAL`]; beyond that an accepted socket is closed without a word.
//! - **Idle and slow clients**: a connection must send each request's headers within
//!   [`HEADER_TIMEOUT`] (2 s). In hyper 1.x this timer also runs while a keep-alive
//!   connection waits for its next request, so it is the idle timeout too. A connection is
//!   also told to close [`MAX_CONNECTION_AGE`] (10 s) after it was accepted, and dropped
//!   [`CLOSE_GRACE`] (2 s) later if it has not finished (a client that stops reading its
//!   answers), the same grace as on stop. A slot is thus held at most 12 s by any client.
//! - **Requests**: a connection is answered at most [`MAX_REQUESTS`] (100) times; the last
//!   answer says `Connection: close`. Its n-th answer is not sent before n x
//!   [`ANSWER_INTERVAL`] (10 ms) after it was accepted, so each slot answers at most 100
//!   requests a second (1,600 for the whole server), pipelined or not.
//! - **Scrape work**: reading the pools' status and encoding it (a message to every pool
//!   actor) is shared. One render at a time, renders begin at least [`RENDER_INTERVAL`]
//!   (20 ms) apart (at most 50 a second), and every scrape that waits is answered with the
//!   first render begun after its request arrived: an answer is never older than its request.
//!
//! A scrape reads the pools' status like `plugins list` does, never blocking a task. What is
//! left to a firewall: a flood of connects still costs an accept and a close each, and a
//! client that keeps all 16 slots busy with requests gets every other scraper a 503.

use crate::dispatch::Dispatcher;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Connections served at once; one more is answered 503.
pub const MAX_CONNECTIONS: usize = 16;
/// 503 answers in progress at once; beyond them an accepted connection is closed unanswered.
pub const MAX_REFUSALS: usize = 16;
/// A client that has not sent a request's headers by then, the first or the next one on a
/// keep-alive connection, is dropped.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Answers per connection; the last one closes it.
pub const MAX_REQUESTS: u32 = 100;
/// A connection's n-th answer waits until n times this after it was accepted.
pub const ANSWER_INTERVAL: Duration = Duration::from_millis(10);
/// Renders of the scrape begin at least this far apart.
pub const RENDER_INTERVAL: Duration = Duration::from_millis(20);
/// A connection is asked to close this long after it was accepted.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(10);
/// How long a connection asked to close (its age, or the server's stop) may take to finish.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a 503 waits for the client to close after the answer, so the kernel does not
/// reset the connection (losing the answer) over a request we did not read.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Bytes of the refused client's request read (and dropped) while lingering.
const REFUSAL_DRAIN_BYTES: usize = 16 * 1024;
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const BUSY_BODY: &str = "the metrics server is busy (all connections in use); retry in a second\n";

/// Serves `/metrics` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, dispatcher: Arc<Dispatcher>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let scrapes = Arc::new(Scrapes {
        dispatcher,
        renders: Renders::new(RENDER_INTERVAL),
    });
    let busy = Bytes::from(format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BUSY_BODY}",
        BUSY_BODY.len()
    ));
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds and the like: wait instead of spinning on the error.
                    tracing::warn!("metrics: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            let (scrapes, stop) = (scrapes.clone(), stop.clone());
            connections.spawn(async move {
                serve_connection(stream, scrapes, stop).await;
                drop(permit);
            });
        } else if let Ok(permit) = refusals.clone().try_acquire_owned() {
            tracing::debug!("metrics: every connection is in use; answering 503");
            let (busy, stop) = (busy.clone(), stop.clone());
            connections.spawn(async move {
                refuse(stream, &busy, stop).await;
                drop(permit);
            });
        } else {
            tracing::debug!("metrics: every connection and every 503 is in use; closing one");
        }
    }
    connections.close();
    connections.wait().await;
}

/// Serves one connection within the limits above: its age, its answers and its headers.
async fn serve_connection(stream: TcpStream, scrapes: Arc<Scrapes>, stop: CancellationToken) {
    let accepted = Instant::now();
    let answers = Arc::new(AtomicU32::new(0));
    let service = hyper::service::service_fn(move |req| {
        let (scrapes, answers) = (scrapes.clone(), answers.clone());
        async move {
            let n = answers.fetch_add(1, Ordering::Relaxed) + 1;
            let asked = Instant::now();
            tokio::time::sleep_until(accepted + ANSWER_INTERVAL * n).await;
            let mut response = scrapes.answer(&req, asked).await;
            if n >= MAX_REQUESTS {
                response.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep_until(accepted + MAX_CONNECTION_AGE) => {}
    }
    // Finishes the answer in progress, if any, then closes; a client that does not read it
    // within the grace is dropped.
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
}

/// Answers 503 on a connection no slot is free for, then waits a little for the client to
/// close. Takes at least [`ANSWER_INTERVAL`], so refusals are bounded in rate as in number.
async fn refuse(mut stream: TcpStream, busy: &[u8], stop: CancellationToken) {
    let floor = tokio::time::sleep(ANSWER_INTERVAL);
    let answer = async {
        stream.write_all(busy).await?;
        stream.shutdown().await?;
        // The client's request, unread, would make the kernel reset the connection on close,
        // and a reset can destroy the answer before the client reads it.
        let mut sink = [0u8; 1024];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN_BYTES {
            match stream.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::timeout(REFUSAL_LINGER, answer) => {}
    }
    floor.await;
}

/// What every connection shares: the dispatcher to read and the last render of it.
struct Scrapes {
    dispatcher: Arc<Dispatcher>,
    renders: Renders,
}

impl Scrapes {
    /// The answer to one request that arrived at `asked`.
    async fn answer(&self, req: &Request<Incoming>, asked: Instant) -> Response<Full<Bytes>> {
        let response = match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/metrics") => {
                let dispatcher = &self.dispatcher;
                let text = self
                    .renders
                    .fresh(asked, || async {
                        dispatcher.metrics().encode(dispatcher.status().await)
                    })
                    .await;
                Response::builder()
                    .header(hyper::header::CONTENT_TYPE, OPENMETRICS)
                    .body(Full::new(text))
            }
            (_, "/metrics") => Response::builder()
                .status(StatusCode::METHOD_NOT_ALLOWED)
                .header(hyper::header::ALLOW, "GET, HEAD")
                .body(Full::new(Bytes::from_static(b"use GET\n"))),
            _ => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n"))),
        };
        response.expect("a response built from constant parts")
    }
}

/// The last render of the scrape, shared by every connection. Renders are never concurrent
/// and begin at least `interval` apart; a request is answered with the first render begun
/// after it arrived, so scrapers waiting together share one render and none gets an old one.
struct Renders {
    interval: Duration,
    /// When the last render began, and its text. The lock is held while rendering: waiters
    /// queue on it in order (tokio's mutex is fair) and find the render they waited for.
    last: tokio::sync::Mutex<Option<(Instant, Bytes)>>,
}

impl Renders {
    fn new(interval: Duration) -> Renders {
        Renders {
            interval,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// A render begun at or after `asked`: the last one if it qualifies, else a new one made
    /// with `render` once `interval` has passed since the last began.
    async fn fresh<F, R>(&self, asked: Instant, render: R) -> Bytes
    where
        R: FnOnce() -> F,
        F: Future<Output = String>,
    {
        let mut last = self.last.lock().await;
        if let Some((began, text)) = &*last {
            if *began >= asked {
                return text.clone();
            }
            tokio::time::sleep_until(*began + self.interval).await;
        }
        let began = Instant::now();
        let text = Bytes::from(render().await);
        *last = Some((began, text.clone()));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A render that counts itself and says when it began.
    async fn counted(renders: &Renders, count: &AtomicUsize, asked: Instant) -> (Instant, Bytes) {
        let text = renders
            .fresh(asked, || async {
                count.fetch_add(1, Ordering::SeqCst);
                format!("{:?}", Instant::now())
            })
            .await;
        let began = *renders.last.lock().await.as_ref().map(|(b, _)| b).unwrap();
        (began, text)
    }

    #[tokio::test]
    async fn renders_are_fresh_spaced_and_shared_by_waiters() {
        let renders = Arc::new(Renders::new(Duration::from_millis(20)));
        let count = Arc::new(AtomicUsize::new(0));

        // One after another: a new render each time, never one begun before the request,
        // each at least the interval after the one before.
        let mut began = Vec::new();
        for _ in 0..4 {
            let asked = Instant::now();
            let (b, _) = counted(&renders, &count, asked).await;
            assert!(b >= asked);
            began.push(b);
        }
        assert_eq!(count.load(Ordering::SeqCst), 4);
        for pair in began.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(20), "{pair:?}");
        }

        // Many at once, while the lock is held (a render in progress): they all arrived
        // before the next render begins, so that one render answers every one of them.
        let held = renders.last.lock().await;
        let asked = Instant::now();
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let (renders, count) = (renders.clone(), count.clone());
                tokio::spawn(async move { counted(&renders, &count, asked).await.1 })
            })
            .collect();
        // The test runtime has one thread: the waiters run, and queue on the lock, here.
        tokio::task::yield_now().await;
        drop(held);
        let mut texts = Vec::new();
        for w in waiters {
            texts.push(w.await.unwrap());
        }
        assert_eq!(count.load(Ordering::SeqCst), 5);
        assert!(texts.iter().all(|t| *t == texts[0]));
    }
}
