//! `task.run`'s params written straight into the line, borrowed from the task's request: its
//! args and kwargs go to the plugin's stdin from where they are, never copied on the way, and
//! the keys are written as they are. Serde escaped every key of a `task.run` byte by byte:
//! about 3,000 instructions a task, the largest single cost of the supervisor's hot path.
//! The bytes are exactly what [`plugin_protocol::TaskRunParams`] serializes to (tested below).

use plugin_protocol::{DeliveryInfo, RequestInfo, TimeLimits};
use serde_json::{Map, Value};

/// `task.run`'s params, borrowed.
pub(super) struct TaskRunWire<'a> {
    pub task_id: &'a str,
    pub task: &'a str,
    pub args: &'a [Value],
    pub kwargs: &'a Map<String, Value>,
    pub attempt: u32,
    pub time_limit: TimeLimits,
    pub delivery_info: &'a DeliveryInfo,
    pub request: RequestWire<'a>,
}

/// `task.run`'s `request` as [`RequestInfo`] writes it, borrowed from the task's request (its
/// headers are not copied) with this worker's node name.
pub(super) struct RequestWire<'a> {
    info: &'a RequestInfo,
    hostname: &'a str,
}

impl<'a> RequestWire<'a> {
    pub fn of(info: &'a RequestInfo, hostname: &'a str) -> RequestWire<'a> {
        RequestWire { info, hostname }
    }
}

impl TaskRunWire<'_> {
    /// Appends the params object to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"task_id":"#);
        put_str(out, self.task_id);
        out.extend_from_slice(br#","task":"#);
        put_str(out, self.task);
        out.extend_from_slice(br#","args":"#);
        put_json(out, self.args);
        out.extend_from_slice(br#","kwargs":"#);
        put_json(out, self.kwargs);
        out.extend_from_slice(br#","attempt":"#);
        put_json(out, &self.attempt);
        out.extend_from_slice(br#","time_limit":"#);
        put_limits(out, &self.time_limit);
        out.extend_from_slice(br#","delivery_info":"#);
        put_delivery(out, self.delivery_info);
        out.extend_from_slice(br#","request":"#);
        put_request(out, &self.request);
        out.push(b'}');
    }
}

fn put_limits(out: &mut Vec<u8>, limits: &TimeLimits) {
    out.push(b'{');
    let mut sep = Sep::default();
    for (key, value) in [
        (&br#""soft":"#[..], limits.soft),
        (br#""hard":"#, limits.hard),
    ] {
        if let Some(seconds) = value {
            sep.put(out, key);
            put_json(out, &seconds);
        }
    }
    out.push(b'}');
}

fn put_delivery(out: &mut Vec<u8>, d: &DeliveryInfo) {
    out.extend_from_slice(br#"{"queue":"#);
    put_opt_str(out, &d.queue);
    out.extend_from_slice(br#","exchange":"#);
    put_opt_str(out, &d.exchange);
    out.extend_from_slice(br#","routing_key":"#);
    put_opt_str(out, &d.routing_key);
    if let Some(serializer) = &d.serializer {
        out.extend_from_slice(br#","serializer":"#);
        put_str(out, serializer);
    }
    if let Some(priority) = d.priority {
        out.extend_from_slice(br#","priority":"#);
        put_json(out, &priority);
    }
    if let Some(redelivered) = d.redelivered {
        out.extend_from_slice(br#","redelivered":"#);
        put_json(out, &redelivered);
    }
    if let Some(count) = d.delivery_count {
        out.extend_from_slice(br#","delivery_count":"#);
        put_json(out, &count);
    }
    out.push(b'}');
}

fn put_request(out: &mut Vec<u8>, r: &RequestWire) {
    let info = r.info;
    out.extend_from_slice(br#"{"retries":"#);
    put_json(out, &info.retries);
    out.extend_from_slice(br#","eta":"#);
    put_opt_str(out, &info.eta);
    out.extend_from_slice(br#","expires":"#);
    put_opt_str(out, &info.expires);
    out.extend_from_slice(br#","parent_id":"#);
    put_opt_str(out, &info.parent_id);
    out.extend_from_slice(br#","root_id":"#);
    put_opt_str(out, &info.root_id);
    out.extend_from_slice(br#","group":"#);
    put_opt_str(out, &info.group);
    out.extend_from_slice(br#","hostname":"#);
    put_str(out, r.hostname);
    if !info.headers.is_empty() {
        out.extend_from_slice(br#","headers":"#);
        put_json(out, &info.headers);
    }
    out.push(b'}');
}

/// Writes the comma before every key but the first.
#[derive(Default)]
struct Sep(bool);

impl Sep {
    fn put(&mut self, out: &mut Vec<u8>, key: &[u8]) {
        if std::mem::replace(&mut self.0, true) {
            out.push(b',');
        }
        out.extend_from_slice(key);
    }
}

/// A JSON string: as it is when nothing in it needs escaping (ids and names, nearly always),
/// else escaped by serde_json. The check is what serde_json escapes: `"`, `\` and controls.
fn put_str(out: &mut Vec<u8>, s: &str) {
    // Without an early exit, so the compiler checks many bytes at a time.
    let plain = !s.bytes().fold(false, |seen, b| {
        seen | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        put_json(out, s);
    }
}

fn put_opt_str(out: &mut Vec<u8>, s: &Option<String>) {
    match s {
        Some(s) => put_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn put_json(out: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) {
    serde_json::to_writer(out, value).expect("task params always serialize");
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_protocol::TaskRunParams;
    use serde_json::json;

    fn written(wire: &TaskRunWire) -> String {
        let mut out = Vec::new();
        wire.write(&mut out);
        String::from_utf8(out).expect("utf-8")
    }

    /// Every shape a task's params take: what `TaskRunParams` writes, byte for byte.
    #[test]
    fn the_written_task_run_is_what_task_run_params_serialize_to() {
        let full_delivery = DeliveryInfo {
            queue: Some("celery".into()),
            exchange: Some(String::new()),
            routing_key: Some("rk \"quoted\"".into()),
            serializer: Some("jsonpickle".into()),
            priority: Some(9),
            redelivered: Some(true),
            delivery_count: Some(3),
        };
        let headers = json!({"jobInfoSpec": {"url": "u"}, "x": "a\nb"});
        let full_request = RequestInfo {
            retries: 2,
            eta: Some("2026-12-05T10:00:00+00:00".into()),
            expires: Some("2026-12-06T10:00:00+00:00".into()),
            parent_id: Some("p-1".into()),
            root_id: Some("r-1".into()),
            group: Some("g\\1".into()),
            hostname: Some("ignored: the worker's own name is written".into()),
            headers: headers.as_object().unwrap().clone(),
        };
        let limits = [
            TimeLimits::default(),
            TimeLimits {
                soft: Some(1.5),
                hard: None,
            },
            TimeLimits {
                soft: None,
                hard: Some(30.0),
            },
            TimeLimits {
                soft: Some(0.25),
                hard: Some(1e9),
            },
        ];
        let args = vec![json!(1), json!({"a": [2, "é", "\u{1}"]}), json!(null)];
        let kwargs = json!({"k": "v", "quote\"": true});
        let kwargs = kwargs.as_object().unwrap();
        let ids = ["id-1", "", "tab\there", "ünïcode ✓", "back\\slash"];
        let deliveries = [DeliveryInfo::default(), full_delivery];
        let requests = [RequestInfo::default(), full_request];
        for (i, id) in ids.iter().enumerate() {
            for delivery in &deliveries {
                for request in &requests {
                    let limit = &limits[i % limits.len()];
                    let hostname = if i % 2 == 0 { "w@h" } else { "w\"@h" };
                    let wire = TaskRunWire {
                        task_id: id,
                        task: "t.name",
                        args: &args,
                        kwargs,
                        attempt: i as u32 + 1,
                        time_limit: limit.clone(),
                        delivery_info: delivery,
                        request: RequestWire::of(request, hostname),
                    };
                    let owned = TaskRunParams {
                        task_id: id.to_string(),
                        task: "t.name".into(),
                        args: args.clone(),
                        kwargs: kwargs.clone(),
                        attempt: i as u32 + 1,
                        time_limit: limit.clone(),
                        delivery_info: Some(delivery.clone()),
                        request: Some(RequestInfo {
                            hostname: Some(hostname.into()),
                            ..request.clone()
                        }),
                    };
                    let want = serde_json::to_string(&owned).unwrap();
                    assert_eq!(written(&wire), want);
                    let read: TaskRunParams = serde_json::from_str(&written(&wire)).unwrap();
                    assert_eq!(read, owned);
                }
            }
        }
    }
}
