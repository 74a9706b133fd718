//! The offer source: tasks that queue backends (protocol 1.5) offer, run through the
//! dispatcher like any other source's, each answered with its final state once every result
//! backend stored it. An id offered again while it runs joins the run, and one answered in
//! the last minutes is answered from memory ([`memory`]), so a backend that crashed before
//! its ack never has a task run twice by this worker.

pub mod memory;

use crate::dispatch::{Dispatcher, TaskUpdate};
use crate::supervisor::backend_stats::{BackendCounters, BackendStats};
use crate::supervisor::offer::{not_taken, Offer, OfferReply};
use crate::task::{Outcome, TaskEvent, TaskRequest};
use memory::{Claim, Memory};
use plugin_protocol::{method, ErrorObject, TaskFinal, TaskOfferParams};
use serde_json::value::{to_raw_value, RawValue};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

/// What an offer is answered with: a final state, or "not run, offer again later".
type Answer = Result<Value, ErrorObject>;
/// A final state as remembered: its JSON text, compact and shared by every re-offer.
type Remembered = Arc<Box<RawValue>>;

/// Takes offers from the inbox until it closes; each runs on `tracker`.
pub async fn serve(
    dispatcher: Arc<Dispatcher>,
    stats: Arc<BackendStats>,
    mut inbox: mpsc::UnboundedReceiver<Offer>,
    tracker: TaskTracker,
) {
    let source = Arc::new(OfferSource {
        stats,
        dispatcher,
        memory: Mutex::default(),
    });
    while let Some(offer) = inbox.recv().await {
        tracker.spawn(source.clone().take(offer));
    }
}

struct OfferSource {
    dispatcher: Arc<Dispatcher>,
    stats: Arc<BackendStats>,
    /// Per plugin: its offered ids (see [`memory`]).
    memory: Mutex<HashMap<String, Memory<Remembered, OfferReply>>>,
}

impl OfferSource {
    /// One offer, from its claim to its answer (and those of the offers that joined it).
    async fn take(self: Arc<Self>, offer: Offer) {
        let Offer {
            plugin,
            params,
            reply,
            ..
        } = offer;
        let counters = self.stats.of(&plugin);
        let claim = crate::sync::lock(&self.memory)
            .entry(plugin.clone())
            .or_default()
            .claim(&params.task_id, reply, Instant::now());
        let reply = match claim {
            Claim::Run(reply) => reply,
            Claim::Answered(answer, reply) => {
                BackendCounters::add(&counters.offers_answered);
                return reply.answer_json(&answer).await;
            }
            Claim::Joined => return,
        };
        BackendCounters::add(&counters.offers_in_flight);
        let task_id = params.task_id.clone();
        let (outcome, stopping) = self.run(&plugin, params, &reply).await;
        BackendCounters::sub(&counters.offers_in_flight);
        let answer = answer_of(&task_id, &outcome, stopping);
        let joined = {
            let mut memory = crate::sync::lock(&self.memory);
            let mine = memory.entry(plugin.clone()).or_default();
            match answer.as_ref().map(to_raw_value) {
                Ok(Ok(raw)) => {
                    let size = raw.get().len();
                    mine.answered(&task_id, Arc::new(raw), size, Instant::now())
                }
                _ => mine.released(&task_id),
            }
        };
        let count = match answer {
            Ok(_) => &counters.offers_answered,
            Err(_) => &counters.offers_not_taken,
        };
        for reply in std::iter::once(reply).chain(joined) {
            BackendCounters::add(count);
            reply.answer(answer.clone()).await;
        }
    }

    /// Runs the offered task to its end, forwarding the events it asked for. Returns its
    /// outcome and whether the worker was stopping by then.
    async fn run(&self, plugin: &str, p: TaskOfferParams, reply: &OfferReply) -> (Outcome, bool) {
        let (progress, stream) = (p.progress, p.stream);
        let task_id = p.task_id.clone();
        let mut run = self.dispatcher.submit(request_of(plugin, p));
        let outcome = loop {
            match run.next().await {
                Some(TaskUpdate::Event(ev)) => forward(reply, &task_id, ev, progress, stream),
                Some(TaskUpdate::Done(outcome)) => break outcome,
                None => unreachable!("a task run ends with Done"),
            }
        };
        (outcome, !self.dispatcher.accepting())
    }
}

/// The offer as the task the dispatcher runs: its id is the backend's.
fn request_of(plugin: &str, p: TaskOfferParams) -> TaskRequest {
    let secs = |s: Option<f64>| s.and_then(|s| crate::task::time_limit("time_limit", s).ok());
    let mut request = TaskRequest::new(p.task, p.args, p.kwargs);
    request.id = p.task_id.into();
    request.soft_time_limit = secs(p.time_limit.soft);
    request.hard_time_limit = secs(p.time_limit.hard);
    request.submitter = format!("queue backend {plugin}");
    request.delivery_info.queue = Some(plugin.to_string());
    request
}

/// A progress or stream event to the offering process, if it asked for that kind.
fn forward(reply: &OfferReply, task_id: &str, ev: TaskEvent, progress: bool, stream: bool) {
    match ev {
        TaskEvent::Progress {
            done,
            total,
            message,
        } if progress => {
            let params = plugin_protocol::OfferProgressParams {
                task_id: task_id.to_string(),
                done,
                total,
                message,
            };
            reply.notify(method::OFFER_PROGRESS, params);
        }
        TaskEvent::Stream { items } if stream => {
            let params = plugin_protocol::OfferStreamParams {
                task_id: task_id.to_string(),
                items,
            };
            reply.notify(method::OFFER_STREAM, params);
        }
        _ => {}
    }
}

/// The answer to an offer that ended with `outcome`: its final state, or "not run" for a
/// task that belongs back in its queue.
fn answer_of(task_id: &str, outcome: &Outcome, stopping: bool) -> Answer {
    if let Outcome::Failure(f) = outcome {
        if f.belongs_back(stopping) {
            return Err(not_taken(task_id, outcome.kind(), &f.message));
        }
    }
    let (state, result, error) = crate::results::final_state(outcome);
    let answer = TaskFinal {
        task_id: task_id.to_string(),
        state,
        result,
        error,
    };
    Ok(serde_json::to_value(answer).expect("a final state serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{Failure, FailureKind};
    use serde_json::json;

    #[test]
    fn final_states_are_answered_and_what_belongs_back_is_not_taken() {
        let ok = answer_of("t", &Outcome::Success(json!(5)), false).unwrap();
        assert_eq!(ok, json!({"task_id": "t", "state": "SUCCESS", "result": 5}));
        let raised = Failure::new(
            FailureKind::Raised { retryable: false },
            "ValueError",
            "builtins",
            "bad",
        );
        let failed = answer_of("t", &Outcome::Failure(raised), false).unwrap();
        assert_eq!(failed["state"], "FAILURE");
        assert_eq!(failed["error"]["kind"], "raised");
        assert_eq!(failed["error"]["type"], "ValueError");
        let crashed = Outcome::Failure(Failure::crashed("boom"));
        assert_eq!(
            answer_of("t", &crashed, false).unwrap()["error"]["kind"],
            "plugin_crashed"
        );
        let err = answer_of("t", &crashed, true).unwrap_err();
        assert_eq!(err.code, plugin_protocol::code::SHUTTING_DOWN);
        assert_eq!(err.data.unwrap()["kind"], "plugin_crashed");
        for f in [Failure::shutting_down(), Failure::unavailable("failed")] {
            let err = answer_of("t", &Outcome::Failure(f), false).unwrap_err();
            assert!(
                err.message.contains("offer task t again later"),
                "{}",
                err.message
            );
        }
        let duplicate = Failure::new(
            FailureKind::Raised { retryable: false },
            crate::task::DUPLICATE_TASK_ID,
            "worker.errors",
            "running",
        );
        assert!(answer_of("t", &Outcome::Failure(duplicate), false).is_err());
    }
}
