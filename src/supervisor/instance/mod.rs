//! One plugin instance: an actor that owns one child process, performs the handshake, runs
//! tasks on it, enforces time limits and health pings, and stops or buries it.
//!
//! Everything the actor waits on (a command from its pool, a stdout message, the child's exit,
//! a timer, room for an event its submitter has not read yet) becomes one [`Wake`], handled in
//! one place ([`Instance::handle`]) according to the [`Phase`] the process is in. It never
//! retries anything: every task handed to it gets exactly one outcome from it, and when the
//! process ends the pool hears `Exited` after every task has had its outcome. It knows nothing
//! of where tasks come from.

mod deadlines;
mod ending;
mod io;
mod offers;
mod protocol;
mod queues;
mod stdin;
mod tasks;
#[cfg(test)]
mod tests;
mod wire;

pub use queues::{reports_capacity, InstanceHandle, Reports, TakesFinished};
pub use tasks::Job;

use super::containment;
use super::process::{self, StderrTail, StdoutEvent};
use crate::manifest::Manifest;
use crate::task::{Cancellation, Failure, Outcome, TaskEvent, TaskId};
use ending::Crash;
use io::Io;
use plugin_protocol::{method, Id, Message, Notification, Request};
use queues::{task_commands, EVENT_ROOM};
use std::process::ExitStatus;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};

/// How long to wait for the stderr reader to catch up after the process died.
const STDERR_SETTLE: Duration = Duration::from_millis(250);

/// Commands taken in one turn after the one that woke the actor (a burst of placed tasks).
const COMMAND_BATCH: usize = 64;

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
    let handle = tokio::spawn(run(spec, rx, events));
    (InstanceHandle { tx, reserved }, handle)
}

/// At most this many stdout messages are handled in one turn of the actor. A plugin answers
/// a burst of tasks in one write; handling all of it before yielding left the plugin idle
/// until every answer was handled and every next task sent, and the two then took turns
/// (lockstep). Yielding after a part lets the submitters of the tasks it finished send their
/// next, whose lines reach the plugin while the rest is handled. Measured with 16 tasks in
/// flight (the supervisor bench): 115-130k tasks/s with no limit, 195-239k with 8.
const STDOUT_TURN: usize = 8;

/// Everything the actor waits on, as one value.
enum Wake {
    Command(Option<Command>),
    Stdout(Option<StdoutEvent>),
    Exited(std::io::Result<ExitStatus>),
    Timer,
    /// Room for the event held back by backpressure; `None` if its submitter is gone.
    Room(Option<mpsc::OwnedPermit<Box<TaskEvent>>>),
    /// The pipe took this many bytes of what waits for stdin (or is gone).
    Written(std::io::Result<usize>),
    /// A line for stdin from outside the actor (an offer's answer).
    Late(Option<Vec<u8>>),
}

/// What the actor is doing with its process.
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
    /// Stdout reached its end; the loop finds out why (usually the process exited).
    StdoutClosed,
}

/// The actor's state: one process and the tasks it holds.
struct Instance {
    spec: LaunchSpec,
    pid: u32,
    phase: Phase,
    /// What waits for the plugin's stdin; the actor writes it itself.
    out: stdin::StdinQueue,
    /// Where lines for stdin come from outside the actor (offer answers, see `OfferReply`).
    late: mpsc::Sender<Vec<u8>>,
    /// The stdin queue was full: the plugin stopped reading its stdin.
    stdin_full: bool,
    events: Reports,
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
    held: Option<(crate::task::EventSender, Box<TaskEvent>)>,
    /// Stray-line logging: window start, lines logged in it, lines only counted.
    stray_log: (Instant, u32, u64),
    started: Instant,
    /// Where the stderr reader sends lines of a lone task that asked for its log.
    task_log: crate::supervisor::process::TaskLog,
    /// `task_log` points at a task: it needs setting again when tasks change. While it points
    /// at nothing and no task asks for its log, it is left alone (a lock less per task).
    task_log_set: bool,
    /// Offers this process made that are not answered yet (its queue backend window).
    offers_out: Arc<std::sync::atomic::AtomicUsize>,
}

async fn run(spec: LaunchSpec, mut commands: mpsc::Receiver<Command>, events: Reports) {
    let started = Instant::now();
    let (mut child, mut io) = match Io::start(&spec) {
        Ok(started) => started,
        Err(reason) => {
            // Nothing of this process ran, so every failure to spawn counts as a crash.
            refuse_waiting(&mut commands, &reason);
            let kind = EventKind::Exited {
                reason: ExitReason::Crashed(reason),
                ran_for: Duration::ZERO,
            };
            let (slot, generation) = (spec.slot, spec.generation);
            events.report(InstanceEvent {
                slot,
                generation,
                kind,
            });
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    let mut inst = Instance::new(
        spec,
        pid,
        io.late_tx.clone(),
        events,
        io.task_log.clone(),
        started,
    );
    tracing::debug!(plugin = %inst.name(), instance = inst.spec.index, pid = inst.pid, "plugin process started");
    inst.begin_handshake();
    let step = inst.drive(&mut child, &mut io, &mut commands).await;
    let reason = inst.end(step, &mut child, io).await;
    refuse_waiting(
        &mut commands,
        "the plugin instance ended before the task could start",
    );
    inst.report(EventKind::Exited {
        reason,
        ran_for: inst.started.elapsed(),
    });
}

/// Tasks the pool sent after the instance decided to end never reached the process: they go
/// back as `Rejected`, which the dispatcher reruns without counting an attempt.
fn refuse_waiting(commands: &mut mpsc::Receiver<Command>, reason: &str) {
    commands.close();
    while let Ok(cmd) = commands.try_recv() {
        if let Command::Run(job) = cmd {
            job.finish(Outcome::Failure(Failure::rejected(reason)));
        }
    }
}

impl Instance {
    /// The actor's state for a process just started (`pid`), before its handshake: lines for
    /// its stdin wait in `out` (offer answers come through `late`), reports to its pool go to
    /// `events`. No I/O of its own, so the tests build one without a process.
    fn new(
        spec: LaunchSpec,
        pid: u32,
        late: mpsc::Sender<Vec<u8>>,
        events: Reports,
        task_log: process::TaskLog,
        started: Instant,
    ) -> Instance {
        Instance {
            next_ping: Instant::now() + spec.manifest.timeouts.ping_interval,
            phase: Phase::Serving,
            pid,
            out: stdin::StdinQueue::new(
                stdin::STDIN_LINES.max(2 * spec.manifest.concurrency as usize + 16),
            ),
            late,
            stdin_full: false,
            spec,
            events,
            next_id: 1,
            running: Default::default(),
            by_task: Default::default(),
            ping: None,
            ping_cpu_wait: None,
            pings_while_busy: false,
            held: None,
            stray_log: (Instant::now(), 0, 0),
            started,
            task_log,
            task_log_set: false,
            offers_out: Arc::default(),
        }
    }
}

impl Instance {
    fn name(&self) -> &str {
        &self.spec.manifest.name
    }

    fn report(&self, kind: EventKind) {
        let event = InstanceEvent {
            slot: self.spec.slot,
            generation: self.spec.generation,
            kind,
        };
        self.events.report(event);
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

    fn begin_handshake(&mut self) {
        let params = super::handshake::initialize_params(
            &self.spec.manifest,
            &self.spec.worker_name,
            self.spec.max_line_bytes,
            self.spec.index,
        );
        let id = self.request(method::INITIALIZE, params);
        let deadline = Instant::now() + self.spec.manifest.timeouts.init;
        self.phase = Phase::Handshake { id, deadline };
    }

    fn begin_drain(&mut self, grace: Duration) {
        if matches!(self.phase, Phase::Draining { .. }) {
            return;
        }
        let id = self.request(method::SHUTDOWN, serde_json::Value::Null);
        self.phase = Phase::Draining {
            id,
            deadline: Instant::now() + grace,
            grace,
        };
    }

    /// The one event loop: waits for the next wake-up, handles it, until a final step.
    /// The exit watch and the timer live across iterations: re-creating them per event would
    /// cost a `waitpid` and a timer registration for every message.
    async fn drive(
        &mut self,
        child: &mut Child,
        io: &mut Io,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Step {
        let Io {
            stdout,
            stdin,
            late_rx,
            ..
        } = io;
        let mut exited = std::pin::pin!(child.wait());
        let first = self.next_deadline();
        let mut timer = std::pin::pin!(sleep_until(first.unwrap_or_else(Instant::now)));
        let mut commands_open = true;
        loop {
            let deadline = self.next_deadline();
            if let Some(at) = deadline.filter(|&at| at != timer.deadline()) {
                timer.as_mut().reset(at);
            }
            let room = self.held.as_ref().map(|(tx, _)| tx.clone());
            let reading = room.is_none();
            let wake = tokio::select! {
                cmd = commands.recv(), if commands_open => Wake::Command(cmd),
                ev = process::next_stdout_event(stdout), if reading => Wake::Stdout(Some(ev)),
                status = &mut exited => Wake::Exited(status),
                _ = &mut timer, if deadline.is_some() => Wake::Timer,
                permit = async move { room?.reserve_owned().await.ok() }, if !reading => Wake::Room(permit),
                written = stdin.write(self.out.pending()), if !self.out.is_empty() => Wake::Written(written),
                line = late_rx.recv() => Wake::Late(line),
            };
            commands_open &= !matches!(wake, Wake::Command(None));
            let batch = matches!(wake, Wake::Stdout(Some(_)));
            let commanded = matches!(wake, Wake::Command(Some(_)));
            let mut step = self.handle(wake);
            // Take the stdout messages already read in one go, while nothing holds them back,
            // up to STDOUT_TURN: then the turn ends and the actor yields (below).
            let (mut taken, mut turn_full) = (1, false);
            while batch && matches!(step, Step::Continue) && self.held.is_none() {
                if taken == STDOUT_TURN {
                    turn_full = true;
                    break;
                }
                match process::ready_now(process::next_stdout_event(stdout)) {
                    Some(ev) => step = self.handle(Wake::Stdout(Some(ev))),
                    None => break,
                }
                taken += 1;
            }
            // Likewise the commands already sent: their lines go out in one write.
            let mut more = if commanded { COMMAND_BATCH } else { 0 };
            while more > 0 && matches!(step, Step::Continue) {
                let Ok(cmd) = commands.try_recv() else { break };
                step = self.handle(Wake::Command(Some(cmd)));
                more -= 1;
            }
            // What this turn queued goes out now, in one write, if the pipe takes it.
            if !self.out.is_empty() {
                if let Some(written) = process::ready_now(stdin.write(self.out.pending())) {
                    self.on_written(written);
                }
            }
            match step {
                Step::Continue if self.stdin_full => {
                    let reason = format!(
                        "broke the protocol: it stopped reading its stdin ({} messages waiting for it)",
                        self.out.capacity()
                    );
                    return Crash::violation(reason).into();
                }
                // The submitters of the tasks just finished run before the rest is read.
                Step::Continue if turn_full => tokio::task::yield_now().await,
                Step::Continue => {}
                Step::StdoutClosed => return self.stdout_closed(exited.as_mut()).await,
                final_step => return final_step,
            }
        }
    }

    /// The final step once stdout has closed: usually the process is exiting, so its exit
    /// status is preferred as the reason.
    async fn stdout_closed(
        &self,
        exited: std::pin::Pin<&mut impl std::future::Future<Output = std::io::Result<ExitStatus>>>,
    ) -> Step {
        let status = timeout(Duration::from_millis(500), exited).await;
        let how = match &status {
            Ok(Ok(status)) => process::describe_exit(status),
            _ => "closed its stdout".to_string(),
        };
        match self.phase {
            Phase::Draining { grace, .. } => Step::Drained {
                grace,
                exited: status.is_ok(),
            },
            Phase::Handshake { .. } => {
                Crash::new(format!("{how} before answering `initialize`")).into()
            }
            Phase::Serving => Crash::new(how).into(),
        }
    }

    /// Handles one wake-up according to the phase.
    fn handle(&mut self, wake: Wake) -> Step {
        match wake {
            Wake::Command(cmd) => self.on_command(cmd),
            Wake::Stdout(ev) => self.on_stdout(ev),
            Wake::Exited(status) => self.on_exit(status),
            Wake::Timer => self.on_timer(),
            Wake::Room(permit) => {
                self.release_held(permit);
                Step::Continue
            }
            Wake::Written(written) => {
                self.on_written(written);
                Step::Continue
            }
            Wake::Late(line) => {
                // Never `None`: the actor holds a sender itself.
                if let Some(line) = line {
                    self.send_line(line);
                }
                Step::Continue
            }
        }
    }

    fn on_command(&mut self, cmd: Option<Command>) -> Step {
        let grace = self.spec.manifest.timeouts.shutdown_grace;
        match (cmd, self.phase) {
            // The pool dropped its handle: stop.
            (None, Phase::Draining { .. }) => {}
            (None, _) => self.begin_drain(grace),
            (Some(Command::Stop { grace }), _) => self.begin_drain(grace),
            (Some(Command::Run(job)), Phase::Serving) => self.start_task(job),
            (Some(Command::Run(job)), _) => job.finish(Outcome::Failure(Failure::rejected(
                "the plugin instance was not serving when the task reached it",
            ))),
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
                self.cancel(&task_id, cancel, grace);
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
}
