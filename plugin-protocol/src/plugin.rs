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
//! the worker's declared `concurrency`, and writes outgoing messages from one writer thread
//! that batches what is ready, so pipelined requests cost few syscalls. The reading thread
//! writes its own answers (pings, quick tasks) itself when nothing is queued before them and
//! stdout takes them without blocking (see `outbox`): no hand-off to the writer per read.
//! Handlers see cancellation through [`TaskContext::is_cancelled`]; a panicking handler fails
//! its task, not the plugin. Stdout belongs to the protocol: log with `eprintln!` or
//! [`TaskContext::log`].
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
use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::ops::ControlFlow;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use crate::outbox::{outbox, Outbox, TASK_BYTES};
use crate::plugin_tasks::{answer, run_handler, start_pool, InFlight, Job};
pub use crate::plugin_tasks::{current_task_queue_name, Handler, TaskContext};

/// What `serve` keeps between messages: the outgoing queue, the tasks in flight, whether
/// `shutdown` was asked, and the task threads' queue once `initialize` started them.
struct Session {
    out: Outbox,
    /// What the reading thread answered while it handles one read's lines: sent in one piece
    /// after them (one hand-off to the writer, one write), and before a shutdown's answer.
    held: Vec<u8>,
    in_flight: Arc<InFlight>,
    shutting_down: Arc<AtomicBool>,
    jobs: Option<mpsc::Sender<Job>>,
    /// `initialize`'s settings, for the tasks' contexts.
    settings: Arc<Map<String, Value>>,
    /// The queue and result backends' side, once `initialize` started it.
    backends: Option<BackendSession>,
}

impl Session {
    fn reply(&mut self, response: Response) {
        self.held
            .extend_from_slice(&Message::Response(response).to_line());
    }

    /// Sends what was held: written here when stdout takes it at once, else by the writer.
    fn release(&mut self) {
        if !self.held.is_empty() {
            self.out.send_or_write(std::mem::take(&mut self.held));
        }
    }
}

/// A plugin: its identity and its task handlers.
pub struct Plugin {
    name: String,
    version: String,
    tasks: Vec<TaskInfo>,
    handlers: HashMap<String, Handler>,
    /// Tasks run on the thread that reads requests (see [`Plugin::quick_task`]).
    quick: HashSet<String>,
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
            quick: HashSet::new(),
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
        self.quick.remove(name);
        self
    }

    /// Registers a task that is quick (microseconds, never blocking): it runs on the thread
    /// that reads requests, and its answer leaves with the others read at the same time, in
    /// one write: no task thread is woken, and the writer gets one piece per read. While it
    /// runs nothing else is read, and a `task.cancel` for it comes too late: keep anything
    /// slow or cancellable in [`Plugin::task`].
    pub fn quick_task<F>(self, name: &str, description: &str, handler: F) -> Self
    where
        F: Fn(&TaskContext, &TaskRunParams) -> Result<Value, TaskError> + Send + Sync + 'static,
    {
        let mut plugin = self.task(name, description, handler);
        plugin.quick.insert(name.to_string());
        plugin
    }

    /// Serves the protocol on stdin/stdout until the worker says `exit` or closes stdin.
    pub fn run(self) -> io::Result<()> {
        self.serve_on(
            io::stdin().lock(),
            io::stdout(),
            Some(Box::new(io::stdout())),
        )
    }

    /// Serves the protocol on any reader/writer pair (tests use pipes or buffers).
    pub fn serve<R: Read, W: Write + Send + 'static>(self, input: R, output: W) -> io::Result<()> {
        self.serve_on(input, output, None)
    }

    /// `serve`, where `direct` is the descriptor `output` writes to, if the reading thread may
    /// write its answers there itself (see `outbox`).
    fn serve_on<R: Read, W: Write + Send + 'static>(
        self,
        input: R,
        output: W,
        direct: Option<Box<dyn AsFd + Send + Sync>>,
    ) -> io::Result<()> {
        let (out, outbox) = outbox(TASK_BYTES, direct);
        let writer = thread::spawn(move || outbox.write_to(output));
        let mut session = Session {
            out,
            held: Vec::new(),
            in_flight: Arc::new(InFlight::default()),
            shutting_down: Arc::new(AtomicBool::new(false)),
            jobs: None,
            settings: Arc::default(),
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
                if self.on_line(&mut session, &line).is_break() {
                    session.release();
                    break 'read;
                }
            }
            session.release();
        }
        session.release();
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

    /// Handles one line from the worker; `Break` for `exit`.
    fn on_line(&self, session: &mut Session, line: &[u8]) -> ControlFlow<()> {
        // The hot path: a `task.run`'s params are parsed once, straight into their type.
        if let Some((id, params)) = crate::message::task_run_request(line) {
            let params = serde_json::from_str(params.get()).map_err(|e| e.to_string());
            if let Some(reply) = self.accept_task(id, params, session) {
                session.reply(reply);
            }
            return ControlFlow::Continue(());
        }
        match Message::parse(line) {
            Ok(Message::Request(req)) => self.on_request(session, req),
            Ok(Message::Notification(n)) => return self.on_notification(n, session),
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
        ControlFlow::Continue(())
    }

    /// Handles a request from the worker; every request is answered (tasks by their thread).
    fn on_request(&self, session: &mut Session, req: Request) {
        match req.method.as_str() {
            method::INITIALIZE => {
                let reply = match serde_json::from_value::<InitializeParams>(req.params) {
                    Ok(params) => {
                        session.backends = Some(self.backends.start(&params, session.out.clone()));
                        let threads = params.limits.concurrency.max(1);
                        session.settings = Arc::new(params.settings);
                        session.jobs = Some(start_pool(
                            threads,
                            session.out.clone(),
                            session.in_flight.clone(),
                            session.settings.clone(),
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
                let params = serde_json::from_value(req.params).map_err(|e| e.to_string());
                if let Some(reply) = self.accept_task(req.id, params, session) {
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
                // What this thread answered so far goes before the shutdown's answer.
                session.release();
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

    /// Queues a `task.run`, or runs it here if it is quick; returns the answer to send now (an
    /// error, or a quick task's result).
    fn accept_task(
        &self,
        id: Id,
        params: Result<TaskRunParams, String>,
        session: &Session,
    ) -> Option<Response> {
        let (jobs, in_flight) = (session.jobs.as_ref(), &session.in_flight);
        let params = match params {
            Ok(p) => p,
            Err(e) => {
                let err = ErrorObject::new(code::INVALID_PARAMS, e);
                return Some(Response::err(Some(id), err));
            }
        };
        let Some(jobs) = jobs else {
            let err = ErrorObject::new(code::INVALID_REQUEST, "task.run before initialize");
            return Some(Response::err(Some(id), err));
        };
        if session.shutting_down.load(Ordering::SeqCst) {
            let err = ErrorObject::new(code::SHUTTING_DOWN, "plugin is shutting down");
            return Some(Response::err(Some(id), err));
        }
        let Some(handler) = self.handlers.get(&params.task).cloned() else {
            let err = ErrorObject::new(code::UNKNOWN_TASK, format!("unknown task {}", params.task));
            return Some(Response::err(Some(id), err));
        };
        let cancelled = Arc::new(AtomicBool::new(false));
        if self.quick.contains(&params.task) {
            let job = Job {
                id,
                params,
                handler,
                cancelled,
            };
            let result = run_handler(&job, &session.settings, &session.out);
            return Some(answer(job.id, result));
        }
        in_flight
            .tasks
            .lock()
            .expect("in-flight lock poisoned")
            .insert(params.task_id.clone(), cancelled.clone());
        let job = Job {
            id,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::mpsc::Receiver;
    use std::sync::Mutex;

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
        let mut input = [
            json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{
                "protocol_version":"1.0","worker":{"name":"w","version":"0"},
                "plugin":{"name":"p","instance":0},"settings":{},
                "limits":{"max_line_bytes":1000,"concurrency":1}}}),
            json!({"jsonrpc":"2.0","method":"initialized"}),
            json!({"jsonrpc":"2.0","id":2,"method":"task.run","params":{"task_id":"a","task":"double","args":[21]}}),
            json!({"jsonrpc":"2.0","id":3,"method":"task.run","params":{"task_id":"b","task":"nope"}}),
            json!({"jsonrpc":"2.0","id":4,"method":"bogus"}),
            json!({"jsonrpc":"2.0","id":6,"method":"task.run","params":{"task_id":7,"task":"double"}}),
        ]
        .iter()
        .map(|v| format!("{v}\n"))
        .collect::<String>()
        .into_bytes();
        // Invalid UTF-8 in a string: not the fast path, but served all the same (decoded lossily).
        input.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"task.run\",\"params\":{\"task_id\":\"c\",\"task\":\"double\",\"args\":[4],\"kwargs\":{\"x\":\"\xff\"}}}\n");
        input.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"shutdown\"}\n");
        let (tx, rx) = mpsc::channel();
        Plugin::new("p", "1.0")
            .task("double", "doubles", |ctx, p| {
                ctx.stream(vec![json!("half-way")]);
                Ok(json!(p.args[0].as_i64().unwrap() * 2))
            })
            .serve(&input[..], ChannelWriter(tx, Vec::new()))
            .unwrap();
        let out = collect(rx);
        let by_id = |id: u64| out.iter().find(|m| m["id"] == json!(id)).cloned().unwrap();
        assert_eq!(by_id(1)["result"]["tasks"][0]["name"], "double");
        assert_eq!(by_id(2)["result"], 42);
        assert_eq!(by_id(3)["error"]["code"], code::UNKNOWN_TASK);
        assert_eq!(by_id(4)["error"]["code"], code::METHOD_NOT_FOUND);
        assert_eq!(by_id(6)["error"]["code"], code::INVALID_PARAMS);
        assert_eq!(by_id(7)["result"], 8);
        assert_eq!(by_id(5)["result"], Value::Null);
        let stream_at = out
            .iter()
            .position(|m| m["method"] == "task.stream")
            .unwrap();
        let result_at = out.iter().position(|m| m["id"] == 2).unwrap();
        assert!(stream_at < result_at, "stream items precede the result");
    }
    #[test]
    fn quick_tasks_run_on_the_reading_thread_and_are_answered_in_order_before_the_shutdown() {
        let input = [
            json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{
                "protocol_version":"1.0","worker":{"name":"w","version":"0"},
                "plugin":{"name":"p","instance":0},"settings":{},
                "limits":{"max_line_bytes":1000,"concurrency":2}}}),
            json!({"jsonrpc":"2.0","method":"initialized"}),
            json!({"jsonrpc":"2.0","id":2,"method":"task.run","params":{"task_id":"a","task":"inc","args":[1]}}),
            json!({"jsonrpc":"2.0","id":3,"method":"task.run","params":{"task_id":"b","task":"boom"}}),
            json!({"jsonrpc":"2.0","id":4,"method":"ping"}),
            json!({"jsonrpc":"2.0","id":5,"method":"task.run","params":{"task_id":"c","task":"inc","args":[5]}}),
            json!({"jsonrpc":"2.0","id":6,"method":"task.run","params":{"task_id":"d","task":"slow","args":[7]}}),
            json!({"jsonrpc":"2.0","id":7,"method":"shutdown"}),
        ]
        .iter()
        .map(|v| format!("{v}\n"))
        .collect::<String>();
        let reader = thread::current().id();
        let threads = Arc::new(Mutex::new(Vec::new()));
        let (seen, seen_slow) = (threads.clone(), threads.clone());
        let (tx, rx) = mpsc::channel();
        Plugin::new("p", "1.0")
            .quick_task("inc", "adds one", move |ctx, p| {
                seen.lock().unwrap().push(thread::current().id());
                ctx.progress(1, Some(1), None);
                Ok(json!(p.args[0].as_i64().unwrap() + 1))
            })
            .quick_task("boom", "panics", |_, _| panic!("quick and broken"))
            .task("slow", "echoes on a task thread", move |_, p| {
                seen_slow.lock().unwrap().push(thread::current().id());
                Ok(p.args[0].clone())
            })
            .serve(input.as_bytes(), ChannelWriter(tx, Vec::new()))
            .unwrap();
        let out = collect(rx);
        let at = |id: u64| out.iter().position(|m| m["id"] == json!(id)).unwrap();
        assert_eq!(out[at(2)]["result"], 2);
        assert_eq!(out[at(3)]["error"]["data"]["type"], "Panic", "{out:?}");
        assert_eq!(out[at(5)]["result"], 6);
        assert_eq!(out[at(6)]["result"], 7);
        assert!(
            at(2) < at(3) && at(3) < at(4) && at(4) < at(5),
            "in the order read"
        );
        assert!(
            at(5) < at(7) && at(6) < at(7),
            "all before the shutdown's answer"
        );
        let progress = out
            .iter()
            .position(|m| m["method"] == "task.progress")
            .unwrap();
        assert!(
            progress < at(2),
            "a quick task's progress precedes its answer"
        );
        let threads = threads.lock().unwrap();
        assert_eq!(
            threads[..2],
            [reader, reader],
            "quick tasks ran on the reading thread"
        );
        assert_ne!(threads[2], reader, "the other task ran on a task thread");
    }
}
