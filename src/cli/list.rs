//! `worker plugins list`: the installed plugins (with live state from a running daemon) and
//! the plugins available in the plugins directory, as text or as stable JSON.

use super::daemon_client;
use super::live::{broker_lines, instance_line, next_try};
use super::output;
use crate::config::Config;
use crate::control::StatusReport;
use crate::install::registry::{Installed, Record, StateDir};
use crate::install::{tree, Change};
use crate::manifest::{Discovery, ManifestError};
use crate::supervisor::status::{PluginState, PluginStatus};
use serde::Serialize;
use serde_json::json;
use std::process::ExitCode;

/// An installed plugin in `list`.
#[derive(Debug, Serialize)]
struct InstalledEntry<'a> {
    #[serde(flatten)]
    record: &'a Installed,
    description: String,
    instances: u32,
    concurrency: u32,
    /// Live status, when a daemon runs this plugin.
    live: Option<&'a PluginStatus>,
}

/// A plugin in the plugins directory in `list`.
#[derive(Debug, Serialize)]
struct AvailableEntry<'a> {
    name: &'a str,
    version: &'a str,
    description: &'a str,
    dir: String,
    tasks: Vec<&'a str>,
    /// `not-installed`, `installed`, `update-available`, `older-than-installed`, `modified`.
    status: &'static str,
    installed_version: Option<&'a str>,
    #[serde(skip)]
    change: Change,
}

/// Everything `list` shows, read once.
struct Listing<'a> {
    config: &'a Config,
    record: &'a Record,
    installed_found: &'a Discovery,
    available: &'a anyhow::Result<Discovery>,
    live: Option<StatusReport>,
}

/// `worker plugins list`: Installed, then Available.
pub(super) async fn list(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let state = StateDir::new(&config.state_dir);
    let record = state.read().map_err(anyhow::Error::msg)?;
    let installed_found = state.manifests(&record);
    // A missing plugins directory only empties the Available section.
    let available = super::available::discover(config);
    let listing = Listing {
        config,
        record: &record,
        installed_found: &installed_found,
        available: &available,
        live: daemon_client::status(config).await,
    };
    if json {
        listing.print_json()?;
    } else {
        listing.print_text();
    }
    Ok(ExitCode::SUCCESS)
}

impl Listing<'_> {
    fn installed(&self) -> Vec<InstalledEntry<'_>> {
        let status_of = |name: &str| {
            self.live
                .as_ref()
                .and_then(|r| r.plugins.iter().find(|p| p.name == name))
        };
        self.record
            .plugins
            .iter()
            .map(|r| {
                let m = self
                    .installed_found
                    .plugins
                    .iter()
                    .find(|m| m.name == r.name);
                InstalledEntry {
                    record: r,
                    description: m.map(|m| m.description.clone()).unwrap_or_default(),
                    instances: m.map_or(0, |m| m.instances),
                    concurrency: m.map_or(0, |m| m.concurrency),
                    live: status_of(&r.name),
                }
            })
            .collect()
    }

    fn available_errors(&self) -> &[ManifestError] {
        match self.available {
            Ok(found) => found.errors.as_slice(),
            Err(_) => &[],
        }
    }

    fn available(&self) -> Vec<AvailableEntry<'_>> {
        let plugins = match self.available {
            Ok(found) => found.plugins.as_slice(),
            Err(_) => &[],
        };
        plugins
            .iter()
            .map(|m| {
                let rec = self.record.get(&m.name);
                // An unreadable source counts as changed: installing it would say why.
                let change = Change::of(rec, &m.version, || {
                    tree::digest(&m.dir, tree::Symlinks::of(m))
                })
                .unwrap_or(Change::Modified);
                AvailableEntry {
                    name: &m.name,
                    version: &m.version,
                    description: &m.description,
                    dir: m.dir.display().to_string(),
                    tasks: m.task_names().collect(),
                    status: change.label(),
                    installed_version: rec.map(|r| r.version.as_str()),
                    change,
                }
            })
            .collect()
    }

    /// Plugins the daemon runs that the record no longer names (it has not reloaded yet).
    fn stale(&self) -> Vec<&str> {
        self.live
            .iter()
            .flat_map(|r| &r.plugins)
            .filter(|p| self.record.get(&p.name).is_none())
            .map(|p| p.name.as_str())
            .collect()
    }

    fn print_json(&self) -> anyhow::Result<()> {
        let config = self.config;
        let mut errors: Vec<_> = self
            .installed_found
            .errors
            .iter()
            .chain(self.available_errors())
            .map(|e| json!({"path": e.path.display().to_string(), "message": e.message}))
            .collect();
        if let Err(e) = self.available {
            errors.push(json!({"path": config.plugins_dir.display().to_string(), "message": format!("{e:#}")}));
        }
        let doc = json!({
            "plugins_dir": config.plugins_dir.display().to_string(),
            "state_dir": config.state_dir.display().to_string(),
            "daemon": self.live.as_ref().map(|r| &r.worker),
            "broker": self.live.as_ref().and_then(|r| r.broker.as_ref()),
            "installed": self.installed(),
            "available": self.available(),
            "not_installed_but_running": self.stale(),
            "errors": errors,
        });
        output::line(&serde_json::to_string_pretty(&doc)?);
        Ok(())
    }

    fn print_text(&self) {
        match &self.live {
            Some(r) => {
                output::line(&format!(
                    "daemon: {} (pid {}, version {}), {} task(s) in flight",
                    r.worker.name, r.worker.pid, r.worker.version, r.in_flight
                ));
                if !r.worker.containment.is_empty() {
                    output::line(&format!("containment: {}", r.worker.containment));
                }
                if let Some(broker) = &r.broker {
                    for line in broker_lines(broker) {
                        output::line(&line);
                    }
                }
            }
            None => output::line(&format!(
                "daemon: none answering on {}",
                self.config.socket.display()
            )),
        }
        self.print_installed();
        self.print_available();
    }

    fn print_installed(&self) {
        output::line(&format!("Installed ({}):", self.config.state_dir.display()));
        let installed = self.installed();
        if installed.is_empty() {
            output::line(
                "  (none; `worker plugins install NAME` installs from the plugins directory)",
            );
        }
        for e in &installed {
            let state = match (&self.live, e.live) {
                (_, Some(p)) => p.state.to_string(),
                (Some(_), None) => "not running (run `worker reload`)".into(),
                (None, None) => "no daemon".into(),
            };
            let tasks: Vec<&str> = e.record.tasks.iter().map(|t| t.name.as_str()).collect();
            output::line(&format!(
                "  {} {}  [{}]  {} instance(s) x {} concurrent  tasks: {}  installed {}",
                e.record.name,
                e.record.version,
                state,
                e.instances,
                e.concurrency,
                tasks.join(", "),
                e.record.installed_at
            ));
            if let Some(p) = e.live {
                print_live(p);
            }
        }
        for err in &self.installed_found.errors {
            output::line(&format!("  BROKEN {}: {}", err.path.display(), err.message));
        }
        for name in self.stale() {
            output::line(&format!(
                "  {name}: still running in the daemon but no longer installed (run `worker reload`)"
            ));
        }
    }

    fn print_available(&self) {
        output::line(&format!(
            "Available ({}):",
            self.config.plugins_dir.display()
        ));
        let available = self.available();
        if let Err(e) = self.available {
            output::line(&format!("  {e:#}"));
        } else if available.is_empty() && self.available_errors().is_empty() {
            output::line("  (none)");
        }
        for a in &available {
            let mark = match &a.change {
                Change::Upgrade { from } => format!("update available (installed: {from})"),
                Change::Downgrade { from } => format!("older than installed {from}"),
                Change::Modified => {
                    "modified since installed (same version, different files)".into()
                }
                Change::Same => "installed".into(),
                Change::NotInstalled => "not installed".into(),
            };
            output::line(&format!(
                "  {} {}  [{mark}]  tasks: {}",
                a.name,
                a.version,
                a.tasks.join(", ")
            ));
        }
        for err in self.available_errors() {
            output::line(&format!("  BROKEN {}: {}", err.path.display(), err.message));
        }
    }
}

/// A running plugin's failure (and next try) and its instances.
fn print_live(p: &PluginStatus) {
    if let PluginState::Failed(reason) = &p.state {
        output::line(&format!("    failed: {reason}"));
        output::line(&format!("    {}", next_try(p)));
    }
    if let Some(e) = &p.events {
        output::line(&format!(
            "    events: {}  delivered {}  dropped {}",
            e.subscribed.join(", "),
            e.delivered,
            e.dropped
        ));
    }
    if let Some(b) = &p.backends {
        output::line(&format!("    {}", super::live::backends_line(b)));
    }
    for i in &p.instances {
        output::line(&format!("    {}", instance_line(i)));
    }
}
