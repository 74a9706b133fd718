//! `task.offer` from a queue backend, checked here (the plugin provides a queue backend, the
//! instance is serving, the params are well-formed, the window has room) and handed to the
//! offer inbox; anything else is answered at once, so an offer never waits unanswered.

use super::{Effect, InstanceCore, Phase};
use crate::supervisor::backend_stats::BackendCounters;
use crate::supervisor::offer::not_taken;
use plugin_protocol::{
    code, method, ErrorObject, Id, Message, Request, Response, TaskOfferParams, MAX_OFFER_ID_BYTES,
};
use std::sync::atomic::Ordering;

impl InstanceCore {
    /// A request from the plugin: `task.offer` from a queue backend, else method not found.
    pub(super) fn on_request(&mut self, r: Request) {
        let window = self
            .spec
            .manifest
            .backends
            .queue_backend
            .as_ref()
            .map(|q| q.window);
        let result = match (r.method.as_str(), window) {
            (method::TASK_OFFER, Some(window)) => self.offer(r.id.clone(), r.params, window),
            (method::TASK_OFFER, None) => Err(ErrorObject::new(
                code::METHOD_NOT_FOUND,
                "`task.offer` is for queue backends: add provides = [\"queue_backend\"] to plugin.toml",
            )),
            (other, _) => Err(ErrorObject::new(
                code::METHOD_NOT_FOUND,
                format!("the worker has no method `{other}`"),
            )),
        };
        if let Err(e) = result {
            self.refuse_request(r.id, e);
        }
    }

    /// Answers a request from the plugin with `e` at once, counting a refused offer.
    pub(super) fn refuse_request(&mut self, id: Id, e: ErrorObject) {
        if self.spec.manifest.backends.queue_backend.is_some() {
            let stats = self.spec.offers.stats.of(&self.spec.manifest.name);
            BackendCounters::add(match e.code {
                code::SHUTTING_DOWN => &stats.offers_not_taken,
                _ => &stats.offers_refused,
            });
        }
        self.send_line(Message::Response(Response::err(Some(id), e)).to_line());
    }

    /// Leaves a checked offer for the shell to hand on (`Effect::Offer`); `Err` is the
    /// answer to send now.
    fn offer(&mut self, id: Id, params: serde_json::Value, window: u32) -> Result<(), ErrorObject> {
        let params = read_offer(params)?;
        if !matches!(self.phase, Phase::Serving) {
            return Err(not_taken(
                &params.task_id,
                "shutting_down",
                "the plugin is stopping",
            ));
        }
        if self.offers_out.load(Ordering::SeqCst) >= window as usize {
            return Err(ErrorObject::new(
                code::OFFER_WINDOW_FULL,
                format!(
                    "window full: {window} offers are unanswered (queue_backend.window); offer task {} again after an answer",
                    params.task_id
                ),
            ));
        }
        self.effects.push(Effect::Offer(id, Box::new(params)));
        Ok(())
    }
}

/// The offer's params, or an invalid-params error that says what is wrong.
fn read_offer(params: serde_json::Value) -> Result<TaskOfferParams, ErrorObject> {
    let invalid = |msg: String| ErrorObject::new(code::INVALID_PARAMS, msg);
    let p: TaskOfferParams = serde_json::from_value(params)
        .map_err(|e| invalid(format!("malformed task.offer: {e}")))?;
    if p.task_id.is_empty() || p.task_id.len() > MAX_OFFER_ID_BYTES {
        return Err(invalid(format!(
            "task.offer `task_id` must be 1 to {MAX_OFFER_ID_BYTES} bytes (it is {})",
            p.task_id.len()
        )));
    }
    if p.task.trim().is_empty() {
        return Err(invalid("task.offer `task` must name a task".into()));
    }
    let limits = [
        ("time_limit.soft", p.time_limit.soft),
        ("time_limit.hard", p.time_limit.hard),
    ];
    for (field, secs) in limits {
        if let Some(secs) = secs {
            crate::task::time_limit(field, secs).map_err(invalid)?;
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What PROTOCOL.md §4a promises of an offer's params: each mistake is `-32602` naming
    /// the field, and a sound offer is read as it was sent.
    #[test]
    fn an_offer_is_read_or_refused_naming_its_mistake() {
        let long_id = "x".repeat(MAX_OFFER_ID_BYTES + 1);
        let longest_id = "x".repeat(MAX_OFFER_ID_BYTES);
        let refused = [
            (
                json!({"task_id": long_id, "task": "t"}),
                "`task_id` must be 1 to 255 bytes (it is 256)",
            ),
            (
                json!({"task_id": "", "task": "t"}),
                "`task_id` must be 1 to 255 bytes (it is 0)",
            ),
            (
                json!({"task_id": "a", "task": "  "}),
                "`task` must name a task",
            ),
            (json!({"task_id": "a"}), "malformed task.offer"),
            (
                json!({"task_id": "a", "task": "t", "args": {"not": "a list"}}),
                "malformed task.offer",
            ),
            (
                json!({"task_id": "a", "task": "t", "time_limit": {"soft": 0}}),
                "`time_limit.soft`",
            ),
            (
                json!({"task_id": "a", "task": "t", "time_limit": {"hard": -1}}),
                "`time_limit.hard`",
            ),
            (
                json!({"task_id": "a", "task": "t", "time_limit": {"hard": 1e300}}),
                "`time_limit.hard`",
            ),
            (json!([1, 2]), "malformed task.offer"),
        ];
        for (params, says) in refused {
            let e = read_offer(params.clone()).unwrap_err();
            assert_eq!(e.code, code::INVALID_PARAMS, "{params}");
            assert!(e.message.contains(says), "{params}: {}", e.message);
        }
        let sound = json!({"task_id": longest_id, "task": "t", "args": [1], "kwargs": {"k": 2},
            "time_limit": {"soft": 1.5, "hard": 3}, "progress": true});
        let p = read_offer(sound).unwrap();
        assert_eq!(
            (p.task_id.len(), p.task.as_str()),
            (MAX_OFFER_ID_BYTES, "t")
        );
        assert_eq!((p.args, p.kwargs["k"].clone()), (vec![json!(1)], json!(2)));
        assert_eq!(
            (p.time_limit.soft, p.time_limit.hard),
            (Some(1.5), Some(3.0))
        );
        assert!(p.progress && !p.stream);
    }
}
