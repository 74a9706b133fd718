//! What queue and result backends did, per plugin name: counted by the instances (offers
//! refused), the offer source (offers taken and answered) and the dispatcher (results
//! stored), read into each plugin's status and `/metrics`. Kept by name, so a counter
//! survives the plugin's reload.

use super::status::BackendsStatus;
use crate::manifest::Manifest;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One plugin's counters.
#[derive(Debug, Default)]
pub struct BackendCounters {
    pub offers_in_flight: AtomicU64,
    pub offers_answered: AtomicU64,
    pub offers_not_taken: AtomicU64,
    pub offers_refused: AtomicU64,
    pub results_stored: AtomicU64,
    pub result_store_failures: AtomicU64,
    pub results_pending: AtomicU64,
}

impl BackendCounters {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sub(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct BackendStats {
    by_plugin: Mutex<HashMap<String, Arc<BackendCounters>>>,
}

impl BackendStats {
    /// The counters of `plugin`, made on first use.
    pub fn of(&self, plugin: &str) -> Arc<BackendCounters> {
        crate::sync::lock(&self.by_plugin)
            .entry(plugin.to_string())
            .or_default()
            .clone()
    }

    /// The status of a plugin that provides a backend; `None` for one that provides none.
    pub fn status(&self, m: &Manifest) -> Option<BackendsStatus> {
        if m.backends.is_empty() {
            return None;
        }
        let c = self.of(&m.name);
        let read = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Some(BackendsStatus {
            provides: m.backends.kinds().iter().map(|k| k.to_string()).collect(),
            window: m.backends.queue_backend.as_ref().map(|q| q.window),
            offers_in_flight: read(&c.offers_in_flight),
            offers_answered: read(&c.offers_answered),
            offers_not_taken: read(&c.offers_not_taken),
            offers_refused: read(&c.offers_refused),
            results_stored: read(&c.results_stored),
            result_store_failures: read(&c.result_store_failures),
            results_pending: read(&c.results_pending),
        })
    }
}
