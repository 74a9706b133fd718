//! Revoked task ids, remembered as Celery does (50,000 ids for 3 hours), so a revoked task that
//! arrives later is answered REVOKED without running.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

const REVOKED_MAX: usize = 50_000;
const REVOKED_TTL: Duration = Duration::from_secs(3 * 3600);

pub struct Revoked {
    map: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
    limit: usize,
}

impl Default for Revoked {
    fn default() -> Self {
        Revoked::with_limit(REVOKED_MAX)
    }
}

impl Revoked {
    /// A set that remembers at most `limit` ids (Celery's is 50,000; the bench goes past it).
    pub fn with_limit(limit: usize) -> Revoked {
        Revoked {
            map: HashMap::new(),
            order: VecDeque::new(),
            limit: limit.max(1),
        }
    }

    pub fn insert(&mut self, id: &str) {
        let now = Instant::now();
        self.map.insert(id.to_string(), now);
        self.order.push_back((id.to_string(), now));
        self.prune(now);
    }

    pub fn contains(&mut self, id: &str) -> bool {
        self.prune(Instant::now());
        self.map.contains_key(id)
    }

    /// The ids remembered, oldest first (`inspect revoked`).
    pub fn ids(&mut self) -> Vec<String> {
        self.prune(Instant::now());
        self.order
            .iter()
            .filter(|(id, at)| self.map.get(id) == Some(at))
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn prune(&mut self, now: Instant) {
        while let Some((id, at)) = self.order.front() {
            if self.order.len() <= self.limit && now.duration_since(*at) < REVOKED_TTL {
                break;
            }
            if self.map.get(id) == Some(at) {
                self.map.remove(id);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_listed_once_oldest_first() {
        let mut r = Revoked::default();
        for id in ["a", "b", "a", "c"] {
            r.insert(id);
        }
        assert_eq!(r.ids(), ["b", "a", "c"]);
        assert!(r.contains("a") && !r.contains("d"));
    }
}
