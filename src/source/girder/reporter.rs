//! Keeps one Girder job up to date over HTTP while its task runs: one tokio task per job that
//! the task's handler feeds with log lines and progress (never waiting: a full queue drops
//! them) and finally asks for the end status, which it sends before the task's own result.
//!
//! Nothing here can fail a task: an unreachable Girder is logged and the task goes on.

use super::{buffer_line, form, refuses_status, reply_status, status, JobEnd, JobSpec, Progress};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often log lines and progress are sent (Girder Worker's `JobManager` interval).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// How long a running job goes without a request before its status is read back, so that a
/// CANCELING set in Girder reaches a quiet task too.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// One request's limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a task's end waits for its job's final update before its result is sent anyway.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Log lines and progress waiting for the job's task; more are dropped.
const NOTE_BUFFER: usize = 1024;
/// Tries of a status update that failed for a reason that may pass (no connection, 5xx, 429).
const STATUS_TRIES: u32 = 4;

/// What the worker needs to update Girder jobs: which URLs it may reach, and one HTTP client.
#[derive(Debug)]
pub struct GirderJobs {
    /// URL prefixes a job may be updated at (`girder_job_urls`); `*` for any.
    allowed: Vec<String>,
    client: OnceLock<reqwest::Client>,
}

impl GirderJobs {
    /// `allowed` as in worker.toml (checked there: an entry that does not parse allows nothing).
    pub fn new(allowed: Vec<String>) -> Self {
        GirderJobs {
            allowed: allowed
                .iter()
                .filter_map(|p| super::url_prefix(p).ok())
                .collect(),
            client: OnceLock::new(),
        }
    }

    /// The job to keep for a task with `headers`, if it has one the worker may follow; a spec
    /// it may not follow is logged once, naming why and what to change.
    pub fn job_of(
        &self,
        task_id: &str,
        headers: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<JobSpec> {
        match JobSpec::from_headers(headers)? {
            Ok(spec) if spec.allowed_by(&self.allowed) => Some(spec),
            Ok(spec) => {
                tracing::warn!(task_id, url = %spec.url, "the task names a Girder job at a URL `girder_job_urls` does not allow; its job is not updated (add the URL's prefix to `girder_job_urls` in worker.toml)");
                None
            }
            Err(why) => {
                tracing::warn!(task_id, "the task's Girder job cannot be updated: {why}");
                None
            }
        }
    }

    fn client(&self) -> reqwest::Client {
        self.client
            .get_or_init(|| {
                reqwest::Client::builder()
                    .timeout(REQUEST_TIMEOUT)
                    .connect_timeout(REQUEST_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::limited(5))
                    .user_agent(concat!("worker/", env!("CARGO_PKG_VERSION")))
                    .build()
                    // Only TLS initialisation can fail here, and rustls with the platform's
                    // roots has none to fail at; a client without roots would still serve http.
                    .unwrap_or_else(|_| reqwest::Client::new())
            })
            .clone()
    }

    /// Starts keeping `spec`'s job for a task about to run: RUNNING at once. `canceling` is
    /// cancelled when Girder says the job is CANCELING.
    pub fn start(&self, spec: JobSpec, task_id: &str, canceling: CancellationToken) -> Reporter {
        let http = Http {
            client: self.client(),
            spec,
            task_id: task_id.to_string(),
        };
        let (notes, rx) = mpsc::channel(NOTE_BUFFER);
        tokio::spawn(keep(http, rx, canceling));
        Reporter { notes }
    }

    /// A job whose task never ran (revoked or expired before it started): CANCELED, as
    /// Girder Worker's `task_revoked` handler does.
    pub async fn canceled_before_start(&self, spec: JobSpec, task_id: &str) {
        let http = Http {
            client: self.client(),
            spec,
            task_id: task_id.to_string(),
        };
        let _ = tokio::time::timeout(FINISH_TIMEOUT, http.end(JobEnd::Canceled)).await;
    }
}

/// The handle a task's handler feeds its job through.
#[derive(Debug)]
pub struct Reporter {
    notes: mpsc::Sender<Note>,
}

#[derive(Debug)]
enum Note {
    Log(String),
    Progress(Progress),
    End(JobEnd, oneshot::Sender<()>),
}

impl Reporter {
    /// A line for the job log, sent with the next flush; dropped if the job is far behind.
    pub fn log(&self, line: String) {
        let _ = self.notes.try_send(Note::Log(line));
    }

    pub fn progress(&self, current: u64, total: Option<u64>, message: Option<String>) {
        let _ = self.notes.try_send(Note::Progress(Progress {
            total,
            current: Some(current),
            message,
        }));
    }

    /// Flushes the log and sets the final status; returns when Girder has it, or after
    /// `FINISH_TIMEOUT` (logged), so a slow Girder delays a result by that much at most.
    pub async fn end(self, end: JobEnd) {
        let (done, wait) = oneshot::channel();
        if self.notes.send(Note::End(end, done)).await.is_err() {
            return;
        }
        if tokio::time::timeout(FINISH_TIMEOUT, wait).await.is_err() {
            tracing::warn!(
                "the Girder job's final update took over {}s; the task's result goes on without waiting",
                FINISH_TIMEOUT.as_secs()
            );
        }
    }
}

/// The job's loop: RUNNING, then log and progress every `FLUSH_INTERVAL` while there is any,
/// the status read back when quiet for `POLL_INTERVAL`, and the end.
async fn keep(http: Http, mut notes: mpsc::Receiver<Note>, canceling: CancellationToken) {
    let seen = http.status(status::RUNNING).await;
    watch_for_canceling(&http, seen, &canceling).await;
    let mut log = String::new();
    let mut progress = Progress::default();
    let mut dirty = false;
    let mut last_contact = Instant::now();
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            note = notes.recv() => match note {
                Some(Note::Log(line)) => dirty |= buffer_line(&mut log, &line),
                Some(Note::Progress(p)) => {
                    progress.current = p.current.or(progress.current);
                    progress.total = p.total.or(progress.total);
                    progress.message = p.message.or(progress.message);
                    dirty = true;
                }
                Some(Note::End(end, done)) => {
                    if let Some(text) = end.log() {
                        buffer_line(&mut log, text.trim_end());
                    }
                    if !log.is_empty() || dirty {
                        http.update(&form(None, &log, &progress)).await;
                    }
                    http.end(end).await;
                    let _ = done.send(());
                    return;
                }
                // The task's handler is gone without an end (the worker is stopping and the
                // task goes back to its queue): the job stays as it is for the next run.
                None => return,
            },
            _ = tick.tick() => {
                if dirty {
                    let seen = http.update(&form(None, &log, &progress)).await;
                    log.clear();
                    dirty = false;
                    last_contact = Instant::now();
                    watch_for_canceling(&http, seen, &canceling).await;
                } else if last_contact.elapsed() >= POLL_INTERVAL && !canceling.is_cancelled() {
                    let seen = http.read_status().await;
                    last_contact = Instant::now();
                    watch_for_canceling(&http, seen.map(Seen::Status).unwrap_or(Seen::Nothing), &canceling).await;
                }
            }
        }
    }
}

/// Cancels the task when what Girder said shows the job CANCELING (a refused RUNNING is read
/// back first, as Girder Worker does).
async fn watch_for_canceling(http: &Http, seen: Seen, canceling: &CancellationToken) {
    let now = match seen {
        Seen::Status(s) => Some(s),
        Seen::Refused => http.read_status().await,
        Seen::Nothing => None,
    };
    if now == Some(status::CANCELING) && !canceling.is_cancelled() {
        tracing::info!(task_id = %http.task_id, "the task's Girder job is CANCELING: cancelling the task as a revoke would");
        canceling.cancel();
    }
}

/// What a reply said about the job.
enum Seen {
    Status(i64),
    /// Girder refused a status change (an invalid transition).
    Refused,
    Nothing,
}

struct Http {
    client: reqwest::Client,
    spec: JobSpec,
    task_id: String,
}

impl Http {
    /// Sets the final status; a refused change is read back, and a job Girder set CANCELING
    /// becomes CANCELED, as Girder Worker's success handler does.
    async fn end(&self, end: JobEnd) {
        if let Seen::Refused = self.status(end.status()).await {
            if self.read_status().await == Some(status::CANCELING) {
                self.status(status::CANCELED).await;
            }
        }
    }

    async fn status(&self, value: i64) -> Seen {
        let form = form(Some(value), "", &Progress::default());
        for attempt in 1..=STATUS_TRIES {
            match self.send(&form).await {
                Sent::Reply(code, body) if refuses_status(code, &body) => return Seen::Refused,
                Sent::Reply(code, body) if code < 300 => {
                    return reply_status(&body).map_or(Seen::Nothing, Seen::Status)
                }
                Sent::Reply(code, _) if code < 500 && code != 429 => {
                    tracing::warn!(task_id = %self.task_id, url = %self.spec.url, "Girder refused the job's status {value}: HTTP {code}");
                    return Seen::Nothing;
                }
                other => {
                    if attempt == STATUS_TRIES {
                        tracing::warn!(task_id = %self.task_id, url = %self.spec.url, "could not set the Girder job's status {value} after {STATUS_TRIES} tries: {other}");
                        return Seen::Nothing;
                    }
                    let pause = Duration::from_millis(500 << (attempt - 1));
                    tokio::time::sleep(pause).await;
                }
            }
        }
        Seen::Nothing
    }

    /// Sends log text and progress once; a failure is logged (the next flush carries on).
    async fn update(&self, form: &[(&'static str, String)]) -> Seen {
        match self.send(form).await {
            Sent::Reply(code, body) if code < 300 => {
                reply_status(&body).map_or(Seen::Nothing, Seen::Status)
            }
            other => {
                tracing::warn!(task_id = %self.task_id, url = %self.spec.url, "could not update the Girder job's log and progress: {other}");
                Seen::Nothing
            }
        }
    }

    async fn read_status(&self) -> Option<i64> {
        let mut req = self.client.get(&self.spec.url);
        for (k, v) in &self.spec.headers {
            req = req.header(k, v);
        }
        let reply = req.send().await.ok()?;
        reply_status(&reply.bytes().await.ok()?)
    }

    async fn send(&self, form: &[(&'static str, String)]) -> Sent {
        let method = reqwest::Method::from_bytes(self.spec.method.as_bytes())
            .unwrap_or(reqwest::Method::PUT);
        let mut req = self.client.request(method, &self.spec.url).form(form);
        for (k, v) in &self.spec.headers {
            req = req.header(k, v);
        }
        match req.send().await {
            Ok(reply) => {
                let code = reply.status().as_u16();
                // A job document is small; a huge reply is not read whole.
                let body = match reply.content_length() {
                    Some(n) if n > 1 << 20 => Vec::new(),
                    _ => reply.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
                };
                Sent::Reply(code, body)
            }
            Err(e) => Sent::Failed(e.to_string()),
        }
    }
}

enum Sent {
    Reply(u16, Vec<u8>),
    Failed(String),
}

impl std::fmt::Display for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sent::Reply(code, _) => write!(f, "HTTP {code}"),
            Sent::Failed(e) => write!(f, "{e}"),
        }
    }
}
