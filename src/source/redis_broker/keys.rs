//! The names kombu's Redis transport gives things, as pure functions: a queue's list per
//! priority step, the unacked hash, index and mutex, an exchange's binding set, the pub/sub
//! channels of fanout exchanges, and the order a consumer pops its lists in. Nothing here
//! talks to Redis; `ops` and the consumer build every key from a [`Keys`].
//!
//! kombu prefixes *every* key and channel with the transport option `global_keyprefix`
//! (its `PrefixedStrictRedis` rewrites the key of LPUSH, RPUSH, RPOP, BRPOP, HSET, HDEL, ZADD,
//! ZREM, SET, SADD, SMEMBERS, PUBLISH, ... and `PrefixedRedisPubSub` the channels of
//! (P)SUBSCRIBE), so every name below starts with it, fanout channels included.

/// kombu's separator between a queue's name and its priority step, and between the parts of
/// a binding (`Channel.sep`).
pub const SEP: &str = "\x06\x16";

/// kombu's default `priority_steps`: one list per step.
pub const DEFAULT_PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// The highest message priority kombu's virtual transport knows (`max_priority`); higher
/// numbers are clamped to it. On Redis a *lower* number is served first.
pub const MAX_PRIORITY: u8 = 9;

/// `priority_steps` kombu could not use as given.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StepsError {
    #[error(
        "transport option `priority_steps` is empty; give at least one step, e.g. [0, 3, 6, 9]"
    )]
    Empty,
    #[error(
        "transport option `priority_steps` must be strictly increasing, as in Celery's \
         configuration (got {0:?}); e.g. [0, 3, 6, 9] or [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"
    )]
    NotIncreasing(Vec<u8>),
}

/// Every key and channel name of one kombu Redis transport: one `global_keyprefix`, one
/// database, one set of priority steps.
#[derive(Clone, Debug, PartialEq)]
pub struct Keys {
    prefix: String,
    db: u32,
    steps: Vec<u8>,
}

impl Keys {
    /// The names for `global_keyprefix` (empty for none) and database `db` (the URL's path),
    /// with kombu's default priority steps.
    pub fn new(global_keyprefix: &str, db: u32) -> Keys {
        Keys {
            prefix: global_keyprefix.to_string(),
            db,
            steps: DEFAULT_PRIORITY_STEPS.to_vec(),
        }
    }

    /// The same names with other `priority_steps` (Celery's docs suggest `list(range(10))`);
    /// every producer and consumer of a queue must use the same steps.
    pub fn with_priority_steps(mut self, steps: &[u8]) -> Result<Keys, StepsError> {
        if steps.is_empty() {
            return Err(StepsError::Empty);
        }
        if steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(StepsError::NotIncreasing(steps.to_vec()));
        }
        self.steps = steps.to_vec();
        Ok(self)
    }

    pub fn global_keyprefix(&self) -> &str {
        &self.prefix
    }

    pub fn db(&self) -> u32 {
        self.db
    }

    pub fn priority_steps(&self) -> &[u8] {
        &self.steps
    }

    /// The step a message of `priority` (already clamped to 0..=9) goes to: the largest step
    /// not above it, as kombu's `Channel.priority` bisects. Below the first step it wraps to
    /// the last one, as kombu's `steps[-1]` does.
    pub fn step_for(&self, priority: u8) -> u8 {
        let above = self.steps.partition_point(|s| *s <= priority);
        match above {
            0 => *self
                .steps
                .last()
                .expect("steps are never empty (checked when set)"),
            n => self.steps[n - 1],
        }
    }

    /// The list of `queue` for priority `step`: the bare name for step 0, else
    /// `<queue>\x06\x16<step>` (kombu's `_q_for_pri`).
    pub fn list(&self, queue: &str, step: u8) -> String {
        match step {
            0 => format!("{}{queue}", self.prefix),
            s => format!("{}{queue}{SEP}{s}", self.prefix),
        }
    }

    /// The list a message of `priority` on `queue` is pushed to.
    pub fn list_for(&self, queue: &str, priority: u8) -> String {
        self.list(queue, self.step_for(priority.min(MAX_PRIORITY)))
    }

    /// The queue a list belongs to (BRPOP's answer, which kombu maps back with
    /// `rsplit(sep, 1)[0]`); `None` if the key is not under our prefix.
    pub fn queue_of<'k>(&self, list: &'k str) -> Option<&'k str> {
        let bare = list.strip_prefix(self.prefix.as_str())?;
        Some(bare.rsplit_once(SEP).map_or(bare, |(queue, _)| queue))
    }

    /// The hash of unacked messages: tag -> JSON `[message, exchange, routing_key]`.
    pub fn unacked(&self) -> String {
        format!("{}unacked", self.prefix)
    }

    /// The sorted set of unacked tags, scored by when they were delivered.
    pub fn unacked_index(&self) -> String {
        format!("{}unacked_index", self.prefix)
    }

    /// The lock a kombu worker holds while it restores expired messages.
    pub fn unacked_mutex(&self) -> String {
        format!("{}unacked_mutex", self.prefix)
    }

    /// The set of `exchange`'s bindings, members `<routing_key>\x06\x16<pattern>\x06\x16<queue>`.
    pub fn binding(&self, exchange: &str) -> String {
        format!("{}_kombu.binding.{exchange}", self.prefix)
    }

    /// The channel a fanout message is PUBLISHed on: `/<db>.<exchange>`, or with a routing
    /// key `/<db>.<exchange>/<routing_key>` (kombu's `fanout_patterns`, on by default).
    pub fn fanout_channel(&self, exchange: &str, routing_key: &str) -> String {
        match routing_key {
            "" => format!("{}/{}.{exchange}", self.prefix, self.db),
            rk => format!("{}/{}.{exchange}/{rk}", self.prefix, self.db),
        }
    }

    /// The pattern a queue bound to a fanout exchange with `binding_key` PSUBSCRIBEs to:
    /// the publish channel with kombu's `#` -> `*` (so `#` binds every routing key).
    pub fn fanout_pattern(&self, exchange: &str, binding_key: &str) -> String {
        self.fanout_channel(exchange, &binding_key.replace('#', "*"))
    }

    /// The lists a consumer of `cycle`'s queues pops from, in the order kombu's BRPOP names
    /// them: priority-major (every queue's step-0 list, then every queue's next step, ...),
    /// queues in the cycle's current order. The first non-empty list wins.
    pub fn watch_order(&self, cycle: &QueueCycle) -> Vec<String> {
        self.steps
            .iter()
            .flat_map(|step| cycle.queues().iter().map(|q| self.list(q, *step)))
            .collect()
    }
}

/// kombu's default `queue_order_strategy`, `round_robin`: the queues in order, and the one
/// a message just came from moves to the end, so a busy queue cannot starve the others.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueCycle {
    queues: Vec<String>,
}

impl QueueCycle {
    /// The cycle over `queues` in their given order, each once (kombu's `active_queues`).
    pub fn new<S: AsRef<str>>(queues: &[S]) -> QueueCycle {
        let mut unique: Vec<String> = Vec::with_capacity(queues.len());
        for q in queues {
            if !unique.iter().any(|u| u == q.as_ref()) {
                unique.push(q.as_ref().to_string());
            }
        }
        QueueCycle { queues: unique }
    }

    pub fn queues(&self) -> &[String] {
        &self.queues
    }

    /// After a message came from `used`: it goes to the end (unknown names change nothing).
    pub fn rotate(&mut self, used: &str) {
        if let Some(i) = self.queues.iter().position(|q| q == used) {
            let q = self.queues.remove(i);
            self.queues.push(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_names_follow_the_priority_step() {
        let k = Keys::new("", 0);
        assert_eq!(k.list("celery", 0), "celery");
        assert_eq!(k.list("celery", 3), "celery\x06\x163");
        assert_eq!(k.list_for("celery", 9), "celery\x06\x169");
        assert_eq!(k.list_for("celery", 200), "celery\x06\x169");
    }

    #[test]
    fn priorities_map_to_the_largest_step_not_above_them() {
        let k = Keys::new("", 0);
        let steps: Vec<u8> = (0..=9).map(|p| k.step_for(p)).collect();
        assert_eq!(steps, [0, 0, 0, 3, 3, 3, 6, 6, 6, 9]);
        let ten = Keys::new("", 0)
            .with_priority_steps(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
            .unwrap();
        assert_eq!(ten.step_for(7), 7);
        // Below the first step, kombu's `steps[bisect(...) - 1]` is `steps[-1]`.
        let odd = Keys::new("", 0).with_priority_steps(&[2, 5]).unwrap();
        assert_eq!(
            (odd.step_for(0), odd.step_for(4), odd.step_for(9)),
            (5, 2, 5)
        );
    }

    #[test]
    fn priority_steps_are_checked() {
        assert_eq!(
            Keys::new("", 0).with_priority_steps(&[]),
            Err(StepsError::Empty)
        );
        let e = Keys::new("", 0)
            .with_priority_steps(&[0, 3, 3])
            .unwrap_err();
        assert!(e.to_string().contains("strictly increasing"), "{e}");
    }

    #[test]
    fn the_global_prefix_is_on_every_key_and_channel() {
        let k = Keys::new("app:", 2);
        assert_eq!(k.list("q", 0), "app:q");
        assert_eq!(k.list("q", 6), "app:q\x06\x166");
        assert_eq!(k.unacked(), "app:unacked");
        assert_eq!(k.unacked_index(), "app:unacked_index");
        assert_eq!(k.unacked_mutex(), "app:unacked_mutex");
        assert_eq!(k.binding("celery"), "app:_kombu.binding.celery");
        assert_eq!(
            k.fanout_channel("celery.pidbox", ""),
            "app:/2.celery.pidbox"
        );
        assert_eq!(
            k.fanout_channel("celeryev", "worker.heartbeat"),
            "app:/2.celeryev/worker.heartbeat"
        );
        let bare = Keys::new("", 0);
        assert_eq!(bare.unacked(), "unacked");
        assert_eq!(bare.fanout_channel("celery.pidbox", ""), "/0.celery.pidbox");
    }

    #[test]
    fn fanout_patterns_turn_hash_into_star() {
        let k = Keys::new("", 0);
        assert_eq!(k.fanout_pattern("celeryev", "#"), "/0.celeryev/*");
        assert_eq!(k.fanout_pattern("celeryev", "task.#"), "/0.celeryev/task.*");
        assert_eq!(k.fanout_pattern("celery.pidbox", ""), "/0.celery.pidbox");
    }

    #[test]
    fn watch_order_is_priority_major_like_kombus_brpop() {
        let k = Keys::new("", 0);
        let cycle = QueueCycle::new(&["a", "b"]);
        assert_eq!(
            k.watch_order(&cycle),
            [
                "a",
                "b",
                "a\x06\x163",
                "b\x06\x163",
                "a\x06\x166",
                "b\x06\x166",
                "a\x06\x169",
                "b\x06\x169"
            ]
        );
    }

    #[test]
    fn the_queue_a_message_came_from_moves_to_the_end() {
        let k = Keys::new("p:", 0);
        let mut cycle = QueueCycle::new(&["a", "b", "c", "a"]);
        assert_eq!(cycle.queues(), ["a", "b", "c"]);
        // BRPOP answered from b's step-3 list: b goes last, a and c keep their order.
        let queue = k.queue_of("p:b\x06\x163").unwrap();
        cycle.rotate(queue);
        assert_eq!(cycle.queues(), ["a", "c", "b"]);
        assert_eq!(&k.watch_order(&cycle)[..3], ["p:a", "p:c", "p:b"]);
        cycle.rotate("nope");
        assert_eq!(cycle.queues(), ["a", "c", "b"]);
    }

    #[test]
    fn queue_of_strips_prefix_and_step() {
        let k = Keys::new("p:", 0);
        assert_eq!(k.queue_of("p:celery"), Some("celery"));
        assert_eq!(k.queue_of("p:celery\x06\x169"), Some("celery"));
        assert_eq!(k.queue_of("other:celery"), None);
    }
}
