//! How the CLI prints a running plugin's live state (shared by `plugins list` and `inspect`).

use crate::broker_status::{BrokerStatus, QueueState};
use crate::supervisor::status::{InstanceStatus, PluginStatus};

/// When a failed plugin is tried again, for `list` and `inspect`.
pub(super) fn next_try(p: &PluginStatus) -> String {
    let Some(at) = p.next_try_at else {
        return "not retried on its own".to_string();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let left = (at - now).max(0.0) as u64;
    let when = chrono::DateTime::from_timestamp(at as i64, 0)
        .map(|t| t.format("%H:%M:%S UTC").to_string())
        .unwrap_or_default();
    format!(
        "next try in {}, at {when} (or now: `worker plugins restart {}`)",
        human(std::time::Duration::from_secs(left)),
        p.name
    )
}

pub(super) fn instance_line(i: &InstanceStatus) -> String {
    let pid = i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    let uptime = i
        .uptime_secs
        .map(|s| human(std::time::Duration::from_secs_f64(s)))
        .unwrap_or_else(|| "-".into());
    let mut s = format!(
        "#{} {} pid {} up {} restarts {} in-flight {} done {} failed {}",
        i.index, i.state, pid, uptime, i.restarts, i.in_flight, i.done, i.failed
    );
    if i.stray_stdout_lines > 0 {
        s.push_str(&format!(" stray-stdout-lines {}", i.stray_stdout_lines));
    }
    if let Some(exit) = &i.last_exit {
        s.push_str(&format!("\n      last exit: {exit}"));
    }
    s
}

/// A duration for people, to the second ("4m 59s").
pub(super) fn human(d: std::time::Duration) -> String {
    humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
}

/// The broker connection and each wanted queue, for `list`: what the broker refuses, in its
/// own words, and since when.
pub(super) fn broker_lines(b: &BrokerStatus) -> Vec<String> {
    let mut lines = vec![format!("broker: {} {}", b.url, b.summary())];
    for q in &b.queues {
        let mut line = match q.state {
            QueueState::Consuming => format!("  queue {}: consuming", q.name),
            QueueState::Waiting => format!("  queue {}: not consumed yet", q.name),
            QueueState::Refused => format!(
                "  queue {}: REFUSED by the broker for {} ({} time(s)), tried again with backoff: {}",
                q.name,
                ago(q.since),
                q.refusals,
                q.error.as_deref().unwrap_or("?")
            ),
        };
        if let Some(how) = &q.differs {
            line.push_str(&format!(
                "\n    exists with other arguments than the worker's settings, consumed as it is: {how}"
            ));
        }
        lines.push(line);
    }
    lines
}

/// How long ago a Unix time was ("4m 59s").
fn ago(at: f64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    human(std::time::Duration::from_secs_f64((now - at).max(0.0)))
}

/// What a queue or result backend did: `queue_backend (window 16): 3 offers in flight, ...`.
pub(super) fn backends_line(b: &crate::supervisor::status::BackendsStatus) -> String {
    let mut parts = Vec::new();
    if let Some(window) = b.window {
        parts.push(format!(
            "queue_backend (window {window}): {} offers in flight, {} answered, {} not taken, {} refused",
            b.offers_in_flight, b.offers_answered, b.offers_not_taken, b.offers_refused
        ));
    }
    if b.provides
        .iter()
        .any(|p| p == plugin_protocol::provides::RESULT_BACKEND)
    {
        parts.push(format!(
            "result_backend: {} stored, {} pending, {} failed stores",
            b.results_stored, b.results_pending, b.result_store_failures
        ));
    }
    parts.join("; ")
}
