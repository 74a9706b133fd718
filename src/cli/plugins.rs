//! `worker plugins list`: what is in the plugins directory and, when a daemon answers on the
//! control socket, how each plugin's instances are doing right now.

use super::output;
use crate::config::Config;
use crate::control::{Client, StatusReport};
use crate::manifest::{self, Manifest};
use crate::supervisor::status::{InstanceStatus, PluginStatus};
use anyhow::Context;
use clap::Subcommand;
use serde::Serialize;
use serde_json::json;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// List plugins, with live instance state from a running daemon
    List {
        /// Machine-readable output (stable; see README)
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Serialize)]
struct Entry<'a> {
    name: &'a str,
    version: &'a str,
    description: &'a str,
    dir: String,
    tasks: Vec<&'a str>,
    instances: u32,
    concurrency: u32,
    /// Live status, when a daemon runs this plugin.
    live: Option<&'a PluginStatus>,
}

pub async fn plugins(config: Config, cmd: PluginsCommand) -> anyhow::Result<ExitCode> {
    let PluginsCommand::List { json } = cmd;
    let dir = &config.plugins_dir;
    let found = manifest::discover(dir).with_context(|| {
        format!(
            "cannot read the plugins directory {} (set --plugins or `plugins_dir`)",
            dir.display()
        )
    })?;
    let live = live_status(&config).await;
    let status_of = |m: &Manifest| {
        live.as_ref()
            .and_then(|r| r.plugins.iter().find(|p| p.name == m.name))
    };
    let entries: Vec<Entry> = found
        .plugins
        .iter()
        .map(|m| Entry {
            name: &m.name,
            version: &m.version,
            description: &m.description,
            dir: m.dir.display().to_string(),
            tasks: m.task_names().collect(),
            instances: m.instances,
            concurrency: m.concurrency,
            live: status_of(m),
        })
        .collect();
    if json {
        let doc = json!({
            "plugins_dir": dir.display().to_string(),
            "daemon": live.as_ref().map(|r| &r.worker),
            "plugins": entries,
            "errors": found.errors.iter().map(|e| json!({"path": e.path.display().to_string(), "message": e.message})).collect::<Vec<_>>(),
        });
        output::line(&serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    match &live {
        Some(r) => output::line(&format!(
            "daemon: {} (pid {}, version {}), {} task(s) in flight",
            r.worker.name, r.worker.pid, r.worker.version, r.in_flight
        )),
        None => output::line(&format!(
            "daemon: none answering on {}",
            config.socket.display()
        )),
    }
    output::line(&format!("plugins in {}:", dir.display()));
    if entries.is_empty() && found.errors.is_empty() {
        output::line("  (none)");
    }
    for e in &entries {
        let state = e
            .live
            .map(|p| p.state.to_string())
            .unwrap_or_else(|| "not running".into());
        output::line(&format!(
            "  {} {}  [{}]  {} instance(s) x {} concurrent  tasks: {}",
            e.name,
            e.version,
            state,
            e.instances,
            e.concurrency,
            e.tasks.join(", ")
        ));
        if let Some(p) = e.live {
            if let crate::supervisor::status::PluginState::Failed(reason) = &p.state {
                output::line(&format!("    failed: {reason}"));
            }
            for i in &p.instances {
                output::line(&format!("    {}", instance_line(i)));
            }
        }
    }
    for err in &found.errors {
        output::line(&format!("  BROKEN {}: {}", err.path.display(), err.message));
    }
    Ok(ExitCode::SUCCESS)
}

async fn live_status(config: &Config) -> Option<StatusReport> {
    let mut client = Client::connect(&config.socket).await.ok()?;
    let reply = client
        .call("plugins.status", json!({}), |_| {})
        .await
        .ok()?
        .ok()?;
    serde_json::from_value(reply).ok()
}

fn instance_line(i: &InstanceStatus) -> String {
    let pid = i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    let uptime = i
        .uptime_secs
        .map(human_duration)
        .unwrap_or_else(|| "-".into());
    let mut s = format!(
        "#{} {} pid {} up {} restarts {} in-flight {} done {} failed {}",
        i.index, i.state, pid, uptime, i.restarts, i.in_flight, i.done, i.failed
    );
    if i.stdout_garbage_lines > 0 {
        s.push_str(&format!(" stray-stdout-lines {}", i.stdout_garbage_lines));
    }
    if let Some(exit) = &i.last_exit {
        s.push_str(&format!("\n      last exit: {exit}"));
    }
    s
}

fn human_duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{secs:.1}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// `worker reload`: asks the daemon to apply the plugins directory and prints what it did.
pub async fn reload(config: Config) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(&config.socket).await?;
    let reply = client.call("plugins.reload", json!({}), |_| {}).await?;
    let report: crate::supervisor::ReloadReport = match reply {
        Ok(v) => serde_json::from_value(v)?,
        Err(e) => anyhow::bail!("reload failed: {}", e.message),
    };
    for (label, names) in [
        ("started", &report.started),
        ("replaced", &report.replaced),
        ("removed", &report.removed),
        ("unchanged", &report.unchanged),
    ] {
        if !names.is_empty() {
            output::line(&format!("{label}: {}", names.join(", ")));
        }
    }
    for (name, reason) in &report.failed {
        output::line(&format!("FAILED {name}: {reason}"));
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
