//! The Rust SDK: a plugin is a [`Plugin`] with task handlers and one call to [`Plugin::run`].
//!
//! ```no_run
//! use plugin_protocol::plugin::{Plugin, TaskError};
//! use serde_json::{json, Value};
//!
//! Plugin::new("hello", "1.0.0")
//!     .task("hello.greet", "Greets its first argument", |ctx, params| {
//!         ctx.progress(1, Some(1), None);
//!         let who = params.args.first().and_then(Value::as_str).unwrap_or("world");
//!         Ok(json!(format!("hello, {who}")))
//!     })
//!     .run()
//!     .expect("stdin/stdout are usable");
//! ```
//!
//! The SDK reads requests on the calling thread, runs tasks on a pool of as many threads as
//! the worker's declared `concurrency`, and writes every outgoing message from one writer
//! thread that batches what is ready, so pipelined requests cost few syscalls. Handlers see
//! cancellation through [`TaskContext::is_cancelled`]; a panicking handler fails its task,
//! not the plugin. Stdout belongs to the protocol: log with `eprintln!` or [`TaskContext::log`].
//!
//! Queue and result backends (protocol 1.5) register with [`Plugin::offers`] and
//! [`Plugin::stores`]; `plugin_backends` and `plugin_offers` serve them, fed their messages here.

use crate::backends::ResultStoreParams;
use crate::codec::{Frame, LineDecoder};
use crate::message::{ErrorObject, Id, Message, Notification, Request, Response};
use crate::methods::*;
use crate::plugin_backends::{BackendSession, Backends};
pub use crate::plugin_error::TaskError;
pub use crate::plugin_offers::{Closed, Offer, Offers};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

/// A task handler: gets the task's context and params, returns its JSON result or an error.
pub type Handler =
    Arc<dyn Fn(&TaskContext, &TaskRunParams) -> Result<Value, TaskError> + Send + Sync>;

/// Queue of encoded lines for the writer thread.
type Outbox = mpsc::Sender<Vec<u8>>;

/// What a running task can see and do besides returning.
pub struct TaskContext {
    task_id: String,
    delivery_info: DeliveryInfo,
    request: RequestInfo,
    cancelled: Arc<AtomicBool>,
    settings: Arc<Map<String, Value>>,
    out: Outbox,
}

impl TaskContext {
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// The queue the task was consumed from; `None` for a task from the control socket (or
    /// from a worker older than protocol 1.2).
    pub fn queue(&self) -> Option<&str> {
        self.delivery_info.queue.as_deref()
    }

    /// Where the task came from: queue, exchange and routing key.
    pub fn delivery_info(&self) -> &DeliveryInfo {
        &self.delivery_info
    }

    /// Celery's request facts (retries, eta, expires, parent, root, group) and the worker's
    /// node name; defaults where the worker sent none.
    pub fn request(&self) -> &RequestInfo {
        &self.request
    }

    /// True once the worker asked this task to stop (cancel or soft time limit).
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// The `[settings]` table of the plugin's manifest.
    pub fn settings(&self) -> &Map<String, Value> {
        &self.settings
    }

    /// Reports how far the task has come.
    pub fn progress(&self, done: u64, total: Option<u64>, message: Option<&str>) {
        self.notify(
            method::TASK_PROGRESS,
            TaskProgressParams {
                task_id: self.task_id.clone(),
                done,
                total,
                message: message.map(str::to_string),
            },
        );
    }

    /// Streams partial results; they reach the caller in order, before the final result.
    pub fn stream(&self, items: Vec<Value>) {
        self.notify(
            method::TASK_STREAM,
            TaskStreamParams {
                task_id: self.task_id.clone(),
                items,
            },
        );
    }

    /// Sends a structured log record to the worker's log.
    pub fn log(&self, level: LogLevel, message: &str) {
        let mut fields = Map::new();
        fields.insert("task_id".into(), Value::from(self.task_id.clone()));
        self.notify(
            method::LOG,
            LogParams {
                level,
                message: message.to_string(),
                fields,
            },
        );
    }

    fn notify(&self, method: &str, params: impl serde::Serialize) {
        // A closed outbox means the worker is gone; there is nobody left to tell.
        let _ = self
            .out
            .send(Message::Notification(Notification::new(method, params)).to_line());
    }
}

struct Job {
    id: Id,
    params: TaskRunParams,
    handler: Handler,
    cancelled: Arc<AtomicBool>,
}

/// Tasks in flight, by task id, with a condvar signalled when one finishes while a shutdown
/// waits for them all (a signal is a syscall: no task pays it otherwise).
#[derive(Default)]
struct InFlight {
    tasks: Mutex<HashMap<String, Arc<AtomicBool>>>,
    finished: Condvar,
    /// Set (before the lock is taken) once a shutdown waits in `wait_empty`.
    waited_for: AtomicBool,
}

impl InFlight {
    fn wait_empty(&self) {
        self.waited_for.store(true, Ordering::SeqCst);
        let mut tasks = self.tasks.lock().expect("in-flight lock poisoned");
        while !tasks.is_empty() {
            tasks = self.finished.wait(tasks).expect("in-flight lock poisoned");
        }
    }
}

/// What `serve` keeps between messages: the outgoing queue, the tasks in flight, whether
/// `shutdown` was asked, and the task threads' queue once `initialize` started them.
struct Session {
    out: mpsc::Sender<Vec<u8>>,
    in_flight: Arc<InFlight>,
    shutting_down: Arc<AtomicBool>,
    jobs: Option<mpsc::Sender<Job>>,
    /// The queue and result backends' side, once `initialize` started it.
    backends: Option<BackendSession>,
}

impl Session {
    fn reply(&self, response: Response) {
        let _ = self.out.send(Message::Response(response).to_line());
    }
}

/// A plugin: its identity and its task handlers.
pub struct Plugin {
    name: String,
    version: String,
    tasks: Vec<TaskInfo>,
    handlers: HashMap<String, Handler>,
    on_event: Option<EventHandler>,
    backends: Backends,
}

/// What a plugin does with each `event` it is sent (see [`Plugin::on_event`]).
type EventHandler = Box<dyn Fn(&EventParams) + Send + Sync>;

impl Plugin {
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Plugin {
            name: name.into(),
            version: version.into(),
            tasks: Vec::new(),
            handlers: HashMap::new(),
            on_event: None,
            backends: Backends::default(),
        }
    }

    /// Makes the plugin a queue backend (protocol 1.5, `provides = ["queue_backend"]`): after
    /// `initialized`, `offers(window, &Offers)` is called once, on a thread of its own, only if
    /// `initialize` carried a `queue_backend` window. It takes tasks from the plugin's queue and
    /// hands each to [`Offers::offer`], which waits while the window is full and returns
    /// [`Closed`] once `shutdown` began: then return (`shutdown` is answered after it has, and
    /// after every offer's answer). See [`Offer`] for what is called when; a panic here ends
    /// the process, so that the worker restarts the plugin.
    pub fn offers<F>(mut self, offers: F) -> Self
    where
        F: FnOnce(u32, &Offers) + Send + 'static,
    {
        self.backends.set_offers(Box::new(offers));
        self
    }

    /// Makes the plugin a result backend (protocol 1.5, `provides = ["result_backend"]`): each
    /// `result.store` runs `store(record)` on one of `concurrency` threads, during a shutdown
    /// too; `Ok` answers `{}` (stored), `Err(message)` or a panic answers error -32000 and the
    /// worker retries later. Store by `task_id` (an upsert): a record may come twice.
    pub fn stores<F>(mut self, store: F) -> Self
    where
        F: Fn(ResultStoreParams) -> Result<(), String> + Send + Sync + 'static,
    {
        self.backends.set_store(Arc::new(store));
        self
    }

    /// Handles the worker's `event` notifications, sent when `plugin.toml` subscribes
    /// (`events = ["task.*", ...]`). Called in order on the thread that reads requests: keep it
    /// quick, since while it runs the worker drops this plugin's events (and says how many in
    /// the next one's `dropped`).
    pub fn on_event<F>(mut self, handler: F) -> Self
    where
        F: Fn(&EventParams) + Send + Sync + 'static,
    {
        self.on_event = Some(Box::new(handler));
        self
    }

    /// Registers a task handler under `name` (which must be declared in `plugin.toml`).
    pub fn task<F>(mut self, name: &str, description: &str, handler: F) -> Self
    where
        F: Fn(&TaskContext, &TaskRunParams) -> Result<Value, TaskError> + Send + Sync + 'static,
    {
        self.tasks.push(TaskInfo {
            name: name.to_string(),
            description: Some(description.to_string()),
            params: None,
        });
        self.handlers.insert(name.to_string(), Arc::new(handler));
        self
    }

    /// Serves the protocol on stdin/stdout until the worker says `exit` or closes stdin.
    pub fn run(self) -> io::Result<()> {
        self.serve(io::stdin().lock(), io::stdout())
    }

    /// Serves the protocol on any reader/writer pair (tests use pipes or buffers).
    pub fn serve<R: Read, W: Write + Send + 'static>(self, input: R, output: W) -> io::Result<()> {
        let (out, outbox) = mpsc::channel::<Vec<u8>>();
        let writer = thread::spawn(move || write_lines(outbox, output));
        let mut session = Session {
            out,
            in_flight: Arc::new(InFlight::default()),
            shutting_down: Arc::new(AtomicBool::new(false)),
            jobs: None,
            backends: None,
        };
        let mut reader = BufReader::with_capacity(64 * 1024, input);
        let mut decoder = LineDecoder::new(crate::codec::DEFAULT_MAX_LINE_BYTES);

        'read: loop {
            let chunk = reader.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            decoder.extend(chunk);
            let n = chunk.len();
            reader.consume(n);
            while let Some(frame) = decoder.next_frame() {
                let Frame::Line(line) = frame else {
                    let err = ErrorObject::new(code::INVALID_REQUEST, "line too long");
                    session.reply(Response::err(None, err));
                    continue;
                };
                match Message::parse(&line) {
                    Ok(Message::Request(req)) => self.on_request(&mut session, req),
                    Ok(Message::Notification(n)) => {
                        if self.on_notification(n, &session).is_break() {
                            break 'read;
                        }
                    }
                    Ok(Message::Response(r)) => {
                        if let Some(backends) = &session.backends {
                            backends.answered(r);
                        }
                    }
                    Err(e) => {
                        let err = ErrorObject::new(code::PARSE_ERROR, e.to_string());
                        session.reply(Response::err(None, err));
                    }
                }
            }
        }
        let Session {
            out,
            in_flight,
            jobs,
            backends,
            ..
        } = session;
        if let Some(backends) = backends {
            backends.close();
        }
        drop(jobs);
        drop(out);
        let idle = in_flight
            .tasks
            .lock()
            .map(|t| t.is_empty())
            .unwrap_or(false);
        if idle {
            // Every sender is gone once the pool threads end, so this flushes and returns.
            let _ = writer.join();
        }
        Ok(())
    }

    /// Handles a request from the worker; every request is answered (tasks by their thread).
    fn on_request(&self, session: &mut Session, req: Request) {
        match req.method.as_str() {
            method::INITIALIZE => {
                let reply = match serde_json::from_value::<InitializeParams>(req.params) {
                    Ok(params) => {
                        session.backends = Some(self.backends.start(&params, session.out.clone()));
                        let threads = params.limits.concurrency.max(1);
                        let settings = Arc::new(params.settings);
                        session.jobs = Some(start_pool(
                            threads,
                            session.out.clone(),
                            session.in_flight.clone(),
                            settings,
                        ));
                        Response::ok(req.id, self.initialize_result())
                    }
                    Err(e) => Response::err(
                        Some(req.id),
                        ErrorObject::new(code::INVALID_PARAMS, e.to_string()),
                    ),
                };
                session.reply(reply);
            }
            method::TASK_RUN => {
                let accepted = self.accept_task(
                    req,
                    session.jobs.as_ref(),
                    &session.in_flight,
                    &session.shutting_down,
                );
                if let Some(reply) = accepted {
                    session.reply(reply);
                }
            }
            method::PING => session.reply(Response::ok(req.id, Map::new())),
            method::RESULT_STORE => match &session.backends {
                Some(backends) => backends.store(req),
                None => {
                    let err =
                        ErrorObject::new(code::INVALID_REQUEST, "result.store before initialize");
                    session.reply(Response::err(Some(req.id), err));
                }
            },
            method::SHUTDOWN => {
                session.shutting_down.store(true, Ordering::SeqCst);
                if let Some(backends) = &session.backends {
                    backends.begin_shutdown();
                }
                let (in_flight, backends) = (session.in_flight.clone(), session.backends.clone());
                let out = session.out.clone();
                thread::spawn(move || {
                    in_flight.wait_empty();
                    if let Some(backends) = backends {
                        backends.wait_drained();
                    }
                    let _ =
                        out.send(Message::Response(Response::ok(req.id, Value::Null)).to_line());
                });
            }
            other => {
                let err =
                    ErrorObject::new(code::METHOD_NOT_FOUND, format!("unknown method {other}"));
                session.reply(Response::err(Some(req.id), err));
            }
        }
    }

    /// Handles a notification from the worker; `Break` for `exit`.
    fn on_notification(&self, n: Notification, session: &Session) -> ControlFlow<()> {
        match n.method.as_str() {
            method::INITIALIZED => {
                if let Some(backends) = &session.backends {
                    backends.initialized();
                }
            }
            method::OFFER_PROGRESS | method::OFFER_STREAM => {
                if let Some(backends) = &session.backends {
                    backends.notified(n);
                }
            }
            method::TASK_CANCEL => {
                if let Ok(p) = serde_json::from_value::<TaskCancelParams>(n.params) {
                    let tasks = session
                        .in_flight
                        .tasks
                        .lock()
                        .expect("in-flight lock poisoned");
                    if let Some(flag) = tasks.get(&p.task_id) {
                        flag.store(true, Ordering::SeqCst);
                    }
                }
            }
            method::EVENT => match (
                &self.on_event,
                serde_json::from_value::<EventParams>(n.params),
            ) {
                (Some(handler), Ok(event)) => handler(&event),
                (Some(_), Err(e)) => {
                    eprintln!("ignoring an `event` whose params do not parse: {e}")
                }
                (None, _) => {}
            },
            method::EXIT => return ControlFlow::Break(()),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn initialize_result(&self) -> InitializeResult {
        InitializeResult {
            protocol_version: PROTOCOL_VERSION.to_string(),
            plugin: PeerInfo {
                name: self.name.clone(),
                version: self.version.clone(),
            },
            tasks: self.tasks.clone(),
            capabilities: [
                capability::CANCEL,
                capability::PROGRESS,
                capability::STREAM,
                capability::PING_WHILE_BUSY,
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    /// Queues a `task.run`; returns an immediate error response when it cannot run.
    fn accept_task(
        &self,
        req: Request,
        jobs: Option<&mpsc::Sender<Job>>,
        in_flight: &InFlight,
        shutting_down: &AtomicBool,
    ) -> Option<Response> {
        let params: TaskRunParams = match serde_json::from_value(req.params) {
            Ok(p) => p,
            Err(e) => {
                let err = ErrorObject::new(code::INVALID_PARAMS, e.to_string());
                return Some(Response::err(Some(req.id), err));
            }
        };
        let Some(jobs) = jobs else {
            let err = ErrorObject::new(code::INVALID_REQUEST, "task.run before initialize");
            return Some(Response::err(Some(req.id), err));
        };
        if shutting_down.load(Ordering::SeqCst) {
            let err = ErrorObject::new(code::SHUTTING_DOWN, "plugin is shutting down");
            return Some(Response::err(Some(req.id), err));
        }
        let Some(handler) = self.handlers.get(&params.task).cloned() else {
            let err = ErrorObject::new(code::UNKNOWN_TASK, format!("unknown task {}", params.task));
            return Some(Response::err(Some(req.id), err));
        };
        let cancelled = Arc::new(AtomicBool::new(false));
        in_flight
            .tasks
            .lock()
            .expect("in-flight lock poisoned")
            .insert(params.task_id.clone(), cancelled.clone());
        let job = Job {
            id: req.id,
            params,
            handler,
            cancelled,
        };
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            let err = ErrorObject::new(code::INTERNAL_ERROR, "task pool stopped");
            return Some(Response::err(Some(job.id), err));
        }
        None
    }
}

fn start_pool(
    threads: u32,
    out: Outbox,
    in_flight: Arc<InFlight>,
    settings: Arc<Map<String, Value>>,
) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..threads {
        let rx = rx.clone();
        let out = out.clone();
        let in_flight = in_flight.clone();
        let settings = settings.clone();
        thread::spawn(move || loop {
            let job = match rx.lock().expect("job queue lock poisoned").recv() {
                Ok(job) => job,
                Err(_) => return,
            };
            let ctx = TaskContext {
                task_id: job.params.task_id.clone(),
                delivery_info: job.params.delivery_info.clone().unwrap_or_default(),
                request: job.params.request.clone().unwrap_or_default(),
                cancelled: job.cancelled,
                settings: settings.clone(),
                out: out.clone(),
            };
            let queue = ctx.queue().map(str::to_string);
            let run = || with_current_queue(queue, || (job.handler)(&ctx, &job.params));
            let result = catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "handler panicked".into());
                Err(TaskError::new("Panic", message))
            });
            let reply = match result {
                Ok(value) => Response::ok(job.id, value),
                Err(e) => Response::err(Some(job.id), e.to_error_object()),
            };
            let _ = out.send(Message::Response(reply).to_line());
            let mut tasks = in_flight.tasks.lock().expect("in-flight lock poisoned");
            tasks.remove(&job.params.task_id);
            if in_flight.waited_for.load(Ordering::SeqCst) {
                in_flight.finished.notify_all();
            }
        });
    }
    tx
}

/// Writes queued lines, flushing once per batch of whatever is ready.
fn write_lines<W: Write>(outbox: mpsc::Receiver<Vec<u8>>, output: W) {
    let mut output = io::BufWriter::with_capacity(64 * 1024, output);
    while let Ok(line) = outbox.recv() {
        if output.write_all(&line).is_err() {
            return;
        }
        while let Ok(line) = outbox.try_recv() {
            if output.write_all(&line).is_err() {
                return;
            }
        }
        if output.flush().is_err() {
            return;
        }
    }
}

thread_local! {
    static CURRENT_QUEUE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with `queue` as the current task's queue on this thread (the SDK's task threads).
pub(crate) fn with_current_queue<T>(queue: Option<String>, f: impl FnOnce() -> T) -> T {
    CURRENT_QUEUE.with(|q| *q.borrow_mut() = queue);
    let out = f();
    CURRENT_QUEUE.with(|q| *q.borrow_mut() = None);
    out
}

/// The queue the task running on this thread was consumed from (`None` outside a task).
pub fn current_task_queue_name() -> Option<String> {
    CURRENT_QUEUE.with(|q| q.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::mpsc::Receiver;

    /// A `Write` that forwards each flushed buffer to a channel.
    struct ChannelWriter(mpsc::Sender<Vec<u8>>, Vec<u8>);
    impl Write for ChannelWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.1.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            let _ = self.0.send(std::mem::take(&mut self.1));
            Ok(())
        }
    }

    fn collect(rx: Receiver<Vec<u8>>) -> Vec<Value> {
        let bytes: Vec<u8> = rx.iter().flatten().collect();
        bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    #[test]
    fn events_reach_on_event_in_order_and_bad_ones_are_skipped() {
        let input = [
            json!({"jsonrpc":"2.0","method":"event","params":{"event":"task.received","time":1.5,"task_id":"a","dropped":0}}),
            json!({"jsonrpc":"2.0","method":"event","params":{"time":"not an event"}}),
            json!({"jsonrpc":"2.0","method":"event","params":{"event":"task.succeeded","time":2.0,"task_id":"a","dropped":7}}),
        ]
        .iter()
        .map(|v| format!("{v}\n"))
        .collect::<String>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let (tx, _rx) = mpsc::channel();
        Plugin::new("p", "1.0")
            .on_event(move |e| {
                let task = e.fields["task_id"].clone();
                sink.lock()
                    .unwrap()
                    .push((e.event.clone(), task, e.dropped));
            })
            .serve(input.as_bytes(), ChannelWriter(tx, Vec::new()))
            .unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                ("task.received".to_string(), json!("a"), 0),
                ("task.succeeded".to_string(), json!("a"), 7)
            ]
        );
    }

    #[test]
    fn serves_a_session() {
        let input = [
            json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{
                "protocol_version":"1.0","worker":{"name":"w","version":"0"},
                "plugin":{"name":"p","instance":0},"settings":{},
                "limits":{"max_line_bytes":1000,"concurrency":1}}}),
            json!({"jsonrpc":"2.0","method":"initialized"}),
            json!({"jsonrpc":"2.0","id":2,"method":"task.run","params":{"task_id":"a","task":"double","args":[21]}}),
            json!({"jsonrpc":"2.0","id":3,"method":"task.run","params":{"task_id":"b","task":"nope"}}),
            json!({"jsonrpc":"2.0","id":4,"method":"bogus"}),
            json!({"jsonrpc":"2.0","id":5,"method":"shutdown"}),
        ]
        .iter()
        .map(|v| format!("{v}\n"))
        .collect::<String>();
        let (tx, rx) = mpsc::channel();
        Plugin::new("p", "1.0")
            .task("double", "doubles", |ctx, p| {
                ctx.stream(vec![json!("half-way")]);
                Ok(json!(p.args[0].as_i64().unwrap() * 2))
            })
            .serve(input.as_bytes(), ChannelWriter(tx, Vec::new()))
            .unwrap();
        let out = collect(rx);
        let by_id = |id: u64| out.iter().find(|m| m["id"] == json!(id)).cloned().unwrap();
        assert_eq!(by_id(1)["result"]["tasks"][0]["name"], "double");
        assert_eq!(by_id(2)["result"], 42);
        assert_eq!(by_id(3)["error"]["code"], code::UNKNOWN_TASK);
        assert_eq!(by_id(4)["error"]["code"], code::METHOD_NOT_FOUND);
        assert_eq!(by_id(5)["result"], Value::Null);
        let stream_at = out
            .iter()
            .position(|m| m["method"] == "task.stream")
            .unwrap();
        let result_at = out.iter().position(|m| m["id"] == 2).unwrap();
        assert!(stream_at < result_at, "stream items precede the result");
    }
}
