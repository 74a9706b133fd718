//! Per-task settings changed by remote control, as a Celery worker keeps them on its task
//! classes: `celery control rate_limit TASK RATE` (enforced here, per worker: a task waits,
//! unacked, until its rate allows it) and `celery control time_limit TASK SOFT HARD` (the
//! limits of tasks whose message sets none; a message's `timelimit` still wins).

use crate::source::pyrepr::exception_repr;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Default)]
struct Controls {
    /// Tasks a second (at least [`SLOWEST_PER_SECOND`], finite), and when the next may start.
    rate: Option<(f64, Instant)>,
    soft: Option<Duration>,
    hard: Option<Duration>,
}

/// The longest wait between two starts of a rate-limited task: one day.
const LONGEST_INTERVAL: Duration = Duration::from_secs(86_400);

/// The slowest rate accepted, one task a day (`0.0417/h`). Celery takes any positive float,
/// but a slower rate is no rate anyone means, and far below it (`1e-19/s`, `1e-300/s`) the
/// wait between starts is no longer a time the clock can hold. Any faster finite rate is
/// accepted as Celery accepts it; above 1e9/s the starts are under a nanosecond apart, which
/// is no spacing at all.
const SLOWEST_PER_SECOND: f64 = 1.0 / 86_400.0;

/// At most this many characters of a refused value are quoted back in the reply.
const QUOTED_MAX: usize = 64;

/// The settings of every task that has any.
#[derive(Debug, Default)]
pub(crate) struct TaskControls {
    tasks: Mutex<HashMap<String, Controls>>,
}

/// Why a rate string is refused, worded as Celery's reply.
#[derive(Debug, PartialEq)]
pub(crate) enum RateError {
    /// The number does not parse or is out of range: `Invalid rate limit string: ValueError(...)`.
    Number(String),
    /// The unit is not s, m or h: Celery's `KeyError('y')`.
    Unit(String),
}

/// Celery's `rate()`: `"10/s"`, `"100/m"`, `"5/h"` (only the unit's first letter counts), or a
/// plain number of tasks a second; zero, empty or null means no limit (`None`). A rate is
/// refused unless it is finite and at least one task a day ([`SLOWEST_PER_SECOND`]), so the
/// wait between two starts is at most [`LONGEST_INTERVAL`].
pub(crate) fn parse_rate(v: &Value) -> Result<Option<f64>, RateError> {
    let text = match v {
        Value::Null => return Ok(None),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => return Err(RateError::Number(quoted(&other.to_string()))),
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
    let ops = ops.trim();
    let n: f64 = ops.parse().map_err(|_| {
        RateError::Number(format!(
            "could not convert string to float: '{}'",
            quoted(ops)
        ))
    })?;
    if !n.is_finite() || n < 0.0 {
        return Err(RateError::Number(format!(
            "rate must be a positive number: {}",
            quoted(ops)
        )));
    }
    // `1e-400` reads as 0 but is not a request for no limit: it is far too slow.
    let mantissa = ops.split(['e', 'E']).next().unwrap_or_default();
    let written_zero = !mantissa.chars().any(|c| ('1'..='9').contains(&c));
    if n == 0.0 && written_zero {
        return Ok(None);
    }
    let per_second = n / per;
    if per_second < SLOWEST_PER_SECOND {
        return Err(RateError::Number(format!(
            "rate {} is slower than one task a day: the slowest accepted is 1 a day (0.0417/h); 0 turns the limit off",
            quoted(&text)
        )));
    }
    Ok(Some(per_second))
}

/// `text`, cut to [`QUOTED_MAX`] characters: a reply need not carry a megabyte sent to it.
fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTED_MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

/// The wait between two starts at `per_second`, never more than [`LONGEST_INTERVAL`]. A rate
/// `parse_rate` accepts is already within range; this keeps any other from panicking.
fn interval(per_second: f64) -> Duration {
    Duration::try_from_secs_f64(1.0 / per_second)
        .map_or(LONGEST_INTERVAL, |d| d.min(LONGEST_INTERVAL))
}

impl TaskControls {
    fn with<R>(&self, task: &str, f: impl FnOnce(&mut Controls) -> R) -> R {
        let mut tasks = crate::sync::lock(&self.tasks);
        f(tasks.entry(task.to_string()).or_default())
    }

    /// `rate_limit`: the reply Celery's worker gives. `known` says whether a plugin serves it.
    pub(crate) fn set_rate(&self, task: &str, rate: &Value, known: bool) -> Value {
        let per_second = match parse_rate(rate) {
            Ok(r) => r,
            Err(RateError::Number(why)) => {
                let exc = exception_repr("ValueError", &why);
                return json!({ "error": format!("Invalid rate limit string: {exc}") });
            }
            Err(RateError::Unit(unit)) => {
                return json!({ "error": exception_repr("KeyError", &unit) })
            }
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

    /// `time_limit`: both limits are set (a null, zero or negative clears one), as in Celery;
    /// a limit over [`crate::task::time_limit`]'s bound is refused and changes nothing.
    pub(crate) fn set_time_limits(
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
    pub(crate) fn time_limits(&self, task: &str) -> (Option<Duration>, Option<Duration>) {
        let tasks = crate::sync::lock(&self.tasks);
        tasks
            .get(task)
            .map(|c| (c.soft, c.hard))
            .unwrap_or_default()
    }

    /// When `task` may start under its rate limit (now if it has none), reserving that slot.
    /// The next slot is at most [`LONGEST_INTERVAL`] later; should even that not fit the
    /// clock, the next start is not pushed back further.
    pub(crate) fn start_at(&self, task: &str) -> Instant {
        let now = Instant::now();
        let mut tasks = crate::sync::lock(&self.tasks);
        let Some((per_second, next)) = tasks.get_mut(task).and_then(|c| c.rate.as_mut()) else {
            return now;
        };
        let at = (*next).max(now);
        *next = at.checked_add(interval(*per_second)).unwrap_or(at);
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

    /// `start_at` `n` times: every gap is at most a day, and the last start is returned.
    fn gaps_are_bounded(c: &TaskControls, task: &str, n: usize) -> Instant {
        let mut last = c.start_at(task);
        for _ in 0..n {
            let at = c.start_at(task);
            assert!(at >= last && at - last <= LONGEST_INTERVAL, "{task}");
            last = at;
        }
        last
    }

    #[test]
    fn extreme_rates_are_refused_or_bounded() {
        let refused =
            |why: &str| json!({"error": format!("Invalid rate limit string: ValueError({why})")});
        let too_slow = |text: &str| {
            refused(&format!("'rate {text} is slower than one task a day: the slowest accepted is 1 a day (0.0417/h); 0 turns the limit off'"))
        };
        let positive = |text: &str| refused(&format!("'rate must be a positive number: {text}'"));
        let ok = json!({"ok": "new rate limit set successfully"});
        let off = json!({"ok": "rate limit disabled successfully"});
        let cases = [
            (json!("1e-300/s"), too_slow("1e-300/s")),
            (json!("1e-19/s"), too_slow("1e-19/s")),
            (json!("1e-300"), too_slow("1e-300")),
            (json!(1e-300), too_slow("1e-300")),
            (json!("1e-400/s"), too_slow("1e-400/s")),
            (json!("5e-324/s"), too_slow("5e-324/s")),
            (json!("0.04/h"), too_slow("0.04/h")),
            (json!("inf"), positive("inf")),
            (json!("-inf/s"), positive("-inf")),
            (json!("nan"), positive("nan")),
            (json!("NaN/m"), positive("NaN")),
            (json!("-1/s"), positive("-1")),
            (json!(-1), positive("-1")),
            (json!("1/d"), json!({"error": "KeyError('d')"})),
            (json!("1/'"), json!({"error": "KeyError(\"'\")"})),
            (json!([1e-300]), refused("'[1e-300]'")),
            (json!("1e300/s"), ok.clone()),
            (json!(1e300), ok.clone()),
            (json!(u64::MAX), ok.clone()),
            (json!("0.0417/h"), ok.clone()),
            (json!("1/h"), ok.clone()),
            (json!("0e-400"), off.clone()),
            (json!("-0"), off),
        ];
        let c = TaskControls::default();
        for (rate, reply) in cases {
            assert_eq!(c.set_rate("t", &rate, true), reply, "{rate}");
            gaps_are_bounded(&c, "t", 100);
        }
    }

    #[test]
    fn huge_rate_strings_get_a_short_refusal() {
        let c = TaskControls::default();
        for rate in [
            "9".repeat(100_000) + "/s",
            "x".repeat(1_000_000),
            format!("0.{}1/s", "0".repeat(100_000)),
            format!("[{}]", "1,".repeat(100_000)),
        ] {
            let reply = c.set_rate("t", &json!(rate), true);
            let e = reply["error"].as_str().expect("refused");
            assert!(
                e.starts_with("Invalid rate limit string: ValueError("),
                "{e}"
            );
            assert!(e.len() < 300, "{e}");
        }
        let reply = c.set_rate("t", &json!(format!("1{}/s", "0".repeat(300))), true);
        assert_eq!(reply, json!({"ok": "new rate limit set successfully"}));
        gaps_are_bounded(&c, "t", 10);
    }

    #[test]
    fn start_at_never_panics_whatever_rate_is_stored() {
        let c = TaskControls::default();
        for per_second in [
            1e-300,
            1e-19,
            5e-324,
            0.0,
            -0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            SLOWEST_PER_SECOND,
        ] {
            c.with("t", |t| t.rate = Some((per_second, Instant::now())));
            gaps_are_bounded(&c, "t", 1000);
        }
        let far = Instant::now() + Duration::from_secs(1 << 40);
        c.with("t", |t| t.rate = Some((SLOWEST_PER_SECOND, far)));
        assert_eq!(gaps_are_bounded(&c, "t", 10) - far, LONGEST_INTERVAL * 10);
    }

    #[test]
    fn a_panic_under_the_lock_stops_nothing() {
        let c = TaskControls::default();
        let poison = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.with("t", |_| panic!("a holder of the lock panics"))
        }));
        assert!(poison.is_err() && c.tasks.is_poisoned());
        assert_eq!(
            c.set_rate("t", &json!("10/s"), true),
            json!({"ok": "new rate limit set successfully"})
        );
        let first = c.start_at("t");
        assert_eq!(c.start_at("t") - first, Duration::from_millis(100));
        assert_eq!(
            c.set_time_limits("t", &json!(1), &json!(2), true),
            json!({"ok": "time limits set successfully"})
        );
        assert_eq!(c.time_limits("t").1, Some(Duration::from_secs(2)));
    }

    #[test]
    fn time_limits_from_the_wire_are_refused_or_cleared() {
        let c = TaskControls::default();
        c.set_time_limits("t", &json!(1), &json!(2), true);
        let limits = c.time_limits("t");
        for bad in [
            json!(1e300),
            json!(f64::MAX),
            json!(2_592_001),
            json!("10"),
            json!([1]),
        ] {
            let reply = c.set_time_limits("t", &bad, &json!(1), true);
            assert!(reply["error"].is_string(), "{bad}: {reply}");
            let reply = c.set_time_limits("t", &json!(1), &bad, true);
            assert!(reply["error"].is_string(), "{bad}: {reply}");
            assert_eq!(c.time_limits("t"), limits, "{bad} changed nothing");
        }
        // NaN and the infinities cannot be written in JSON: they arrive as null.
        for clear in [
            json!(f64::NAN),
            json!(f64::INFINITY),
            json!(-1),
            json!(-1e300),
            json!(0),
        ] {
            let reply = c.set_time_limits("t", &clear, &clear, true);
            assert_eq!(
                reply,
                json!({"ok": "time limits set successfully"}),
                "{clear}"
            );
            assert_eq!(c.time_limits("t"), (None, None), "{clear}");
        }
    }

    #[test]
    fn a_storm_of_remote_control_leaves_rate_limits_working() {
        use crate::source::pidbox::fuzz::{storm, FakeWorker};
        use std::sync::atomic::{AtomicUsize, Ordering};
        let c = TaskControls::default();
        let rates = AtomicUsize::new(0);
        let known = |task: &str| task == "t" || task == "tasks.add";
        let worker = FakeWorker {
            rate_limit: Box::new(|task, rate| {
                rates.fetch_add(1, Ordering::Relaxed);
                let reply = c.set_rate(task, rate, known(task));
                c.start_at(task);
                reply
            }),
            time_limit: Box::new(|task, soft, hard| {
                let reply = c.set_time_limits(task, soft, hard, known(task));
                c.time_limits(task);
                reply
            }),
        };
        storm(&worker, 2000);
        assert!(
            rates.load(Ordering::Relaxed) > 200,
            "the storm reached rate_limit"
        );
        assert_eq!(
            c.set_rate("t", &json!("10/s"), true),
            json!({"ok": "new rate limit set successfully"})
        );
        let first = c.start_at("t");
        assert!(first <= Instant::now());
        assert_eq!(c.start_at("t") - first, Duration::from_millis(100));
        gaps_are_bounded(&c, "tasks.add", 100);
    }
}
