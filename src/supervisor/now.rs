//! The time an input to a pure core (a pool's, an instance's) happens at, read from a clock
//! only when the core asks for it.

use std::time::SystemTime;
use tokio::time::Instant;

/// The time an input happens at: the monotonic clock for timers, the wall clock for records.
/// The current time reads a clock only where one is asked for: most inputs (a task placed or
/// finished, twice per task) need neither. A fixed time (the tests') reads as given.
#[derive(Debug, Clone, Copy)]
pub(in crate::supervisor) struct Now {
    fixed: Option<(Instant, SystemTime)>,
}

impl Now {
    pub fn current() -> Now {
        Now { fixed: None }
    }

    #[cfg(test)]
    pub fn fixed(at: Instant, wall: SystemTime) -> Now {
        Now {
            fixed: Some((at, wall)),
        }
    }

    pub fn at(&self) -> Instant {
        self.fixed.map_or_else(Instant::now, |(at, _)| at)
    }

    pub fn wall(&self) -> SystemTime {
        self.fixed.map_or_else(SystemTime::now, |(_, wall)| wall)
    }
}
