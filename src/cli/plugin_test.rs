//! `worker plugins test NAME`: starts the plugin on its own, checks the handshake and protocol
//! conformance (unknown method, a stray cancel, ping, shutdown and exit), runs the self-tests
//! declared in its manifest, and stops it. The exit code says pass or fail; each check prints
//! one line saying what it saw.

use super::output;
use crate::config::Config;
use crate::manifest::{Expect, Manifest, SelfTest};
use crate::probe::{ProbeError, Session};
use plugin_protocol::{code, method, TaskErrorData, TaskRunParams};
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::Duration;

struct Report {
    failures: usize,
}

impl Report {
    fn check<E: std::fmt::Display>(&mut self, what: &str, result: Result<String, E>) {
        match result {
            Ok(detail) => output::line(&format!(
                "ok    {what}{}",
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            )),
            Err(why) => {
                self.failures += 1;
                output::line(&format!("FAIL  {what}: {why}"));
            }
        }
    }
}

/// Tests `m` as it is (its directory must already be ready to run).
pub async fn test_manifest(config: &Config, m: &Manifest) -> anyhow::Result<ExitCode> {
    output::line(&format!(
        "testing {} {} ({})",
        m.name,
        m.version,
        m.dir.display()
    ));
    let mut report = Report { failures: 0 };
    report.check::<String>(
        "manifest",
        Ok(format!(
            "{} task(s), {} self-test(s)",
            m.tasks.len(),
            m.tests.len()
        )),
    );
    let mut s = match Session::start(m, config.max_line_bytes, config.plugin_user.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            report.check("start", Err(e));
            output::line(&format!("FAILED: {} check(s)", report.failures));
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Err(e) = run_checks(&mut s, m, config, &mut report).await {
        report.check("session", Err(s.explain(e)));
    }
    drop(s);
    if report.failures == 0 {
        output::line("PASS");
        Ok(ExitCode::SUCCESS)
    } else {
        output::line(&format!("FAILED: {} check(s)", report.failures));
        Ok(ExitCode::FAILURE)
    }
}

async fn run_checks(
    s: &mut Session,
    m: &Manifest,
    config: &Config,
    report: &mut Report,
) -> Result<(), ProbeError> {
    if !check_handshake(s, m, config, report).await {
        return Ok(());
    }
    s.notify(method::INITIALIZED, json!({}))
        .await
        .map_err(ProbeError::Write)?;
    check_conformance(s, report).await?;
    for (i, t) in m.tests.iter().enumerate() {
        s.reply_timeout = m.timeouts.task_hard.unwrap_or(Duration::from_secs(60));
        self_test(s, i + 1, t, report).await?;
    }
    if let Some(q) = &m.backends.queue_backend {
        check_offers(s, q.window, report).await?;
    }
    if m.backends.result_backend.is_some() {
        s.reply_timeout = m.timeouts.task_hard.unwrap_or(Duration::from_secs(60));
        check_store(s, report).await?;
    }
    let grace = m.timeouts.shutdown_grace;
    let answered = s.shutdown(grace).await;
    let ok = answered.is_ok();
    report.check("shutdown answered", answered.map(|()| String::new()));
    if ok {
        report.check("exits after `exit`", s.exit(grace).await);
    }
    Ok(())
}

/// The handshake by the daemon's rules; a version mismatch is a warning. True if it passed.
async fn check_handshake(
    s: &mut Session,
    m: &Manifest,
    config: &Config,
    report: &mut Report,
) -> bool {
    let handshake = s.initialize(m, &config.name, config.max_line_bytes).await;
    let line = handshake.as_ref().map_err(ToString::to_string).map(|r| {
        let served: Vec<&str> = r.tasks.iter().map(|t| t.name.as_str()).collect();
        format!(
            "{} {} serves {}",
            r.plugin.name,
            r.plugin.version,
            served.join(", ")
        )
    });
    report.check("handshake", line);
    match &handshake {
        Ok(r) => {
            if let Some(warning) = crate::supervisor::handshake::version_mismatch(r, m) {
                output::line(&format!("WARN  version: {warning}"));
            }
            true
        }
        Err(_) => false,
    }
}

/// An unknown method gets -32601; a cancel for an unknown task is ignored (ping still works).
async fn check_conformance(s: &mut Session, report: &mut Report) -> Result<(), ProbeError> {
    let unknown = s
        .call("worker.conformance.no_such_method", json!({}))
        .await?;
    report.check(
        "unknown method answered with -32601",
        match unknown {
            Err(e) if e.code == code::METHOD_NOT_FOUND => Ok(String::new()),
            Err(e) => Err(format!("got error {} instead", e.code)),
            Ok(v) => Err(format!("got a result instead: {v}")),
        },
    );
    let stray_cancel = json!({"task_id": "no-such-task", "reason": "conformance"});
    s.notify(method::TASK_CANCEL, stray_cancel)
        .await
        .map_err(ProbeError::Write)?;
    let ping = s.call(method::PING, json!({})).await;
    report.check(
        "cancel of an unknown task is ignored, ping answered",
        ping.map(|_| String::new()),
    );
    Ok(())
}

/// One `[[tests]]` entry: run it and judge the answer against `expect`.
async fn self_test(
    s: &mut Session,
    n: usize,
    t: &SelfTest,
    report: &mut Report,
) -> Result<(), ProbeError> {
    let params = TaskRunParams {
        task_id: format!("self-test-{n}"),
        task: t.task.clone(),
        args: t.args.clone(),
        kwargs: t.kwargs.clone(),
        attempt: 1,
        time_limit: Default::default(),
        delivery_info: Some(Default::default()),
        request: Some(plugin_protocol::RequestInfo {
            hostname: Some("worker plugins test".into()),
            ..Default::default()
        }),
    };
    let params = serde_json::to_value(params).expect("task.run params serialize");
    let got = s.call(method::TASK_RUN, params).await?;
    let args: Vec<String> = t.args.iter().map(Value::to_string).collect();
    let label = format!("self-test {n} {}({})", t.task, args.join(", "));
    let error_type = |e: &plugin_protocol::ErrorObject| {
        e.data
            .clone()
            .and_then(|d| serde_json::from_value::<TaskErrorData>(d).ok())
            .map(|d| d.exc_type)
            .unwrap_or_else(|| format!("error {}", e.code))
    };
    let verdict = match (&t.expect, got) {
        (Expect::Success, Ok(v)) => Ok(format!("returned {v}")),
        (Expect::Result(want), Ok(v)) if *want == v => Ok(format!("returned {v}")),
        (Expect::Result(want), Ok(v)) => Err(format!("expected {want}, got {v}")),
        (Expect::Error(want), Err(e)) if error_type(&e) == *want => Ok(format!("raised {want}")),
        (Expect::Error(want), Err(e)) => Err(format!(
            "expected {want}, got {}: {}",
            error_type(&e),
            e.message
        )),
        (Expect::Error(want), Ok(v)) => Err(format!("expected {want}, got result {v}")),
        (_, Err(e)) => Err(format!("raised {}: {}", error_type(&e), e.message)),
    };
    report.check(&label, verdict);
    Ok(())
}

/// How long a queue backend is listened to for offers.
const OFFER_LISTEN: Duration = Duration::from_secs(3);

/// A queue backend: what it offers within a few seconds, each answered "not run", so the
/// test takes nothing from its queue. Offering nothing is not a failure (its queue may be
/// empty); a malformed offer is.
async fn check_offers(s: &mut Session, window: u32, report: &mut Report) -> Result<(), ProbeError> {
    s.listen(OFFER_LISTEN).await?;
    let mut names: Vec<&str> = s.offered.iter().map(|(t, _)| t.as_str()).collect();
    let mut ids: Vec<&str> = s.offered.iter().map(|(_, id)| id.as_str()).collect();
    let offers = ids.len();
    for list in [&mut names, &mut ids] {
        list.sort_unstable();
        list.dedup();
    }
    let detail = match ids.len() {
        0 => format!("offered nothing in {OFFER_LISTEN:?} (is its queue empty?)"),
        n => format!(
            "offered {n} task(s) ({}) in {offers} offer(s) within {OFFER_LISTEN:?}, window {window}; each answered \"not run\", so its queue keeps them",
            names.join(", ")
        ),
    };
    let malformed = s.offered.iter().any(|(t, id)| t == "?" || id == "?");
    let verdict = match malformed {
        true => {
            Err("an offer had no `task` or `task_id` (see PROTOCOL.md, task.offer)".to_string())
        }
        false => Ok(detail),
    };
    report.check("queue backend", verdict);
    Ok(())
}

/// A result backend: stores one test record (task `worker.plugins_test`) and answers.
async fn check_store(s: &mut Session, report: &mut Report) -> Result<(), ProbeError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let record = plugin_protocol::ResultStoreParams {
        task_id: format!("worker-plugins-test-{}", crate::task::new_task_id()),
        task: "worker.plugins_test".into(),
        state: plugin_protocol::FinalState::Success,
        result: Some(json!("a test record from `worker plugins test`")),
        error: None,
        args: vec![],
        kwargs: Default::default(),
        submitter: "worker plugins test".into(),
        attempts: 1,
        started: now,
        finished: now,
    };
    let task_id = record.task_id.clone();
    let params = serde_json::to_value(record).expect("result.store params serialize");
    let verdict = match s.call(method::RESULT_STORE, params).await? {
        Ok(_) => Ok(format!(
            "stored test record {task_id} (task worker.plugins_test)"
        )),
        Err(e) => Err(format!("answered error {}: {}", e.code, e.message)),
    };
    report.check("result backend", verdict);
    Ok(())
}
