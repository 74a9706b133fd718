//! The engine's handlers over a fake transport that records what it is asked: the seam is
//! real (no broker anywhere), and a delivery's way from arrival to settlement is checked for
//! each decision `admit` can make, with a dispatcher that serves no plugin.

use super::delivery::{self, Received};
use super::transport::{BrokerSettings, Delivered, Published, Returns, WantedQueue};
use super::worker::{Transport, Worker, WorkerOptions};
use super::ActiveInfo;
use crate::dispatch::Dispatcher;
use crate::source::canvas::Outgoing;
use crate::source::celery::CeleryTask;
use crate::source::pidbox::RemoteWorker;
use crate::supervisor::pool::PoolOptions;
use crate::supervisor::Supervisor;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Records every call, in order, as a line.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
}

impl Fake {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

fn status(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap();
    let exc = v["result"]["exc_type"].as_str().unwrap_or_default();
    format!("{} {exc}", v["status"].as_str().unwrap())
        .trim()
        .to_string()
}

impl Transport for Fake {
    type Ack = u32;
    type Raw = ();
    const NAME: &'static str = "fake";

    async fn ack(w: &Worker<Fake>, ack: &u32) -> bool {
        w.transport.record(format!("ack {ack}"));
        true
    }
    async fn reject(w: &Worker<Fake>, ack: &u32, requeue: bool) -> bool {
        w.transport
            .record(format!("reject {ack} requeue={requeue}"));
        true
    }
    async fn park(_: &Worker<Fake>, _: &str, _: &CeleryTask, _: &(), _: &u32) -> bool {
        false
    }
    async fn publish_task(w: &Worker<Fake>, m: &Outgoing) -> Published {
        w.transport.record(format!("publish {}", m.id));
        Published::Confirmed
    }
    async fn publish_retry(w: &Worker<Fake>, t: &CeleryTask, _: &(), n: u64, _: &str) -> Published {
        w.transport.record(format!("retry {} #{n}", t.id));
        Published::Confirmed
    }
    async fn reply(
        w: &Worker<Fake>,
        id: &str,
        _: (&str, &str),
        body: &[u8],
        _: Returns,
    ) -> Delivered {
        w.transport.record(format!("reply {id} {}", status(body)));
        Delivered::Confirmed
    }
    async fn reply_progress(_: &Worker<Fake>, _: (&str, &str), _: &[u8]) {}
    fn active_queues(_: &Worker<Fake>) -> Vec<Value> {
        Vec::new()
    }
    fn settings(_: &Worker<Fake>) -> BrokerSettings {
        BrokerSettings {
            url: "fake://".into(),
            prefetch: 1,
            queues: Vec::new(),
            conf: Default::default(),
        }
    }
    async fn add_consumer(_: &Worker<Fake>, _: WantedQueue) -> Result<bool, String> {
        Ok(true)
    }
    fn cancel_consumer(_: &Worker<Fake>, _: &str) {}
}

/// A worker over the fake transport whose dispatcher serves no plugin.
fn worker() -> Arc<Worker<Fake>> {
    let options = PoolOptions {
        worker_name: "engine-test".into(),
        max_line_bytes: plugin_protocol::DEFAULT_MAX_LINE_BYTES,
        queue_capacity: 16,
        state_dir: None,
        plugin_user: None,
        events: crate::events::EventBus::new(),
        cgroups: None,
        offers: Default::default(),
    };
    let supervisor = Arc::new(Supervisor::start(Vec::new(), options));
    let options = WorkerOptions {
        nodename: "engine@test".into(),
        result_memory: 100,
        task_events: false,
        result_backend: None,
        result_expires: 0,
        girder_job_urls: Vec::new(),
    };
    Arc::new(Worker::new(
        options,
        Arc::new(Dispatcher::new(supervisor)),
        Fake::default(),
    ))
}

fn message(id: &str, ack: u32) -> Received<Fake> {
    let task = CeleryTask {
        id: id.into(),
        name: "nobody.serves.this".into(),
        reply_to: Some("client".into()),
        correlation_id: id.into(),
        ..CeleryTask::default()
    };
    let info = ActiveInfo {
        id: id.into(),
        name: task.name.clone(),
        args: Default::default(),
        kwargs: Default::default(),
        type_: task.name.clone(),
        hostname: "engine@test".into(),
        time_start: 0.0,
        acknowledged: false,
        worker_pid: 0,
        delivery: Default::default(),
    };
    Received {
        task,
        info: info.into(),
        ack,
        raw: (),
        redelivered: false,
    }
}

async fn handle(w: &Arc<Worker<Fake>>, received: Received<Fake>) -> Vec<String> {
    w.transport.calls.lock().unwrap().clear();
    let handling = delivery::handle(w.clone(), "q".into(), received, CancellationToken::new());
    tokio::time::timeout(Duration::from_secs(10), handling)
        .await
        .expect("a delivery is handled to its end");
    w.transport.calls.lock().unwrap().clone()
}

#[tokio::test]
async fn each_admission_ends_on_the_transport_as_the_rules_say() {
    let w = worker();
    // Nobody serves it: NotRegistered answered, then rejected (dead-lettered where possible).
    assert_eq!(
        handle(&w, message("t1", 1)).await,
        ["reply t1 FAILURE NotRegistered", "reject 1 requeue=false"]
    );
    // A copy of an answered id: settled without running or answering again.
    let mut copy = message("t1", 2);
    copy.redelivered = true;
    assert_eq!(handle(&w, copy).await, ["ack 2"]);
    // Revoked before it arrived: REVOKED, acked.
    w.revoke(&["t3".to_string()], false).await;
    assert_eq!(
        handle(&w, message("t3", 3)).await,
        ["reply t3 REVOKED TaskRevokedError", "ack 3"]
    );
    // Past its expiry: REVOKED too.
    let mut expired = message("t4", 4);
    expired.task.expires = Some(SystemTime::now() - Duration::from_secs(1));
    assert_eq!(
        handle(&w, expired).await,
        ["reply t4 REVOKED TaskRevokedError", "ack 4"]
    );
    // No reply wanted: only the settlement.
    let mut quiet = message("t5", 5);
    quiet.task.ignore_result = true;
    assert_eq!(handle(&w, quiet).await, ["reject 5 requeue=false"]);
    // Stopping: back to the queue, unanswered.
    w.engine.stopping.cancel();
    assert_eq!(
        handle(&w, message("t6", 6)).await,
        ["reject 6 requeue=true"]
    );
}

#[test]
fn inspect_active_shows_a_task_as_a_celery_worker_does() {
    let mut info = Arc::unwrap_or_clone(message("t-1", 1).info);
    info.delivery = plugin_protocol::DeliveryInfo {
        queue: Some("celery".into()),
        exchange: Some("".into()),
        routing_key: Some("celery".into()),
        serializer: Some("json".into()),
        priority: Some(3),
        redelivered: Some(true),
        delivery_count: None,
    };
    let shown = serde_json::to_value(&info).unwrap();
    let want = serde_json::json!({
        "id": "t-1", "name": "nobody.serves.this", "args": [], "kwargs": {},
        "type": "nobody.serves.this", "hostname": "engine@test", "time_start": 0.0,
        "acknowledged": false, "worker_pid": 0,
        "delivery_info": {"exchange": "", "routing_key": "celery", "priority": 3, "redelivered": true},
    });
    assert_eq!(shown, want);
}
