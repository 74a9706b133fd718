//! Acks of one consumers' channel, coalesced: answered deliveries are acked together with one
//! `basic.ack` `multiple` where that is safe, instead of one frame each. The rules are a pure
//! [`Coalescer`] (tags in, [`AckOp`]s out; no I/O, no clock), table-tested below; the
//! [`ChannelAcks`] around it sends them on the lapin channel and owns nothing else.
//!
//! What must never happen: a multiple ack up to tag H covers every unacked delivery up to H on
//! the channel, so it is sent only when each of them has been answered. A task still running
//! with a low tag, a delivery another consumer's relay has not handed on yet, and a delivery
//! about to be rejected all block it (a reject of a tag a multiple ack already covered would
//! close the channel with PRECONDITION_FAILED). Answered tags above such a blocker wait in
//! their batch until its deadline, and go one by one then if it still blocks them, so a long
//! task never holds them past the deadline.
//!
//! Tags are per channel and start again at 1 on a new one, so each channel has its own
//! [`ChannelAcks`] and each delivery's [`Tag`] names the one of the channel it came on: a new
//! channel never sees the old one's tags, and what a lost channel had pending is dropped with it
//! (the broker redelivers those messages; the engine acks a copy of an answered task without
//! publishing again).
//!
//! lapin's own `Acker` is not used for task deliveries: it knows nothing of the others, and
//! acking a tag a multiple ack covered would close the channel. `Channel::basic_ack` with
//! `multiple` and a tag above 0 only sends the frame (lapin drops its prefetched deliveries
//! only for a multiple ack of tag 0, which this never sends), so lapin keeps no state that
//! disagrees with the broker's.

use crate::sync::lock;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::Channel;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest an answered delivery waits for its ack. Long enough to gather a batch when
/// tasks come fast (about 50 answers at 10,000 tasks/s, more than a batch), short enough that
/// the prefetch window it holds is back before a fast plugin would idle on it (a task message
/// is delivered in well under a millisecond once acked), and what a crash can redeliver stays
/// a few milliseconds of answers (each acked again without publishing, see the module doc).
pub const FLUSH_DEADLINE: Duration = Duration::from_millis(5);

/// The most answers acked by one multiple ack. The batch is also at most half the prefetch,
/// so answered deliveries never hold more than half of a consumer's window.
pub const MAX_BATCH: usize = 32;

/// One `basic.ack` to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOp {
    /// Every unacked delivery up to and including this tag (`multiple`).
    Multiple(u64),
    /// This delivery alone.
    Single(u64),
}

/// What the caller of [`Coalescer::answered`] does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// Flush now: the batch is full, or nothing else is in flight on the channel.
    Flush,
    /// The first answer of batch `n`: flush it ([`Coalescer::due`]) after [`FLUSH_DEADLINE`].
    Lead(u64),
    /// Joined a batch someone else flushes.
    Joined,
}

/// The ack state of one channel: which delivered tags are still open, which answered ones
/// wait for their ack.
#[derive(Debug)]
pub struct Coalescer {
    batch_size: usize,
    /// Delivered tags neither answered nor rejected, and tags below `seen` not handed on yet
    /// (another consumer's relay holds them): what a multiple ack must not cover.
    open: BTreeSet<u64>,
    /// The highest tag seen.
    seen: u64,
    /// Answered tags whose ack is not sent yet.
    answered: BTreeSet<u64>,
    /// Number of the batch `answered` belongs to; a flush starts the next.
    batch: u64,
    /// The batch has a leader waiting out [`FLUSH_DEADLINE`] (see [`Answered::Lead`]).
    led: bool,
}

impl Coalescer {
    /// The state of a new channel whose consumers have prefetch `prefetch`.
    pub fn new(prefetch: u16) -> Coalescer {
        Coalescer {
            batch_size: (prefetch as usize / 2).clamp(1, MAX_BATCH),
            open: BTreeSet::new(),
            seen: 0,
            answered: BTreeSet::new(),
            batch: 0,
            led: false,
        }
    }

    /// The broker delivered `tag`.
    pub fn delivered(&mut self, tag: u64) {
        if self.see(tag) {
            self.open.insert(tag);
        }
    }

    /// Marks every tag up to `tag` seen: those skipped are open (on their way). False if `tag`
    /// was seen before (it is open, or settled already).
    fn see(&mut self, tag: u64) -> bool {
        if tag <= self.seen {
            return false;
        }
        self.open.extend(self.seen + 1..tag);
        self.seen = tag;
        true
    }

    /// `tag` was answered: its ack may wait for others'.
    pub fn answered(&mut self, tag: u64) -> Answered {
        let known = self.open.remove(&tag) || self.see(tag);
        if !known || !self.answered.insert(tag) {
            // Answered twice, or rejected already: nothing more to send.
            return Answered::Joined;
        }
        if self.answered.len() >= self.batch_size || self.open.is_empty() {
            Answered::Flush
        } else if self.answered.len() == 1 {
            self.led = true;
            Answered::Lead(self.batch)
        } else {
            Answered::Joined
        }
    }

    /// `tag` is being rejected (the caller sends the reject at once, before any later ack):
    /// it is settled, and no multiple ack ever counts it as answered.
    pub fn rejected(&mut self, tag: u64) {
        if !self.open.remove(&tag) {
            self.see(tag);
        }
        self.answered.remove(&tag);
    }

    /// The acks of every answered tag: one multiple ack (or a single one, for a lone answer)
    /// up to the highest answered tag below the lowest open one, and a single ack for each
    /// answered tag above it.
    pub fn flush(&mut self) -> Vec<AckOp> {
        if self.answered.is_empty() {
            return Vec::new();
        }
        self.batch += 1;
        self.led = false;
        let lowest_open = self.open.first().copied().unwrap_or(u64::MAX);
        let above = self.answered.split_off(&lowest_open);
        let below = std::mem::take(&mut self.answered);
        let mut ops = Vec::with_capacity(1 + above.len());
        ops.extend(covering(&below));
        ops.extend(above.into_iter().map(AckOp::Single));
        ops
    }

    /// What a full batch sends at once: one ack for the answers below the lowest open tag.
    /// The answers above it stay in the batch until its leader's deadline, by when that tag
    /// is usually answered too and one multiple ack covers them all (each single ack costs
    /// the broker about as much as a delivery). Without a leader, everything goes now.
    pub fn flush_full(&mut self) -> Vec<AckOp> {
        let lowest_open = self.open.first().copied().unwrap_or(u64::MAX);
        if !self.led || self.answered.last().is_none_or(|&t| t < lowest_open) {
            return self.flush();
        }
        let above = self.answered.split_off(&lowest_open);
        let below = std::mem::replace(&mut self.answered, above);
        covering(&below).into_iter().collect()
    }

    /// [`flush`](Self::flush) if batch `batch` still waits (its leader's deadline passed);
    /// nothing if it was flushed meanwhile.
    pub fn due(&mut self, batch: u64) -> Vec<AckOp> {
        match batch == self.batch {
            true => self.flush(),
            false => Vec::new(),
        }
    }
}

/// One ack for every tag of `tags`, all answered and contiguous with what was acked before.
fn covering(tags: &BTreeSet<u64>) -> Option<AckOp> {
    match (tags.len(), tags.last()) {
        (1, Some(&tag)) => Some(AckOp::Single(tag)),
        (_, Some(&tag)) => Some(AckOp::Multiple(tag)),
        (_, None) => None,
    }
}

/// The acks of one lapin channel: the [`Coalescer`] and the channel its ops go out on.
pub struct ChannelAcks {
    channel: Channel,
    core: Mutex<Coalescer>,
    /// Held while acks and rejects go out, so they reach the broker in the order the core
    /// decided them (a multiple ack overtaking a reject or a single ack it covers would close
    /// the channel).
    wire: tokio::sync::Mutex<()>,
}

/// A task delivery, as the engine settles it: its tag and its channel's acks.
#[derive(Clone)]
pub struct Tag {
    tag: u64,
    acks: Arc<ChannelAcks>,
}

impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "delivery tag {}", self.tag)
    }
}

impl ChannelAcks {
    /// The acks of `channel`, whose consumers have prefetch `prefetch`.
    pub fn new(channel: Channel, prefetch: u16) -> Arc<ChannelAcks> {
        Arc::new(ChannelAcks {
            channel,
            core: Mutex::new(Coalescer::new(prefetch)),
            wire: tokio::sync::Mutex::new(()),
        })
    }

    /// Records a delivery of this channel (as soon as its consumer hands it on) and returns
    /// how to settle it.
    pub fn delivered(self: &Arc<Self>, tag: u64) -> Tag {
        lock(&self.core).delivered(tag);
        Tag {
            tag,
            acks: self.clone(),
        }
    }

    /// Sends every pending ack (a graceful stop, before the channel closes).
    pub async fn flush(&self) -> bool {
        self.send(Coalescer::flush).await
    }

    /// Takes ops from the core and sends them, in order; false if the channel failed (what
    /// was pending is dropped: the broker redelivers it).
    async fn send(&self, take: impl FnOnce(&mut Coalescer) -> Vec<AckOp>) -> bool {
        let _wire = self.wire.lock().await;
        let ops = take(&mut lock(&self.core));
        for op in ops {
            let (tag, multiple) = match op {
                AckOp::Multiple(tag) => (tag, true),
                AckOp::Single(tag) => (tag, false),
            };
            if let Err(e) = self
                .channel
                .basic_ack(tag, BasicAckOptions { multiple })
                .await
            {
                // The channel is gone (connection lost): RabbitMQ redelivers, and the copy is
                // acked as answered without publishing again.
                tracing::debug!("ack failed ({e}); the broker will redeliver and the copy will be acked as answered");
                return false;
            }
        }
        true
    }
}

impl Tag {
    /// Acks the delivery, together with others where the rules allow: waits at most
    /// [`FLUSH_DEADLINE`] (only the first answer of a batch waits, then sends the batch).
    /// True once the ack is taken on an open channel: a flush that fails later (the channel
    /// lost meanwhile) drops it, and the broker redelivers the message.
    pub async fn ack(&self) -> bool {
        let acks = &self.acks;
        if !acks.channel.status().connected() {
            return false;
        }
        let next = lock(&acks.core).answered(self.tag);
        match next {
            Answered::Flush => acks.send(Coalescer::flush_full).await,
            Answered::Lead(batch) => {
                tokio::time::sleep(FLUSH_DEADLINE).await;
                acks.send(|core| core.due(batch)).await
            }
            Answered::Joined => true,
        }
    }

    /// Rejects the delivery at once (back to its queue with `requeue`).
    pub async fn reject(&self, requeue: bool) -> bool {
        let acks = &self.acks;
        let _wire = acks.wire.lock().await;
        lock(&acks.core).rejected(self.tag);
        let reject = acks
            .channel
            .basic_reject(self.tag, BasicRejectOptions { requeue });
        match reject.await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("reject failed ({e})");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AckOp::{Multiple, Single};
    use super::Answered::{Flush, Joined, Lead};
    use super::*;

    /// A channel with prefetch 64 (batches of 32) that delivered tags 1..=n.
    fn delivered(n: u64) -> Coalescer {
        let mut c = Coalescer::new(64);
        (1..=n).for_each(|t| c.delivered(t));
        c
    }

    #[test]
    fn contiguous_answers_are_acked_by_one_multiple_ack() {
        let mut c = delivered(10);
        assert_eq!(c.answered(1), Lead(0));
        for t in 2..=5 {
            assert_eq!(c.answered(t), Joined);
        }
        assert_eq!(c.due(0), vec![Multiple(5)]);
        // Out of order: the highest answered tag below every open one.
        for t in [8, 6, 7] {
            c.answered(t);
        }
        assert_eq!(c.flush(), vec![Multiple(8)]);
        assert_eq!(c.flush(), vec![], "nothing is acked twice");
    }

    #[test]
    fn a_running_low_tag_blocks_the_multiple_ack_but_not_singles_at_flush() {
        let mut c = delivered(6);
        // Tag 2 is a long task; 1 and 3..=5 are answered, 6 still runs.
        for t in [1, 3, 4, 5] {
            c.answered(t);
        }
        assert_eq!(
            c.flush(),
            vec![Single(1), Single(3), Single(4), Single(5)],
            "nothing covers tag 2"
        );
        c.answered(6);
        assert_eq!(c.flush(), vec![Single(6)], "tag 2 still runs");
        // Once it is answered, the acks are contiguous again.
        c.delivered(7);
        c.delivered(8);
        c.answered(2);
        c.answered(7);
        assert_eq!(c.flush(), vec![Multiple(7)]);
    }

    #[test]
    fn answers_below_the_lowest_open_tag_go_as_one_multiple_and_the_rest_singly() {
        let mut c = delivered(9);
        for t in [1, 2, 3, 5, 6, 9] {
            c.answered(t);
        }
        assert_eq!(
            c.flush(),
            vec![Multiple(3), Single(5), Single(6), Single(9)]
        );
    }

    #[test]
    fn a_rejected_tag_is_never_covered_until_it_is_settled() {
        let mut c = delivered(4);
        c.answered(1);
        c.answered(3);
        // Tag 2 not yet rejected: the multiple ack stops below it.
        assert_eq!(c.flush(), vec![Single(1), Single(3)]);
        // Rejected (sent at once): settled, so later acks go around it.
        c.rejected(2);
        c.answered(4);
        assert_eq!(c.flush(), vec![Single(4)]);
        let mut c = delivered(5);
        c.rejected(3);
        for t in [1, 2, 4, 5] {
            c.answered(t);
        }
        // Covering tag 3 is harmless once its reject went out first: it is no longer unacked.
        assert_eq!(c.flush(), vec![Multiple(5)]);
        // A reject of a tag answered already (never done by the engine) takes it back out.
        let mut c = delivered(3);
        c.answered(1);
        c.answered(2);
        c.rejected(2);
        assert_eq!(c.flush(), vec![Single(1)]);
    }

    #[test]
    fn the_batch_size_flushes_at_once_and_is_at_most_half_the_prefetch() {
        for (prefetch, batch) in [(64, 32), (1000, MAX_BATCH), (8, 4), (2, 1), (1, 1), (0, 1)] {
            let mut c = Coalescer::new(prefetch);
            (1..=batch as u64 + 5).for_each(|t| c.delivered(t));
            let verdicts: Vec<Answered> = (1..=batch as u64).map(|t| c.answered(t)).collect();
            assert_eq!(verdicts.last(), Some(&Flush), "prefetch {prefetch}");
            if batch > 1 {
                assert_eq!(verdicts[0], Lead(0), "prefetch {prefetch}");
            }
            assert_eq!(
                c.flush(),
                vec![match batch {
                    1 => Single(1),
                    b => Multiple(b as u64),
                }],
                "prefetch {prefetch}"
            );
        }
    }

    #[test]
    fn a_full_batch_acks_below_the_lowest_open_tag_and_keeps_the_rest_for_its_deadline() {
        let mut c = Coalescer::new(8); // batches of 4
        (1..=8).for_each(|t| c.delivered(t));
        assert_eq!(c.answered(2), Lead(0));
        assert_eq!((c.answered(3), c.answered(4)), (Joined, Joined));
        assert_eq!(c.answered(5), Flush, "the batch is full");
        assert_eq!(c.flush_full(), vec![], "tag 1 still runs: 2-5 wait");
        assert_eq!(c.answered(1), Flush);
        assert_eq!(c.flush_full(), vec![Multiple(5)], "one ack for all five");
        assert_eq!(c.due(0), vec![], "the batch was flushed");
        // A low tag that keeps running: the rest go one by one at the leader's deadline.
        assert_eq!(c.answered(7), Lead(1));
        (8..=10).for_each(|t| c.delivered(t));
        assert_eq!((c.answered(8), c.answered(9)), (Joined, Joined));
        assert_eq!(c.answered(10), Flush);
        assert_eq!(c.flush_full(), vec![], "tag 6 still runs");
        assert_eq!(c.due(1), vec![Single(7), Single(8), Single(9), Single(10)]);
        // No leader (batches of 1): what is answered goes at once.
        let mut c = Coalescer::new(2);
        (1..=2).for_each(|t| c.delivered(t));
        assert_eq!(c.answered(2), Flush);
        assert_eq!(
            c.flush_full(),
            vec![Single(2)],
            "nobody would flush it later"
        );
    }

    #[test]
    fn nothing_else_in_flight_flushes_at_once() {
        let mut c = delivered(2);
        assert_eq!(c.answered(1), Lead(0));
        assert_eq!(c.answered(2), Flush, "the last delivery in flight");
        assert_eq!(c.flush(), vec![Multiple(2)]);
        c.delivered(3);
        assert_eq!(c.answered(3), Flush, "a lone delivery");
        assert_eq!(c.flush(), vec![Single(3)]);
    }

    #[test]
    fn a_leader_flushes_only_its_own_batch() {
        let mut c = delivered(40);
        assert_eq!(c.answered(1), Lead(0));
        (2..32).for_each(|t| assert_eq!(c.answered(t), Joined));
        assert_eq!(c.answered(32), Flush);
        assert_eq!(c.flush(), vec![Multiple(32)]);
        // The next batch has its own leader; batch 0's leader wakes to nothing.
        assert_eq!(c.answered(33), Lead(1));
        assert_eq!(c.due(0), vec![]);
        assert_eq!(c.due(1), vec![Single(33)]);
        assert_eq!(c.due(1), vec![]);
    }

    #[test]
    fn a_delivery_not_handed_on_yet_blocks_the_multiple_ack() {
        // Two consumers share the channel: tag 3 reached its relay first, 2 is still on its way.
        let mut c = Coalescer::new(64);
        c.delivered(1);
        c.delivered(3);
        c.answered(1);
        assert_eq!(c.answered(3), Joined, "tag 2 is in flight");
        assert_eq!(c.flush(), vec![Single(1), Single(3)]);
        c.delivered(2);
        assert_eq!(c.answered(2), Flush);
        assert_eq!(c.flush(), vec![Single(2)]);
        // An answer for a tag never recorded as delivered counts the skipped ones as open.
        c.answered(6);
        assert_eq!(c.flush(), vec![Single(6)]);
        c.answered(4);
        c.answered(5);
        assert_eq!(c.flush(), vec![Multiple(5)]);
    }

    #[test]
    fn answering_twice_sends_one_ack() {
        let mut c = delivered(3);
        c.answered(1);
        assert_eq!(c.answered(1), Joined);
        assert_eq!(c.flush(), vec![Single(1)]);
        assert_eq!(c.answered(1), Joined, "acked already");
        assert_eq!(c.flush(), vec![]);
    }

    #[test]
    fn a_new_channel_starts_from_nothing() {
        // The old channel had answers pending when it was lost; they are dropped with it.
        let mut old = delivered(10);
        (5..=9).for_each(|t| {
            old.answered(t);
        });
        // Its replacement counts from 1 again: tag 1 there is a different message.
        let mut new = Coalescer::new(64);
        new.delivered(1);
        assert_eq!(new.answered(1), Flush);
        assert_eq!(new.flush(), vec![Single(1)], "nothing of the old channel's");
    }
}
