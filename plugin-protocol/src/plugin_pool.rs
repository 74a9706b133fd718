//! The threads the SDK runs a backend's user code on (callbacks, stores), and the outlet its
//! protocol lines leave through: shared by `plugin_offers` and `plugin_backends`, knowing
//! neither.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::thread;

use crate::outbox::Outbox;

/// A job for a [`Pool`].
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Where protocol lines go: the writer thread's queue, until stdin closes.
pub(crate) struct Outlet(Mutex<Option<Outbox>>);

impl Outlet {
    pub(crate) fn new(out: Outbox) -> Outlet {
        Outlet(Mutex::new(Some(out)))
    }

    pub(crate) fn send(&self, line: Vec<u8>) {
        if let Some(out) = &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            // A closed queue means the worker is gone; nobody is left to tell.
            out.send(line);
        }
    }

    /// Lets go of the writer's queue, so that the writer thread can end.
    pub(crate) fn close(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

/// Threads running jobs from one queue, and a count of the jobs not done yet.
pub(crate) struct Pool {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    tally: Arc<Tally>,
}

/// How many jobs are queued or running, and whether the pool is closed; signalled on change.
#[derive(Default)]
struct Tally {
    counts: Mutex<Counts>,
    changed: Condvar,
}

#[derive(Default)]
struct Counts {
    pending: usize,
    closed: bool,
}

impl Tally {
    fn update(&self, change: impl FnOnce(&mut Counts)) {
        change(&mut self.counts.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_all();
    }
}

impl Pool {
    pub(crate) fn start(name: &str, threads: u32) -> Pool {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..threads.max(1) {
            let rx = rx.clone();
            spawn(name, move || loop {
                let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                match next {
                    Ok(job) => job(),
                    Err(_) => return, // closed and drained
                }
            });
        }
        Pool {
            jobs: Mutex::new(Some(tx)),
            tally: Arc::default(),
        }
    }

    /// Queues `job`, counted until it has run (a panic in it is logged). Dropped once the
    /// pool is closed: the worker is gone.
    pub(crate) fn run(&self, job: Job) {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = &*jobs else {
            return;
        };
        self.tally.update(|c| c.pending += 1);
        let tally = self.tally.clone();
        let sent = tx.send(Box::new(move || {
            guarded("a job of the SDK's", job);
            tally.update(|c| c.pending -= 1);
        }));
        if sent.is_err() {
            self.tally.update(|c| c.pending -= 1);
        }
    }

    /// Waits until every job queued so far has run, or the pool is closed.
    pub(crate) fn wait_idle(&self) {
        let mut counts = self
            .tally
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while counts.pending > 0 && !counts.closed {
            counts = self
                .tally
                .changed
                .wait(counts)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Queues nothing more; the threads end once they have run what is queued.
    pub(crate) fn close(&self) {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.tally.update(|c| c.closed = true);
    }
}

/// Starts a named thread; false (and logged) when the system refuses one.
pub(crate) fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> bool {
    let spawned = thread::Builder::new().name(name.to_string()).spawn(f);
    spawned
        .map_err(|e| eprintln!("cannot start a thread for {name}: {e}"))
        .is_ok()
}

/// Runs user code `f`, logging a panic (as `what`'s) instead of unwinding into the SDK.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(f))
        .map_err(|panic| eprintln!("{what} panicked: {}", panic_text(&*panic)))
        .ok()
}

/// A panic's message, when it has one.
pub(crate) fn panic_text(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}
