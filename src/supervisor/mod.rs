//! The supervisor: the set of running plugin pools and the route from task name to pool.
//!
//! Each plugin is an independent pool actor; the route table maps task names to pool handles
//! and is swapped as a whole, so replacing one plugin (a new pool started beside the old one,
//! then the route switched, then the old pool drained) never touches the others.

pub mod backend_stats;
pub mod cgroup;
pub mod containment;
pub mod handshake;
pub mod identity;
pub mod instance;
mod now;
pub mod offer;
pub mod pool;
pub mod process;
pub mod reply_id;
pub mod restart;
pub mod sandbox;
pub mod status;

use crate::manifest::Manifest;
use pool::{PoolHandle, PoolOptions};
use status::{PluginState, PluginStatus};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;

#[derive(Debug, Default)]
struct Routes {
    by_task: crate::idmap::IdMap<PoolHandle>,
    by_plugin: BTreeMap<String, PoolHandle>,
    /// The plugins that provide a result backend: looked at for every task that ends.
    result_backends: Vec<PoolHandle>,
}

impl Routes {
    /// Fills `by_task` and `result_backends` from `by_plugin`.
    fn index_tasks(&mut self) {
        self.result_backends.clear();
        for handle in self.by_plugin.values() {
            for t in handle.manifest().task_names() {
                self.by_task.insert(t.to_string(), handle.clone());
            }
            if handle.manifest().backends.result_backend.is_some() {
                self.result_backends.push(handle.clone());
            }
        }
    }
}

/// Owns every plugin pool of this worker.
#[derive(Debug)]
pub struct Supervisor {
    /// Read by every task (no lock, no reference count taken), replaced whole by a reload.
    routes: arc_swap::ArcSwap<Routes>,
    /// Every pool actor and every drain of a retired pool: tracked, never growing with
    /// reloads (finished tasks leave it), waited for at stop.
    tasks: TaskTracker,
    options: PoolOptions,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

/// What a reload did, plugin by plugin.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReloadReport {
    /// New plugins, started.
    pub started: Vec<String>,
    /// Changed plugins whose new version is now serving (the old one drains).
    pub replaced: Vec<String>,
    /// Plugins no longer in the directory, draining and stopping.
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Unchanged plugins that were `failed`, started again.
    #[serde(default)]
    pub restarted: Vec<String>,
    /// Plugins whose new version did not become ready, with why; a replaced plugin's old
    /// version keeps serving.
    pub failed: Vec<(String, String)>,
}

/// A pool started by a reload, and the one it would replace.
struct Candidate {
    new: PoolHandle,
    old: Option<PoolHandle>,
}

impl Supervisor {
    /// Starts a pool for each manifest.
    pub fn start(manifests: Vec<Manifest>, options: PoolOptions) -> Supervisor {
        let tasks = TaskTracker::new();
        let mut routes = Routes::default();
        for m in manifests {
            let handle = pool::start(Arc::new(m), options.clone(), &tasks);
            routes
                .by_plugin
                .insert(handle.manifest().name.clone(), handle);
        }
        routes.index_tasks();
        Supervisor {
            routes: arc_swap::ArcSwap::from_pointee(routes),
            tasks,
            options,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Applies a new set of manifests without touching unchanged plugins: new ones start,
    /// removed ones drain and stop, a changed one is replaced blue/green (the new pool must
    /// become ready before tasks go to it; then the old pool drains for up to `drain`), and
    /// an unchanged `failed` one is started again. With `wait`, returns only once the retired
    /// pools have stopped, so their files may go.
    pub async fn reload(
        &self,
        manifests: Vec<Manifest>,
        drain: Duration,
        wait: bool,
    ) -> ReloadReport {
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.routes.load_full();
        let mut report = ReloadReport::default();
        let mut next = Routes::default();
        let mut candidates = Vec::new();
        for m in manifests {
            match current.by_plugin.get(&m.name) {
                Some(old) if **old.manifest() == m => {
                    // A reload is also how an operator says "try again" to a failed plugin.
                    match old.restart().await {
                        true => report.restarted.push(m.name.clone()),
                        false => report.unchanged.push(m.name.clone()),
                    }
                    next.by_plugin.insert(m.name.clone(), old.clone());
                }
                old => candidates.push(Candidate {
                    new: pool::start(Arc::new(m), self.options.clone(), &self.tasks),
                    old: old.cloned(),
                }),
            }
        }
        let mut retired = Vec::new();
        for candidate in candidates {
            Self::settle_candidate(candidate, &mut next, &mut retired, &mut report).await;
        }
        for (name, old) in &current.by_plugin {
            if !next.by_plugin.contains_key(name) {
                report.removed.push(name.clone());
                retired.push(old.clone());
            }
        }
        next.index_tasks();
        self.routes.store(Arc::new(next));
        tracing::info!(?report, "plugins reloaded");
        self.publish_reload(&report);
        self.retire(retired, drain, wait).await;
        report
    }

    /// Waits for a candidate to become ready, then routes to it (retiring what it replaces);
    /// if it does not, the old version keeps serving and the report says why.
    async fn settle_candidate(
        Candidate { new, old }: Candidate,
        next: &mut Routes,
        retired: &mut Vec<PoolHandle>,
        report: &mut ReloadReport,
    ) {
        let name = new.manifest().name.clone();
        let timeout = new.manifest().timeouts.init + Duration::from_secs(1);
        let Err(state) = new.wait_ready(tokio::time::Instant::now() + timeout).await else {
            match old {
                Some(old) => {
                    report.replaced.push(name.clone());
                    retired.push(old);
                }
                None => report.started.push(name.clone()),
            }
            next.by_plugin.insert(name, new);
            return;
        };
        let reason = match state {
            PluginState::Failed(reason) => reason,
            _ => match new.view().borrow().last_exit.clone() {
                Some(exit) => format!("not ready within {timeout:?}; last exit: {exit}"),
                None => format!("not ready within {timeout:?}"),
            },
        };
        tracing::error!(plugin = %name, "reload: the new version did not start: {reason}");
        report.failed.push((name.clone(), reason));
        match old {
            // The old version keeps serving; the failed candidate goes away.
            Some(old) => {
                next.by_plugin.insert(name, old);
                retired.push(new);
            }
            // A new plugin that cannot start stays visible, failing its tasks with the reason.
            None => {
                next.by_plugin.insert(name, new);
            }
        }
    }

    /// Drains and stops retired pools; with `wait`, until they have stopped.
    async fn retire(&self, retired: Vec<PoolHandle>, drain: Duration, wait: bool) {
        let stops: Vec<_> = retired
            .into_iter()
            .map(|old| self.tasks.spawn(async move { old.stop(drain).await }))
            .collect();
        if wait {
            for stop in stops {
                let _ = stop.await;
            }
            tracing::info!("replaced and removed plugins have stopped");
        }
    }

    /// Tells event subscribers which plugins a reload installed, replaced and removed.
    fn publish_reload(&self, report: &ReloadReport) {
        let routes = self.routes();
        let version = |name: &str| {
            routes
                .by_plugin
                .get(name)
                .map(|p| p.manifest().version.clone())
        };
        for (kind, names) in [
            ("plugin.installed", &report.started),
            ("plugin.replaced", &report.replaced),
            ("plugin.removed", &report.removed),
        ] {
            for name in names {
                self.options.events.publish(kind, |f| {
                    f.field("plugin", name).field("version", &version(name));
                });
            }
        }
    }

    /// The worker's event bus, which every pool and instance publishes on.
    pub fn events(&self) -> &Arc<crate::events::EventBus> {
        &self.options.events
    }

    /// What queue and result backends did, by plugin name.
    pub fn backend_stats(&self) -> &Arc<backend_stats::BackendStats> {
        &self.options.offers.stats
    }

    /// The names of the result backends that store `task`'s final states.
    pub fn result_backends(&self, task: &str) -> Vec<String> {
        self.routes()
            .result_backends
            .iter()
            .filter(|p| {
                let m = p.manifest();
                m.backends
                    .result_backend
                    .as_ref()
                    .is_some_and(|r| r.stores(task))
            })
            .map(|p| p.manifest().name.clone())
            .collect()
    }

    fn routes(&self) -> arc_swap::Guard<Arc<Routes>> {
        self.routes.load()
    }

    /// The pool serving `task`, if any.
    pub fn route(&self, task: &str) -> Option<PoolHandle> {
        self.routes().by_task.get(task).cloned()
    }

    /// Whether some plugin serves `task` (without handing out its pool).
    pub fn serves(&self, task: &str) -> bool {
        self.routes().by_task.contains_key(task)
    }

    /// Every task name some plugin serves.
    pub fn task_names(&self) -> Vec<String> {
        self.routes().by_task.keys().cloned().collect()
    }

    pub fn plugin(&self, name: &str) -> Option<PoolHandle> {
        self.routes().by_plugin.get(name).cloned()
    }

    pub fn plugins(&self) -> Vec<PoolHandle> {
        self.routes().by_plugin.values().cloned().collect()
    }

    /// Waits until every plugin has a ready instance or has failed, up to `timeout`.
    /// Returns the plugins that are not ready, with their state.
    pub async fn wait_ready(&self, timeout: Duration) -> Vec<(String, PluginState)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut not_ready = Vec::new();
        for pool in self.plugins() {
            if let Err(state) = pool.wait_ready(deadline).await {
                not_ready.push((pool.manifest().name.clone(), state));
            }
        }
        not_ready
    }

    /// The status of every plugin, sorted by name.
    pub async fn status(&self) -> Vec<PluginStatus> {
        let mut out = Vec::new();
        for pool in self.plugins() {
            if let Some(s) = pool.status().await {
                out.push(s);
            }
        }
        out
    }

    /// Stops every plugin in parallel; `grace` overrides each manifest's shutdown grace.
    pub async fn stop(&self, grace: Option<Duration>) {
        let mut stops = tokio::task::JoinSet::new();
        for pool in self.plugins() {
            stops.spawn(async move {
                let g = grace.unwrap_or(pool.manifest().timeouts.shutdown_grace);
                pool.stop(g).await;
            });
        }
        while stops.join_next().await.is_some() {}
        self.tasks.close();
        self.tasks.wait().await;
    }
}
