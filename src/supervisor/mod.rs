//! The supervisor: the set of running plugin pools and the route from task name to pool.
//!
//! Each plugin is an independent pool actor; the route table maps task names to pool handles
//! and is swapped as a whole, so replacing one plugin (a new pool started beside the old one,
//! then the route switched, then the old pool drained) never touches the others.

pub mod instance;
pub mod pool;
pub mod process;
pub mod restart;
pub mod status;

use crate::manifest::Manifest;
use pool::{PoolHandle, PoolOptions};
use status::{PluginState, PluginStatus};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::task::JoinHandle;

#[derive(Debug, Default)]
struct Routes {
    by_task: HashMap<String, PoolHandle>,
    by_plugin: BTreeMap<String, PoolHandle>,
}

/// Owns every plugin pool of this worker.
#[derive(Debug)]
pub struct Supervisor {
    routes: RwLock<Arc<Routes>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Supervisor {
    /// Starts a pool for each manifest.
    pub fn start(manifests: Vec<Manifest>, options: PoolOptions) -> Supervisor {
        let mut routes = Routes::default();
        let mut tasks = Vec::new();
        for m in manifests {
            let (handle, task) = pool::start(Arc::new(m), options.clone());
            for t in handle.manifest().task_names() {
                routes.by_task.insert(t.to_string(), handle.clone());
            }
            routes
                .by_plugin
                .insert(handle.manifest().name.clone(), handle);
            tasks.push(task);
        }
        Supervisor {
            routes: RwLock::new(Arc::new(routes)),
            tasks: Mutex::new(tasks),
        }
    }

    fn routes(&self) -> Arc<Routes> {
        self.routes.read().expect("route lock poisoned").clone()
    }

    /// The pool serving `task`, if any.
    pub fn route(&self, task: &str) -> Option<PoolHandle> {
        self.routes().by_task.get(task).cloned()
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
            let mut view = pool.view();
            let settled = tokio::time::timeout_at(
                deadline,
                view.wait_for(|v| {
                    v.ready > 0 || matches!(v.state, PluginState::Failed(_) | PluginState::Stopped)
                }),
            )
            .await;
            let ready = matches!(&settled, Ok(Ok(v)) if v.ready > 0);
            drop(settled);
            if ready {
                continue;
            }
            let state = view.borrow().state.clone();
            not_ready.push((pool.manifest().name.clone(), state));
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
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().expect("task list lock poisoned"));
        for t in tasks {
            let _ = t.await;
        }
    }
}
