//! Celery's canvas as a worker carries it on (pure functions; the AMQP source publishes what
//! they return): after a success, each `link` callback and the next step of a `chain`, with the
//! result prepended to its arguments; after a failure, the rest of the chain fails with the same
//! exception and each `link_error` errback is sent the failed task's id. A `group` inside a
//! chain or among the callbacks sends each of its members; a `chord` sends its header tasks
//! carrying the body, once the result backend (Redis) knows the header's size.

use super::celery::CeleryTask;
use super::embed::{no_steps, signatures, Signature, Steps};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::time::{Duration, SystemTime};

/// A task message to publish, in Celery's protocol 2.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub id: String,
    pub exchange: String,
    pub routing_key: String,
    pub headers: Map<String, Value>,
    pub reply_to: Option<String>,
    pub priority: Option<u8>,
    /// `[args, kwargs, embed]`, the embed's chain empty: the chain goes in `chain`, as text.
    pub body: Value,
    /// The message's remaining chain, as the text it came as.
    pub chain: Steps,
    /// Set on the first header task of a chord this message starts: `(group id, header
    /// size)`, which the result backend must know before any part can finish (Celery's
    /// client-side `SET <group>.s`).
    pub opens_chord: Option<(String, usize)>,
}

impl Outgoing {
    /// The message body on the wire: `body` with `chain` written into its embed as it came.
    pub fn body_bytes(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Wire<'a> {
            callbacks: &'a Value,
            errbacks: &'a Value,
            chain: &'a [Box<RawValue>],
            chord: &'a Value,
        }
        let embed = &self.body[2];
        let wire = (
            &self.body[0],
            &self.body[1],
            Wire {
                callbacks: &embed["callbacks"],
                errbacks: &embed["errbacks"],
                chain: &self.chain,
                chord: &embed["chord"],
            },
        );
        serde_json::to_vec(&wire).expect("a task body serializes")
    }
}

/// A remaining chain step that fails with its parent: its id and where its client waits.
#[derive(Debug, Clone, PartialEq)]
pub struct Failed {
    pub id: String,
    pub reply_to: String,
}

/// Where the message of a step goes, and what this worker knows of its parent.
pub struct Context<'a> {
    pub parent: &'a CeleryTask,
    /// This worker's node name (the `origin` header).
    pub node: &'a str,
    /// The queue for a step whose options name none (Celery's `task_default_queue`).
    pub default_queue: &'a str,
}

impl Context<'_> {
    fn root_id(&self) -> String {
        self.parent
            .root_id
            .clone()
            .unwrap_or_else(|| self.parent.id.to_string())
    }

    /// The message for `sig` applied with `prepend` before its own arguments (unless it is
    /// immutable), `chain` as its remaining chain, and `group` as `(group id, index)`.
    fn message(
        &self,
        sig: &Signature,
        prepend: &[Value],
        chain: &Steps,
        group: Option<(&str, usize)>,
    ) -> Outgoing {
        let id = sig
            .option_str("task_id")
            .map(str::to_string)
            .unwrap_or_else(new_id);
        let args: Vec<Value> = match sig.immutable {
            true => sig.args.clone(),
            false => prepend.iter().chain(&sig.args).cloned().collect(),
        };
        let group_id = group
            .map(|(g, _)| g.to_string())
            .or_else(|| sig.option_str("group_id").map(str::to_string));
        let group_index = group
            .map(|(_, i)| json!(i))
            .or_else(|| sig.options.get("group_index").cloned())
            .unwrap_or(Value::Null);
        let number = |k: &str| sig.options.get(k).and_then(Value::as_f64);
        let eta = number("countdown")
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| iso(SystemTime::now() + Duration::from_secs_f64(s.min(MAX_DELAY))))
            .or_else(|| sig.option_str("eta").map(str::to_string));
        let expires = match sig.options.get("expires") {
            Some(Value::Number(n)) => n
                .as_f64()
                .map(|s| iso(SystemTime::now() + Duration::from_secs_f64(s.clamp(0.0, MAX_DELAY)))),
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let name = sig.task.clone();
        let headers = json!({
            "lang": "py", "task": name, "id": id, "shadow": sig.option_str("shadow"),
            "eta": eta, "expires": expires, "group": group_id, "group_index": group_index,
            "retries": 0, "timelimit": [number("time_limit"), number("soft_time_limit")],
            "root_id": self.root_id(), "parent_id": self.parent.id,
            "argsrepr": super::pyrepr::args_repr(&args), "kwargsrepr": super::pyrepr::kwargs_repr(&sig.kwargs),
            "origin": self.node, "ignore_result": sig.options.get("ignore_result").and_then(Value::as_bool).unwrap_or(false),
            "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {},
        });
        let listed = |v: Vec<Value>| (!v.is_empty()).then_some(Value::Array(v));
        let embed = json!({
            "callbacks": listed(sig.option_signatures("link")),
            "errbacks": listed(sig.option_signatures("link_error")),
            "chain": [],
            "chord": sig.options.get("chord").filter(|c| !c.is_null()),
        });
        let (exchange, routing_key) = match (
            sig.option_str("exchange"),
            sig.option_str("routing_key"),
            sig.option_str("queue"),
        ) {
            (Some(e), Some(k), _) => (e.to_string(), k.to_string()),
            (_, _, Some(q)) => (String::new(), q.to_string()),
            (_, Some(k), None) => (String::new(), k.to_string()),
            _ => (String::new(), self.default_queue.to_string()),
        };
        Outgoing {
            id,
            exchange,
            routing_key,
            headers: match headers {
                Value::Object(h) => h,
                _ => unreachable!("a json object"),
            },
            reply_to: sig.option_str("reply_to").map(str::to_string),
            priority: sig
                .options
                .get("priority")
                .and_then(Value::as_u64)
                .map(|p| p.min(255) as u8),
            body: json!([args, sig.kwargs, embed]),
            chain: chain.clone(),
            opens_chord: None,
        }
    }

    /// `sig` applied with `prepend`: a group sends each member (under the group's id, in
    /// order), a plain signature one message. A chord cannot be carried on (see the module).
    fn apply(
        &self,
        sig: &Signature,
        prepend: &[Value],
        chain: &Steps,
    ) -> Result<Vec<Outgoing>, String> {
        match sig.subtask_type.as_deref() {
            None => Ok(vec![self.message(sig, prepend, chain, None)]),
            Some("group") => {
                let members = signatures(sig.kwargs.get("tasks"), "group.kwargs.tasks")
                    .map_err(|e| e.to_string())?;
                let group_id = sig.option_str("task_id").map(str::to_string).unwrap_or_else(new_id);
                Ok(members
                    .iter()
                    .enumerate()
                    .map(|(i, m)| self.message(m, prepend, &no_steps(), Some((&group_id, i))))
                    .collect())
            }
            Some("chord") => self.chord(sig, prepend),
            Some(other) => Err(format!(
                "a `{other}` step ({}) cannot be carried on by this worker (only plain tasks, groups and chords)",
                sig.task
            )),
        }
    }
}

impl Context<'_> {
    /// A chord as a step: each header task gets `prepend` (unless immutable), the chord's
    /// group id and its index, and the body in its `embed.chord`; the first message says the
    /// header's size (see `Outgoing::opens_chord`).
    fn chord(&self, sig: &Signature, prepend: &[Value]) -> Result<Vec<Outgoing>, String> {
        let header = sig
            .kwargs
            .get("header")
            .ok_or("a chord step without a `header`")?;
        let header =
            Signature::from_json(header, "chord.kwargs.header").map_err(|e| e.to_string())?;
        let members = match header.subtask_type.as_deref() {
            Some("group") => signatures(header.kwargs.get("tasks"), "chord header tasks")
                .map_err(|e| e.to_string())?,
            _ => vec![header.clone()],
        };
        if members.iter().any(|m| m.subtask_type.is_some()) {
            return Err("a chord step whose header holds composites (nested groups or chords) cannot be carried on by this worker".into());
        }
        let mut body = sig
            .kwargs
            .get("body")
            .cloned()
            .ok_or("a chord step without a `body`")?;
        let group_id = header
            .option_str("task_id")
            .or_else(|| sig.option_str("group_id"))
            .map(str::to_string)
            .unwrap_or_else(new_id);
        if let Some(options) = body.get_mut("options").and_then(Value::as_object_mut) {
            options.entry("task_id").or_insert_with(|| {
                json!(sig
                    .option_str("task_id")
                    .map(str::to_string)
                    .unwrap_or_else(new_id))
            });
            options.insert("group_id".into(), json!(group_id));
        }
        let mut out: Vec<Outgoing> = members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut m = m.clone();
                m.options.insert("chord".into(), body.clone());
                self.message(&m, prepend, &no_steps(), Some((&group_id, i)))
            })
            .collect();
        let size = out.len();
        match out.first_mut() {
            Some(first) => first.opens_chord = Some((group_id, size)),
            None => return Err("a chord step with an empty header".into()),
        }
        Ok(out)
    }
}

/// Longest countdown or expiry accepted from a signature (30 days), so no time can overflow.
const MAX_DELAY: f64 = crate::task::MAX_DURATION_SECS;

fn iso(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// What follows a success: the `link` callbacks (several plain ones as one group, each member
/// with its index, as Celery sends them), then the next chain step with the rest of the chain.
/// An error names a step that cannot be carried on.
pub fn after_success(cx: &Context, result: &Value) -> Result<Vec<Outgoing>, String> {
    let embed = &cx.parent.embed;
    let prepend = [result.clone()];
    let mut out = Vec::new();
    let (groups, plain): (Vec<&Signature>, Vec<&Signature>) = embed
        .callbacks
        .iter()
        .partition(|s| s.subtask_type.is_some());
    match plain.as_slice() {
        [] => {}
        [one] => out.extend(cx.apply(one, &prepend, &no_steps())?),
        several => {
            let group_id = new_id();
            for (i, cb) in several.iter().enumerate() {
                out.push(cx.message(cb, &prepend, &no_steps(), Some((&group_id, i))));
            }
        }
    }
    for g in groups {
        out.extend(cx.apply(g, &prepend, &no_steps())?);
    }
    if let Some(next) = &embed.chain.next {
        out.extend(cx.apply(next, &prepend, &embed.chain.rest)?);
    }
    Ok(out)
}

/// A chord's body, sent with the results of its header in header order as its first argument
/// (a group body sends each member).
pub fn chord_body(
    cx: &Context,
    body: &Signature,
    results: Vec<Value>,
) -> Result<Vec<Outgoing>, String> {
    cx.apply(body, &[Value::Array(results)], &no_steps())
}

/// What follows a failure: every remaining chain step with a frozen id and a reply queue fails
/// with the same exception (its client may wait on the last one), and the errbacks are sent
/// the failed task's id, as one group.
pub fn after_failure(cx: &Context) -> (Vec<Failed>, Vec<Outgoing>) {
    let embed = &cx.parent.embed;
    let failed = embed
        .chain
        .steps()
        .filter_map(|s| {
            Some(Failed {
                id: s.option_str("task_id")?.to_string(),
                reply_to: s.option_str("reply_to")?.to_string(),
            })
        })
        .collect();
    let prepend = [json!(cx.parent.id)];
    let group_id = new_id();
    let errbacks = embed
        .errbacks
        .iter()
        .enumerate()
        .map(|(i, eb)| cx.message(eb, &prepend, &no_steps(), Some((&group_id, i))))
        .collect();
    (failed, errbacks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::embed::Embed;

    fn sig(task: &str, extra: Value) -> Value {
        let mut s = json!({"task": task, "args": [], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false});
        s.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        s
    }

    /// The body as it goes on the wire.
    fn wire(m: &Outgoing) -> Value {
        serde_json::from_slice(&m.body_bytes()).unwrap()
    }

    /// A 10,000-step chain: the next message carries the other steps as they came, byte for
    /// byte, and only the next step was read.
    #[test]
    fn a_long_chain_is_carried_on_as_text() {
        let steps: Vec<Value> = (0..10_000)
            .map(|i| sig("s", json!({"args": [i], "options": {"task_id": format!("id{i}"), "reply_to": "rq"}})))
            .collect();
        let p = parent(json!({"chain": steps}));
        let out = after_success(&cx(&p), &json!(1)).unwrap();
        assert_eq!(out.len(), 1);
        let m = wire(&out[0]);
        assert_eq!(m[0], json!([1, 9999]), "the last step runs next");
        assert_eq!(m[2]["chain"].as_array().unwrap().len(), 9_999);
        assert_eq!(m[2]["chain"][0], steps[0]);
        let (failed, _) = after_failure(&cx(&p));
        assert_eq!(failed.len(), 10_000);
        assert_eq!(failed[0].id, "id0", "in wire order");
        assert_eq!(failed[9_999].id, "id9999");
    }

    fn parent(embed: Value) -> CeleryTask {
        CeleryTask {
            id: "p".into(),
            name: "a".into(),
            root_id: Some("r".into()),
            embed: Embed::from_json(Some(&embed)).unwrap(),
            ..CeleryTask::default()
        }
    }

    fn cx(p: &CeleryTask) -> Context<'_> {
        Context {
            parent: p,
            node: "w@h",
            default_queue: "celery",
        }
    }

    #[test]
    fn the_next_chain_step_gets_the_result_and_the_rest_of_the_chain() {
        let c = sig(
            "c",
            json!({"immutable": true, "args": [5], "options": {"task_id": "idc", "reply_to": "rq"}}),
        );
        let b = sig(
            "b",
            json!({"args": [3], "options": {"task_id": "idb", "reply_to": "rq", "queue": "q2"}}),
        );
        let p = parent(json!({"chain": [c, b]}));
        let out = after_success(&cx(&p), &json!(3)).unwrap();
        assert_eq!(out.len(), 1);
        let m = &out[0];
        assert_eq!(
            (m.id.as_str(), m.exchange.as_str(), m.routing_key.as_str()),
            ("idb", "", "q2")
        );
        assert_eq!(m.reply_to.as_deref(), Some("rq"));
        assert_eq!(m.body[0], json!([3, 3]), "the result first");
        assert_eq!(
            wire(m)[2]["chain"][0]["task"],
            "c",
            "the rest of the chain goes along"
        );
        assert_eq!(m.headers["parent_id"], "p");
        assert_eq!(m.headers["root_id"], "r");
        assert_eq!(m.headers["argsrepr"], "(3, 3)");

        // The last step: immutable keeps its own args, and nothing follows it.
        let p = parent(json!({"chain": [sig("c", json!({"immutable": true, "args": [5]}))]}));
        let out = after_success(&cx(&p), &json!(8)).unwrap();
        assert_eq!(out[0].body[0], json!([5]));
        assert_eq!(wire(&out[0])[2]["chain"], json!([]));
        assert_eq!(out[0].routing_key, "celery", "no queue: the default one");
    }

    #[test]
    fn several_callbacks_go_as_one_group_and_groups_send_each_member() {
        let p = parent(json!({"callbacks": [sig("x", json!({})), sig("y", json!({"args": [1]}))]}));
        let out = after_success(&cx(&p), &json!("r")).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].headers["group"], out[1].headers["group"]);
        assert_eq!(
            (
                out[0].headers["group_index"].clone(),
                out[1].headers["group_index"].clone()
            ),
            (json!(0), json!(1))
        );
        assert_eq!(out[1].body[0], json!(["r", 1]));

        let members: Vec<Value> = (0..3).map(|i| sig("m", json!({"args": [i]}))).collect();
        let g = sig(
            "celery.group",
            json!({"subtask_type": "group", "kwargs": {"tasks": members}, "options": {"task_id": "G"}}),
        );
        let p = parent(json!({"chain": [g]}));
        let out = after_success(&cx(&p), &json!(10)).unwrap();
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|m| m.headers["group"] == "G"));
        assert_eq!(out[2].body[0], json!([10, 2]));

        let header = sig(
            "celery.group",
            json!({"subtask_type": "group", "kwargs": {"tasks": [sig("h", json!({})), sig("h", json!({"args": [9]}))]}, "options": {"task_id": "G2"}}),
        );
        let body = sig("b", json!({"options": {"task_id": "B", "reply_to": "rq"}}));
        let chord = sig(
            "celery.chord",
            json!({"subtask_type": "chord", "kwargs": {"header": header, "body": body}}),
        );
        let p = parent(json!({"chain": [chord]}));
        let out = after_success(&cx(&p), &json!(1)).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].opens_chord, Some(("G2".to_string(), 2)));
        assert_eq!(out[1].opens_chord, None);
        assert_eq!(out[1].body[0], json!([1, 9]));
        assert_eq!(out[1].headers["group"], "G2");
        assert_eq!(out[1].body[2]["chord"]["options"]["group_id"], "G2");
        assert_eq!(out[1].body[2]["chord"]["options"]["task_id"], "B");
        let nested = sig(
            "celery.chord",
            json!({"subtask_type": "chord", "kwargs": {"header": sig("celery.group", json!({"subtask_type": "group", "kwargs": {"tasks": [sig("celery.group", json!({"subtask_type": "group"}))]}})), "body": sig("b", json!({}))}}),
        );
        let p = parent(json!({"chain": [nested]}));
        assert!(after_success(&cx(&p), &json!(1))
            .unwrap_err()
            .contains("composites"));
    }

    #[test]
    fn a_failure_fails_the_rest_of_the_chain_and_sends_errbacks_the_id() {
        let c = sig(
            "c",
            json!({"options": {"task_id": "idc", "reply_to": "rq"}}),
        );
        let b = sig(
            "b",
            json!({"options": {"task_id": "idb", "reply_to": "rq"}}),
        );
        let eb = sig("on_err", json!({"args": ["extra"]}));
        let p = parent(json!({"chain": [c, b], "errbacks": [eb]}));
        let (failed, errbacks) = after_failure(&cx(&p));
        assert_eq!(
            failed,
            vec![
                Failed {
                    id: "idc".into(),
                    reply_to: "rq".into()
                },
                Failed {
                    id: "idb".into(),
                    reply_to: "rq".into()
                }
            ]
        );
        assert_eq!(errbacks.len(), 1);
        assert_eq!(errbacks[0].body[0], json!(["p", "extra"]));
        assert_eq!(errbacks[0].headers["group_index"], 0);
    }

    #[test]
    fn embeds_are_read_strictly() {
        assert_eq!(Embed::from_json(None).unwrap(), Embed::default());
        assert!(Embed::from_json(Some(&json!([1]))).is_err());
        assert!(Embed::from_json(Some(&json!({"chain": [{"args": []}]}))).is_err());
        assert!(Embed::from_json(Some(&json!({"callbacks": "x"}))).is_err());
    }
}
