//! The restart policy as pure code: when to restart a crashed instance, and when to give up.
//!
//! The first restart is immediate; each further consecutive crash doubles the delay (with
//! jitter, capped). An instance that stayed up for `stable_after` starts counting afresh.
//! More than `max_restarts` restarts of one plugin within `window` put it in the `failed` state.

use crate::manifest::RestartSettings;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Jitter is +/- this fraction of the delay, so instances that crash together spread out.
const JITTER: f64 = 0.2;

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Restart { after: Duration },
    GiveUp { restarts: usize, window: Duration },
}

/// Consecutive crashes of one instance slot.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    consecutive: u32,
}

/// Restart times of one plugin within the window.
#[derive(Debug, Default, Clone)]
pub struct RestartWindow {
    times: VecDeque<Instant>,
}

impl RestartWindow {
    /// Restarts counted in the window ending at `now`.
    pub fn count(&mut self, now: Instant, window: Duration) -> usize {
        while self
            .times
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.times.pop_front();
        }
        self.times.len()
    }
}

/// The wait before retry number `consecutive` (0 = the first: no wait): `initial` doubling
/// per retry, with +/- 20% jitter, never past `max`. Shared by plugin restarts and broker
/// reconnects. `random` is uniform in [0, 1).
pub fn delay(consecutive: u32, initial: Duration, max: Duration, random: f64) -> Duration {
    if consecutive == 0 {
        return Duration::ZERO;
    }
    let exp = 2f64.powi(consecutive.min(30) as i32 - 1);
    let base = (initial.as_secs_f64() * exp).min(max.as_secs_f64());
    // Jitter spreads retries out but never past the cap.
    let jittered = base * (1.0 + JITTER * (2.0 * random - 1.0));
    Duration::from_secs_f64(jittered.min(max.as_secs_f64()))
}

/// Decides what follows a crash of an instance that had been up for `ran_for`.
/// `random` is uniform in [0, 1) and only shapes the jitter.
pub fn decide(
    policy: &RestartSettings,
    backoff: &mut Backoff,
    window: &mut RestartWindow,
    now: Instant,
    ran_for: Duration,
    random: f64,
) -> Decision {
    if ran_for >= policy.stable_after {
        backoff.consecutive = 0;
    }
    let recent = window.count(now, policy.window);
    if recent >= policy.max_restarts as usize {
        return Decision::GiveUp {
            restarts: recent,
            window: policy.window,
        };
    }
    window.times.push_back(now);
    let after = delay(
        backoff.consecutive,
        policy.backoff_initial,
        policy.backoff_max,
        random,
    );
    backoff.consecutive += 1;
    Decision::Restart { after }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartSettings {
        RestartSettings {
            max_restarts: 4,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(250),
            stable_after: Duration::from_secs(30),
            failed_retry: Duration::from_secs(300),
        }
    }

    fn delays(n: usize, ran_for: Duration, step: Duration) -> Vec<Decision> {
        let (p, mut b, mut w) = (policy(), Backoff::default(), RestartWindow::default());
        let start = Instant::now();
        (0..n)
            .map(|i| decide(&p, &mut b, &mut w, start + step * i as u32, ran_for, 0.5))
            .collect()
    }

    #[test]
    fn first_restart_is_immediate_then_exponential_and_capped() {
        let d = delays(4, Duration::ZERO, Duration::ZERO);
        let ms = |d: &Decision| match d {
            Decision::Restart { after } => after.as_millis(),
            other => panic!("{other:?}"),
        };
        assert_eq!(d.iter().map(ms).collect::<Vec<_>>(), vec![0, 100, 200, 250]);
    }

    #[test]
    fn too_many_restarts_in_window_gives_up() {
        let d = delays(5, Duration::ZERO, Duration::ZERO);
        assert_eq!(
            d[4],
            Decision::GiveUp {
                restarts: 4,
                window: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn restarts_outside_the_window_are_forgotten() {
        let d = delays(10, Duration::ZERO, Duration::from_secs(61));
        assert!(d.iter().all(|d| matches!(d, Decision::Restart { .. })));
    }

    #[test]
    fn stable_run_resets_backoff() {
        let d = delays(3, Duration::from_secs(31), Duration::ZERO);
        assert!(d.iter().all(|d| *d
            == Decision::Restart {
                after: Duration::ZERO
            }));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let (p, mut w) = (policy(), RestartWindow::default());
        for r in [0.0, 0.999] {
            let mut b = Backoff { consecutive: 1 };
            let Decision::Restart { after } =
                decide(&p, &mut b, &mut w, Instant::now(), Duration::ZERO, r)
            else {
                panic!()
            };
            assert!((80..=120).contains(&after.as_millis()), "{after:?}");
        }
    }

    #[test]
    fn jitter_never_exceeds_the_cap() {
        let (p, mut w) = (policy(), RestartWindow::default());
        for consecutive in [3, 4, 10, 40] {
            let mut b = Backoff { consecutive };
            let Decision::Restart { after } =
                decide(&p, &mut b, &mut w, Instant::now(), Duration::ZERO, 0.999)
            else {
                panic!()
            };
            assert!(after <= p.backoff_max, "{consecutive}: {after:?}");
        }
    }
}
