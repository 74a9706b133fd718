//! Who answers each task id. One owner per id holds the duty to publish its final state and
//! then ack its message, from the first delivery until the broker confirmed that state; only
//! then is the id remembered as answered. Copies that RabbitMQ redelivers (after a connection
//! loss) attach to the owner and are acked with it, or, once the id is answered, are acked
//! without publishing again. That is what gives each task id exactly one final state.
//!
//! Generic over the acker type so the rules are tested without a broker.

use crate::task::TaskId;
use std::collections::{HashSet, VecDeque};

/// What a delivery of a task id should do, decided atomically with claiming it.
#[derive(Debug, PartialEq)]
pub enum Arrival<A> {
    /// Nobody holds this id: the caller now owns it and runs it.
    Owner,
    /// Another handler owns it and will ack this copy together with its own message.
    Attached,
    /// Its final state was confirmed already: ack this copy, publish nothing.
    Answered(A),
}

/// A task id being run and answered by this worker.
#[derive(Debug)]
struct Owned<A, I> {
    info: I,
    /// Redelivered copies, acked (or requeued) together with the owner's message.
    copies: Vec<A>,
}

/// The owners of task ids in flight and a bounded memory of answered ids.
#[derive(Debug)]
pub struct Ledger<A, I> {
    owned: crate::idmap::TaskMap<Owned<A, I>>,
    /// Keyed by the id the task came with: remembering it costs no copy.
    answered: HashSet<TaskId, foldhash::fast::RandomState>,
    order: VecDeque<TaskId>,
    capacity: usize,
}

impl<A, I: Clone> Ledger<A, I> {
    /// A ledger that remembers the last `capacity` answered ids (at least one).
    pub fn new(capacity: usize) -> Self {
        Ledger {
            owned: Default::default(),
            answered: Default::default(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// True if the final state of `id` was confirmed (and it is still remembered).
    pub fn is_answered(&self, id: &str) -> bool {
        self.answered.contains(id)
    }

    /// A delivery of `id` arrived: claim it, attach it to its owner, or hand it back to be
    /// acked because the id is answered.
    pub fn arrive(&mut self, id: impl Into<TaskId>, info: I, acker: A) -> Arrival<A> {
        let id = id.into();
        if self.answered.contains(&id) {
            return Arrival::Answered(acker);
        }
        if let Some(owner) = self.owned.get_mut(&id) {
            owner.copies.push(acker);
            return Arrival::Attached;
        }
        self.owned.insert(
            id,
            Owned {
                info,
                copies: Vec::new(),
            },
        );
        Arrival::Owner
    }

    /// The owner's final state is confirmed (or can never be delivered): remember the id and
    /// return the copies to ack with the owner's message.
    pub fn answered(&mut self, id: impl Into<TaskId>) -> Vec<A> {
        let id = id.into();
        let copies = self.owned.remove(&id).map(|o| o.copies).unwrap_or_default();
        if self.answered.insert(id.clone()) {
            self.order.push_back(id);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.answered.remove(&old);
            }
        }
        copies
    }

    /// The owner gives the task back unanswered (the worker is stopping): forget it and
    /// return the copies, to be requeued with the owner's message.
    pub fn release(&mut self, id: &str) -> Vec<A> {
        self.owned.remove(id).map(|o| o.copies).unwrap_or_default()
    }

    pub fn owns(&self, id: &str) -> bool {
        self.owned.contains_key(id)
    }

    /// What `inspect active` shows: the info of every owned task.
    pub fn active(&self) -> Vec<I> {
        self.owned.values().map(|o| o.info.clone()).collect()
    }

    /// The info of the owned task `id`.
    pub fn info(&self, id: &str) -> Option<&I> {
        self.owned.get(id).map(|o| &o.info)
    }

    /// How many ids have an owner (running or being answered).
    pub fn active_count(&self) -> usize {
        self.owned.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type L = Ledger<u32, ()>;

    /// Every order in which an original delivery (1), its redelivered copy (2) and the owner's
    /// confirm can happen: exactly one owner, and every delivery is acked exactly once.
    #[test]
    fn an_id_has_one_owner_and_every_copy_is_acked_once() {
        enum Step {
            Deliver(u32),
            Confirm,
        }
        use Step::*;
        let orders = [
            vec![Deliver(1), Deliver(2), Confirm],
            vec![Deliver(1), Confirm, Deliver(2)],
        ];
        for order in orders {
            let mut l = L::new(10);
            let (mut owners, mut acked) = (0, Vec::new());
            for step in order {
                match step {
                    Deliver(tag) => match l.arrive("t", (), tag) {
                        Arrival::Owner => owners += 1,
                        Arrival::Attached => {}
                        Arrival::Answered(a) => acked.push(a),
                    },
                    Confirm => {
                        acked.push(1);
                        acked.extend(l.answered("t"));
                    }
                }
            }
            acked.sort();
            assert_eq!((owners, acked), (1, vec![1, 2]));
        }
    }

    #[test]
    fn a_released_id_is_not_answered_and_its_copies_come_back() {
        let mut l = L::new(10);
        assert_eq!(l.arrive("t", (), 1), Arrival::Owner);
        assert_eq!(l.arrive("t", (), 2), Arrival::Attached);
        assert_eq!(l.release("t"), vec![2]);
        assert!(!l.is_answered("t"));
        assert_eq!(l.arrive("t", (), 3), Arrival::Owner, "runs again later");
    }

    #[test]
    fn answered_ids_are_forgotten_oldest_first() {
        let mut l = L::new(2);
        for id in ["a", "b", "c"] {
            assert_eq!(l.arrive(id, (), 0), Arrival::Owner);
            l.answered(id);
        }
        assert!(!l.is_answered("a") && l.is_answered("b") && l.is_answered("c"));
        assert_eq!(l.arrive("b", (), 7), Arrival::Answered(7));
    }
}
