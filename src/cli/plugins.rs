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
    /// Scaffold a working plugin (manifest, code with one task, README, self-test)
    Create {
        name: String,
        #[arg(long, value_enum, default_value = "python")]
        lang: super::scaffold::Lang,
    },
    /// Start a plugin alone and check it: handshake, protocol conformance, its manifest's
    /// [[tests]], shutdown. Exit code 0 = pass
    Test { name: String },
    /// One plugin in detail: manifest, tasks, instances, recent exits, last stderr lines
    Inspect {
        name: String,
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
    let json = match cmd {
        PluginsCommand::List { json } => json,
        PluginsCommand::Inspect { name, json } => return inspect(&config, &name, json).await,
        PluginsCommand::Test { name } => return super::plugin_test::test(&config, &name).await,
        PluginsCommand::Create { name, lang } => {
            return super::scaffold::create(&config, &name, lang)
        }
    };
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

/// `worker plugins inspect NAME`.
async fn inspect(config: &Config, name: &str, json: bool) -> anyhow::Result<ExitCode> {
    let dir = &config.plugins_dir;
    let found = manifest::discover(dir).with_context(|| {
        format!(
            "cannot read the plugins directory {} (set --plugins or `plugins_dir`)",
            dir.display()
        )
    })?;
    let Some(m) = found.plugins.iter().find(|m| m.name == name) else {
        let broken = found.errors.iter().find(|e| {
            e.path
                .parent()
                .and_then(|p| p.file_name())
                .is_some_and(|f| f == name)
        });
        match broken {
            Some(e) => anyhow::bail!("plugin `{name}` has a broken manifest: {e}"),
            None => anyhow::bail!("no plugin named `{name}` in {}", dir.display()),
        }
    };
    let live = live_status(config).await;
    let status = live
        .as_ref()
        .and_then(|r| r.plugins.iter().find(|p| p.name == name));
    if json {
        let doc = json!({
            "name": m.name, "version": m.version, "description": m.description,
            "dir": m.dir.display().to_string(), "command": m.command, "env": m.env,
            "tasks": m.tasks.iter().map(|t| json!({"name": t.name, "description": t.description})).collect::<Vec<_>>(),
            "instances": m.instances, "concurrency": m.concurrency, "max_attempts": m.max_attempts,
            "timeouts": {
                "init": m.timeouts.init.as_secs_f64(), "task_soft": m.timeouts.task_soft.map(|d| d.as_secs_f64()),
                "task_hard": m.timeouts.task_hard.map(|d| d.as_secs_f64()), "shutdown_grace": m.timeouts.shutdown_grace.as_secs_f64(),
                "cancel_grace": m.timeouts.cancel_grace.as_secs_f64(), "ping_interval": m.timeouts.ping_interval.as_secs_f64(),
                "ping_timeout": m.timeouts.ping_timeout.as_secs_f64(),
            },
            "restart": {
                "max_restarts": m.restart.max_restarts, "window": m.restart.window.as_secs_f64(),
                "backoff_initial": m.restart.backoff_initial.as_secs_f64(), "backoff_max": m.restart.backoff_max.as_secs_f64(),
                "stable_after": m.restart.stable_after.as_secs_f64(),
            },
            "settings": m.settings,
            "live": status,
        });
        output::line(&serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    output::line(&format!("{} {}  ({})", m.name, m.version, m.dir.display()));
    if !m.description.is_empty() {
        output::line(&format!("  {}", m.description));
    }
    output::line(&format!("  command: {}", m.command.join(" ")));
    output::line(&format!(
        "  {} instance(s) x {} concurrent, max_attempts {}",
        m.instances, m.concurrency, m.max_attempts
    ));
    output::line("  tasks:");
    for t in &m.tasks {
        output::line(&format!(
            "    {}{}",
            t.name,
            t.description
                .as_deref()
                .map(|d| format!(" - {d}"))
                .unwrap_or_default()
        ));
    }
    match status {
        None => output::line(&format!(
            "  not running in a daemon on {}",
            config.socket.display()
        )),
        Some(p) => {
            output::line(&format!("  state: {}  queued: {}", p.state, p.queued));
            if let crate::supervisor::status::PluginState::Failed(reason) = &p.state {
                output::line(&format!("  failed: {reason}"));
            }
            for i in &p.instances {
                output::line(&format!("  {}", instance_line(i)));
                for e in &i.recent_exits {
                    output::line(&format!("      exit at {:.0}: {}", e.at, e.reason));
                }
                if !i.stderr_tail.is_empty() {
                    output::line("      last stderr:");
                    for l in &i.stderr_tail {
                        output::line(&format!("        {l}"));
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
