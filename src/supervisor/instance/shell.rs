//! The instance's thin async shell: it starts the process, waits for the next wake-up (a
//! command, a stdout message, the exit, a timer, room for a held event, stdin written, an
//! offer's answer), feeds it to the [`InstanceCore`], carries out the [`Effect`]s it left and
//! writes what waits for stdin. No decision is made here; `ending.rs` ends the process.

use super::io::Io;
use super::{process, Command, Effect, EventKind, ExitReason, InstanceCore, InstanceEvent};
use super::{LaunchSpec, Reports, Step, Wake};
use crate::supervisor::now::Now;
use crate::supervisor::offer::{not_taken, Offer, OfferReply};
use crate::task::{Failure, Outcome, TaskEvent};
use plugin_protocol::{Id, TaskOfferParams};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};

/// Commands taken in one turn after the one that woke the shell (a burst of placed tasks).
const COMMAND_BATCH: usize = 64;

/// At most this many stdout messages are handled in one turn. A plugin answers a burst of
/// tasks in one write; handling all of it before yielding left the plugin idle until every
/// answer was handled and every next task sent, and the two then took turns (lockstep).
/// Yielding after a part lets the submitters of the tasks it finished send their next, whose
/// lines reach the plugin while the rest is handled. Measured with 16 tasks in flight (the
/// supervisor bench): 115-130k tasks/s with no limit, 195-239k with 8.
const STDOUT_TURN: usize = 8;

/// The core and what its effects are carried out on.
pub(super) struct Shell {
    pub(super) core: InstanceCore,
    /// Where the pool hears of its instance.
    reports: Reports,
    /// Where the stderr reader sends lines of a lone task that asked for its log.
    task_log: process::TaskLog,
    /// Lines for stdin from outside the shell (offer answers) come back through this.
    late: mpsc::Sender<Vec<u8>>,
}

/// Starts the process and runs it until it has ended and every task it held has its outcome;
/// the pool hears `Ready`, each task's `Finished`, then `Exited`.
pub(super) async fn run(spec: LaunchSpec, mut commands: mpsc::Receiver<Command>, reports: Reports) {
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
            reports.report(InstanceEvent {
                slot,
                generation,
                kind,
            });
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    let mut shell = Shell {
        core: InstanceCore::new(spec, pid, started),
        reports,
        task_log: io.task_log.clone(),
        late: io.late_tx.clone(),
    };
    let core = &mut shell.core;
    tracing::debug!(plugin = %core.name(), instance = core.spec.index, pid, "plugin process started");
    core.begin_handshake(Now::current());
    let step = shell.drive(&mut child, &mut io, &mut commands).await;
    let reason = shell.end(step, &mut child, io).await;
    refuse_waiting(
        &mut commands,
        "the plugin instance ended before the task could start",
    );
    shell.report(EventKind::Exited {
        reason,
        ran_for: shell.core.started.elapsed(),
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

impl Shell {
    pub(super) fn report(&self, kind: EventKind) {
        let event = InstanceEvent {
            slot: self.core.spec.slot,
            generation: self.core.spec.generation,
            kind,
        };
        self.reports.report(event);
    }

    /// Feeds one wake-up to the core and carries out what it left to do.
    pub(super) fn step(&mut self, wake: Wake) -> Step {
        let step = self.core.handle(wake, Now::current());
        self.carry_out();
        step
    }

    /// Carries out the core's effects, in order.
    pub(super) fn carry_out(&mut self) {
        if self.core.effects.is_empty() {
            return;
        }
        let mut effects = self.core.take_effects();
        for effect in effects.drain(..) {
            match effect {
                Effect::Finish(job, outcome) => {
                    let (task_id, ok) = (job.request.id.clone(), outcome.is_success());
                    job.finish(outcome);
                    self.report(EventKind::Finished { task_id, ok });
                }
                Effect::Refuse(job, failure) => job.finish(Outcome::Failure(failure)),
                Effect::Report(kind) => self.report(kind),
                Effect::Deliver(to, event) => self.deliver(to, event),
                Effect::DeliverLog(to, event) => {
                    let _ = to.try_send(event);
                }
                Effect::Release(permit, event) => {
                    permit.send(event);
                }
                Effect::FollowLog(sink) => self.task_log.set(sink),
                Effect::Offer(id, params) => self.hand_on_offer(id, *params),
            }
        }
        self.core.give_back_effects(effects);
    }

    /// An event for a submitter; one without room is handed back to the core, which holds it.
    fn deliver(&mut self, to: crate::task::EventSender, event: Box<TaskEvent>) {
        match to.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                self.core.handle(Wake::NoRoom(to, event), Now::current());
            }
            // The submitter is gone: nobody to tell.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// A checked offer to the offer inbox, with the way back to this process's stdin; the
    /// core answers one that nothing takes.
    fn hand_on_offer(&mut self, id: Id, params: TaskOfferParams) {
        let spec = &self.core.spec;
        let reply = OfferReply::new(id.clone(), self.late.clone(), self.core.offers_out.clone());
        let offer = Offer {
            plugin: spec.manifest.name.clone(),
            instance: spec.index,
            params,
            reply,
        };
        if let Err(offer) = spec.offers.send(offer) {
            let why = "this worker runs no offer source";
            let error = not_taken(&offer.params.task_id, "plugin_unavailable", why);
            drop(offer);
            self.core
                .handle(Wake::OfferNotTaken(id, error), Now::current());
        }
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
        let first = self.core.next_deadline();
        let mut timer = std::pin::pin!(sleep_until(first.unwrap_or_else(Instant::now)));
        let mut commands_open = true;
        loop {
            let deadline = self.core.next_deadline();
            if let Some(at) = deadline.filter(|&at| at != timer.deadline()) {
                timer.as_mut().reset(at);
            }
            let room = self.core.held.as_ref().map(|(tx, _)| tx.clone());
            let reading = room.is_none();
            let out = &self.core.out;
            let wake = tokio::select! {
                cmd = commands.recv(), if commands_open => Wake::Command(cmd),
                ev = process::next_stdout_event(stdout), if reading => Wake::Stdout(Some(ev)),
                status = &mut exited => Wake::Exited(status),
                _ = &mut timer, if deadline.is_some() => Wake::Timer {
                    cpu_wait: process::cpu_wait(self.core.pid),
                },
                permit = async move { room?.reserve_owned().await.ok() }, if !reading => Wake::Room(permit),
                written = stdin.write(out.pending()), if !out.is_empty() => Wake::Written(written),
                line = late_rx.recv() => Wake::Late(line),
            };
            commands_open &= !matches!(wake, Wake::Command(None));
            let batch = matches!(wake, Wake::Stdout(Some(_)));
            let commanded = matches!(wake, Wake::Command(Some(_)));
            let mut step = self.step(wake);
            // Take the stdout messages already read in one go, while nothing holds them back,
            // up to STDOUT_TURN: then the turn ends and the shell yields (below).
            let (mut taken, mut turn_full) = (1, false);
            while batch && matches!(step, Step::Continue) && self.core.held.is_none() {
                if taken == STDOUT_TURN {
                    turn_full = true;
                    break;
                }
                match process::ready_now(process::next_stdout_event(stdout)) {
                    Some(ev) => step = self.step(Wake::Stdout(Some(ev))),
                    None => break,
                }
                taken += 1;
            }
            // Likewise the commands already sent: their lines go out in one write.
            let mut more = if commanded { COMMAND_BATCH } else { 0 };
            while more > 0 && matches!(step, Step::Continue) {
                let Ok(cmd) = commands.try_recv() else { break };
                step = self.step(Wake::Command(Some(cmd)));
                more -= 1;
            }
            // What this turn queued goes out now, in one write, if the pipe takes it.
            if !self.core.out.is_empty() {
                if let Some(written) = process::ready_now(stdin.write(self.core.out.pending())) {
                    self.core.on_written(written);
                }
            }
            match step {
                Step::Continue if self.core.stdin_full => return self.core.stdin_not_read(),
                // The submitters of the tasks just finished run before the rest is read.
                Step::Continue if turn_full => tokio::task::yield_now().await,
                Step::Continue => {}
                Step::StdoutClosed => {
                    // Usually the process is exiting: its exit status is preferred as why.
                    let status = timeout(Duration::from_millis(500), exited.as_mut()).await;
                    return self.core.stdout_closed(status.ok().as_ref());
                }
                final_step => return final_step,
            }
        }
    }
}
