//! `worker plugins test NAME`: starts the plugin on its own, checks the handshake and protocol
//! conformance (unknown method, a stray cancel, ping, shutdown and exit), runs the self-tests
//! declared in its manifest, and stops it. The exit code says pass or fail; each check prints
//! one line saying what it saw.

use super::output;
use crate::config::Config;
use crate::manifest::{self, Expect, Manifest};
use crate::supervisor::process;
use anyhow::Context;
use plugin_protocol::{
    code, method, Frame, Id, InitializeParams, InstanceRef, Limits, LineDecoder, Message,
    Notification, PeerInfo, Request, TaskErrorData, TaskRunParams, PROTOCOL_VERSION,
};
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// A plugin process driven one request at a time.
struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    decoder: LineDecoder,
    next_id: u64,
    reply_timeout: Duration,
}

impl Session {
    async fn send(&mut self, msg: Message) -> anyhow::Result<()> {
        self.stdin.write_all(&msg.to_line()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Sends a request and waits for its response, skipping notifications and stray lines.
    async fn call(
        &mut self,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Result<Value, plugin_protocol::ErrorObject>> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(Message::Request(Request::new(Id::Num(id), method, params)))
            .await?;
        let wait = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                while let Some(frame) = self.decoder.next_frame() {
                    if let Frame::Line(line) = frame {
                        if let Ok(Message::Response(r)) = Message::parse(&line) {
                            if r.id == Some(Id::Num(id)) {
                                return Ok(r.result);
                            }
                        }
                    }
                }
                let n = self.stdout.read(&mut buf).await?;
                if n == 0 {
                    anyhow::bail!("the plugin closed its stdout");
                }
                self.decoder.extend(&buf[..n]);
            }
        };
        tokio::time::timeout(self.reply_timeout, wait)
            .await
            .map_err(|_| {
                anyhow::anyhow!("no answer to `{method}` within {:?}", self.reply_timeout)
            })?
    }
}

struct Report {
    failures: usize,
}

impl Report {
    fn check(&mut self, what: &str, result: Result<String, String>) {
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

pub async fn test(config: &Config, name: &str) -> anyhow::Result<ExitCode> {
    let dir = &config.plugins_dir;
    let found = manifest::discover(dir)
        .with_context(|| format!("cannot read the plugins directory {}", dir.display()))?;
    let Some(m) = found.plugins.into_iter().find(|m| m.name == name) else {
        if let Some(e) = found.errors.iter().find(|e| {
            e.path
                .parent()
                .and_then(|p| p.file_name())
                .is_some_and(|f| f == name)
        }) {
            output::line(&format!("FAIL  manifest: {e}"));
            return Ok(ExitCode::FAILURE);
        }
        anyhow::bail!("no plugin named `{name}` in {}", dir.display());
    };
    output::line(&format!(
        "testing {} {} ({})",
        m.name,
        m.version,
        m.dir.display()
    ));
    let mut report = Report { failures: 0 };
    report.check(
        "manifest",
        Ok(format!(
            "{} task(s), {} self-test(s)",
            m.tasks.len(),
            m.tests.len()
        )),
    );
    let mut child = process::spawn(&m, 0)
        .with_context(|| format!("could not start `{}`", m.program().display()))?;
    let pid = child.id().unwrap_or(0);
    // Its log goes where ours goes, so a failing plugin explains itself.
    let stderr = child.stderr.take().expect("stderr is piped");
    let origin = process::LogOrigin {
        plugin: m.name.clone(),
        instance: 0,
        pid,
    };
    let tail = process::StderrTail::default();
    let _pump = process::pump_stderr(stderr, origin, tail.clone());
    let mut s = Session {
        stdin: child.stdin.take().expect("stdin is piped"),
        stdout: child.stdout.take().expect("stdout is piped"),
        child,
        decoder: LineDecoder::new(config.max_line_bytes),
        next_id: 1,
        reply_timeout: m.timeouts.init,
    };
    let outcome = run_checks(&mut s, &m, config, &mut report).await;
    if let Err(e) = outcome {
        report.check("session", Err(format!("{e:#}{}", tail.summary(5))));
    }
    // Also sweeps anything the plugin forked.
    process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = s.child.wait().await;
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
) -> anyhow::Result<()> {
    let init = InitializeParams {
        protocol_version: PROTOCOL_VERSION.into(),
        worker: PeerInfo {
            name: config.name.clone(),
            version: crate::WORKER_VERSION.into(),
        },
        plugin: InstanceRef {
            name: m.name.clone(),
            instance: 0,
        },
        settings: m.settings.clone(),
        limits: Limits {
            max_line_bytes: config.max_line_bytes as u64,
            concurrency: m.concurrency,
        },
    };
    let reply = s
        .call(method::INITIALIZE, serde_json::to_value(init)?)
        .await?;
    let handshake = crate::supervisor::handshake::check(reply, m).map(|r| {
        let served: Vec<&str> = r.tasks.iter().map(|t| t.name.as_str()).collect();
        format!(
            "{} {} serves {}",
            r.plugin.name,
            r.plugin.version,
            served.join(", ")
        )
    });
    let handshake_ok = handshake.is_ok();
    report.check("handshake", handshake);
    if !handshake_ok {
        return Ok(());
    }
    s.send(Message::Notification(Notification::new(
        method::INITIALIZED,
        json!({}),
    )))
    .await?;

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
    s.send(Message::Notification(Notification::new(
        method::TASK_CANCEL,
        json!({"task_id": "no-such-task", "reason": "conformance"}),
    )))
    .await?;
    let ping = s.call(method::PING, json!({})).await;
    report.check(
        "cancel of an unknown task is ignored, ping answered",
        ping.map(|_| String::new()).map_err(|e| e.to_string()),
    );

    for (i, t) in m.tests.iter().enumerate() {
        let params = TaskRunParams {
            task_id: format!("self-test-{}", i + 1),
            task: t.task.clone(),
            args: t.args.clone(),
            kwargs: t.kwargs.clone(),
            attempt: 1,
            time_limit: Default::default(),
        };
        s.reply_timeout = m.timeouts.task_hard.unwrap_or(Duration::from_secs(60));
        let got = s
            .call(method::TASK_RUN, serde_json::to_value(params)?)
            .await?;
        let label = format!(
            "self-test {} {}({})",
            i + 1,
            t.task,
            t.args
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
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
            (Expect::Error(want), Err(e)) if error_type(&e) == *want => {
                Ok(format!("raised {want}"))
            }
            (Expect::Error(want), Err(e)) => Err(format!(
                "expected {want}, got {}: {}",
                error_type(&e),
                e.message
            )),
            (Expect::Error(want), Ok(v)) => Err(format!("expected {want}, got result {v}")),
            (_, Err(e)) => Err(format!("raised {}: {}", error_type(&e), e.message)),
        };
        report.check(&label, verdict);
    }

    s.reply_timeout = m.timeouts.shutdown_grace.max(Duration::from_millis(100));
    let shutdown = s.call(method::SHUTDOWN, Value::Null).await;
    report.check(
        "shutdown answered",
        shutdown.map(|_| String::new()).map_err(|e| e.to_string()),
    );
    s.send(Message::Notification(Notification::new(
        method::EXIT,
        Value::Null,
    )))
    .await?;
    let exited = tokio::time::timeout(
        m.timeouts.shutdown_grace.max(Duration::from_millis(100)),
        s.child.wait(),
    )
    .await;
    report.check(
        "exits after `exit`",
        match exited {
            Ok(Ok(status)) => Ok(process::describe_exit(&status)),
            _ => Err(format!(
                "still running {:?} after `exit`",
                m.timeouts.shutdown_grace
            )),
        },
    );
    Ok(())
}
