//! How the CLI prints a running plugin's live state (shared by `plugins list` and `inspect`).

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
