//! Queue and result backends in the Rust SDK (protocol 1.5, PROTOCOL.md §4a): what a plugin
//! registered ([`Backends`]) and, once `initialize` came, the [`BackendSession`] that `plugin`
//! hands their messages to. The queue side (offers) lives in `plugin_offers`; the result
//! side, `result.store`, is served here. Never imports `plugin`, and touches no stdio.

use crate::backends::ResultStoreParams;
use crate::message::{ErrorObject, Message, Notification, Request, Response};
use crate::methods::{code, InitializeParams};
use crate::outbox::Outbox;
use crate::plugin_offers::{OfferSession, OffersFn};
use crate::plugin_pool::{guarded, Outlet, Pool};
use serde_json::Map;
use std::sync::{Arc, Mutex, PoisonError};

/// A result backend's store handler.
pub(crate) type StoreFn = Arc<dyn Fn(ResultStoreParams) -> Result<(), String> + Send + Sync>;

/// What a plugin registered, kept until `initialize` starts a [`BackendSession`].
#[derive(Default)]
pub(crate) struct Backends {
    offers: Mutex<Option<OffersFn>>,
    store: Option<StoreFn>,
}

impl Backends {
    pub(crate) fn set_offers(&mut self, offers: OffersFn) {
        *self
            .offers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = Some(offers);
    }

    pub(crate) fn set_store(&mut self, store: StoreFn) {
        self.store = Some(store);
    }

    /// The session of one `initialize`: offering only if it carried a `queue_backend` window
    /// (and the plugin registered offers), storing on `limits.concurrency` threads, writing
    /// to `out`.
    pub(crate) fn start(&self, params: &InitializeParams, out: Outbox) -> BackendSession {
        let outlet = Arc::new(Outlet::new(out));
        let offers = self
            .offers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let offers = match (offers, &params.queue_backend) {
            (Some(offers), Some(init)) => {
                Some(OfferSession::new(offers, init.window, outlet.clone()))
            }
            (Some(_), None) => {
                eprintln!("Plugin::offers is registered but the worker did not make this plugin a queue backend (no queue_backend in initialize): add `provides = [\"queue_backend\"]` to plugin.toml; nothing is offered");
                None
            }
            (None, Some(_)) => {
                eprintln!("initialize gave a queue_backend window, but this plugin registered no Plugin::offers: nothing is offered");
                None
            }
            (None, None) => None,
        };
        let store = self.store.clone().map(|store| {
            let threads = params.limits.concurrency;
            (store, Pool::start("result.store", threads))
        });
        BackendSession {
            outlet,
            offers,
            store: store.map(Arc::new),
        }
    }
}

/// The queue and result backends' side of one session; `plugin` calls it as messages come.
/// Cheap to clone.
#[derive(Clone)]
pub(crate) struct BackendSession {
    outlet: Arc<Outlet>,
    offers: Option<OfferSession>,
    store: Option<Arc<(StoreFn, Pool)>>,
}

impl BackendSession {
    /// `initialized`: a queue backend starts offering.
    pub(crate) fn initialized(&self) {
        if let Some(offers) = &self.offers {
            offers.start();
        }
    }

    /// A response from the worker: only a queue backend asks the worker anything.
    pub(crate) fn answered(&self, response: Response) {
        match &self.offers {
            Some(offers) => offers.answered(response),
            None => eprintln!(
                "ignoring a response to request {:?}: this plugin sent none",
                response.id
            ),
        }
    }

    /// `offer.progress` and `offer.stream`.
    pub(crate) fn notified(&self, n: Notification) {
        if let Some(offers) = &self.offers {
            offers.notified(n);
        }
    }

    /// `result.store`: `store(record)` on a store thread, answered `{}` once stored or
    /// `-32000` with the handler's message (the worker retries); `-32601` when the plugin
    /// registered no store. Accepted while shutting down too: the worker stores an offered
    /// task's result before it answers the offer, and `shutdown` waits for those answers.
    pub(crate) fn store(&self, req: Request) {
        let refuse = |err| self.reply(Response::err(Some(req.id.clone()), err));
        let Some(store) = &self.store else {
            let message = "unknown method result.store: this plugin registered no Plugin::stores";
            return refuse(ErrorObject::new(code::METHOD_NOT_FOUND, message));
        };
        let record = match serde_json::from_value::<ResultStoreParams>(req.params) {
            Ok(record) => record,
            Err(e) => return refuse(ErrorObject::new(code::INVALID_PARAMS, e.to_string())),
        };
        let (outlet, handler, id) = (self.outlet.clone(), store.0.clone(), req.id);
        store.1.run(Box::new(move || {
            let what = format!("the store of task {}", record.task_id);
            let stored = guarded(&what, || handler(record))
                .unwrap_or_else(|| Err(format!("{what} panicked")));
            let reply = match stored {
                Ok(()) => Response::ok(id, Map::new()),
                Err(message) => {
                    Response::err(Some(id), ErrorObject::new(code::TASK_FAILED, message))
                }
            };
            outlet.send(Message::Response(reply).to_line());
        }));
    }

    fn reply(&self, response: Response) {
        self.outlet.send(Message::Response(response).to_line());
    }

    /// `shutdown` arrived: offer nothing more.
    pub(crate) fn begin_shutdown(&self) {
        if let Some(offers) = &self.offers {
            offers.begin_shutdown();
        }
    }

    /// Waits until offering has stopped, every offer is answered, and every callback and
    /// store has run (or stdin closed): then `shutdown` may be answered.
    pub(crate) fn wait_drained(&self) {
        if let Some(offers) = &self.offers {
            offers.wait_drained();
        }
        if let Some(store) = &self.store {
            store.1.wait_idle();
        }
    }

    /// Stdin closed (or `exit`): the worker is gone. Nothing more is offered, called or
    /// written, and the writer thread may end.
    pub(crate) fn close(&self) {
        if let Some(offers) = &self.offers {
            offers.close();
        }
        if let Some(store) = &self.store {
            store.1.close();
        }
        self.outlet.close();
    }
}

/// The SDK driven as the worker drives it: `Plugin::serve` on a thread, its stdin and stdout
/// in-memory pipes, every wait bounded.
#[cfg(test)]
mod tests {
    use crate::backends::{FinalState, ResultStoreParams, TaskFinal};
    use crate::methods::code;
    use crate::plugin::{Offer, Plugin};
    use serde_json::{json, Value};
    use std::collections::VecDeque;
    use std::io::{self, Read, Write};
    use std::sync::mpsc::{self, Receiver, Sender};
    use std::sync::{Arc, Mutex};
    use std::thread::{self, JoinHandle};
    use std::time::{Duration, Instant};

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// The plugin's stdin: what the test sends; end of file once the test drops its end.
    struct Stdin(Receiver<Vec<u8>>, VecDeque<u8>);

    impl Read for Stdin {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.1.is_empty() {
                match self.0.recv() {
                    Ok(bytes) => self.1.extend(bytes),
                    Err(_) => return Ok(0),
                }
            }
            self.1.read(out)
        }
    }

    /// The plugin's stdout: every write, to the test.
    struct Stdout(Sender<Vec<u8>>);

    impl Write for Stdout {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let _ = self.0.send(bytes.to_vec());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The worker's end of a plugin being served.
    struct Worker {
        stdin: Option<Sender<Vec<u8>>>,
        stdout: Receiver<Vec<u8>>,
        partial: Vec<u8>,
        /// Messages read and not taken yet, in order.
        unread: VecDeque<Value>,
        serving: Option<JoinHandle<io::Result<()>>>,
    }

    impl Worker {
        /// `plugin` served, initialized (a queue backend with `window`, when given) with
        /// `concurrency`, and told `initialized`.
        fn start(plugin: Plugin, window: Option<u32>, concurrency: u32) -> Worker {
            let (stdin, input) = mpsc::channel();
            let (output, stdout) = mpsc::channel();
            let serving =
                thread::spawn(move || plugin.serve(Stdin(input, VecDeque::new()), Stdout(output)));
            let mut worker = Worker {
                stdin: Some(stdin),
                stdout,
                partial: Vec::new(),
                unread: VecDeque::new(),
                serving: Some(serving),
            };
            let mut params = json!({
                "protocol_version": "1.5", "worker": {"name": "w", "version": "0"},
                "plugin": {"name": "backend", "instance": 0}, "settings": {},
                "limits": {"max_line_bytes": 1_000_000, "concurrency": concurrency}});
            if let Some(window) = window {
                params["queue_backend"] = json!({ "window": window });
            }
            worker.send(json!({"id": 0, "method": "initialize", "params": params}));
            let init = worker.response(0);
            assert_eq!(init["result"]["protocol_version"], "1.5", "{init}");
            worker.send(json!({"method": "initialized", "params": {}}));
            worker
        }

        fn send(&self, message: Value) {
            self.send_all([message]);
        }

        /// Sends `messages` in one write, so that the plugin reads them together.
        fn send_all<const N: usize>(&self, messages: [Value; N]) {
            let mut lines = String::new();
            for mut message in messages {
                message["jsonrpc"] = json!("2.0");
                lines += &format!("{message}\n");
            }
            let stdin = self.stdin.as_ref().expect("stdin is open");
            stdin.send(lines.into_bytes()).unwrap();
        }

        /// The first message, read or to come, that `matches`; the others stay unread.
        fn take(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
            let deadline = Instant::now() + TIMEOUT;
            loop {
                if let Some(at) = self.unread.iter().position(&matches) {
                    return self.unread.remove(at).unwrap();
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(bytes) = self.stdout.recv_timeout(left) else {
                    panic!("no {what} within {TIMEOUT:?}; unread: {:?}", self.unread);
                };
                self.partial.extend(bytes);
                while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.partial.drain(..=end).collect();
                    self.unread
                        .push_back(serde_json::from_slice(&line).unwrap());
                }
            }
        }

        fn response(&mut self, id: u64) -> Value {
            let what = format!("response to request {id}");
            self.take(&what, |m| m["id"] == id && m.get("method").is_none())
        }

        fn offer(&mut self) -> Value {
            self.take("task.offer", |m| m["method"] == "task.offer")
        }

        /// Answers `offer` as the worker does once its task `t.add` succeeded.
        fn succeed(&self, offer: &Value) -> TaskFinal {
            let n = offer["params"]["args"][0].as_u64().unwrap();
            let task_id = offer["params"]["task_id"].as_str().unwrap().to_string();
            let outcome = TaskFinal {
                task_id,
                state: FinalState::Success,
                result: Some(json!(n + n)),
                error: None,
            };
            self.send(json!({"id": offer["id"], "result": outcome}));
            outcome
        }

        fn refuse(&self, offer: &Value, code: i64, message: &str) {
            let error = json!({"code": code, "message": message});
            self.send(json!({"id": offer["id"], "error": error}));
        }

        /// Pings and waits for the answer: whatever the plugin's reader did before it (the
        /// progress and stream callbacks) is done, and what it wrote before is read.
        fn barrier(&mut self, id: u64) {
            self.send(json!({"id": id, "method": "ping"}));
            self.response(id);
        }

        fn offers_unread(&self) -> usize {
            let offers = self.unread.iter().filter(|m| m["method"] == "task.offer");
            offers.count()
        }

        /// Closes stdin and waits for `serve` to return.
        fn finish(mut self) {
            self.stdin = None;
            let serving = self.serving.take().unwrap();
            serving.join().unwrap().unwrap();
        }
    }

    /// What the test plugin's offers function and callbacks saw, in order.
    #[derive(Debug, Clone, PartialEq)]
    enum Seen {
        Window(u32),
        Pulled(u32),
        Returned,
        OutcomeStarted(String),
        Outcome(String, TaskFinal),
        Release(String, String),
        Progress(String, u64, Option<u64>, Option<String>),
        Stream(String, Vec<Value>),
        Stored(ResultStoreParams),
    }

    fn next(seen: &Receiver<Seen>) -> Seen {
        seen.recv_timeout(TIMEOUT)
            .expect("the plugin reports within the timeout")
    }

    /// What the plugin reports up to and including `last` (the offering thread and the
    /// callback threads report in any order between them).
    fn until(seen: &Receiver<Seen>, last: &Seen) -> Vec<Seen> {
        until_all(seen, std::slice::from_ref(last))
    }

    /// What the plugin reports until it has reported each of `wanted`, in any order.
    fn until_all(seen: &Receiver<Seen>, wanted: &[Seen]) -> Vec<Seen> {
        let mut reported = Vec::new();
        while !wanted.iter().all(|w| reported.contains(w)) {
            reported.push(next(seen));
        }
        reported
    }

    /// Runs first in each `on_outcome`, with the task id.
    type Hook = Arc<dyn Fn(&str) + Send + Sync>;

    /// A queue backend (no tasks) whose queue is jobs 1..=`jobs`: `t.add` with args [n, n],
    /// task id `job-n`; odd ones ask for progress and stream and carry a hard time limit. It
    /// takes a job only when there is room, and reports all it sees.
    fn queue_backend(jobs: u32, hook: Hook) -> (Plugin, Receiver<Seen>) {
        let (tx, seen) = mpsc::channel();
        // It reports with `let _ =`: a panicking offers function ends the process.
        let plugin = Plugin::new("backend", "0.1.0").offers(move |window, offers| {
            let _ = tx.send(Seen::Window(window));
            for n in 1..=jobs {
                if !offers.wait_for_room() {
                    break;
                }
                let _ = tx.send(Seen::Pulled(n));
                if offers.offer(job(n, &tx, hook.clone())).is_err() {
                    break;
                }
            }
            let _ = tx.send(Seen::Returned);
        });
        (plugin, seen)
    }

    fn job(n: u32, tx: &Sender<Seen>, hook: Hook) -> Offer {
        let id = format!("job-{n}");
        let (outcome, release) = (tx.clone(), tx.clone());
        let (done_id, released_id) = (id.clone(), id.clone());
        let offer = Offer::new("t.add")
            .task_id(&id)
            .args(vec![json!(n), json!(n)])
            .on_outcome(move |outcome_| {
                hook(&done_id);
                outcome.send(Seen::Outcome(done_id, outcome_)).unwrap();
            })
            .on_release(move |reason| release.send(Seen::Release(released_id, reason)).unwrap());
        if n.is_multiple_of(2) {
            return offer;
        }
        let (progress, stream) = (tx.clone(), tx.clone());
        let (progress_id, stream_id) = (id.clone(), id);
        offer
            .hard_time_limit(Duration::from_secs(60))
            .on_progress(move |done, total, message| {
                let message = message.map(str::to_string);
                let seen = Seen::Progress(progress_id.clone(), done, total, message);
                progress.send(seen).unwrap();
            })
            .on_stream(move |items| stream.send(Seen::Stream(stream_id.clone(), items)).unwrap())
    }

    fn no_hook() -> Hook {
        Arc::new(|_: &str| {})
    }

    #[test]
    fn an_offer_has_a_uuid4_task_id_by_default_and_sends_only_what_was_given() {
        let (a, b) = (Offer::new("t.add"), Offer::new("t.add"));
        let id = a.params().task_id.clone();
        assert_ne!(id, b.params().task_id);
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
        assert!(
            id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
            "{id}"
        );
        assert_eq!(&id[14..15], "4", "version 4: {id}");
        assert!("89ab".contains(&id[19..20]), "RFC 4122 variant: {id}");
        let mut sent = serde_json::to_value(a.params()).unwrap();
        sent.as_object_mut().unwrap().remove("task_id");
        assert_eq!(sent, json!({"task": "t.add", "args": [], "kwargs": {}}));
        let given = Offer::new("t.add")
            .task_id("jobs-1")
            .soft_time_limit(Duration::from_secs(30))
            .on_stream(|_| {});
        assert_eq!(
            serde_json::to_value(given.params()).unwrap(),
            json!({"task_id": "jobs-1", "task": "t.add", "args": [], "kwargs": {},
                   "time_limit": {"soft": 30.0}, "stream": true})
        );
    }

    #[test]
    fn offers_keep_to_the_window_and_outcomes_reach_on_outcome() {
        let (plugin, seen) = queue_backend(8, no_hook());
        let mut worker = Worker::start(plugin, Some(2), 1);
        let mut unanswered = VecDeque::from([worker.offer(), worker.offer()]);
        let params: Vec<&Value> = unanswered.iter().map(|o| &o["params"]).collect();
        assert_eq!(
            params,
            [
                &json!({"task_id": "job-1", "task": "t.add", "args": [1, 1], "kwargs": {},
                        "time_limit": {"hard": 60.0}, "progress": true, "stream": true}),
                &json!({"task_id": "job-2", "task": "t.add", "args": [2, 2], "kwargs": {}}),
            ]
        );
        assert_eq!(
            [next(&seen), next(&seen), next(&seen)],
            [Seen::Window(2), Seen::Pulled(1), Seen::Pulled(2)]
        );
        // A correct SDK cannot fail these: with the window full, no third job is taken.
        worker.barrier(50);
        assert_eq!(worker.offers_unread(), 0);
        assert_eq!(seen.try_recv().ok(), None);
        let mut outcomes = Vec::new();
        for n in 3..=8 {
            let oldest = unanswered.pop_front().unwrap();
            let outcome = worker.succeed(&oldest);
            outcomes.push(Seen::Outcome(outcome.task_id.clone(), outcome));
            let offer = worker.offer();
            assert_eq!(offer["params"]["task_id"], format!("job-{n}"));
            unanswered.push_back(offer);
        }
        outcomes.push(Seen::Returned);
        let reported = until_all(&seen, &outcomes);
        let pulled = reported.iter().filter(|s| matches!(s, Seen::Pulled(_)));
        let expected: Vec<Seen> = (3..=8).map(Seen::Pulled).collect();
        assert!(pulled.eq(&expected), "jobs taken in order: {reported:?}");
        assert_eq!(
            reported.len(),
            6 + outcomes.len(),
            "each outcome once: {reported:?}"
        );
        let failure = json!({"task_id": "job-7", "state": "FAILURE", "error": {
            "kind": "raised", "type": "ValueError", "module": "builtins",
            "message": "n must be >= 0", "traceback": "Traceback ..."}});
        worker.send(json!({"id": unanswered[0]["id"], "result": failure}));
        let failed: TaskFinal = serde_json::from_value(failure).unwrap();
        assert_eq!(next(&seen), Seen::Outcome("job-7".into(), failed));
        worker.finish();
    }

    #[test]
    fn an_offer_not_taken_goes_again_a_second_later_and_before_any_new_one() {
        let (plugin, seen) = queue_backend(2, no_hook());
        let mut worker = Worker::start(plugin, Some(1), 1);
        let mut offer = worker.offer();
        for code in [code::SHUTTING_DOWN, code::OFFER_WINDOW_FULL] {
            let refused_at = Instant::now();
            worker.refuse(&offer, code, "not run; offer it again");
            let again = worker.offer();
            assert_eq!(again["params"], offer["params"]);
            assert_ne!(again["id"], offer["id"], "a new request");
            // A lower bound on the SDK's own delay: a slow machine only makes it longer.
            assert!(refused_at.elapsed() >= Duration::from_millis(900));
            offer = again;
        }
        // With window 1, the one waiting offer kept job 2 in the queue meanwhile.
        let reported: Vec<Seen> = seen.try_iter().collect();
        assert_eq!(reported, [Seen::Window(1), Seen::Pulled(1)]);
        let outcome = worker.succeed(&offer);
        assert_eq!(worker.offer()["params"]["task_id"], "job-2");
        until(&seen, &Seen::Outcome("job-1".into(), outcome));
        worker.finish();
    }

    #[test]
    fn an_offer_waiting_to_go_again_holds_no_window_place() {
        let (plugin, _seen) = queue_backend(3, no_hook());
        let mut worker = Worker::start(plugin, Some(2), 1);
        let (first, _second) = (worker.offer(), worker.offer());
        worker.refuse(
            &first,
            code::SHUTTING_DOWN,
            "the plugin serving t.add is restarting",
        );
        // Job 3 goes at once; job 1 waits a second (and then for a place).
        assert_eq!(worker.offer()["params"]["task_id"], "job-3");
        worker.finish();
    }

    #[test]
    fn an_offer_refused_for_good_is_released_and_not_offered_again() {
        let (plugin, seen) = queue_backend(2, no_hook());
        let mut worker = Worker::start(plugin, Some(1), 1);
        let offer = worker.offer();
        worker.refuse(&offer, code::INVALID_PARAMS, "time_limit.hard must be > 0");
        let released = Seen::Release("job-1".into(), "time_limit.hard must be > 0".into());
        until(&seen, &released);
        // Were job 1 waiting to go again, window 1 would keep job 2 back.
        assert_eq!(worker.offer()["params"]["task_id"], "job-2");
        worker.barrier(50);
        assert_eq!(worker.offers_unread(), 0, "job 1 is not offered again");
        worker.finish();
    }

    #[test]
    fn progress_and_stream_reach_the_offer_that_asked_for_them() {
        let (plugin, seen) = queue_backend(2, no_hook());
        let mut worker = Worker::start(plugin, Some(2), 1);
        let (first, _second) = (worker.offer(), worker.offer());
        assert_eq!(first["params"]["task_id"], "job-1");
        for (method, params) in [
            (
                "offer.progress",
                json!({"task_id": "job-1", "done": 3, "total": 10, "message": "fetched"}),
            ),
            ("offer.progress", json!({"task_id": "job-2", "done": 1})), // it did not ask
            ("offer.progress", json!({"task_id": "job-99", "done": 1})), // not outstanding
            ("offer.progress", json!({"task_id": "job-1"})),            // malformed: skipped
            (
                "offer.stream",
                json!({"task_id": "job-1", "items": [{"row": 1}]}),
            ),
            ("offer.progress", json!({"task_id": "job-1", "done": 4})),
        ] {
            worker.send(json!({"method": method, "params": params}));
        }
        worker.barrier(50);
        let reported: Vec<Seen> = seen
            .try_iter()
            .filter(|s| matches!(s, Seen::Progress(..) | Seen::Stream(..)))
            .collect();
        assert_eq!(
            reported,
            [
                Seen::Progress("job-1".into(), 3, Some(10), Some("fetched".into())),
                Seen::Stream("job-1".into(), vec![json!({"row": 1})]),
                Seen::Progress("job-1".into(), 4, None, None),
            ]
        );
        let outcome = Seen::Outcome("job-1".into(), worker.succeed(&first));
        let late = json!({"task_id": "job-1", "done": 5});
        worker.send(json!({"method": "offer.progress", "params": late}));
        worker.barrier(51);
        until(&seen, &outcome);
        assert_eq!(
            seen.try_recv().ok(),
            None,
            "job 1 is answered: no more progress"
        );
        worker.finish();
    }

    #[test]
    fn shutdown_waits_for_answers_and_callbacks_and_stores_go_on_meanwhile() {
        let (gate, wait) = mpsc::channel::<()>();
        let (started, outcome_started) = mpsc::channel();
        let wait = Mutex::new(wait);
        let hook: Hook = Arc::new(move |task_id: &str| {
            started.send(Seen::OutcomeStarted(task_id.into())).unwrap();
            wait.lock().unwrap().recv_timeout(TIMEOUT).unwrap();
        });
        let (plugin, seen) = queue_backend(5, hook);
        let plugin = plugin.stores(|_| Ok(()));
        let mut worker = Worker::start(plugin, Some(2), 1);
        let (first, second) = (worker.offer(), worker.offer());
        worker.send(json!({"id": 100, "method": "shutdown"}));
        worker.send(json!({"id": 101, "method": "result.store", "params": record("job-1")}));
        assert_eq!(worker.response(101)["result"], json!({}));
        let outcome = worker.succeed(&first);
        assert_eq!(next(&outcome_started), Seen::OutcomeStarted("job-1".into()));
        let stopping = "not run: the worker is stopping; offer task job-2 again later";
        worker.refuse(&second, code::SHUTTING_DOWN, stopping);
        worker.barrier(102);
        assert!(
            worker.unread.is_empty(),
            "job 1's on_outcome runs: no answer yet"
        );
        gate.send(()).unwrap();
        assert_eq!(worker.response(100)["result"], Value::Null);
        let reported: Vec<Seen> = seen.try_iter().collect();
        assert_eq!(
            reported[..3],
            [Seen::Window(2), Seen::Pulled(1), Seen::Pulled(2)]
        );
        let mut rest = reported[3..].to_vec();
        rest.sort_by_key(|s| format!("{s:?}"));
        let released = Seen::Release("job-2".into(), stopping.into());
        let outcome = Seen::Outcome("job-1".into(), outcome);
        assert_eq!(rest, [outcome, released, Seen::Returned]);
        assert_eq!(
            worker.offers_unread(),
            0,
            "nothing offered after the shutdown"
        );
        worker.send(json!({"method": "exit"}));
        worker.finish();
    }

    #[test]
    fn shutdown_releases_an_offer_waiting_to_go_again() {
        let (plugin, seen) = queue_backend(5, no_hook());
        let mut worker = Worker::start(plugin, Some(1), 1);
        let offer = worker.offer();
        // One write: the shutdown is read long before the refused offer's second is up.
        let refused = json!({"code": code::SHUTTING_DOWN, "message": "not run"});
        worker.send_all([
            json!({"id": offer["id"], "error": refused}),
            json!({"id": 100, "method": "shutdown"}),
        ]);
        worker.response(100);
        let mut reported: Vec<Seen> = seen.try_iter().collect();
        reported.sort_by_key(|s| format!("{s:?}"));
        let released = Seen::Release("job-1".into(), "shutting down".into());
        let expected = [Seen::Pulled(1), released, Seen::Returned, Seen::Window(1)];
        assert_eq!(reported, expected);
        assert_eq!(worker.offers_unread(), 0);
        worker.finish();
    }

    #[test]
    fn a_panicking_on_outcome_is_logged_and_the_backend_carries_on() {
        let hook: Hook = Arc::new(|task_id: &str| panic!("ack of {task_id} failed"));
        let (plugin, _seen) = queue_backend(2, hook);
        let mut worker = Worker::start(plugin, Some(1), 1);
        let first = worker.offer();
        worker.succeed(&first);
        let second = worker.offer();
        assert_eq!(second["params"]["task_id"], "job-2");
        worker.send(json!({"id": 100, "method": "shutdown"}));
        worker.succeed(&second);
        worker.response(100);
        worker.finish();
    }

    #[test]
    fn without_queue_backend_in_initialize_the_offers_function_is_never_called() {
        let (called, never) = mpsc::channel::<()>();
        let plugin = Plugin::new("backend", "0.1.0").offers(move |_, _| called.send(()).unwrap());
        let mut worker = Worker::start(plugin, None, 1);
        worker.barrier(50);
        assert_eq!(worker.offers_unread(), 0);
        worker.finish();
        // Dropped without a call: the channel closes empty.
        assert!(never.recv().is_err());
    }

    /// PROTOCOL.md's `result.store` example, for `task_id`.
    fn record(task_id: &str) -> Value {
        json!({"task_id": task_id, "task": "fibonacci", "state": "SUCCESS", "result": 121393,
               "args": [26], "kwargs": {}, "submitter": "queue backend pg-queue", "attempts": 1,
               "started": 1764140000.25, "finished": 1764140000.5})
    }

    #[test]
    fn a_store_is_answered_empty_once_stored_and_with_an_error_when_it_fails() {
        let (tx, seen) = mpsc::channel();
        let tx = Mutex::new(tx);
        let plugin = Plugin::new("results", "0.1.0").stores(move |record| {
            if record.task_id.starts_with("fail") {
                return Err("ConnectionError: database down".into());
            }
            tx.lock().unwrap().send(Seen::Stored(record)).unwrap();
            Ok(())
        });
        let mut worker = Worker::start(plugin, None, 2);
        worker.send(json!({"id": 1, "method": "result.store", "params": record("jobs-42")}));
        assert_eq!(worker.response(1)["result"], json!({}));
        let stored = serde_json::from_value(record("jobs-42")).unwrap();
        assert_eq!(next(&seen), Seen::Stored(stored));
        worker.send(json!({"id": 2, "method": "result.store", "params": record("fail-1")}));
        let error = worker.response(2)["error"].clone();
        assert_eq!(
            error,
            json!({"code": code::TASK_FAILED, "message": "ConnectionError: database down"})
        );
        worker.send(json!({"id": 3, "method": "result.store", "params": {"task_id": "x"}}));
        assert_eq!(worker.response(3)["error"]["code"], code::INVALID_PARAMS);
        worker.finish();
    }

    #[test]
    fn without_a_store_handler_result_store_is_method_not_found() {
        let mut worker = Worker::start(Plugin::new("p", "0.1.0"), None, 1);
        worker.send(json!({"id": 1, "method": "result.store", "params": record("jobs-42")}));
        assert_eq!(worker.response(1)["error"]["code"], code::METHOD_NOT_FOUND);
        worker.finish();
    }

    #[test]
    fn stores_run_concurrently_up_to_concurrency() {
        let (started, seen) = mpsc::channel();
        let (gate, wait) = mpsc::channel::<()>();
        let (started, wait) = (Mutex::new(started), Arc::new(Mutex::new(wait)));
        let plugin = Plugin::new("results", "0.1.0").stores(move |record| {
            started.lock().unwrap().send(record.task_id).unwrap();
            wait.lock()
                .unwrap()
                .recv_timeout(TIMEOUT)
                .map_err(|e| e.to_string())
        });
        let mut worker = Worker::start(plugin, None, 2);
        for id in 1..=3 {
            let params = record(&format!("jobs-{id}"));
            worker.send(json!({"id": id, "method": "result.store", "params": params}));
        }
        let mut first_two = [next_id(&seen), next_id(&seen)];
        first_two.sort();
        assert_eq!(first_two, ["jobs-1", "jobs-2"]);
        worker.barrier(50);
        assert_eq!(seen.try_recv().ok(), None, "both store threads are busy");
        for _ in 1..=3 {
            gate.send(()).unwrap();
        }
        for id in 1..=3 {
            assert_eq!(worker.response(id)["result"], json!({}));
        }
        assert_eq!(next_id(&seen), "jobs-3");
        worker.finish();
    }

    fn next_id(seen: &Receiver<String>) -> String {
        seen.recv_timeout(TIMEOUT)
            .expect("a store starts within the timeout")
    }
}
