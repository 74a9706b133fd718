//! What the broker source last saw of its broker: the connection and each queue it wants,
//! with the broker's own words when it refused one. The source writes it; `plugins.status`
//! (so `worker plugins list`), systemd's STATUS line and the metrics read it.
//!
//! It also decides which failures are news: a configuration error (a refused queue, a wrong
//! password) is retried with backoff for as long as it lasts, but logged once, when it first
//! happens or changes, not at every retry.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The broker connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Not connected yet.
    Connecting,
    /// Connected and serving (each queue says whether it is consumed).
    Connected,
    /// Lost or refused; retried with backoff.
    Disconnected,
}

/// One queue the worker wants to consume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueState {
    /// Not tried on this connection yet.
    Waiting,
    Consuming,
    /// The broker refused to declare or consume it; tried again with backoff.
    Refused,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueStatus {
    pub name: String,
    pub state: QueueState,
    /// What the broker said when it last refused this queue (kept while it is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Consumed as it exists: it was declared with other arguments than this worker's
    /// settings, and the broker's words on how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differs: Option<String>,
    /// Times the broker refused it since the worker started.
    pub refusals: u64,
    /// Unix time of its last change of state.
    pub since: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BrokerStatus {
    /// The broker URL in use, password hidden.
    pub url: String,
    pub state: LinkState,
    /// Unix time of the connection's last change of state.
    pub since: f64,
    /// Why the last attempt failed; cleared once connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Failed attempts since the last connection that came up.
    pub failures: u32,
    pub queues: Vec<QueueStatus>,
}

impl BrokerStatus {
    /// The queues the broker refuses now.
    pub fn refused(&self) -> impl Iterator<Item = &QueueStatus> {
        self.queues
            .iter()
            .filter(|q| q.state == QueueState::Refused)
    }

    /// "connected", "disconnected (reason)" or "connecting", and how many queues are refused:
    /// one line for systemd's STATUS and `plugins list`.
    pub fn summary(&self) -> String {
        let mut line = match (&self.state, &self.error) {
            (LinkState::Connected, _) => "connected".to_string(),
            (LinkState::Connecting, _) => "connecting".to_string(),
            (LinkState::Disconnected, Some(e)) => {
                format!("disconnected, {} failed attempt(s): {e}", self.failures)
            }
            (LinkState::Disconnected, None) => "disconnected".to_string(),
        };
        let refused = self.refused().count();
        if self.state == LinkState::Connected && refused > 0 {
            line.push_str(&format!(
                ", {refused} of {} queue(s) refused",
                self.queues.len()
            ));
        }
        line
    }
}

/// The shared record behind [`BrokerStatus`]. Cheap to clone; never held across an await.
#[derive(Debug, Clone, Default)]
pub struct BrokerBoard(Arc<Mutex<Board>>);

#[derive(Debug, Default)]
struct Board {
    /// `None` until a broker source starts: the daemon has no broker.
    status: Option<BrokerStatus>,
    /// Connection failures ("url reason") already logged since the last connection came up.
    named: HashSet<String>,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl BrokerBoard {
    /// The status now, or `None` when the daemon has no broker.
    pub fn snapshot(&self) -> Option<BrokerStatus> {
        crate::sync::lock(&self.0).status.clone()
    }

    fn with<R>(&self, f: impl FnOnce(&mut BrokerStatus, &mut HashSet<String>) -> R) -> R {
        let mut board = crate::sync::lock(&self.0);
        let Board { status, named } = &mut *board;
        let status = status.get_or_insert_with(|| BrokerStatus {
            url: String::new(),
            state: LinkState::Connecting,
            since: now(),
            error: None,
            failures: 0,
            queues: Vec::new(),
        });
        f(status, named)
    }

    /// Connecting to `url` (password hidden) for the first time.
    pub fn connecting(&self, url: &str) {
        self.with(|s, _| {
            s.url = url.to_string();
        })
    }

    /// The connection to `url` is up.
    pub fn connected(&self, url: &str) {
        self.with(|s, named| {
            named.clear();
            s.url = url.to_string();
            s.state = LinkState::Connected;
            s.since = now();
            s.error = None;
            s.failures = 0;
        })
    }

    /// The connection to `url` was lost or refused for `reason`. True if that failure is news
    /// (not yet named since the last connection came up): log it then, quietly otherwise.
    pub fn lost(&self, url: &str, reason: &str) -> bool {
        self.with(|s, named| {
            if s.state != LinkState::Disconnected {
                s.since = now();
            }
            s.url = url.to_string();
            s.state = LinkState::Disconnected;
            s.error = Some(reason.to_string());
            s.failures = s.failures.saturating_add(1);
            named.insert(format!("{url} {reason}"))
        })
    }

    /// The queues wanted now (in this order); a queue no longer wanted is forgotten.
    pub fn want<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        self.with(|s, _| {
            let mut queues = Vec::new();
            for name in names {
                let known = s.queues.iter().position(|q| q.name == name);
                queues.push(match known {
                    Some(i) => s.queues.swap_remove(i),
                    None => QueueStatus {
                        name: name.to_string(),
                        state: QueueState::Waiting,
                        error: None,
                        differs: None,
                        refusals: 0,
                        since: now(),
                    },
                });
            }
            s.queues = queues;
        })
    }

    fn queue<R>(&self, name: &str, f: impl FnOnce(&mut QueueStatus) -> R) -> Option<R> {
        self.with(|s, _| s.queues.iter_mut().find(|q| q.name == name).map(f))
    }

    /// `name` is consumed. The error it was refused with until now, if it was.
    pub fn consuming(&self, name: &str) -> Option<String> {
        self.queue(name, |q| {
            let was = match q.state {
                QueueState::Refused => q.error.take(),
                _ => None,
            };
            if q.state != QueueState::Consuming {
                q.since = now();
            }
            q.state = QueueState::Consuming;
            q.error = None;
            was
        })
        .flatten()
    }

    /// The broker refused `name` for `reason`. True if that is news (it was not refused, or
    /// for another reason): log it then, quietly otherwise.
    pub fn refused(&self, name: &str, reason: &str) -> bool {
        self.queue(name, |q| {
            q.refusals += 1;
            let news = q.state != QueueState::Refused || q.error.as_deref() != Some(reason);
            if q.state != QueueState::Refused {
                q.since = now();
            }
            q.state = QueueState::Refused;
            q.error = Some(reason.to_string());
            news
        })
        // A queue nobody wants any more: nothing to show, nothing to log twice.
        .unwrap_or(false)
    }

    /// `name` exists with other arguments than the worker declares (`how`, the broker's
    /// words) and is consumed as it is. True the first time: warn then.
    pub fn differs(&self, name: &str, how: &str) -> bool {
        self.queue(name, |q| q.differs.replace(how.to_string()).is_none())
            .unwrap_or(false)
    }

    /// A new connection: every queue is tried again on it.
    pub fn new_session(&self) {
        self.with(|s, _| {
            for q in &mut s.queues {
                if q.state == QueueState::Consuming {
                    q.state = QueueState::Waiting;
                    q.since = now();
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(queues: &[&str]) -> BrokerBoard {
        let b = BrokerBoard::default();
        b.connecting("amqp://h//");
        b.want(queues.iter().copied());
        b
    }

    #[test]
    fn no_broker_means_no_status() {
        assert_eq!(BrokerBoard::default().snapshot(), None);
    }

    #[test]
    fn a_refusal_is_news_once_until_it_changes_or_clears() {
        let b = board(&["q", "r"]);
        b.connected("amqp://h//");
        assert!(b.refused("q", "NOT_FOUND - no queue 'q'"));
        assert!(!b.refused("q", "NOT_FOUND - no queue 'q'"));
        assert!(b.refused("q", "ACCESS_REFUSED"), "another reason is news");
        assert_eq!(b.consuming("r"), None);
        let s = b.snapshot().unwrap();
        assert_eq!(s.queues[0].state, QueueState::Refused);
        assert_eq!(s.queues[0].refusals, 3);
        assert_eq!(s.summary(), "connected, 1 of 2 queue(s) refused");
        assert_eq!(b.consuming("q").as_deref(), Some("ACCESS_REFUSED"));
        assert!(
            b.refused("q", "ACCESS_REFUSED"),
            "refused again after consuming"
        );
        assert!(!b.refused("gone", "x"), "a queue not wanted is not tracked");
    }

    #[test]
    fn a_connection_failure_is_named_once_per_url_and_reason_until_connected() {
        let b = board(&["q"]);
        assert!(b.lost("amqp://a//", "refused"));
        assert!(
            b.lost("amqp://b//", "refused"),
            "another URL of the failover list"
        );
        assert!(!b.lost("amqp://a//", "refused"));
        let s = b.snapshot().unwrap();
        assert_eq!(
            (s.state, s.failures, s.error.as_deref()),
            (LinkState::Disconnected, 3, Some("refused"))
        );
        assert_eq!(s.summary(), "disconnected, 3 failed attempt(s): refused");
        b.connected("amqp://a//");
        assert_eq!(b.snapshot().unwrap().failures, 0);
        assert!(b.lost("amqp://a//", "refused"), "news again after being up");
    }

    #[test]
    fn wanted_queues_keep_their_history_and_drop_the_rest() {
        let b = board(&["q", "r"]);
        b.refused("q", "x");
        assert!(b.differs("r", "inequivalent arg 'x-queue-type'"));
        assert!(!b.differs("r", "inequivalent arg 'x-queue-type'"));
        b.want(["r", "s"]);
        let s = b.snapshot().unwrap();
        let names: Vec<&str> = s.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["r", "s"]);
        assert!(s.queues[0].differs.is_some());
        b.consuming("r");
        b.new_session();
        assert_eq!(b.snapshot().unwrap().queues[0].state, QueueState::Waiting);
    }
}
