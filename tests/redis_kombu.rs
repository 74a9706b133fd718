//! kombu's Redis transport against a real `redis-server` of the test's own: taking, acking,
//! requeueing, restoring and renewing unacked messages, pushing through bindings, priority
//! order, the atomicity promise (a message is in a list or in `unacked`, never neither),
//! kombu's `unacked_mutex`, hostile list entries; and both directions with the real Celery
//! client and kombu.

mod common;

use common::broker::RedisServer;
use common::within;
use redis::aio::ConnectionManager;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use worker::source::redis_broker::envelope::{self, Outgoing};
use worker::source::redis_broker::keys::{Keys, QueueCycle};
use worker::source::redis_broker::ops::{self, Placement, Requeued, Stuck, Taken};

const MAX: usize = 1 << 20;
const LIMIT: Duration = Duration::from_secs(30);

async fn connect(redis: &RedisServer) -> ConnectionManager {
    let client = redis::Client::open(redis.url()).unwrap();
    within(LIMIT, ConnectionManager::new(client)).await.unwrap()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A Celery-shaped task message with id `id`, as we publish it.
fn task(id: &str, priority: u8, exchange: &str, routing_key: &str) -> Vec<u8> {
    let mut headers = Map::new();
    headers.insert("task".into(), json!("t"));
    headers.insert("id".into(), json!(id));
    let body = serde_json::to_vec(&json!([[id], {}, {}])).unwrap();
    let mut m = Outgoing::task(&body, headers, exchange, routing_key);
    m.priority = priority;
    envelope::encode(&m)
}

fn id_of(payload: &[u8]) -> String {
    let m = envelope::decode(payload, MAX).unwrap();
    m.headers["id"].as_str().unwrap().to_string()
}

async fn lpush(conn: &mut ConnectionManager, list: &str, payload: &[u8]) {
    let _: i64 = redis::cmd("LPUSH")
        .arg(list)
        .arg(payload)
        .query_async(conn)
        .await
        .unwrap();
}

async fn query<T: redis::FromRedisValue>(conn: &mut ConnectionManager, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(conn).await.unwrap()
}

/// Takes from `order`, expecting a recorded message: (queue, payload, tag).
async fn take_one(
    conn: &mut ConnectionManager,
    keys: &Keys,
    order: &[String],
    at: f64,
) -> (String, Vec<u8>, String) {
    match ops::take(conn, keys, order, at).await.unwrap() {
        Some(Taken::Message {
            queue,
            payload,
            tag,
            ..
        }) => (queue, payload, tag),
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn take_records_it_unacked_in_the_same_step_and_ack_forgets_it() {
    let redis = RedisServer::start();
    let mut c = connect(&redis).await;
    let keys = Keys::new("", 0);
    let sent = task("a", 0, "", "q");
    lpush(&mut c, "q", &sent).await;
    let order = keys.watch_order(&QueueCycle::new(&["q"]));
    let at = now();
    let (queue, payload, tag) = take_one(&mut c, &keys, &order, at).await;
    assert_eq!((queue.as_str(), payload.as_slice()), ("q", sent.as_slice()));
    assert_eq!(redis.cli(&["llen", "q"]), "0");
    // kombu's record: the hash holds `[message, exchange, routing_key]`, the index the time.
    let entry: Value = serde_json::from_str(&redis.cli(&["hget", "unacked", &tag])).unwrap();
    let message: Value = serde_json::from_slice(&sent).unwrap();
    assert_eq!(entry, json!([message, "", "q"]));
    let score: f64 = redis
        .cli(&["zscore", "unacked_index", &tag])
        .parse()
        .unwrap();
    assert!((score - at).abs() < 0.001, "{score} vs {at}");
    assert!(ops::take(&mut c, &keys, &order, at)
        .await
        .unwrap()
        .is_none());

    assert!(ops::ack(&mut c, &keys, &tag).await.unwrap());
    assert_eq!(redis.cli(&["hlen", "unacked"]), "0");
    assert_eq!(redis.cli(&["zcard", "unacked_index"]), "0");
    assert!(!ops::ack(&mut c, &keys, &tag).await.unwrap(), "acked twice");
}

#[tokio::test]
async fn lower_steps_come_first_queues_take_turns_and_each_list_is_fifo() {
    let redis = RedisServer::start();
    let mut c = connect(&redis).await;
    let keys = Keys::new("", 0);
    for (id, priority, queue) in [
        ("q1-p9", 9, "q1"),
        ("q1-p5", 5, "q1"),
        ("q1-p0-first", 0, "q1"),
        ("q1-p0-second", 1, "q1"),
        ("q2-p0", 0, "q2"),
    ] {
        let sent = task(id, priority, "", queue);
        let n = ops::push(&mut c, &keys, "", queue, priority, &sent).await;
        assert_eq!(n.unwrap(), 1);
    }
    assert_eq!(
        redis.cli(&["llen", "q1\x06\x163"]),
        "1",
        "priority 5 -> step 3"
    );
    assert_eq!(redis.cli(&["llen", "q1\x06\x169"]), "1");
    let mut cycle = QueueCycle::new(&["q1", "q2"]);
    let mut seen = Vec::new();
    loop {
        let order = keys.watch_order(&cycle);
        match ops::take(&mut c, &keys, &order, now()).await.unwrap() {
            Some(t) => {
                cycle.rotate(t.queue());
                let Taken::Message { payload, .. } = t else {
                    panic!("{t:?}")
                };
                seen.push(id_of(&payload));
            }
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["q1-p0-first", "q2-p0", "q1-p0-second", "q1-p5", "q1-p9"]
    );
}

/// The message without kombu's redelivered marks, to compare with what was sent.
fn unmarked(payload: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(payload).unwrap();
    v["headers"].as_object_mut().unwrap().remove("redelivered");
    v["properties"]["delivery_info"]
        .as_object_mut()
        .unwrap()
        .remove("redelivered");
    v
}

#[tokio::test]
async fn requeue_puts_it_back_marked_redelivered_at_the_end_kombu_uses() {
    let redis = RedisServer::start();
    let mut c = connect(&redis).await;
    let keys = Keys::new("", 0);
    let order = keys.watch_order(&QueueCycle::new(&["q"]));
    let (a, b) = (task("a", 7, "", "q"), task("b", 7, "", "q"));
    ops::push(&mut c, &keys, "", "q", 7, &a).await.unwrap();
    ops::push(&mut c, &keys, "", "q", 7, &b).await.unwrap();

    // Rejected with requeue: LPUSH, behind b.
    let (_, _, tag) = take_one(&mut c, &keys, &order, now()).await;
    let back = ops::requeue(&mut c, &keys, &tag, Placement::Back);
    assert_eq!(back.await.unwrap(), Requeued::Restored { lists: 1 });
    assert_eq!(redis.cli(&["hlen", "unacked"]), "0");
    assert_eq!(redis.cli(&["zcard", "unacked_index"]), "0");
    let (_, first, _) = take_one(&mut c, &keys, &order, now()).await;
    assert_eq!(id_of(&first), "b");
    let (_, again, tag) = take_one(&mut c, &keys, &order, now()).await;
    let m = envelope::decode(&again, MAX).unwrap();
    assert!(m.redelivered && m.headers["redelivered"] == json!(true));
    assert_eq!(
        unmarked(&again),
        serde_json::from_slice::<Value>(&a).unwrap()
    );
    assert_eq!(m.priority, 7, "back in the step-6 list");

    // Restored (shutdown, visibility): RPUSH, taken next; marked once only.
    let c2 = task("c", 7, "", "q");
    ops::push(&mut c, &keys, "", "q", 7, &c2).await.unwrap();
    let front = ops::requeue(&mut c, &keys, &tag, Placement::Front).await;
    assert_eq!(front.unwrap(), Requeued::Restored { lists: 1 });
    let (_, next, tag) = take_one(&mut c, &keys, &order, now()).await;
    assert_eq!(next, again, "taken next, marks not added twice");
    ops::ack(&mut c, &keys, &tag).await.unwrap();
    let gone = ops::requeue(&mut c, &keys, &tag, Placement::Back).await;
    assert_eq!(gone.unwrap(), Requeued::Missing);
}

#[tokio::test]
async fn a_restore_keeps_the_message_text_and_only_adds_the_marks() {
    let redis = RedisServer::start();
    let mut c = connect(&redis).await;
    let keys = Keys::new("", 0);
    // As Python's json.dumps writes kombu's entry, with what Redis's cjson would not keep:
    // an integer past 2^53, an empty array, a float, a string full of JSON syntax.
    let message = r#"{"body": "", "headers": {"big": 12345678901234567890, "empty": [], "f": 0.1, "s": "a\"}]\\,{"}, "properties": {"delivery_tag": "x", "priority": 4, "delivery_info": {}}}"#;
    redis.cli(&["hset", "unacked", "x", &format!("[{message}, \"\", \"q\"]")]);
    redis.cli(&["zadd", "unacked_index", "1", "x"]);
    let r = ops::requeue(&mut c, &keys, "x", Placement::Front).await;
    assert_eq!(r.unwrap(), Requeued::Restored { lists: 1 });
    assert_eq!(
        redis.cli(&["lrange", "q\x06\x163", "0", "-1"]),
        r#"{"body": "", "headers": {"big": 12345678901234567890, "empty": [], "f": 0.1, "s": "a\"}]\\,{", "redelivered": true}, "properties": {"delivery_tag": "x", "priority": 4, "delivery_info": {"redelivered": true}}}"#
    );
}

#[tokio::test]
async fn a_named_exchange_routes_through_its_bindings_like_kombus_direct_lookup() {
    let redis = RedisServer::start();
    let mut c = connect(&redis).await;
    let keys = Keys::new("", 0);
    for member in [
        "rk\x06\x16\x06\x16qa",
        "rk\x06\x16\x06\x16qb",
        "x\x06\x16\x06\x16qc",
    ] {
        redis.cli(&["sadd", "_kombu.binding.ex", member]);
    }
    let sent = task("m", 6, "ex", "rk");
    assert_eq!(
        ops::push(&mut c, &keys, "ex", "rk", 6, &sent)
            .await
            .unwrap(),
        2
    );
    for list in ["qa\x06\x166", "qb\x06\x166"] {
        assert_eq!(redis.cli(&["llen", list]), "1", "{list:?}");
    }
    assert_eq!(redis.cli(&["exists", "qc\x06\x166"]), "0");
    let none = ops::push(&mut c, &keys, "ex", "unbound", 0, &sent).await;
    assert_eq!(none.unwrap(), 0, "nothing bound: nothing written");

    // A restore routes again, as kombu's `_do_restore_message` does: to every bound queue.
    let order = keys.watch_order(&QueueCycle::new(&["qa"]));
    let (_, _, tag) = take_one(&mut c, &keys, &order, now()).await;
    let r = ops::requeue(&mut c, &keys, &tag, Placement::Front).await;
    assert_eq!(r.unwrap(), Requeued::Restored { lists: 2 });
    assert_eq!(redis.cli(&["llen", "qb\x06\x166"]), "2");

    // Unbound meanwhile: the entry stays unacked rather than vanish.
    let (_, _, tag) = take_one(&mut c, &keys, &order, now()).await;
    redis.cli(&["del", "_kombu.binding.ex"]);
    let r = ops::requeue(&mut c, &keys, &tag, Placement::Front).await;
    assert_eq!(r.unwrap(), Requeued::Stuck(Stuck::Unroutable));
    assert_eq!(redis.cli(&["hexists", "unacked", &tag]), "1");
}

#[tokio::test]
async fn expired_entries_are_restored_unless_held_or_kombu_holds_the_mutex() {
    let redis = RedisServer::start();
    let mut c = connect(&redis).await;
    let keys = Keys::new("", 0);
    let order = keys.watch_order(&QueueCycle::new(&["q"]));
    let t0 = now();
    let mut tags = Vec::new();
    for (id, age) in [
        ("old1", 100.0),
        ("old2", 90.0),
        ("held", 95.0),
        ("new", 1.0),
    ] {
        ops::push(&mut c, &keys, "", "q", 0, &task(id, 0, "", "q"))
            .await
            .unwrap();
        tags.push(take_one(&mut c, &keys, &order, t0 - age).await.2);
    }
    // A Celery worker's restore holds the lock (redis-py's Lock: SET NX PX).
    let locked = redis.cli(&["set", "unacked_mutex", "token", "NX", "PX", "300000"]);
    assert_eq!(locked, "OK");
    let round = ops::restore_expired(&mut c, &keys, 50.0, t0, &[])
        .await
        .unwrap();
    assert!(round.mutex_held && round.restored == 0, "{round:?}");
    assert_eq!(redis.cli(&["hlen", "unacked"]), "4");

    redis.cli(&["del", "unacked_mutex"]);
    let held = [tags[2].clone()];
    let round = ops::restore_expired(&mut c, &keys, 50.0, t0, &held)
        .await
        .unwrap();
    assert_eq!((round.mutex_held, round.restored), (false, 2), "{round:?}");
    assert!(round.stuck.is_empty());
    let left: Vec<String> = query(&mut c, &["zrange", "unacked_index", "0", "-1"]).await;
    assert_eq!(left, [tags[2].clone(), tags[3].clone()]);
    // Newest first, each RPUSHed (kombu's order): the oldest is taken first.
    let (_, first, _) = take_one(&mut c, &keys, &order, now()).await;
    let (_, second, _) = take_one(&mut c, &keys, &order, now()).await;
    assert_eq!([id_of(&first), id_of(&second)], ["old1", "old2"]);
    assert!(envelope::decode(&first, MAX).unwrap().redelivered);
}

#[tokio::test]
async fn renew_moves_the_lease_and_never_brings_back_an_acked_tag() {
    let redis = RedisServer::start();
    let mut c = connect(&redis).await;
    let keys = Keys::new("", 0);
    let order = keys.watch_order(&QueueCycle::new(&["q"]));
    let t0 = now();
    let mut tags = Vec::new();
    for id in ["running", "done"] {
        ops::push(&mut c, &keys, "", "q", 0, &task(id, 0, "", "q"))
            .await
            .unwrap();
        tags.push(take_one(&mut c, &keys, &order, t0 - 100.0).await.2);
    }
    ops::ack(&mut c, &keys, &tags[1]).await.unwrap();
    assert_eq!(ops::renew(&mut c, &keys, &tags, t0).await.unwrap(), 1);
    assert_eq!(redis.cli(&["zscore", "unacked_index", &tags[1]]), "");
    let round = ops::restore_expired(&mut c, &keys, 50.0, t0, &[])
        .await
        .unwrap();
    assert_eq!(round.restored, 0, "renewed: not expired");
    assert_eq!(redis.cli(&["hexists", "unacked", &tags[0]]), "1");
}

#[tokio::test]
async fn hostile_entries_are_returned_unrecorded_and_lose_no_other_message() {
    let redis = RedisServer::start();
    let mut c = connect(&redis).await;
    let keys = Keys::new("", 0);
    let order = keys.watch_order(&QueueCycle::new(&["q"]));
    let mut garbage = vec![0u8; 1 << 20];
    for (i, b) in garbage.iter_mut().enumerate() {
        *b = (i * 7919 % 251) as u8;
    }
    let no_info = br#"{"body": "", "headers": {}, "properties": {"delivery_tag": "no-info"}}"#;
    let hostile: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        br#"{"properties": {"priority": 1}}"#.to_vec(),
        br#"{"body": "e30="}"#.to_vec(),
        b"[1, 2]".to_vec(),
        "[".repeat(100_000).into_bytes(),
        garbage,
    ];
    lpush(&mut c, "q", &task("good1", 0, "", "q")).await;
    for h in &hostile {
        lpush(&mut c, "q", h).await;
    }
    lpush(&mut c, "q", no_info).await;
    lpush(&mut c, "q", &task("good2", 0, "", "q")).await;

    let (mut good, mut unreadable) = (Vec::new(), Vec::new());
    while let Some(t) = ops::take(&mut c, &keys, &order, now()).await.unwrap() {
        match t {
            Taken::Message { payload, tag, .. } => good.push((payload, tag)),
            Taken::Unreadable {
                payload, reason, ..
            } => {
                assert!(envelope::decode(&payload, MAX).is_err());
                unreadable.push((payload, reason));
            }
        }
    }
    assert_eq!(unreadable.len(), hostile.len(), "{unreadable:?}");
    assert!(unreadable.iter().all(|(p, _)| hostile.contains(p)));
    assert_eq!(good.len(), 3);
    assert_eq!(redis.cli(&["hlen", "unacked"]), "3");
    // No delivery_info: recorded as published to its queue, so a restore finds it.
    let (_, tag) = good.iter().find(|(p, _)| p == no_info).unwrap();
    let entry: Value = serde_json::from_str(&redis.cli(&["hget", "unacked", tag])).unwrap();
    assert_eq!((&entry[1], &entry[2]), (&json!(""), &json!("q")));
    let r = ops::requeue(&mut c, &keys, tag, Placement::Front).await;
    assert_eq!(r.unwrap(), Requeued::Restored { lists: 1 });
    // An unacked entry kombu could not read either stays where it is.
    redis.cli(&["hset", "unacked", "bad", "{not an entry"]);
    redis.cli(&["zadd", "unacked_index", "1", "bad"]);
    let round = ops::restore_expired(&mut c, &keys, 10.0, now(), &[])
        .await
        .unwrap();
    assert_eq!(round.stuck, [("bad".to_string(), Stuck::Unreadable)]);
}

#[tokio::test]
async fn the_global_keyprefix_is_on_every_key_used() {
    let redis = RedisServer::start();
    let mut c = connect(&redis).await;
    let keys = Keys::new("app:", 0);
    redis.cli(&["sadd", "app:_kombu.binding.ex", "rk\x06\x16\x06\x16q"]);
    let pushed = ops::push(&mut c, &keys, "ex", "rk", 3, &task("p", 3, "ex", "rk")).await;
    assert_eq!(pushed.unwrap(), 1);
    assert_eq!(redis.cli(&["llen", "app:q\x06\x163"]), "1");
    let order = keys.watch_order(&QueueCycle::new(&["q"]));
    let (queue, _, tag) = take_one(&mut c, &keys, &order, now() - 100.0).await;
    assert_eq!(queue, "q");
    assert_eq!(redis.cli(&["hexists", "app:unacked", &tag]), "1");
    assert_eq!(redis.cli(&["zcard", "app:unacked_index"]), "1");
    redis.cli(&["set", "app:unacked_mutex", "t"]);
    let round = ops::restore_expired(&mut c, &keys, 10.0, now(), &[])
        .await
        .unwrap();
    assert!(round.mutex_held);
    redis.cli(&["del", "app:unacked_mutex"]);
    let round = ops::restore_expired(&mut c, &keys, 10.0, now(), &[])
        .await
        .unwrap();
    assert_eq!(round.restored, 1);
    assert_eq!(redis.cli(&["llen", "app:q\x06\x163"]), "1");
    let keys_now = redis.cli(&["keys", "*"]);
    assert!(
        keys_now.lines().all(|k| k.starts_with("app:")),
        "{keys_now}"
    );
}

/// Messages in the list plus messages unacked, in one MULTI snapshot.
async fn in_list_or_unacked(conn: &mut ConnectionManager) -> (i64, i64) {
    redis::pipe()
        .atomic()
        .cmd("LLEN")
        .arg("q")
        .cmd("HLEN")
        .arg("unacked")
        .query_async(conn)
        .await
        .unwrap()
}

/// Three takers, a requeuer and a restorer race; an observer's atomic snapshots never see a
/// message outside both the list and `unacked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_always_in_its_list_or_unacked_never_neither() {
    let redis = RedisServer::start();
    let keys = Keys::new("", 0);
    let mut c = connect(&redis).await;
    let n = 300;
    for i in 0..n {
        lpush(&mut c, "q", &task(&format!("m{i}"), 0, "", "q")).await;
    }
    let order = keys.watch_order(&QueueCycle::new(&["q"]));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut racers = Vec::new();
    for i in 0..3 {
        let (mut c, keys, order, stop) = (c.clone(), keys.clone(), order.clone(), stop.clone());
        racers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Some(Taken::Message { tag, .. }) =
                    ops::take(&mut c, &keys, &order, now()).await.unwrap()
                {
                    if i == 0 {
                        ops::requeue(&mut c, &keys, &tag, Placement::Back)
                            .await
                            .unwrap();
                    }
                }
            }
        }));
    }
    let (mut r, rkeys, rstop) = (c.clone(), keys.clone(), stop.clone());
    racers.push(tokio::spawn(async move {
        while !rstop.is_cancelled() {
            ops::restore_expired(&mut r, &rkeys, 0.0, now() + 1.0, &[])
                .await
                .unwrap();
        }
    }));
    let mut mid_race = 0;
    for _ in 0..500 {
        let (listed, unacked) = in_list_or_unacked(&mut c).await;
        assert_eq!(listed + unacked, n, "({listed} listed, {unacked} unacked)");
        mid_race += usize::from(listed > 0 && unacked > 0);
    }
    assert!(
        mid_race > 0,
        "the snapshots never caught the racers at work"
    );
    stop.cancel();
    for r in racers {
        within(LIMIT, r).await.unwrap();
    }
    let (listed, unacked) = in_list_or_unacked(&mut c).await;
    assert_eq!(listed + unacked, n);
}

/// Runs `script` under the venv's Python with `URL` set; the JSON of its last stdout line.
fn python(python: &PathBuf, redis: &RedisServer, script: &str) -> Value {
    common::broker::last_json(
        Command::new(python)
            .args(["-c", script])
            .env("URL", redis.url())
            .stdin(Stdio::null()),
    )
}

const SEND: &str = r#"
import json, os
from celery import Celery
app = Celery(broker=os.environ['URL'])
ids = [app.send_task('t', args=[1], kwargs={'a': 2}, priority=p).id for p in (9, 5, 0)]
print(json.dumps(ids))
"#;

#[tokio::test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
async fn redis_kombu_tasks_sent_by_the_celery_client_are_taken_and_read() {
    let py = common::broker::redis_python("redis_kombu_client");
    let redis = RedisServer::start();
    let ids = python(&py, &redis, SEND);
    let mut c = connect(&redis).await;
    let keys = Keys::new("", 0);
    let order = keys.watch_order(&QueueCycle::new(&["celery"]));
    let mut got = Vec::new();
    while let Some(t) = ops::take(&mut c, &keys, &order, now()).await.unwrap() {
        let Taken::Message {
            list, payload, tag, ..
        } = t
        else {
            panic!("{t:?}")
        };
        let m = envelope::decode(&payload, MAX).unwrap();
        assert_eq!(m.delivery_tag, tag);
        assert_eq!(
            (m.exchange.as_deref(), m.routing_key.as_deref()),
            (Some(""), Some("celery"))
        );
        let task = worker::source::celery::decode(&m.envelope()).unwrap();
        assert_eq!(
            (task.name.as_str(), task.args.to_vec()),
            ("t", vec![json!(1)])
        );
        assert_eq!(task.kwargs.get("a"), Some(&json!(2)));
        assert_eq!(list, keys.list_for("celery", m.priority));
        got.push((task.id.to_string(), m.priority));
    }
    // Sent 9, 5, 0: taken by step, 0 first.
    let want: Vec<(String, u8)> = [(2, 0), (1, 5), (0, 9)]
        .iter()
        .map(|(i, p)| (ids[*i].as_str().unwrap().to_string(), *p))
        .collect();
    assert_eq!(got, want);
    assert_eq!(redis.cli(&["hlen", "unacked"]), "3");
}

const GET: &str = r#"
import json, os
from kombu import Connection
with Connection(os.environ['URL']) as conn:
    m = conn.default_channel.basic_get(os.environ.get('QUEUE', 'q'))
    out = {'body': m.body.decode(), 'headers': m.headers, 'info': m.delivery_info,
           'props': m.properties, 'redelivered': m.delivery_info.get('redelivered', False)}
    if os.environ.get('ABANDON'):
        print(json.dumps(out), flush=True)
        os._exit(0)  # no ack, no restore at close: as if the worker were killed
    m.ack()
print(json.dumps(out))
"#;

fn kombu_get(py: &PathBuf, redis: &RedisServer, abandon: bool) -> Value {
    let mut cmd = Command::new(py);
    cmd.args(["-c", GET])
        .env("URL", redis.url())
        .stdin(Stdio::null());
    if abandon {
        cmd.env("ABANDON", "1");
    }
    common::broker::last_json(&mut cmd)
}

#[tokio::test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
async fn redis_kombu_reads_what_we_push_and_restore_and_we_restore_what_it_abandoned() {
    let py = common::broker::redis_python("redis_kombu_kombu");
    let redis = RedisServer::start();
    let mut c = connect(&redis).await;
    let keys = Keys::new("", 0);
    let mut headers = Map::new();
    headers.insert("task".into(), json!("t"));
    headers.insert("id".into(), json!("our-id"));
    let mut m = Outgoing::task(br#"[[1], {"a": 2}, {}]"#, headers, "", "q");
    m.priority = 6;
    m.correlation_id = Some("our-id");
    m.reply_to = Some("replies");
    let sent = envelope::encode(&m);
    assert_eq!(
        ops::push(&mut c, &keys, "", "q", 6, &sent).await.unwrap(),
        1
    );

    let got = kombu_get(&py, &redis, false);
    assert_eq!(got["body"], r#"[[1], {"a": 2}, {}]"#);
    assert_eq!(got["headers"], json!({"task": "t", "id": "our-id"}));
    assert_eq!(got["props"]["correlation_id"], "our-id");
    assert_eq!(got["props"]["reply_to"], "replies");
    assert_eq!(got["props"]["priority"], 6);
    assert_eq!(got["info"]["routing_key"], "q");
    assert_eq!(got["redelivered"], false);
    assert_eq!(redis.cli(&["hlen", "unacked"]), "0", "kombu acked it");

    // We take it, requeue it; kombu sees it redelivered, the same otherwise.
    ops::push(&mut c, &keys, "", "q", 6, &sent).await.unwrap();
    let order = keys.watch_order(&QueueCycle::new(&["q"]));
    let (_, _, tag) = take_one(&mut c, &keys, &order, now()).await;
    ops::requeue(&mut c, &keys, &tag, Placement::Front)
        .await
        .unwrap();
    let again = kombu_get(&py, &redis, false);
    assert_eq!(again["redelivered"], true);
    assert_eq!(again["headers"]["redelivered"], true);
    assert_eq!(again["body"], got["body"]);

    // kombu takes it and dies before acking: its entry (Python's JSON) is restored by us.
    ops::push(&mut c, &keys, "", "q", 6, &sent).await.unwrap();
    let abandoned = kombu_get(&py, &redis, true);
    assert_eq!(redis.cli(&["hlen", "unacked"]), "1");
    let round = ops::restore_expired(&mut c, &keys, 0.0, now() + 1.0, &[])
        .await
        .unwrap();
    assert_eq!(round.restored, 1, "{round:?}");
    let (_, payload, _) = take_one(&mut c, &keys, &order, now()).await;
    let back = envelope::decode(&payload, MAX).unwrap();
    assert!(back.redelivered);
    assert_eq!(back.delivery_tag, abandoned["props"]["delivery_tag"]);
    assert_eq!(back.body, br#"[[1], {"a": 2}, {}]"#);
}

const PREFIXED: &str = r#"
import json, os, sys
from kombu import Connection, Exchange, Producer, Queue
with Connection(os.environ['URL'], transport_options={'global_keyprefix': 'app:'}) as conn:
    ch = conn.default_channel
    if sys.argv[1] == 'publish':
        Queue('qq', Exchange('ex', 'direct'), 'rk')(ch).declare()
        Producer(ch).publish({'n': 1}, exchange='ex', routing_key='rk', priority=7)
        print(json.dumps({}))
    else:
        m = ch.basic_get('qq')
        m.ack()
        print(json.dumps({'body': m.body.decode(), 'info': m.delivery_info, 'headers': m.headers}))
"#;

#[tokio::test]
#[cfg_attr(without_broker, ignore = "WORKER_TESTS_WITHOUT_BROKER=1")]
async fn redis_kombu_a_global_keyprefix_and_a_named_exchange_match_kombus() {
    let py = common::broker::redis_python("redis_kombu_prefix");
    let redis = RedisServer::start();
    let run = |what: &str| {
        common::broker::last_json(
            Command::new(&py)
                .args(["-c", PREFIXED, what])
                .env("URL", redis.url())
                .stdin(Stdio::null()),
        )
    };
    run("publish");
    let mut c = connect(&redis).await;
    let keys = Keys::new("app:", 0);
    let order = keys.watch_order(&QueueCycle::new(&["qq"]));
    let Some(Taken::Message {
        list, payload, tag, ..
    }) = ops::take(&mut c, &keys, &order, now()).await.unwrap()
    else {
        panic!("kombu's message is not where our keys say")
    };
    assert_eq!(list, "app:qq\x06\x166");
    let m = envelope::decode(&payload, MAX).unwrap();
    assert_eq!(
        (m.exchange.as_deref(), m.routing_key.as_deref()),
        (Some("ex"), Some("rk"))
    );
    assert_eq!(redis.cli(&["hexists", "app:unacked", &tag]), "1");
    // Requeued through kombu's (prefixed) binding set, read back by kombu.
    let r = ops::requeue(&mut c, &keys, &tag, Placement::Front).await;
    assert_eq!(r.unwrap(), Requeued::Restored { lists: 1 });
    let got = run("get");
    assert_eq!(got["body"], r#"{"n": 1}"#);
    assert_eq!(got["info"]["redelivered"], true);
    // And what we push through the exchange, kombu reads too.
    let mut ours = Outgoing::plain(br#"{"n": 2}"#, "ex", "rk");
    ours.priority = 2;
    let pushed = ops::push(&mut c, &keys, "ex", "rk", 2, &envelope::encode(&ours)).await;
    assert_eq!(pushed.unwrap(), 1);
    assert_eq!(run("get")["body"], r#"{"n": 2}"#);
    assert_eq!(redis.cli(&["hlen", "app:unacked"]), "0");
}
