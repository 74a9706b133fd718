//! Celery remote control as the AMQP source answers it: what `celery inspect` and `celery
//! control` ask of this worker ([`pidbox::RemoteWorker`]), and the replies on the wire.

use super::value::json_to_amqp;
use super::{redact, Declare, QueueSpec, SourceState};
use crate::source::pidbox::{self, RemoteWorker};
use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde_json::{json, Map, Value};

impl RemoteWorker for SourceState {
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
        self.queues
            .borrow()
            .iter()
            .map(|q| {
                json!({
                    "name": q.name, "exchange": {"name": q.exchange, "type": q.exchange_type, "durable": true, "auto_delete": false},
                    "routing_key": q.routing_key, "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false,
                    "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null
                })
            })
            .collect()
    }
    async fn stats(&self) -> Value {
        let plugins = self.engine.dispatcher.status().await;
        let processes: Vec<u32> = plugins
            .iter()
            .flat_map(|p| p.instances.iter().filter_map(|i| i.pid))
            .collect();
        let capacity = self.engine.dispatcher.capacity();
        let uptime = self
            .engine
            .started
            .elapsed()
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({
            "pid": std::process::id(),
            "clock": "0",
            "uptime": uptime,
            "total": *crate::sync::lock(&self.engine.totals),
            "pool": {
                "implementation": "worker (out-of-process plugins)",
                "max-concurrency": capacity,
                "processes": processes,
                "prefetch_count": self.options.prefetch,
            },
            "broker": { "transport": "amqp", "hostname": redact(&self.options.url) },
            "prefetch_count": self.options.prefetch,
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
            for id in ids
                .iter()
                .filter(|id| id.len() <= super::inbound::MAX_ID_BYTES)
            {
                tasks.revoked.insert(id);
                if tasks.ledger.owns(id) {
                    // Marked first: a plugin may answer the cancel at once.
                    let reason = if terminate { "terminated" } else { "revoked" };
                    tasks.ledger.mark_revoked(id, reason);
                    to_cancel.push((id.clone(), terminate));
                }
            }
        }
        self.engine.revoke_signal.notify_waiters();
        for (id, terminate) in to_cancel {
            if terminate {
                self.engine
                    .dispatcher
                    .cancel(&id, "revoked (terminate)")
                    .await;
            } else {
                self.engine
                    .dispatcher
                    .cancel_cooperatively(&id, "revoked")
                    .await;
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
            } else if let Some(info) = tasks.reserved.get(id) {
                // Held here until its eta.
                found.insert(id.clone(), json!(["scheduled", info]));
            }
        }
        found
    }
    fn conf(&self) -> Map<String, Value> {
        let o = &self.options;
        let mut conf = Map::new();
        conf.insert("broker_url".into(), json!(mask_password(&o.url)));
        let backend = self.redis.as_ref().map_or("rpc://", |r| r.url());
        conf.insert("result_backend".into(), json!(mask_password(backend)));
        conf.insert(
            "worker_send_task_events".into(),
            json!(self.monitor.task_events()),
        );
        conf.insert("queues".into(), json!(self.queue_names()));
        conf.insert("prefetch_count".into(), json!(o.prefetch));
        conf.insert("result_memory".into(), json!(o.result_memory));
        conf.insert(
            "result_retry_timeout".into(),
            json!(o.result_retry_timeout.as_secs_f64()),
        );
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
        let spec = QueueSpec {
            name: queue.to_string(),
            exchange: exchange.unwrap_or(queue).to_string(),
            exchange_type: kind.unwrap_or("direct").to_string(),
            routing_key: key.unwrap_or(queue).to_string(),
        };
        if self.queues.borrow().iter().any(|q| q.name == queue) {
            return json!({ "ok": format!("already consuming from '{queue}'") });
        }
        if let Err(why) = self.try_declare(&spec).await {
            tracing::error!(queue, "add_consumer refused: {why}");
            return json!({ "error": format!("cannot consume from {queue}: {why}") });
        }
        let added = self.queues.send_if_modified(|queues| {
            let new = !queues.iter().any(|q| q.name == queue);
            if new {
                queues.push(spec);
            }
            new
        });
        match added {
            true => json!({ "ok": format!("add consumer {queue}") }),
            false => json!({ "ok": format!("already consuming from '{queue}'") }),
        }
    }
    fn cancel_consumer(&self, queue: &str) -> Value {
        self.queues.send_if_modified(|queues| {
            let before = queues.len();
            queues.retain(|q| q.name != queue);
            queues.len() != before
        });
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
            "software -> {}:{} (out-of-process plugins) lapin\nplatform -> system:{} arch:{} kernel version:{}\nsettings -> transport:amqp results:{}\n\n",
            crate::WORKER_NAME,
            crate::WORKER_VERSION,
            field(|u| u.sysname()),
            field(|u| u.machine()),
            field(|u| u.release()),
            mask_password(self.redis.as_ref().map_or("rpc://", |r| r.url())),
        );
        for (key, value) in self.conf() {
            text.push_str(&format!("{key}: {value}\n"));
        }
        text
    }
}

impl SourceState {
    /// Whether some plugin serves `task` (remote control's limits apply to known tasks).
    fn serves(&self, task: &str) -> bool {
        self.engine
            .dispatcher
            .task_names()
            .iter()
            .any(|t| t == task)
    }

    /// Declares `q` (as the consumers would) on a channel of its own, so that a queue the
    /// broker refuses (a reserved `amq.` name, another connection's exclusive queue, other
    /// arguments) closes only that channel.
    async fn try_declare(&self, q: &QueueSpec) -> Result<(), String> {
        for name in [&q.name, &q.exchange, &q.routing_key] {
            if name.len() > 255 {
                return Err(format!(
                    "`{}...` is longer than AMQP's 255-byte limit",
                    &name[..32]
                ));
            }
        }
        let args = super::value::json_to_table(&self.options.queue_arguments);
        let mut how = self.options.declare;
        loop {
            let channel = self.own_channel().await?;
            let declared = super::consumers::declare(&channel, q, how, &args).await;
            if channel.status().connected() {
                let _ = channel.close(200, "declared".into()).await;
            }
            match declared {
                // It exists with other arguments: the consumer takes it as it is.
                Err(e) if super::consumers::inequivalent(&e) && how == Declare::Kombu => {
                    how = Declare::Passive;
                }
                other => return other.map_err(|e| e.to_string()),
            }
        }
    }
}

/// The broker URL with its password masked, as Celery's `inspect conf` shows it.
fn mask_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let user = url[s + 3..at].split(':').next().unwrap_or_default();
            format!("{}://{user}:********@{}", &url[..s], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Answers one remote-control message addressed to this node.
pub(super) async fn answer(shared: &SourceState, channel: &Channel, delivery: Delivery) {
    let req = match pidbox::parse(&delivery.data) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("ignoring a remote control message that cannot be read: {e}");
            return;
        }
    };
    let node = shared.engine.nodename();
    if !pidbox::addressed_to(&req, &node) {
        return;
    }
    tracing::debug!(method = %req.method, "remote control request");
    let Some(result) = pidbox::handle(&req, shared).await else {
        return;
    };
    let Some((exchange, routing_key)) = &req.reply_to else {
        return;
    };
    let (Ok(exchange), Ok(routing_key)) = (
        lapin::types::ShortString::try_new(exchange.as_str()),
        lapin::types::ShortString::try_new(routing_key.as_str()),
    ) else {
        tracing::warn!("not answering remote control `{}`: its reply exchange or routing key is longer than AMQP's 255-byte limit", req.method);
        return;
    };
    let mut headers = FieldTable::default();
    if let Some(ticket) = &req.ticket {
        headers.insert("ticket".into(), json_to_amqp(&json!(ticket)));
    }
    headers.insert("clock".into(), AMQPValue::LongLongInt(0));
    let body = serde_json::to_vec(&json!({ node: result })).expect("reply serializes");
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers)
        .with_delivery_mode(1);
    if let Err(e) = channel
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await
    {
        tracing::warn!("cannot answer remote control `{}`: {e}", req.method);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_masked_as_celery_masks_them() {
        assert_eq!(
            super::mask_password("amqp://guest:secret@host:5672//"),
            "amqp://guest:********@host:5672//"
        );
        assert_eq!(super::mask_password("amqp://host//"), "amqp://host//");
    }
}
