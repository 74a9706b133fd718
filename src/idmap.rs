//! Maps keyed by task ids and task names: every task passes through several (the route
//! table, the dispatcher's in-flight table, a pool's placements, an instance's tasks, a
//! broker source's ledger). Std's SipHash cost ~9 % of the supervisor's instructions per task;
//! foldhash is several times faster and, seeded per process, still fit for ids chosen by any
//! broker user (what hashbrown itself uses by default).

/// A map from task id (or name) to `V`; make one with `IdMap::default()`.
pub type IdMap<V> = std::collections::HashMap<String, V, foldhash::fast::RandomState>;

/// A map from a number the worker chose (request ids) to `V`.
pub type NumMap<V> = std::collections::HashMap<u64, V, foldhash::fast::RandomState>;

/// A map from task id to `V`, looked up by `&str`: its keys share the id's one allocation.
pub type TaskMap<V> =
    std::collections::HashMap<crate::task_id::TaskId, V, foldhash::fast::RandomState>;
