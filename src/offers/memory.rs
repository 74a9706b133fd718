//! What the offer source remembers per offered task id, so a re-offer never runs a task twice:
//! the offers waiting on a task that runs, and the answers of tasks that ended (for
//! `REMEMBER_FOR`, at most `REMEMBER_MAX` ids and `REMEMBER_BYTES` of answers per plugin,
//! oldest forgotten first). Pure: the caller passes the time and each answer's size.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long an answered id is remembered: longer than a plugin takes to crash, restart and
/// offer again what it had not acked.
pub const REMEMBER_FOR: Duration = Duration::from_secs(600);
/// Answered ids remembered per plugin at most.
pub const REMEMBER_MAX: usize = 100_000;
/// Bytes of answers (and their ids) remembered per plugin at most: large results are
/// forgotten sooner, so the memory stays bounded whatever the tasks return.
pub const REMEMBER_BYTES: usize = 32 << 20;

/// Where an offer goes.
#[derive(Debug, PartialEq)]
pub enum Claim<A, W> {
    /// Nothing runs or ran with this id: run it.
    Run(W),
    /// It ended: answer with this at once.
    Answered(A, W),
    /// It runs: the waiter is kept and answered when it ends.
    Joined,
}

enum Entry<A, W> {
    Running(Vec<W>),
    Answered(A),
}

/// One plugin's memory; `A` is an answer, `W` a waiting offer.
pub struct Memory<A, W> {
    entries: HashMap<String, Entry<A, W>>,
    /// Answered ids, oldest first, with when they were answered and their size.
    answered: VecDeque<(String, Instant, usize)>,
    /// The sizes in `answered`, summed.
    bytes: usize,
}

impl<A: Clone, W> Default for Memory<A, W> {
    fn default() -> Self {
        Memory {
            entries: HashMap::new(),
            answered: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl<A: Clone, W> Memory<A, W> {
    /// What to do with an offer of `id`.
    pub fn claim(&mut self, id: &str, waiter: W, now: Instant) -> Claim<A, W> {
        self.forget_old(now);
        match self.entries.get_mut(id) {
            None => {
                self.entries
                    .insert(id.to_string(), Entry::Running(Vec::new()));
                Claim::Run(waiter)
            }
            Some(Entry::Running(waiting)) => {
                waiting.push(waiter);
                Claim::Joined
            }
            Some(Entry::Answered(answer)) => Claim::Answered(answer.clone(), waiter),
        }
    }

    /// The task ended with a final `answer` of `size` bytes: remembered; returns the offers
    /// that joined it.
    pub fn answered(&mut self, id: &str, answer: A, size: usize, now: Instant) -> Vec<W> {
        let waiting = match self.entries.insert(id.to_string(), Entry::Answered(answer)) {
            Some(Entry::Running(waiting)) => waiting,
            _ => Vec::new(),
        };
        let size = size + id.len();
        self.answered.push_back((id.to_string(), now, size));
        self.bytes += size;
        while self.answered.len() > REMEMBER_MAX || self.bytes > REMEMBER_BYTES {
            self.pop_oldest();
        }
        waiting
    }

    /// The task did not run to a final state (it belongs back in its queue): nothing is
    /// remembered; returns the offers that joined it, to be told the same.
    pub fn released(&mut self, id: &str) -> Vec<W> {
        match self.entries.remove(id) {
            Some(Entry::Running(waiting)) => waiting,
            Some(answered @ Entry::Answered(_)) => {
                self.entries.insert(id.to_string(), answered);
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// Ids running, or answered and remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn forget_old(&mut self, now: Instant) {
        while self
            .answered
            .front()
            .is_some_and(|(_, at, _)| now.saturating_duration_since(*at) > REMEMBER_FOR)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((id, _, size)) = self.answered.pop_front() {
            self.bytes -= size;
            // Only if still answered: an id forgotten and run again is Running now.
            if matches!(self.entries.get(&id), Some(Entry::Answered(_))) {
                self.entries.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_runs_once_while_running_and_is_answered_from_memory_after() {
        let t0 = Instant::now();
        let mut m: Memory<&str, u32> = Memory::default();
        assert_eq!(m.claim("a", 1, t0), Claim::Run(1));
        assert_eq!(m.claim("a", 2, t0), Claim::Joined);
        assert_eq!(m.claim("a", 3, t0), Claim::Joined);
        assert_eq!(m.answered("a", "ok", 2, t0), vec![2, 3]);
        assert_eq!(m.claim("a", 4, t0), Claim::Answered("ok", 4));
        assert_eq!(m.claim("b", 5, t0), Claim::Run(5));
    }

    #[test]
    fn a_released_task_runs_again_and_its_joiners_are_told() {
        let t0 = Instant::now();
        let mut m: Memory<&str, u32> = Memory::default();
        assert_eq!(m.claim("a", 1, t0), Claim::Run(1));
        assert_eq!(m.claim("a", 2, t0), Claim::Joined);
        assert_eq!(m.released("a"), vec![2]);
        assert!(m.is_empty());
        assert_eq!(m.claim("a", 3, t0), Claim::Run(3));
    }

    #[test]
    fn answers_are_forgotten_after_ten_minutes() {
        let t0 = Instant::now();
        let mut m: Memory<&str, u32> = Memory::default();
        m.claim("a", 1, t0);
        m.answered("a", "ok", 2, t0);
        let later = t0 + REMEMBER_FOR;
        assert_eq!(m.claim("a", 2, later), Claim::Answered("ok", 2));
        let much_later = later + Duration::from_secs(1);
        assert_eq!(m.claim("a", 3, much_later), Claim::Run(3));
        // Its old record, popped later, does not forget the new run.
        m.answered("a", "again", 5, much_later);
        assert_eq!(m.claim("a", 4, much_later), Claim::Answered("again", 4));
    }

    #[test]
    fn at_most_the_limit_is_remembered_oldest_forgotten_first() {
        let t0 = Instant::now();
        let mut m: Memory<u32, u32> = Memory::default();
        for i in 0..=REMEMBER_MAX as u32 {
            let id = i.to_string();
            m.claim(&id, i, t0);
            m.answered(&id, i, 4, t0);
        }
        assert_eq!(m.len(), REMEMBER_MAX);
        assert_eq!(m.claim("0", 7, t0), Claim::Run(7));
        assert_eq!(m.claim("1", 7, t0), Claim::Answered(1, 7));
    }

    #[test]
    fn large_answers_are_forgotten_sooner_within_the_byte_budget() {
        let t0 = Instant::now();
        let mut m: Memory<u32, u32> = Memory::default();
        let big = REMEMBER_BYTES / 4;
        for i in 0..5u32 {
            let id = i.to_string();
            m.claim(&id, i, t0);
            m.answered(&id, i, big, t0);
        }
        assert_eq!(m.len(), 3, "three quarters fit, a fourth of four would not");
        assert_eq!(m.claim("1", 9, t0), Claim::Run(9));
        assert_eq!(m.claim("4", 9, t0), Claim::Answered(4, 9));
    }
}
