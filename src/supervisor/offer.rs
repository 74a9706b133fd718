//! A queue backend's `task.offer` (protocol 1.5) as the instance hands it on: the offer, and
//! the way back to the process that made it. The instance checks the offer and its window;
//! whoever takes offers (the daemon's offer source) runs it and answers through
//! [`OfferReply`]. The supervisor never knows what runs it.

use super::backend_stats::BackendStats;
use plugin_protocol::{code, ErrorObject, Id, Message, Notification, Response, TaskOfferParams};
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// One offer, checked: well-formed and within its process's window.
#[derive(Debug)]
pub struct Offer {
    pub plugin: String,
    pub instance: u32,
    pub params: TaskOfferParams,
    pub reply: OfferReply,
}

/// The way back to the process that offered: its stdin and its window count. Answering
/// frees the window place first, so the process may offer again as soon as it reads the
/// answer; dropping it unanswered frees the place too (the process is gone or the answer was
/// lost).
#[derive(Debug)]
pub struct OfferReply {
    id: Id,
    stdin: mpsc::Sender<Vec<u8>>,
    outstanding: Arc<AtomicUsize>,
    /// Still holds its window place.
    holding: bool,
}

impl OfferReply {
    /// Takes a place in the window.
    pub(super) fn new(id: Id, stdin: mpsc::Sender<Vec<u8>>, outstanding: Arc<AtomicUsize>) -> Self {
        outstanding.fetch_add(1, Ordering::SeqCst);
        OfferReply {
            id,
            stdin,
            outstanding,
            holding: true,
        }
    }

    /// Writes the answer, waiting for room in the process's stdin; a process that is gone
    /// gets nothing (it never acked, so its backend offers the task again).
    pub async fn answer(self, result: Result<Value, ErrorObject>) {
        let response = match result {
            Ok(value) => Response::ok(self.id.clone(), value),
            Err(e) => Response::err(Some(self.id.clone()), e),
        };
        self.send(Message::Response(response).to_line()).await;
    }

    /// Writes a final state given as JSON text (`result`), as [`answer`](Self::answer) does.
    pub async fn answer_json(self, result: &serde_json::value::RawValue) {
        #[derive(serde::Serialize)]
        struct Raw<'a> {
            jsonrpc: &'static str,
            id: &'a Id,
            result: &'a serde_json::value::RawValue,
        }
        let raw = Raw {
            jsonrpc: "2.0",
            id: &self.id,
            result,
        };
        let mut line = serde_json::to_vec(&raw).expect("a response serializes");
        line.push(b'\n');
        self.send(line).await;
    }

    async fn send(mut self, line: Vec<u8>) {
        self.release();
        let _ = self.stdin.send(line).await;
    }

    /// A notification about the offered task, dropped when the process's stdin is full.
    pub fn notify(&self, method: &str, params: impl serde::Serialize) {
        let line = Message::Notification(Notification::new(method, params)).to_line();
        let _ = self.stdin.try_send(line);
    }

    /// The offering process has ended.
    pub fn is_closed(&self) -> bool {
        self.stdin.is_closed()
    }

    fn release(&mut self) {
        if std::mem::take(&mut self.holding) {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for OfferReply {
    fn drop(&mut self) {
        self.release();
    }
}

/// Where instances hand offers, and the backends' counters. The default takes no offers:
/// each is answered "not run" (a harness or `worker run`, with no offer source).
/// Unbounded as a channel, bounded in fact: an instance hands on no more than its backend's
/// `window` of unanswered offers (`instance/offers.rs` refuses the rest at once), so the
/// inbox never holds more than the sum of the windows.
#[derive(Debug, Clone, Default)]
pub struct OfferInbox {
    tx: Option<mpsc::UnboundedSender<Offer>>,
    pub stats: Arc<BackendStats>,
}

impl OfferInbox {
    /// An inbox and the receiver the offer source reads.
    pub fn channel() -> (OfferInbox, mpsc::UnboundedReceiver<Offer>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let inbox = OfferInbox {
            tx: Some(tx),
            stats: Arc::default(),
        };
        (inbox, rx)
    }

    /// Hands `offer` on, or gives it back when nothing takes offers.
    pub fn send(&self, offer: Offer) -> Result<(), Box<Offer>> {
        match &self.tx {
            Some(tx) => tx.send(offer).map_err(|e| Box::new(e.0)),
            None => Err(Box::new(offer)),
        }
    }
}

/// The error for an offer that was not run: offer it again later. `kind` is the reason's
/// failure kind (`shutting_down`, `plugin_unavailable`, ...).
pub fn not_taken(task_id: &str, kind: &str, why: &str) -> ErrorObject {
    ErrorObject::new(
        code::SHUTTING_DOWN,
        format!("not run: {why}; offer task {task_id} again later"),
    )
    .with_data(serde_json::json!({ "task_id": task_id, "kind": kind }))
}
