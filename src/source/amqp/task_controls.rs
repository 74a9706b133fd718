//! Per-task settings changed by remote control, as a Celery worker keeps them on its task
//! classes: `celery control rate_limit TASK RATE` (enforced here, per worker: a task waits,
//! unacked, until its rate allows it) and `celery control time_limit TASK SOFT HARD` (the
//! limits of tasks whose message sets none; a message's `timelimit` still wins).

use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Default)]
struct Controls {
    /// Tasks a second, and when the next may start.
    rate: Option<(f64, Instant)>,
    soft: Option<Duration>,
    hard: Option<Duration>,
}

/// The settings of every task that has any.
#[derive(Debug, Default)]
pub(super) struct TaskControls {
    tasks: Mutex<HashMap<String, Controls>>,
}

/// Why a rate string is refused, worded as Celery's reply.
#[derive(Debug, PartialEq)]
pub(super) enum RateError {
    /// The number does not parse: `Invalid rate limit string: ValueError(...)`.
    Number(String),
    /// The unit is not s, m or h: Celery's `KeyError('y')`.
    Unit(String),
}

/// Celery's `rate()`: `"10/s"`, `"100/m"`, `"5/h"` (only the unit's first letter counts), or a
/// plain number of tasks a second; zero, empty or null means no limit (`None`).
pub(super) fn parse_rate(v: &Value) -> Result<Option<f64>, RateError> {
    let text = match v {
        Value::Null => return Ok(None),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => return Err(RateError::Number(other.to_string())),
    };
    if text.is_empty() {
        return Ok(None);
    }
    let (ops, unit) = text.split_once('/').unwrap_or((&text, "s"));
    let per = match unit.chars().next().unwrap_or('s') {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        other => return Err(RateError::Unit(other.to_string())),
    };
    let n: f64 = ops.trim().parse().map_err(|_| {
        RateError::Number(format!(
            "could not convert string to float: '{}'",
            ops.trim()
        ))
    })?;
    if !n.is_finite() || n < 0.0 {
        return Err(RateError::Number(format!(
            "rate must be a positive number: {n}"
        )));
    }
    Ok((n > 0.0).then_some(n / per))
}

impl TaskControls {
    fn with<R>(&self, task: &str, f: impl FnOnce(&mut Controls) -> R) -> R {
        let mut tasks = self.tasks.lock().expect("task controls lock poisoned");
        f(tasks.entry(task.to_string()).or_default())
    }

    /// `rate_limit`: the reply Celery's worker gives. `known` says whether a plugin serves it.
    pub(super) fn set_rate(&self, task: &str, rate: &Value, known: bool) -> Value {
        let per_second = match parse_rate(rate) {
            Ok(r) => r,
            Err(RateError::Number(why)) => {
                return json!({ "error": format!("Invalid rate limit string: ValueError(\"{why}\")") })
            }
            Err(RateError::Unit(unit)) => return json!({ "error": format!("KeyError('{unit}')") }),
        };
        if !known {
            return json!({ "error": "unknown task" });
        }
        self.with(task, |c| c.rate = per_second.map(|r| (r, Instant::now())));
        match per_second {
            None => {
                tracing::info!(task, "rate limit disabled by remote control");
                json!({ "ok": "rate limit disabled successfully" })
            }
            Some(r) => {
                tracing::info!(task, "rate limit set by remote control: {r} tasks/s");
                json!({ "ok": "new rate limit set successfully" })
            }
        }
    }

    /// `time_limit`: both limits are set (a null or zero clears one), as in Celery.
    pub(super) fn set_time_limits(
        &self,
        task: &str,
        soft: &Value,
        hard: &Value,
        known: bool,
    ) -> Value {
        let limit = |field: &str, v: &Value| -> Result<Option<Duration>, String> {
            match v.as_f64() {
                None if v.is_null() => Ok(None),
                None => Err(format!("`{field}` must be a number of seconds or null")),
                Some(s) if s <= 0.0 => Ok(None),
                Some(s) => crate::task::time_limit(field, s).map(Some),
            }
        };
        let (soft, hard) = match (limit("soft", soft), limit("hard", hard)) {
            (Ok(s), Ok(h)) => (s, h),
            (Err(e), _) | (_, Err(e)) => return json!({ "error": e }),
        };
        if !known {
            return json!({ "error": "unknown task" });
        }
        self.with(task, |c| (c.soft, c.hard) = (soft, hard));
        tracing::info!(task, ?soft, ?hard, "time limits set by remote control");
        json!({ "ok": "time limits set successfully" })
    }

    /// The `(soft, hard)` limits set for `task`.
    pub(super) fn time_limits(&self, task: &str) -> (Option<Duration>, Option<Duration>) {
        let tasks = self.tasks.lock().expect("task controls lock poisoned");
        tasks
            .get(task)
            .map(|c| (c.soft, c.hard))
            .unwrap_or_default()
    }

    /// When `task` may start under its rate limit (now if it has none), reserving that slot.
    pub(super) fn start_at(&self, task: &str) -> Instant {
        let mut tasks = self.tasks.lock().expect("task controls lock poisoned");
        let Some((per_second, next)) = tasks.get_mut(task).and_then(|c| c.rate.as_mut()) else {
            return Instant::now();
        };
        let at = (*next).max(Instant::now());
        *next = at + Duration::from_secs_f64(1.0 / *per_second);
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_celery_reads_them() {
        assert_eq!(parse_rate(&json!("10/s")), Ok(Some(10.0)));
        assert_eq!(parse_rate(&json!("120/m")), Ok(Some(2.0)));
        assert_eq!(parse_rate(&json!("3600/hour")), Ok(Some(1.0)));
        assert_eq!(parse_rate(&json!("5")), Ok(Some(5.0)));
        assert_eq!(parse_rate(&json!(5)), Ok(Some(5.0)));
        for off in [json!("0"), json!(""), json!(null), json!(0)] {
            assert_eq!(parse_rate(&off), Ok(None), "{off}");
        }
        assert_eq!(parse_rate(&json!("1/y")), Err(RateError::Unit("y".into())));
        assert!(matches!(
            parse_rate(&json!("x/s")),
            Err(RateError::Number(_))
        ));
    }

    #[test]
    fn a_rate_spaces_the_starts() {
        let c = TaskControls::default();
        let reply = c.set_rate("t", &json!("4/s"), true);
        assert_eq!(reply, json!({"ok": "new rate limit set successfully"}));
        let first = c.start_at("t");
        let starts: Vec<Duration> = (0..3).map(|_| c.start_at("t") - first).collect();
        assert_eq!(starts, [250, 500, 750].map(Duration::from_millis));
        assert!(c.start_at("other") <= Instant::now(), "no limit: at once");
        assert_eq!(
            c.set_rate("t", &json!(null), true),
            json!({"ok": "rate limit disabled successfully"})
        );
        assert!(c.start_at("t") <= Instant::now());
        assert_eq!(
            c.set_rate("nope", &json!("1/s"), false),
            json!({"error": "unknown task"})
        );
        assert_eq!(
            c.set_rate("t", &json!("1/y"), true),
            json!({"error": "KeyError('y')"})
        );
    }

    #[test]
    fn time_limits_are_bounded_and_null_clears() {
        let c = TaskControls::default();
        assert_eq!(
            c.set_time_limits("t", &json!(1.5), &json!(3), true),
            json!({"ok": "time limits set successfully"})
        );
        assert_eq!(
            c.time_limits("t"),
            (
                Some(Duration::from_millis(1500)),
                Some(Duration::from_secs(3))
            )
        );
        c.set_time_limits("t", &json!(null), &json!(3), true);
        assert_eq!(c.time_limits("t").0, None);
        let e = c.set_time_limits("t", &json!(1e300), &json!(null), true);
        assert!(e["error"].as_str().unwrap().contains("soft"), "{e}");
        assert_eq!(
            c.time_limits("t").1,
            Some(Duration::from_secs(3)),
            "unchanged by a refusal"
        );
    }
}
