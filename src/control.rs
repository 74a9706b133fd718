//! The control socket: a Unix socket speaking the plugin protocol's JSON-RPC line codec, through
//! which local clients submit tasks, cancel them and read status. Server and client both live
//! here so the wire stays in one place (documented in docs/src/reference/control-api.md).
//!
//! Methods: `task.submit` (notifications `task.accepted`, `task.progress`, `task.stream`, then
//! the response), `task.cancel`, `task.list`, `plugins.status`, `plugins.restart` (`{name}`),
//! `plugins.reload` (`{wait?}`), `ping`. A connection may carry many requests at once; a task
//! whose submitter disconnects is cancelled unless it was submitted with `detach: true`.

use crate::dispatch::{Dispatcher, TaskUpdate};
use crate::framed::FramedReader;
use crate::reload::{self, ReloadSettings};
use crate::supervisor::status::PluginStatus;
use crate::task::{Cancellation, Outcome, TaskEvent, TaskRequest};
use plugin_protocol::{code, ErrorObject, Frame, Id, Message, Notification, Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Control connections served at once.
const MAX_CONNECTIONS: usize = 256;
/// Wait after a failed accept (e.g. no file descriptors left) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Requests one connection may have in flight at once (tasks included); more wait unread.
const REQUESTS_PER_CONNECTION: usize = 256;

/// Lines a connection may have waiting to be written to its client.
const OUTBOX_LINES: usize = 64;

/// Control requests are small; task arguments can be large, so allow what plugins allow.
const MAX_REQUEST_BYTES: usize = plugin_protocol::DEFAULT_MAX_LINE_BYTES;

/// `task.submit` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitParams {
    pub name: String,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// A caller-chosen task id; one is generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_time_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_time_limit: Option<f64>,
    /// Keep running if this connection closes; by default a task whose submitter
    /// disconnects is cancelled, since nobody is left to receive its result.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detach: bool,
}

/// What `ping` and `plugins.status` say about the worker itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub version: String,
    pub pid: u32,
    /// The state directory whose installed plugins it runs.
    #[serde(default)]
    pub state_dir: std::path::PathBuf,
    /// How plugin processes are contained (see `supervisor::containment`).
    #[serde(default)]
    pub containment: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub worker: WorkerInfo,
    pub in_flight: usize,
    pub plugins: Vec<PluginStatus>,
    /// The broker connection and its queues; absent without a broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<crate::broker_status::BrokerStatus>,
}

/// Binds the socket in a private directory (see [`crate::socket`]), replacing a stale file but
/// never a live worker's socket.
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    let invalid = |e: crate::socket::SocketError| {
        io::Error::new(io::ErrorKind::PermissionDenied, e.to_string())
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::socket::prepare_dir(dir).map_err(invalid)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "a worker is already serving on {}; stop it or use --socket",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = crate::socket::bind_private(path).map_err(invalid)?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// `plugins.reload {wait: true}` answers only once replaced and removed plugins have stopped.
fn wants_wait(params: &Value) -> bool {
    params.get("wait").and_then(Value::as_bool).unwrap_or(false)
}

/// Serves connections until `stop` fires, then waits for open requests to finish.
pub async fn serve(
    listener: UnixListener,
    dispatcher: Arc<Dispatcher>,
    info: WorkerInfo,
    reload: ReloadSettings,
    idle_timeout: Duration,
    stop: CancellationToken,
) {
    let tracker = TaskTracker::new();
    // At the limit, new connections wait in the listen backlog until one closes.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = stop.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let (dispatcher, info, stop, reload) = (
                    dispatcher.clone(),
                    info.clone(),
                    stop.clone(),
                    reload.clone(),
                );
                tracker.spawn(async move {
                    connection(stream, dispatcher, info, reload, idle_timeout, stop).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors, most likely: back off instead of spinning.
                tracing::warn!("control socket accept failed: {e}; retrying in {ACCEPT_BACKOFF:?}");
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// What every request on one connection needs.
#[derive(Clone)]
struct Context {
    dispatcher: Arc<Dispatcher>,
    info: WorkerInfo,
    reload: ReloadSettings,
    /// Bounded: a client that does not read its responses makes its tasks wait (and in turn
    /// their plugins), never the worker's memory grow.
    out: mpsc::Sender<Vec<u8>>,
    /// "control socket (pid 42, uid 1000)", from the peer's credentials.
    submitter: String,
    /// Tasks submitted on this connection without `detach`: cancelled if it closes.
    attached: Arc<std::sync::Mutex<HashSet<String>>>,
}

async fn connection(
    stream: UnixStream,
    dispatcher: Arc<Dispatcher>,
    info: WorkerInfo,
    reload: ReloadSettings,
    idle_timeout: Duration,
    stop: CancellationToken,
) {
    let submitter = submitter_of(&stream);
    let (read, write) = stream.into_split();
    let (out, writer) = spawn_writer(write);
    // Shared by the connection's requests: each queued submit holds a pointer, not a copy.
    let ctx = Arc::new(Context {
        dispatcher,
        info,
        reload,
        out: out.clone(),
        submitter,
        attached: Arc::default(),
    });
    let requests = TaskTracker::new();
    // A client that pipelines requests without reading answers waits here, not in our memory.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(REQUESTS_PER_CONNECTION));
    let mut frames = FramedReader::new(read, MAX_REQUEST_BYTES);
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    // When the last request finished: idleness counts from then, not from the last read.
    let last_done = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
    loop {
        let frame = tokio::select! {
            // Nothing asked, nothing running: free the slot for someone else.
            _ = &mut idle, if requests.is_empty() => {
                let quiet_until = *crate::sync::lock(&last_done) + idle_timeout;
                if quiet_until > tokio::time::Instant::now() {
                    idle.as_mut().reset(quiet_until);
                    continue;
                }
                tracing::debug!(submitter = %ctx.submitter, "closing an idle control connection");
                break;
            }
            frame = frames.next() => match frame {
                Ok(Some(frame)) => frame,
                // The client is gone (or half-closed): nobody will read its results.
                Ok(None) | Err(_) => {
                    cancel_attached(&ctx).await;
                    break;
                }
            },
            // After a stop, close idle connections; requests under way still finish.
            _ = stop.cancelled(), if requests.is_empty() => break,
        };
        idle.as_mut()
            .reset(tokio::time::Instant::now() + idle_timeout);
        match request_of(frame) {
            Ok(req) => {
                let permit = in_flight.clone().acquire_owned().await;
                let permit = permit.expect("the semaphore is never closed");
                let (ctx, last_done) = (ctx.clone(), last_done.clone());
                requests.spawn(async move {
                    handle(req, ctx).await;
                    *crate::sync::lock(&last_done) = tokio::time::Instant::now();
                    drop(permit);
                });
            }
            Err(None) => {}
            Err(Some(err)) => {
                let line = Message::Response(Response::err(None, err)).to_line();
                if out.send(line).await.is_err() {
                    break;
                }
            }
        }
    }
    requests.close();
    requests.wait().await;
    drop(ctx);
    drop(out);
    let _ = writer.await;
}

/// "control socket (pid 42, uid 1000)", from the peer's credentials.
fn submitter_of(stream: &UnixStream) -> String {
    match stream.peer_cred() {
        Ok(c) => match c.pid() {
            Some(pid) => format!("control socket (pid {pid}, uid {})", c.uid()),
            None => format!("control socket (uid {})", c.uid()),
        },
        Err(_) => "control socket".to_string(),
    }
}

/// Writes a connection's outbox to its client, in order, until either side goes.
fn spawn_writer(
    mut write: tokio::net::unix::OwnedWriteHalf,
) -> (mpsc::Sender<Vec<u8>>, tokio::task::JoinHandle<()>) {
    let (out, mut outbox) = mpsc::channel::<Vec<u8>>(OUTBOX_LINES);
    let writer = tokio::spawn(async move {
        while let Some(line) = outbox.recv().await {
            if write.write_all(&line).await.is_err() {
                return;
            }
        }
    });
    (out, writer)
}

/// A request out of a frame; `Err(Some)` is the error to answer, `Err(None)` a message that
/// needs no answer (a notification or response from the client).
fn request_of(frame: Frame) -> Result<Request, Option<ErrorObject>> {
    let line = match frame {
        Frame::Line(line) => line,
        Frame::TooLong { seen } => {
            let message = format!("request line over {MAX_REQUEST_BYTES} bytes ({seen} seen)");
            return Err(Some(ErrorObject::new(code::INVALID_REQUEST, message)));
        }
    };
    match Message::parse(&line) {
        Ok(Message::Request(req)) => Ok(req),
        Ok(_) => Err(None),
        Err(e) => Err(Some(ErrorObject::new(code::PARSE_ERROR, e.to_string()))),
    }
}

/// The client went away: nobody will read the results of the tasks it did not detach.
async fn cancel_attached(ctx: &Context) {
    let ids: Vec<String> = crate::sync::lock(&ctx.attached).drain().collect();
    for id in ids {
        tracing::info!(task_id = %id, submitter = %ctx.submitter, "the client that submitted this task disconnected; cancelling it (submit with `detach: true` to keep it running)");
        ctx.dispatcher
            .cancel(
                &id,
                Cancellation::requested("the control-socket client that submitted it disconnected"),
            )
            .await;
    }
}

async fn handle(req: Request, ctx: Arc<Context>) {
    let result = match req.method.as_str() {
        "task.submit" => submit(req.params, &req.id, &ctx).await,
        // Boxed: the future of every queued submit would otherwise keep room for the largest
        // of the other methods' (a reload's).
        method => Box::pin(answer(method, req.params, &ctx)).await,
    };
    let resp = match result {
        Ok(v) => Response::ok(req.id, v),
        Err(e) => Response::err(Some(req.id), e),
    };
    let _ = ctx.out.send(Message::Response(resp).to_line()).await;
}

/// The answer to any method but `task.submit`.
async fn answer(method: &str, params: Value, ctx: &Context) -> Result<Value, ErrorObject> {
    let dispatcher = &ctx.dispatcher;
    match method {
        "task.list" => Ok(json!({ "tasks": dispatcher.list().await })),
        "task.cancel" => {
            #[derive(Deserialize)]
            struct P {
                task_id: String,
                #[serde(default)]
                reason: Option<String>,
            }
            match serde_json::from_value::<P>(params) {
                Ok(p) => {
                    let reason = p.reason.unwrap_or_else(|| "cancelled by request".into());
                    let cancel = Cancellation::requested(reason);
                    Ok(json!({ "cancelled": dispatcher.cancel(&p.task_id, cancel).await }))
                }
                Err(e) => Err(ErrorObject::new(code::INVALID_PARAMS, e.to_string())),
            }
        }
        "plugins.status" => Ok(serde_json::to_value(StatusReport {
            worker: ctx.info.clone(),
            in_flight: dispatcher.in_flight(),
            plugins: dispatcher.status().await,
            broker: dispatcher.metrics().broker().snapshot(),
        })
        .expect("status serializes")),
        "plugins.restart" => restart(params, dispatcher).await,
        // Test hook only: wedges a pool actor, so a test can see the watchdog stop.
        "debug.freeze" if std::env::var_os("WORKER_TEST_HOOKS").is_some() => {
            let plugin = params["plugin"].as_str().unwrap_or_default();
            Ok(json!({ "frozen": dispatcher.freeze(plugin).await }))
        }
        "ping" => Ok(serde_json::to_value(&ctx.info).expect("info serializes")),
        "plugins.reload" => {
            let wait = wants_wait(&params);
            match reload::apply_install_record(dispatcher, &ctx.reload, wait).await {
                Ok(report) => Ok(serde_json::to_value(report).expect("report serializes")),
                Err(e) => Err(ErrorObject::new(code::INTERNAL_ERROR, e.to_string())),
            }
        }
        other => Err(ErrorObject::new(
            code::METHOD_NOT_FOUND,
            format!("unknown method `{other}`"),
        )),
    }
}

/// `plugins.restart {name}`: a failed plugin is started again at once.
async fn restart(params: Value, dispatcher: &Dispatcher) -> Result<Value, ErrorObject> {
    #[derive(Deserialize)]
    struct P {
        name: String,
    }
    let p: P = serde_json::from_value(params)
        .map_err(|e| ErrorObject::new(code::INVALID_PARAMS, e.to_string()))?;
    let Some((restarted, state)) = dispatcher.restart(&p.name).await else {
        return Err(ErrorObject::new(
            code::INVALID_PARAMS,
            format!("no plugin `{}` runs in this worker", p.name),
        ));
    };
    Ok(json!({ "name": p.name, "restarted": restarted, "state": state.to_string() }))
}

async fn submit(params: Value, request_id: &Id, ctx: &Context) -> Result<Value, ErrorObject> {
    let (request, detach) = submitted(params, ctx)?;
    let task_id = request.id.to_string();
    // Made before the first wait, so that the request is not kept beside it; the task starts
    // only when `run` is first read, after the client was told it was accepted.
    let mut run = ctx.dispatcher.submit(request);
    // `request` is the submit's own JSON-RPC id, so a client with many submits in flight on one
    // connection knows which task id each got before any result arrives.
    let accepted = json!({ "task_id": task_id, "request": request_id });
    ctx.notify("task.accepted", accepted).await;
    if !detach {
        crate::sync::lock(&ctx.attached).insert(task_id.clone());
    }
    let outcome = loop {
        match run.next().await {
            Some(TaskUpdate::Event(ev)) => {
                let (method, params) = event_notification(&task_id, ev);
                ctx.notify(method, params).await;
            }
            Some(TaskUpdate::Done(outcome)) => break outcome,
            None => unreachable!("a task run ends with Done"),
        }
    };
    crate::sync::lock(&ctx.attached).remove(&task_id);
    match outcome {
        Outcome::Success(result) => Ok(json!({ "task_id": task_id, "result": result })),
        Outcome::Failure(f) => {
            let mut data = serde_json::to_value(&f).expect("failure serializes");
            data["task_id"] = Value::from(task_id);
            Err(ErrorObject::new(code::TASK_FAILED, f.to_string()).with_data(data))
        }
    }
}

/// The task a `task.submit` asks for, and whether it is detached.
fn submitted(params: Value, ctx: &Context) -> Result<(TaskRequest, bool), ErrorObject> {
    let p: SubmitParams = serde_json::from_value(params)
        .map_err(|e| ErrorObject::new(code::INVALID_PARAMS, e.to_string()))?;
    let secs = |field: &str, s: Option<f64>| {
        s.map(|s| crate::task::time_limit(field, s))
            .transpose()
            .map_err(|e| ErrorObject::new(code::INVALID_PARAMS, e))
    };
    let soft = secs("soft_time_limit", p.soft_time_limit)?;
    let hard = secs("hard_time_limit", p.hard_time_limit)?;
    let mut request = TaskRequest::new(p.name, p.args, p.kwargs);
    if let Some(id) = p.id {
        request.id = id.into();
    }
    request.soft_time_limit = soft;
    request.hard_time_limit = hard;
    request.submitter = ctx.submitter.clone();
    Ok((request, p.detach))
}

/// A progress or stream event as the control socket's notification.
fn event_notification(task_id: &str, ev: TaskEvent) -> (&'static str, Value) {
    let mut params = serde_json::to_value(&ev).expect("event serializes");
    let method = match ev {
        TaskEvent::Progress { .. } => "task.progress",
        TaskEvent::Stream { .. } => "task.stream",
        // Never asked for by the control socket (`capture_log` is off).
        TaskEvent::Log { .. } => "task.log",
        TaskEvent::Retrying { .. } => "task.retrying",
    };
    if let Some(obj) = params.as_object_mut() {
        obj.remove("event");
        obj.insert("task_id".into(), Value::from(task_id));
    }
    (method, params)
}

impl Context {
    /// Sends a notification, waiting for room in the outbox; a closed connection drops it.
    async fn notify(&self, method: &str, params: Value) {
        let note = Notification {
            method: method.into(),
            params,
        };
        let _ = self.out.send(Message::Notification(note).to_line()).await;
    }
}

/// A connection to a running worker's control socket.
pub struct Client {
    write: tokio::net::unix::OwnedWriteHalf,
    frames: FramedReader<tokio::net::unix::OwnedReadHalf>,
    next_id: u64,
}

impl Client {
    pub async fn connect(path: &Path) -> io::Result<Client> {
        crate::socket::check_owner(path)
            .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?;
        let stream = UnixStream::connect(path).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "no worker answers on {} ({e}); start one with `worker serve` or pass --socket",
                    path.display()
                ),
            )
        })?;
        let (read, write) = stream.into_split();
        Ok(Client {
            write,
            frames: FramedReader::new(read, MAX_REQUEST_BYTES),
            next_id: 1,
        })
    }

    /// Sends one request and returns its response; notifications in between go to `on_note`.
    pub async fn call(
        &mut self,
        method: &str,
        params: Value,
        mut on_note: impl FnMut(Notification),
    ) -> io::Result<Result<Value, ErrorObject>> {
        let id = self.next_id;
        self.next_id += 1;
        let line = Message::Request(Request {
            id: Id::Num(id),
            method: method.into(),
            params,
        })
        .to_line();
        self.write.write_all(&line).await?;
        loop {
            let Some(frame) = self.frames.next().await? else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the worker closed the control connection",
                ));
            };
            let Frame::Line(line) = frame else { continue };
            match Message::parse(&line) {
                Ok(Message::Response(r)) if r.id == Some(Id::Num(id)) => return Ok(r.result),
                Ok(Message::Notification(n)) => on_note(n),
                _ => {}
            }
        }
    }
}
