//! A queue backend in the Rust SDK (protocol 1.5, PROTOCOL.md §4a): the [`Offer`]s a plugin
//! makes of the tasks in its own queue, the [`Offers`] handle it makes them through, and the
//! session that keeps them within the window, hands the worker's answers to their callbacks,
//! offers again what the worker did not take, and drains on `shutdown`.
//!
//! This module never touches stdio and never imports `plugin`: `plugin_backends` feeds it the
//! worker's messages and gives it the `Outlet` it writes through. Locking rule: no user code
//! (the offers function, a callback) runs while the state lock is held.

use crate::backends::{OfferProgressParams, OfferStreamParams, TaskFinal, TaskOfferParams};
use crate::message::{request_line, Id, Notification, Response};
use crate::methods::{code, method};
use crate::plugin_pool::{guarded, panic_text, spawn, Outlet, Pool};
use serde_json::{Map, Value};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long an offer the worker did not take (`-32002`, `-32005`) waits before it goes again.
const REOFFER_AFTER: Duration = Duration::from_secs(1);

type OutcomeFn = Box<dyn FnOnce(TaskFinal) + Send>;
type ReleaseFn = Box<dyn FnOnce(String) + Send>;
type ProgressFn = Arc<Mutex<dyn FnMut(u64, Option<u64>, Option<&str>) + Send>>;
type StreamFn = Arc<Mutex<dyn FnMut(Vec<Value>) + Send>>;
/// A queue backend's offers function: called once with the window and the [`Offers`].
pub(crate) type OffersFn = Box<dyn FnOnce(u32, &Offers) + Send>;

/// One task from the plugin's queue, for [`Offers::offer`]: `task.offer`'s params and what to
/// call when the worker answers.
///
/// Every offer given to `offer` ends in exactly one call: `on_outcome` with its final state
/// (record it and ack the task in the backend now, and only now), or `on_release` with why it
/// did not run (do not ack it). The one exception: an offer sent but not answered when the
/// worker goes away (stdin closes) gets neither; the task is simply not acked, and the
/// backend offers it again later.
pub struct Offer {
    params: TaskOfferParams,
    on_outcome: Option<OutcomeFn>,
    on_progress: Option<ProgressFn>,
    on_stream: Option<StreamFn>,
    on_release: Option<ReleaseFn>,
}

impl Offer {
    /// An offer of a task named `task`: no args, a fresh UUID4 as its `task_id`, no limits.
    pub fn new(task: impl Into<String>) -> Self {
        Offer {
            params: TaskOfferParams {
                task_id: uuid4(),
                task: task.into(),
                args: Vec::new(),
                kwargs: Map::new(),
                time_limit: Default::default(),
                progress: false,
                stream: false,
            },
            on_outcome: None,
            on_progress: None,
            on_stream: None,
            on_release: None,
        }
    }

    /// The backend's id for the task (at most 255 bytes, unique across the worker's sources:
    /// prefix small integers); the task's id in the worker too.
    pub fn task_id(mut self, task_id: impl Into<String>) -> Self {
        self.params.task_id = task_id.into();
        self
    }

    pub fn args(mut self, args: Vec<Value>) -> Self {
        self.params.args = args;
        self
    }

    pub fn kwargs(mut self, kwargs: Map<String, Value>) -> Self {
        self.params.kwargs = kwargs;
        self
    }

    /// When the worker asks the running task to stop (`task.cancel`).
    pub fn soft_time_limit(mut self, limit: Duration) -> Self {
        self.params.time_limit.soft = Some(limit.as_secs_f64());
        self
    }

    /// When the worker kills the process running the task.
    pub fn hard_time_limit(mut self, limit: Duration) -> Self {
        self.params.time_limit.hard = Some(limit.as_secs_f64());
        self
    }

    /// Called with the task's final state (`SUCCESS` with `result`, `FAILURE` with `error`)
    /// on a callback thread; the reader goes on meanwhile. Without it the outcome is only
    /// dropped, and the task is never acked.
    pub fn on_outcome(mut self, f: impl FnOnce(TaskFinal) + Send + 'static) -> Self {
        self.on_outcome = Some(Box::new(f));
        self
    }

    /// Asks for the running task's progress: `f(done, total, message)` for each
    /// `offer.progress`, in order, on the thread that reads stdin: keep it quick.
    pub fn on_progress(
        mut self,
        f: impl FnMut(u64, Option<u64>, Option<&str>) + Send + 'static,
    ) -> Self {
        self.params.progress = true;
        self.on_progress = Some(Arc::new(Mutex::new(f)));
        self
    }

    /// Asks for the running task's partial results: `f(items)` for each `offer.stream`, in
    /// order, on the thread that reads stdin: keep it quick.
    pub fn on_stream(mut self, f: impl FnMut(Vec<Value>) + Send + 'static) -> Self {
        self.params.stream = true;
        self.on_stream = Some(Arc::new(Mutex::new(f)));
        self
    }

    /// Called with the reason when the offer is given up without running: the worker refused
    /// it for good (its message, e.g. a malformed offer), or the plugin is shutting down (the
    /// worker's message, or `"shutting down"` for an offer waiting to go again or given to
    /// [`Offers::offer`] too late). On a callback thread, or, in the last case, the caller's.
    pub fn on_release(mut self, f: impl FnOnce(String) + Send + 'static) -> Self {
        self.on_release = Some(Box::new(f));
        self
    }

    /// The `task.offer` params this offer sends.
    pub fn params(&self) -> &TaskOfferParams {
        &self.params
    }

    /// Calls `on_release` (user code: no lock may be held).
    fn release(self, reason: String) {
        if let Some(f) = self.on_release {
            let task_id = self.params.task_id;
            let what = format!("on_release of the offer of task {task_id}");
            guarded(&what, move || f(reason));
        }
    }
}

impl fmt::Debug for Offer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Offer")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// [`Offers::offer`]'s error: the plugin is shutting down (or the worker is gone), so nothing
/// more is offered. The offer was handed to its `on_release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the plugin is shutting down: it offers no more tasks")
    }
}

impl std::error::Error for Closed {}

/// A queue backend's way to the worker, lent to the function registered with
/// [`Plugin::offers`](crate::plugin::Plugin::offers).
///
/// A new offer goes out only while fewer than `window` offers are unanswered and fewer than
/// `window` wait to be offered again (an offer the worker did not take, `-32002` or
/// `-32005`, goes again a second later, before any new one, holding no place meanwhile): so
/// a worker that takes nothing never makes the plugin drain its queue into memory.
pub struct Offers {
    shared: Arc<Shared>,
}

impl Offers {
    /// How many offers may be unanswered at once (`initialize`'s `queue_backend.window`).
    pub fn window(&self) -> u32 {
        self.shared.window
    }

    /// Sends `offer` as a `task.offer`, first waiting until the window has room. Once
    /// `shutdown` began (or stdin closed) it sends nothing: it calls the offer's `on_release`
    /// with `"shutting down"` and returns [`Closed`], as every later call does; return from
    /// the offers function then (`shutdown` is answered once it has).
    pub fn offer(&self, offer: Offer) -> Result<(), Closed> {
        let mut state = self.shared.lock();
        loop {
            if state.phase != Phase::Open {
                drop(state);
                offer.release("shutting down".into());
                return Err(Closed);
            }
            if state.room_for_new(self.shared.window, Instant::now()) {
                self.shared.send_offer(&mut state, offer);
                return Ok(());
            }
            state = self.shared.wait(state);
        }
    }

    /// Waits until an offer would go out at once; false once shutdown began. Call it before
    /// taking a task from the queue, so that none is taken only to wait.
    pub fn wait_for_room(&self) -> bool {
        let mut state = self.shared.lock();
        while state.phase == Phase::Open && !state.room_for_new(self.shared.window, Instant::now())
        {
            state = self.shared.wait(state);
        }
        state.phase == Phase::Open
    }

    /// Sleeps up to `duration` (the queue is empty: poll it again later), waking early when
    /// shutdown begins; false once it began.
    pub fn pause(&self, duration: Duration) -> bool {
        let deadline = Instant::now() + duration;
        let mut state = self.shared.lock();
        while state.phase == Phase::Open {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            state = self.shared.wait_timeout(state, left);
        }
        state.phase == Phase::Open
    }

    /// True once shutdown began (or stdin closed): [`Offers::offer`] sends nothing more.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().phase != Phase::Open
    }
}

/// The queue backend's side of one session. Cheap to clone.
#[derive(Clone)]
pub(crate) struct OfferSession {
    shared: Arc<Shared>,
}

impl OfferSession {
    /// A session offering through `offers` with `window` places (at least 1).
    pub(crate) fn new(offers: OffersFn, window: u32, outlet: Arc<Outlet>) -> OfferSession {
        let window = window.max(1);
        OfferSession {
            shared: Arc::new(Shared {
                window,
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                outlet,
                callbacks: Pool::start("offer callbacks", window.min(8)),
                offers: Mutex::new(Some(offers)),
            }),
        }
    }

    /// `initialized`: the offers function starts on a thread of its own, and the thread that
    /// offers again what the worker did not take starts with it. Once at most.
    pub(crate) fn start(&self) {
        let taken = self
            .shared
            .offers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(offers) = taken else {
            return;
        };
        let shared = self.shared.clone();
        // Marked before it starts, so that a shutdown right after waits for it.
        shared.lock().offering = true;
        let offering = spawn("offers", move || {
            let handle = Offers { shared };
            let window = handle.window();
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| offers(window, &handle))) {
                // It offers nothing again; restarted, the plugin calls it afresh, and its
                // unacked tasks come back from the queue.
                eprintln!(
                    "the offers function panicked ({}): the plugin exits so that the worker restarts it",
                    panic_text(&*panic)
                );
                std::process::exit(1);
            }
            handle.shared.lock().offering = false;
            handle.shared.changed.notify_all();
        });
        if !offering {
            self.shared.lock().offering = false;
        }
        let shared = self.shared.clone();
        spawn("re-offers", move || shared.reoffer_loop());
    }

    /// A response from the worker: the answer to one of our offers.
    pub(crate) fn answered(&self, response: Response) {
        let Some(Id::Num(id)) = response.id else {
            return eprintln!(
                "ignoring a response with id {:?}: no offer has it",
                response.id
            );
        };
        let shared = &self.shared;
        let mut state = shared.lock();
        let Some(offer) = state.unanswered.remove(&id) else {
            return eprintln!("ignoring an answer to request {id}: no offer waits for it");
        };
        let task_id = offer.params.task_id.clone();
        if state.by_task.get(&task_id) == Some(&id) {
            state.by_task.remove(&task_id);
        }
        let reason = match response.result {
            Ok(result) => match serde_json::from_value::<TaskFinal>(result) {
                Ok(outcome) => {
                    if let Some(f) = offer.on_outcome {
                        let what = format!("on_outcome of the offer of task {task_id}");
                        shared.callbacks.run(Box::new(move || {
                            guarded(&what, move || f(outcome));
                        }));
                    }
                    return shared.changed.notify_all();
                }
                Err(e) => {
                    eprintln!("offer of task {task_id} dropped: its answer is no final state: {e}");
                    format!("unreadable task.offer result: {e}")
                }
            },
            Err(e) if e.code == code::SHUTTING_DOWN || e.code == code::OFFER_WINDOW_FULL => {
                if state.phase == Phase::Open {
                    state
                        .reoffers
                        .push_back((Instant::now() + REOFFER_AFTER, offer));
                    return shared.changed.notify_all();
                }
                e.message
            }
            Err(e) => {
                eprintln!(
                    "the worker refused the offer of task {task_id} for good ({}: {}): released",
                    e.code, e.message
                );
                e.message
            }
        };
        shared
            .callbacks
            .run(Box::new(move || offer.release(reason)));
        shared.changed.notify_all();
    }

    /// `offer.progress` and `offer.stream`: to the callbacks of the unanswered offer they name
    /// (best effort: one that is not, or did not ask, is ignored).
    pub(crate) fn notified(&self, n: Notification) {
        match n.method.as_str() {
            method::OFFER_PROGRESS => match serde_json::from_value::<OfferProgressParams>(n.params)
            {
                Ok(p) => {
                    if let Some(f) = self.callback(&p.task_id, |o| o.on_progress.clone()) {
                        guarded("on_progress", || {
                            let mut f = f.lock().unwrap_or_else(PoisonError::into_inner);
                            f(p.done, p.total, p.message.as_deref())
                        });
                    }
                }
                Err(e) => eprintln!("ignoring an offer.progress whose params do not parse: {e}"),
            },
            method::OFFER_STREAM => match serde_json::from_value::<OfferStreamParams>(n.params) {
                Ok(p) => {
                    if let Some(f) = self.callback(&p.task_id, |o| o.on_stream.clone()) {
                        guarded("on_stream", || {
                            f.lock().unwrap_or_else(PoisonError::into_inner)(p.items)
                        });
                    }
                }
                Err(e) => eprintln!("ignoring an offer.stream whose params do not parse: {e}"),
            },
            _ => {}
        }
    }

    /// A callback of the unanswered offer of `task_id`, picked while the lock is held.
    fn callback<T>(&self, task_id: &str, pick: impl FnOnce(&Offer) -> Option<T>) -> Option<T> {
        let state = self.shared.lock();
        let id = state.by_task.get(task_id)?;
        pick(state.unanswered.get(id)?)
    }

    /// `shutdown` arrived: offer nothing more; release the offers waiting to go again.
    pub(crate) fn begin_shutdown(&self) {
        let shared = &self.shared;
        let mut state = shared.lock();
        if state.phase != Phase::Open {
            return;
        }
        state.phase = Phase::ShuttingDown;
        for (_, offer) in std::mem::take(&mut state.reoffers) {
            shared
                .callbacks
                .run(Box::new(move || offer.release("shutting down".into())));
        }
        shared.changed.notify_all();
    }

    /// Waits until the offers function has returned, every offer is answered and every
    /// callback has run (or stdin closed): then `shutdown` may be answered.
    pub(crate) fn wait_drained(&self) {
        let shared = &self.shared;
        let mut state = shared.lock();
        while state.phase != Phase::Closed && (state.offering || !state.unanswered.is_empty()) {
            state = shared.wait(state);
        }
        drop(state);
        // Every answer queued its callback before it left `unanswered`.
        shared.callbacks.wait_idle();
    }

    /// Stdin closed: the worker is gone. Offer nothing more and call nothing more.
    pub(crate) fn close(&self) {
        let dropped = {
            let mut state = self.shared.lock();
            state.phase = Phase::Closed;
            std::mem::take(&mut state.reoffers)
        };
        self.shared.changed.notify_all();
        self.shared.callbacks.close();
        drop(dropped);
    }
}

/// Open, then shutting down (`shutdown` arrived), then closed (stdin closed). Never back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Open,
    ShuttingDown,
    Closed,
}

/// What the offering thread, the re-offer thread, the reader and the callbacks share.
#[derive(Default)]
struct State {
    phase: Phase,
    /// The offers function is running.
    offering: bool,
    /// The id of our last `task.offer` request.
    last_id: u64,
    /// Offers sent and not answered yet, by request id: the window places taken.
    unanswered: HashMap<u64, Offer>,
    /// The unanswered offer of each task id, for `offer.progress` and `offer.stream`.
    by_task: HashMap<String, u64>,
    /// Offers the worker did not take, each with when it may go again, in that order.
    reoffers: VecDeque<(Instant, Offer)>,
}

impl State {
    /// Whether a new offer may go out now: a place is free, not too many wait to go again,
    /// and none of those is due (they go first).
    fn room_for_new(&self, window: u32, now: Instant) -> bool {
        let window = window as usize;
        self.unanswered.len() < window
            && self.reoffers.len() < window
            && self.reoffers.front().is_none_or(|(due, _)| *due > now)
    }
}

struct Shared {
    window: u32,
    state: Mutex<State>,
    /// Signalled on every change of `state` that someone may wait for.
    changed: Condvar,
    outlet: Arc<Outlet>,
    callbacks: Pool,
    /// The offers function until `initialized` starts it.
    offers: Mutex<Option<OffersFn>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No user code runs under this lock, so a poisoned one is a bug of the SDK's.
        self.state.lock().expect("offer state lock poisoned")
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(state).expect("offer state lock poisoned")
    }

    fn wait_timeout<'a>(&self, state: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        let waited = self.changed.wait_timeout(state, d);
        waited.expect("offer state lock poisoned").0
    }

    /// Sends `offer` in a window place the caller found free. Registered before it is
    /// written: the answer may come back at once.
    fn send_offer(&self, state: &mut State, offer: Offer) {
        state.last_id += 1;
        let id = state.last_id;
        let line = request_line(&Id::Num(id), method::TASK_OFFER, &offer.params);
        state.by_task.insert(offer.params.task_id.clone(), id);
        state.unanswered.insert(id, offer);
        self.outlet.send(line);
    }

    /// Sends the offers the worker did not take again, once due and a place is free, until
    /// shutdown.
    fn reoffer_loop(&self) {
        let mut state = self.lock();
        while state.phase == Phase::Open {
            let now = Instant::now();
            let due_in = state
                .reoffers
                .front()
                .map(|(due, _)| due.saturating_duration_since(now));
            match due_in {
                Some(d) if d.is_zero() && state.unanswered.len() < self.window as usize => {
                    let (_, offer) = state.reoffers.pop_front().expect("a front was seen");
                    self.send_offer(&mut state, offer);
                    self.changed.notify_all();
                }
                Some(d) if !d.is_zero() => state = self.wait_timeout(state, d),
                _ => state = self.wait(state),
            }
        }
    }
}

/// A random (version 4) UUID as Python's `str(uuid.uuid4())` writes it. The randomness is the
/// standard library's random hash keys: unique, not secret.
fn uuid4() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u64(salt);
        h.finish()
    };
    let mut v = (u128::from(half(1)) << 64) | u128::from(half(2));
    v = (v & !(0xf << 76)) | (0x4 << 76); // version 4
    v = (v & !(0x3 << 62)) | (0x2 << 62); // the RFC 4122 variant
    let hex = format!("{v:032x}");
    let parts = [
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..],
    ];
    parts.join("-")
}
