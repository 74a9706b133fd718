//! The SDK's task side: what a running task sees ([`TaskContext`]), the threads that run
//! tasks, and the tasks in flight that a shutdown waits for. `plugin` reads requests and hands
//! tasks here.

use crate::message::{Id, Message, Notification, Response};
use crate::methods::*;
use crate::plugin_error::TaskError;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use crate::outbox::Outbox;

/// A task handler: gets the task's context and params, returns its JSON result or an error.
pub type Handler =
    Arc<dyn Fn(&TaskContext, &TaskRunParams) -> Result<Value, TaskError> + Send + Sync>;

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
        self.out
            .send_from_task(Message::Notification(Notification::new(method, params)).to_line());
    }
}

pub(crate) struct Job {
    pub(crate) id: Id,
    pub(crate) params: TaskRunParams,
    pub(crate) handler: Handler,
    pub(crate) cancelled: Arc<AtomicBool>,
}

/// Tasks in flight, by task id, with a condvar signalled when one finishes while a shutdown
/// waits for them all (a signal is a syscall: no task pays it otherwise).
#[derive(Default)]
pub(crate) struct InFlight {
    pub(crate) tasks: Mutex<HashMap<String, Arc<AtomicBool>>>,
    finished: Condvar,
    /// Set (before the lock is taken) once a shutdown waits in `wait_empty`.
    waited_for: AtomicBool,
}

impl InFlight {
    pub(crate) fn wait_empty(&self) {
        self.waited_for.store(true, Ordering::SeqCst);
        let mut tasks = self.tasks.lock().expect("in-flight lock poisoned");
        while !tasks.is_empty() {
            tasks = self.finished.wait(tasks).expect("in-flight lock poisoned");
        }
    }
}

pub(crate) fn start_pool(
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
            let result = run_handler(&job, &settings, &out);
            let reply = answer(job.id, result);
            out.send_from_task(Message::Response(reply).to_line());
            let mut tasks = in_flight.tasks.lock().expect("in-flight lock poisoned");
            tasks.remove(&job.params.task_id);
            if in_flight.waited_for.load(Ordering::SeqCst) {
                in_flight.finished.notify_all();
            }
        });
    }
    tx
}

/// Runs a task's handler on this thread; a panic is the task's error.
pub(crate) fn run_handler(
    job: &Job,
    settings: &Arc<Map<String, Value>>,
    out: &Outbox,
) -> Result<Value, TaskError> {
    let ctx = TaskContext {
        task_id: job.params.task_id.clone(),
        delivery_info: job.params.delivery_info.clone().unwrap_or_default(),
        request: job.params.request.clone().unwrap_or_default(),
        cancelled: job.cancelled.clone(),
        settings: settings.clone(),
        out: out.clone(),
    };
    let queue = ctx.queue().map(str::to_string);
    let run = || with_current_queue(queue, || (job.handler)(&ctx, &job.params));
    catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "handler panicked".into());
        Err(TaskError::new("Panic", message))
    })
}

/// A task's answer to its `task.run`.
pub(crate) fn answer(id: Id, result: Result<Value, TaskError>) -> Response {
    match result {
        Ok(value) => Response::ok(id, value),
        Err(e) => Response::err(Some(id), e.to_error_object()),
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
