//! One plugin instance: one child process, its handshake, the tasks it runs, their time
//! limits, its health pings, and its stop or burial.
//!
//! Split in two. [`InstanceCore`] is every decision, as a state machine with no I/O, no
//! channel and no clock of its own: [`InstanceCore::handle`] takes one [`Wake`] (a command
//! from the pool, a stdout message, the exit, a timer, room for a held event, ...) and the
//! time ([`Now`]), changes the state by the [`Phase`] the process is in, queues lines for
//! stdin in its own buffer and leaves [`Effect`]s (a task's outcome, a report to the pool, an
//! event for a submitter, an offer) for its shell. `shell.rs` is the thin async loop that owns
//! the process and its pipes: it waits for the next wake-up, feeds it to the core, carries out
//! the effects and writes stdin; `ending.rs` ends the process. `tests/` tables every
//! transition of the core without a process, a channel loop or a runtime.
//!
//! It never retries anything: every task handed to it gets exactly one outcome from it, and
//! when the process ends the pool hears `Exited` after every task has had its outcome. It
//! knows nothing of where tasks come from. Logs, counters and the event bus (observers that
//! never answer back) are written directly.

mod deadlines;
mod ending;
mod io;
mod offers;
mod protocol;
mod queues;
mod shell;
mod stdin;
mod tasks;
#[cfg(test)]
mod tests;
mod wire;

pub use queues::{reports_capacity, InstanceHandle, Reports, TakesFinished};
pub use tasks::Job;

use super::now::Now;
use super::process::{self, StderrTail, StdoutEvent};
use crate::manifest::Manifest;
use crate::task::{Cancellation, EventSender, Failure, Outcome, TaskEvent, TaskId};
use ending::Crash;
use plugin_protocol::{method, Id, Message, Notification, Request, TaskOfferParams};
use queues::{task_commands, EVENT_ROOM};
use std::process::ExitStatus;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the pool tells an instance.
#[derive(Debug)]
pub enum Command {
    Run(Job),
    Cancel {
        task_id: String,
        cancel: Cancellation,
        /// Kill the process after `cancel_grace` if the task has not ended.
        escalate: bool,
    },
    /// Graceful stop: `shutdown`, `exit`, then SIGTERM and SIGKILL, each after `grace`.
    Stop {
        grace: Duration,
    },
    /// An `event` notification for a subscribing plugin: written if its stdin has room,
    /// else dropped and counted.
    Event {
        event: crate::events::Event,
        stats: Arc<crate::events::DeliveryStats>,
    },
}

/// What an instance tells its pool.
#[derive(Debug)]
pub struct InstanceEvent {
    pub slot: usize,
    pub generation: u64,
    pub kind: EventKind,
}

#[derive(Debug)]
pub enum EventKind {
    /// Handshake done; tasks may be sent.
    Ready { pid: u32, plugin_version: String },
    /// A task ended (its outcome is already delivered).
    Finished { task_id: TaskId, ok: bool },
    /// The process is gone and every task it held has its outcome.
    Exited {
        reason: ExitReason,
        ran_for: Duration,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExitReason {
    /// Stopped on request.
    Stopped,
    /// Died or was killed for misbehaving; worth a restart.
    Crashed(String),
    /// Handshake showed it can never work with this manifest; restarting will not help.
    Incompatible(String),
}

/// Everything needed to start one process of a plugin.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub manifest: Arc<Manifest>,
    pub index: u32,
    pub slot: usize,
    pub generation: u64,
    pub worker_name: String,
    pub max_line_bytes: usize,
    /// Shared with the pool for status reports.
    pub stderr: StderrTail,
    pub stray_lines: Arc<AtomicU64>,
    /// Shared with the pool: processes ended for a protocol violation.
    pub violations: Arc<AtomicU64>,
    /// The state directory, under which the plugin's data directory is made.
    pub state_dir: Option<std::path::PathBuf>,
    /// `plugin_user` of the worker config.
    pub plugin_user: Option<String>,
    /// Where `task.started` and `task.progress` are told.
    pub events: Arc<crate::events::EventBus>,
    /// Where its process gets a cgroup, if anywhere.
    pub cgroups: Option<Arc<crate::supervisor::cgroup::CgroupTree>>,
    /// Where a queue backend's offers go.
    pub offers: crate::supervisor::offer::OfferInbox,
}

/// Starts the instance's actor. The pool hears `Ready` or `Exited` on `events`.
pub fn start(spec: LaunchSpec, events: Reports) -> (InstanceHandle, tokio::task::JoinHandle<()>) {
    let reserved = task_commands(spec.manifest.concurrency as usize);
    let (tx, rx) = mpsc::channel(reserved + EVENT_ROOM);
    let handle = tokio::spawn(shell::run(spec, rx, events));
    (InstanceHandle { tx, reserved }, handle)
}

/// Everything the core is told, as one value.
enum Wake {
    Command(Option<Command>),
    Stdout(Option<StdoutEvent>),
    Exited(std::io::Result<ExitStatus>),
    /// A timer went off; `cpu_wait` is how long the process has waited for a CPU so far
    /// (`process::cpu_wait`), which a missed ping is judged by.
    Timer {
        cpu_wait: Option<Duration>,
    },
    /// Room for the event held back by backpressure; `None` if its submitter is gone.
    Room(Option<mpsc::OwnedPermit<Box<TaskEvent>>>),
    /// The submitter of a [`Effect::Deliver`]ed event had no room: the event is held.
    NoRoom(EventSender, Box<TaskEvent>),
    /// The pipe took this many bytes of what waits for stdin (or is gone).
    Written(std::io::Result<usize>),
    /// A line for stdin from outside the core (an offer's answer).
    Late(Option<Vec<u8>>),
    /// An offer handed on as [`Effect::Offer`] was not taken (no offer source): answer it.
    OfferNotTaken(Id, plugin_protocol::ErrorObject),
}

/// What the core leaves its shell to do, in order, before the next wake-up.
#[derive(Debug)]
enum Effect {
    /// The task's outcome to its submitter, then `Finished` to the pool.
    Finish(Job, Outcome),
    /// A task that never reached the process (it was not serving), back to its submitter
    /// as this failure; the pool is not told, it drops what it placed here on the exit.
    Refuse(Job, Failure),
    /// A report to the pool (`Ready`; the shell reports `Exited` itself, last).
    Report(EventKind),
    /// A progress or stream event for its task's submitter; with no room, it comes back as
    /// [`Wake::NoRoom`] and stdout is not read until it is delivered (backpressure).
    Deliver(EventSender, Box<TaskEvent>),
    /// A log line for a task that asked for its log: dropped when its submitter has no room.
    DeliverLog(EventSender, Box<TaskEvent>),
    /// The held event, through the room reserved for it.
    Release(mpsc::OwnedPermit<Box<TaskEvent>>, Box<TaskEvent>),
    /// The stderr reader's lines go to this task's submitter (a lone task that asked for
    /// its log), or to nobody.
    FollowLog(Option<mpsc::WeakSender<Box<TaskEvent>>>),
    /// A checked `task.offer` (request `Id`) for the offer inbox; its answer comes back as a
    /// [`Wake::Late`] line.
    Offer(Id, Box<TaskOfferParams>),
}

/// What the core is doing with its process.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// `initialize` was sent with this id; no task is sent before the reply.
    Handshake {
        id: u64,
        deadline: Instant,
    },
    Serving,
    /// `shutdown` was sent with this id: tasks in flight may finish until `deadline`.
    Draining {
        id: u64,
        deadline: Instant,
        grace: Duration,
    },
}

/// What follows a wake-up.
enum Step {
    Continue,
    /// The process must end now; its tasks are buried.
    Crash(Box<Crash>),
    /// Draining is over (shutdown answered, deadline passed, or the process went away):
    /// finish the stop sequence with `grace` per phase.
    Drained {
        grace: Duration,
        exited: bool,
    },
    /// Stdout reached its end; the shell finds out why (usually the process exited).
    StdoutClosed,
}

/// The instance's state: one process and the tasks it holds.
struct InstanceCore {
    spec: LaunchSpec,
    pid: u32,
    phase: Phase,
    /// What waits for the plugin's stdin; the shell writes it.
    out: stdin::StdinQueue,
    /// The stdin queue was full: the plugin stopped reading its stdin.
    stdin_full: bool,
    /// What the shell is to do, in order (see [`Effect`]).
    effects: Vec<Effect>,
    next_id: u64,
    running: crate::idmap::NumMap<tasks::Running>,
    by_task: crate::idmap::TaskMap<u64>,
    /// Outstanding ping id and when it times out.
    ping: Option<(u64, Instant)>,
    /// How long the process had waited for a CPU when the outstanding ping's deadline was
    /// last set (`process::cpu_wait`): what it waits more is added to the deadline.
    ping_cpu_wait: Option<std::time::Duration>,
    next_ping: Instant,
    /// The plugin declared `ping_while_busy`: it is pinged while tasks run, too. Otherwise
    /// only while idle, since a plugin that runs one task at a time cannot answer meanwhile.
    pings_while_busy: bool,
    /// An event its submitter has no room for yet; stdout is not read until it is delivered.
    held: Option<(EventSender, Box<TaskEvent>)>,
    /// Stray-line logging: window start, lines logged in it, lines only counted.
    stray_log: (Instant, u32, u64),
    started: Instant,
    /// The stderr reader follows a task (`Effect::FollowLog`): it needs pointing again when
    /// tasks change. While it follows nothing and no task asks for its log, it is left alone
    /// (a lock less per task).
    task_log_set: bool,
    /// Offers this process made that are not answered yet (its queue backend window): raised
    /// by each offer's reply when the shell makes it, lowered when it is answered.
    offers_out: Arc<std::sync::atomic::AtomicUsize>,
}

impl InstanceCore {
    /// The state for a process just started (`pid`) at `now`, before its handshake.
    fn new(spec: LaunchSpec, pid: u32, now: Instant) -> InstanceCore {
        InstanceCore {
            next_ping: now + spec.manifest.timeouts.ping_interval,
            phase: Phase::Serving,
            pid,
            out: stdin::StdinQueue::new(
                stdin::STDIN_LINES.max(2 * spec.manifest.concurrency as usize + 16),
            ),
            stdin_full: false,
            effects: Vec::new(),
            spec,
            next_id: 1,
            running: Default::default(),
            by_task: Default::default(),
            ping: None,
            ping_cpu_wait: None,
            pings_while_busy: false,
            held: None,
            stray_log: (now, 0, 0),
            started: now,
            task_log_set: false,
            offers_out: Arc::default(),
        }
    }

    fn name(&self) -> &str {
        &self.spec.manifest.name
    }

    fn send_line(&mut self, line: Vec<u8>) {
        if !self.out.push(&line) {
            self.stdin_full = true;
        }
    }

    /// What the pipe took; a pipe that is gone takes nothing more (the exit is on its way).
    fn on_written(&mut self, written: std::io::Result<usize>) {
        match written {
            Ok(n) if n > 0 => self.out.written(n),
            _ => self.out.discard(),
        }
    }

    fn request(&mut self, method: &str, params: impl serde::Serialize) -> u64 {
        let id = self.take_request_id();
        self.send_line(Message::Request(Request::new(Id::Num(id), method, params)).to_line());
        id
    }

    fn take_request_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }

    fn notify(&mut self, method: &str, params: impl serde::Serialize) {
        self.send_line(Message::Notification(Notification::new(method, params)).to_line());
    }

    /// Sends `initialize`: the first thing a process hears.
    fn begin_handshake(&mut self, now: Now) {
        let params = super::handshake::initialize_params(
            &self.spec.manifest,
            &self.spec.worker_name,
            self.spec.max_line_bytes,
            self.spec.index,
        );
        let id = self.request(method::INITIALIZE, params);
        let deadline = now.at() + self.spec.manifest.timeouts.init;
        self.phase = Phase::Handshake { id, deadline };
    }

    fn begin_drain(&mut self, grace: Duration, now: Now) {
        if matches!(self.phase, Phase::Draining { .. }) {
            return;
        }
        let id = self.request(method::SHUTDOWN, serde_json::Value::Null);
        self.phase = Phase::Draining {
            id,
            deadline: now.at() + grace,
            grace,
        };
    }

    /// Handles one wake-up at `now` according to the phase; what it leaves the shell to do
    /// is in `effects` (see [`take_effects`](Self::take_effects)) and the stdin queue.
    fn handle(&mut self, wake: Wake, now: Now) -> Step {
        match wake {
            Wake::Command(cmd) => self.on_command(cmd, now),
            Wake::Stdout(ev) => self.on_stdout(ev, now),
            Wake::Exited(status) => self.on_exit(status),
            Wake::Timer { cpu_wait } => self.on_timer(now, cpu_wait),
            Wake::Room(permit) => {
                self.release_held(permit, now);
                Step::Continue
            }
            Wake::NoRoom(to, event) => {
                self.held = Some((to, event));
                Step::Continue
            }
            Wake::Written(written) => {
                self.on_written(written);
                Step::Continue
            }
            Wake::Late(line) => {
                // Never `None`: the shell holds a sender itself.
                if let Some(line) = line {
                    self.send_line(line);
                }
                Step::Continue
            }
            Wake::OfferNotTaken(id, error) => {
                self.refuse_request(id, error);
                Step::Continue
            }
        }
    }

    /// The effects left so far, in order; the buffer stays with the caller, to be handed back
    /// with [`give_back_effects`](Self::give_back_effects) (no allocation per turn).
    fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    fn give_back_effects(&mut self, emptied: Vec<Effect>) {
        debug_assert!(emptied.is_empty());
        if self.effects.is_empty() {
            self.effects = emptied;
        }
    }

    fn on_command(&mut self, cmd: Option<Command>, now: Now) -> Step {
        let grace = self.spec.manifest.timeouts.shutdown_grace;
        match (cmd, self.phase) {
            // The pool dropped its handle: stop.
            (None, Phase::Draining { .. }) => {}
            (None, _) => self.begin_drain(grace, now),
            (Some(Command::Stop { grace }), _) => self.begin_drain(grace, now),
            (Some(Command::Run(job)), Phase::Serving) => self.start_task(job, now),
            (Some(Command::Run(job)), _) => {
                let why = "the plugin instance was not serving when the task reached it";
                self.effects
                    .push(Effect::Refuse(job, Failure::rejected(why)));
            }
            // Events never take the last quarter of the stdin queue: requests need it.
            (Some(Command::Event { event, stats }), Phase::Serving)
                if self.out.has_room_for_event() =>
            {
                // Has room: the line goes straight into the queue's buffer.
                match self.out.push_with(|out| {
                    stats.write_notification(&event, out);
                }) {
                    true => stats.sent(),
                    false => stats.unsent(),
                }
            }
            (Some(Command::Event { stats, .. }), Phase::Serving) => stats.unsent(),
            (Some(Command::Event { stats, .. }), _) => stats.count_drop(),
            (
                Some(Command::Cancel {
                    task_id,
                    cancel,
                    escalate,
                }),
                _,
            ) => {
                let grace = escalate.then_some(self.spec.manifest.timeouts.cancel_grace);
                self.cancel(&task_id, cancel, grace, now);
            }
        }
        Step::Continue
    }

    fn on_exit(&mut self, status: std::io::Result<ExitStatus>) -> Step {
        let how = status
            .map(|s| process::describe_exit(&s))
            .unwrap_or_else(|e| format!("could not be waited for: {e}"));
        match self.phase {
            Phase::Handshake { .. } => Crash::new(format!("{how} before answering `initialize`")),
            Phase::Serving => Crash::new(how),
            Phase::Draining { grace, .. } => {
                return Step::Drained {
                    grace,
                    exited: true,
                }
            }
        }
        .into()
    }

    /// The stdin queue filled: the plugin stopped reading its stdin.
    fn stdin_not_read(&self) -> Step {
        let waiting = self.out.capacity();
        let reason = format!(
            "broke the protocol: it stopped reading its stdin ({waiting} messages waiting for it)"
        );
        Crash::violation(reason).into()
    }

    /// The final step once stdout has closed, given how the process exited if it did
    /// (`None`: it had not within the shell's wait).
    fn stdout_closed(&self, exit: Option<&std::io::Result<ExitStatus>>) -> Step {
        let how = match exit {
            Some(Ok(status)) => process::describe_exit(status),
            _ => "closed its stdout".to_string(),
        };
        match self.phase {
            Phase::Draining { grace, .. } => Step::Drained {
                grace,
                exited: exit.is_some(),
            },
            Phase::Handshake { .. } => {
                Crash::new(format!("{how} before answering `initialize`")).into()
            }
            Phase::Serving => Crash::new(how).into(),
        }
    }
}
