//! Celery remote control as any broker's worker answers it: what `celery inspect` and
//! `celery control` ask of this worker ([`RemoteWorker`]), from the engine's state; the
//! transport adds its queues and settings, and carries the replies.

use super::transport::WantedQueue;
use super::worker::{Transport, Worker};
use crate::source::pidbox::RemoteWorker;
use crate::source::redact;
use crate::task::{CancelCause, Cancellation};
use serde_json::{json, Map, Value};

impl<T: Transport> RemoteWorker for Worker<T> {
    fn registered(&self) -> Vec<String> {
        self.engine.dispatcher.task_names()
    }
    fn active(&self) -> Vec<Value> {
        let active = self.engine.tasks().ledger.active();
        active.into_iter().map(|a| json!(a)).collect()
    }
    fn reserved(&self) -> Vec<Value> {
        self.engine
            .tasks()
            .reserved
            .values()
            .map(|a| json!(a))
            .collect()
    }
    fn active_queues(&self) -> Vec<Value> {
        T::active_queues(self)
    }
    async fn stats(&self) -> Value {
        let plugins = self.engine.dispatcher.status().await;
        let processes: Vec<u32> = plugins
            .iter()
            .flat_map(|p| p.instances.iter().filter_map(|i| i.pid))
            .collect();
        let capacity = self.engine.dispatcher.capacity();
        let broker = T::settings(self);
        let uptime = self
            .engine
            .started
            .elapsed()
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({
            "pid": crate::worker_pid(),
            "clock": "0",
            "uptime": uptime,
            "total": *crate::sync::lock(&self.engine.totals),
            "pool": {
                "implementation": "worker (out-of-process plugins)",
                "max-concurrency": capacity,
                "processes": processes,
                "prefetch_count": broker.prefetch,
            },
            "broker": { "transport": T::NAME, "hostname": redact(&broker.url) },
            "prefetch_count": broker.prefetch,
            "plugins": plugins.iter().map(|p| json!({
                "name": p.name, "version": p.version, "state": p.state.to_string(), "tasks": p.tasks,
                "instances": p.instances.len(), "queued": p.queued,
            })).collect::<Vec<_>>(),
            "worker": { "name": crate::WORKER_NAME, "version": crate::WORKER_VERSION },
            "events": { "task_events": self.monitor.task_events(), "dropped": self.monitor.dropped() },
        })
    }
    /// Remembers the ids as revoked. With `terminate`, running ones are cancelled, then killed
    /// after the plugin's cancel grace, and answered REVOKED ("terminated"). Without it, a
    /// queued one is dropped and a running one is asked to stop (`task.cancel`, reason
    /// `revoked`) with no kill: REVOKED if it ends as cancelled, its result if it finishes.
    async fn revoke(&self, ids: &[String], terminate: bool) {
        let mut to_cancel = Vec::new();
        {
            let mut tasks = self.engine.tasks();
            // A longer id can name no task here (refused when read): not worth remembering.
            for id in ids.iter().filter(|id| id.len() <= super::MAX_ID_BYTES) {
                tasks.revoked.insert(id);
                if tasks.ledger.owns(id) {
                    to_cancel.push(id.clone());
                }
            }
        }
        self.engine.revoke_signal.notify_waiters();
        // The cause travels with the cancel to the task's outcome, which settles it REVOKED.
        let dispatcher = &self.engine.dispatcher;
        for id in to_cancel {
            if terminate {
                let cancel = Cancellation::new(CancelCause::Terminated, "revoked (terminate)");
                dispatcher.cancel(&id, cancel).await;
            } else {
                let cancel = Cancellation::new(CancelCause::Revoked, "revoked");
                dispatcher.cancel_cooperatively(&id, cancel).await;
            }
        }
    }
    fn request_shutdown(&self) {
        tracing::info!("shutdown requested through remote control");
        self.engine.shutdown_requested.cancel();
    }
    fn enable_events(&self) -> Value {
        self.monitor.enable()
    }
    fn disable_events(&self) -> Value {
        self.monitor.disable()
    }
    fn heartbeat(&self) {
        self.monitor.heartbeat_requested(&self.engine.nodename());
    }
    fn revoked(&self) -> Vec<String> {
        self.engine.tasks().revoked.ids()
    }
    fn query_task(&self, ids: &[String]) -> Map<String, Value> {
        let tasks = self.engine.tasks();
        let mut found = Map::new();
        for id in ids {
            if let Some(info) = tasks.ledger.info(id) {
                found.insert(id.clone(), json!(["active", info]));
            } else if let Some(info) = tasks.reserved.get(id.as_str()) {
                // Held here until its eta.
                found.insert(id.clone(), json!(["scheduled", info]));
            }
        }
        found
    }
    fn conf(&self) -> Map<String, Value> {
        let broker = T::settings(self);
        let mut conf = Map::new();
        conf.insert("broker_url".into(), json!(mask_password(&broker.url)));
        let backend = self.result_backend.as_ref().map_or("rpc://", |r| r.url());
        conf.insert("result_backend".into(), json!(mask_password(backend)));
        conf.insert(
            "worker_send_task_events".into(),
            json!(self.monitor.task_events()),
        );
        conf.insert("queues".into(), json!(broker.queues));
        conf.insert("prefetch_count".into(), json!(broker.prefetch));
        conf.extend(broker.conf);
        conf
    }
    fn rate_limit(&self, task: &str, rate: &Value) -> Value {
        let known = self.serves(task);
        self.engine.controls.set_rate(task, rate, known)
    }
    fn time_limit(&self, task: &str, soft: &Value, hard: &Value) -> Value {
        let known = self.serves(task);
        self.engine
            .controls
            .set_time_limits(task, soft, hard, known)
    }
    async fn add_consumer(
        &self,
        queue: &str,
        exchange: Option<&str>,
        kind: Option<&str>,
        key: Option<&str>,
    ) -> Value {
        let wanted = WantedQueue {
            name: queue.to_string(),
            exchange: exchange.unwrap_or(queue).to_string(),
            exchange_type: kind.unwrap_or("direct").to_string(),
            routing_key: key.unwrap_or(queue).to_string(),
        };
        match T::add_consumer(self, wanted).await {
            Ok(true) => json!({ "ok": format!("add consumer {queue}") }),
            Ok(false) => json!({ "ok": format!("already consuming from '{queue}'") }),
            Err(why) => {
                tracing::error!(queue, "add_consumer refused: {why}");
                json!({ "error": format!("cannot consume from {queue}: {why}") })
            }
        }
    }
    fn cancel_consumer(&self, queue: &str) -> Value {
        T::cancel_consumer(self, queue);
        json!({ "ok": format!("no longer consuming from {queue}") })
    }
    async fn scale(&self, scale: crate::supervisor::pool::Scale) -> Vec<Result<usize, String>> {
        let answers = self.engine.dispatcher.scale(scale).await;
        for (plugin, answer) in &answers {
            match answer {
                Ok(n) => tracing::info!(plugin, instances = n, "{scale:?} by remote control"),
                Err(why) => tracing::warn!(plugin, "{scale:?} refused: {why}"),
            }
        }
        answers.into_iter().map(|(_, a)| a).collect()
    }
    fn report(&self) -> String {
        let uname = nix::sys::utsname::uname().ok();
        let field = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
            uname
                .as_ref()
                .map(|u| f(u).to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut text = format!(
            "software -> {}:{} (out-of-process plugins)\nplatform -> system:{} arch:{} kernel version:{}\nsettings -> transport:{} results:{}\n\n",
            crate::WORKER_NAME,
            crate::WORKER_VERSION,
            field(|u| u.sysname()),
            field(|u| u.machine()),
            field(|u| u.release()),
            T::NAME,
            mask_password(self.result_backend.as_ref().map_or("rpc://", |r| r.url())),
        );
        for (key, value) in self.conf() {
            text.push_str(&format!("{key}: {value}\n"));
        }
        text
    }
}

impl<T: Transport> Worker<T> {
    /// Whether some plugin serves `task` (remote control's limits apply to known tasks).
    fn serves(&self, task: &str) -> bool {
        self.engine
            .dispatcher
            .task_names()
            .iter()
            .any(|t| t == task)
    }
}

/// The broker URL with its password masked, as Celery's `inspect conf` shows it.
pub(crate) fn mask_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let user = url[s + 3..at].split(':').next().unwrap_or_default();
            format!("{}://{user}:********@{}", &url[..s], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}
