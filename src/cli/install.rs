//! `worker plugins install` and `worker plugins uninstall`: change the install record, then make
//! a running daemon apply it (blue/green for updates, drain-and-stop for removals), and delete
//! installed copies only once nothing runs them.
//!
//! One install or uninstall at a time per state directory (a file lock). If the daemon cannot
//! start a new version, the record goes back to what it was, so the old version keeps serving.

use super::daemon_client::{self, Applied};
use super::output;
use crate::config::Config;
use crate::install::registry::{Record, StateDir};
use crate::install::{Change, InstallError, Installer, Stage, Staged};
use crate::manifest::{self, Manifest};
use anyhow::Context;
use std::io::IsTerminal;
use std::process::ExitCode;

/// `worker plugins install [NAME...] [--force]`.
pub async fn install(config: &Config, names: &[String], force: bool) -> anyhow::Result<ExitCode> {
    let state = StateDir::new(&config.state_dir);
    let _lock = state
        .lock(|| eprintln!("waiting for another install or uninstall to finish..."))
        .with_context(|| {
            format!(
                "cannot lock the state directory {}",
                config.state_dir.display()
            )
        })?;
    let found = super::available::discover(config)?;
    let (sources, mut failures) = select_sources(config, names, &found);
    if sources.is_empty() && failures.is_empty() {
        output::line(&format!(
            "nothing to install: no plugins in {} (create one with `worker plugins create NAME`)",
            config.plugins_dir.display()
        ));
        return Ok(ExitCode::SUCCESS);
    }
    let before = state.read().map_err(anyhow::Error::msg)?;
    let mut record = before.clone();
    let installer = Installer {
        state: &state,
        worker_name: &config.name,
        max_line_bytes: config.max_line_bytes,
        plugin_user: config.plugin_user.as_deref(),
    };
    let mut staged = Vec::new();
    for m in sources {
        if let Some(s) = stage_one(&installer, m, &mut record, force, &mut failures).await {
            staged.push(s);
        }
    }
    if !staged.is_empty() {
        if let Err(e) = state.write(&record) {
            for s in staged.drain(..) {
                failures.push(InstallError {
                    name: s.entry.name,
                    stage: Stage::Record,
                    reason: e.to_string(),
                });
            }
        }
    }
    if !staged.is_empty() {
        let rollback = Rollback {
            state: &state,
            before: &before,
        };
        rollback
            .apply(config, &mut record, &mut staged, &mut failures)
            .await?;
        print_installed(&staged);
    }
    print_failures(&failures, &before);
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The plugins to install: the named ones (or all available), and the names that are not.
fn select_sources<'a>(
    config: &Config,
    names: &[String],
    found: &'a manifest::Discovery,
) -> (Vec<&'a Manifest>, Vec<InstallError>) {
    let mut failures = Vec::new();
    let mut sources = Vec::new();
    if names.is_empty() {
        sources.extend(&found.plugins);
        for e in &found.errors {
            let name = e.path.parent().map(|p| p.display().to_string());
            failures.push(InstallError {
                name: name.unwrap_or_default(),
                stage: Stage::Manifest,
                reason: e.message.clone(),
            });
        }
    }
    for name in names {
        match found.plugins.iter().find(|m| &m.name == name) {
            Some(m) => sources.push(m),
            None => failures.push(InstallError {
                name: name.clone(),
                stage: Stage::Manifest,
                reason: match found.error_for(name) {
                    Some(e) => e.to_string(),
                    None => format!(
                        "no plugin named `{name}` in {} (available: {})",
                        config.plugins_dir.display(),
                        list_or_none(found.plugins.iter().map(|m| m.name.as_str()))
                    ),
                },
            }),
        }
    }
    (sources, failures)
}

/// Stages one plugin (copy, steps, handshake) and puts it in `record`.
async fn stage_one(
    installer: &Installer<'_>,
    m: &Manifest,
    record: &mut Record,
    force: bool,
    failures: &mut Vec<InstallError>,
) -> Option<Staged> {
    output::line(&format!(
        "{} {}: installing from {}",
        m.name,
        m.version,
        m.dir.display()
    ));
    match installer.stage(m, record, force).await {
        Ok(None) => {
            output::line(&format!(
                "{} {}: already installed with the same files; nothing to do",
                m.name, m.version
            ));
            None
        }
        Ok(Some(s)) => {
            record.put(s.entry.clone());
            Some(s)
        }
        Err(e) => {
            failures.push(e);
            None
        }
    }
}

/// Asking a running daemon to apply a new record, and putting back what it rejects.
struct Rollback<'a> {
    state: &'a StateDir,
    before: &'a Record,
}

impl Rollback<'_> {
    /// The daemon applies the record; plugins it could not start go back to their previous
    /// version (or to not installed) in the record, since it kept the old version serving.
    /// Unused copies are deleted once no daemon runs them.
    async fn apply(
        &self,
        config: &Config,
        record: &mut Record,
        staged: &mut Vec<Staged>,
        failures: &mut Vec<InstallError>,
    ) -> anyhow::Result<()> {
        let mut applied = daemon_client::apply(config).await;
        let mut rejected = Vec::new();
        if let Applied::Done(report) = &applied {
            for (name, reason) in &report.failed {
                if let Some(i) = staged.iter().position(|s| &s.entry.name == name) {
                    rejected.push((staged.remove(i), reason.clone()));
                }
            }
        }
        if !rejected.is_empty() {
            for (s, reason) in rejected {
                match self.before.get(&s.entry.name) {
                    Some(old) => record.put(old.clone()),
                    None => record.remove(&s.entry.name),
                };
                failures.push(InstallError {
                    name: s.entry.name,
                    stage: Stage::Daemon,
                    reason,
                });
            }
            self.state
                .write(record)
                .context("cannot restore the install record")?;
            applied = daemon_client::apply(config).await;
        }
        report_daemon(config, &applied);
        // Another daemon running from this state directory (on another socket) may still run
        // the old copies: they go only once every live one has applied the record.
        if applied.old_files_unused() && daemon_client::apply_to_others(config).await {
            self.state.collect_garbage(record);
        }
        Ok(())
    }
}

fn print_installed(staged: &[Staged]) {
    for s in staged {
        let what = match &s.change {
            Change::Upgrade { from } => format!("updated from {from}"),
            Change::Downgrade { from } => format!("downgraded from {from}"),
            Change::NotInstalled => "installed".to_string(),
            Change::Same | Change::Modified => "reinstalled".to_string(),
        };
        output::line(&format!(
            "{} {}: {what} ({})",
            s.entry.name,
            s.entry.version,
            s.entry.dir.display()
        ));
    }
}

fn print_failures(failures: &[InstallError], before: &Record) {
    for f in failures {
        let kept = match before.get(&f.name) {
            Some(old) => format!("\n    {} {} stays installed", old.name, old.version),
            None => String::new(),
        };
        output::line(&format!(
            "FAILED {}: at {}: {}{kept}",
            f.name, f.stage, f.reason
        ));
    }
}

/// `worker plugins uninstall NAME... | --all [--yes]`.
pub async fn uninstall(
    config: &Config,
    names: &[String],
    all: bool,
    yes: bool,
) -> anyhow::Result<ExitCode> {
    let state = StateDir::new(&config.state_dir);
    let record = state.read().map_err(anyhow::Error::msg)?;
    let targets: Vec<String> = if all {
        if !names.is_empty() {
            anyhow::bail!("give plugin names or --all, not both");
        }
        record.plugins.iter().map(|p| p.name.clone()).collect()
    } else if names.is_empty() {
        anyhow::bail!(
            "name the installed plugins to uninstall, or pass --all (see `worker plugins list`)"
        );
    } else {
        let refused: Vec<String> = names.iter().filter_map(|n| refuse(n, &record)).collect();
        if !refused.is_empty() {
            for r in &refused {
                eprintln!("error: {r}");
            }
            eprintln!("nothing was uninstalled");
            return Ok(ExitCode::from(2));
        }
        names.to_vec()
    };
    if targets.is_empty() {
        output::line("nothing is installed");
        return Ok(ExitCode::SUCCESS);
    }
    if !yes && !confirm(config, &record, &targets)? {
        eprintln!("nothing was uninstalled");
        return Ok(ExitCode::FAILURE);
    }
    let _lock = state
        .lock(|| eprintln!("waiting for another install or uninstall to finish..."))
        .with_context(|| {
            format!(
                "cannot lock the state directory {}",
                config.state_dir.display()
            )
        })?;
    // Read again under the lock: another command may have changed it since.
    let mut record = state.read().map_err(anyhow::Error::msg)?;
    let removed: Vec<_> = targets.iter().filter_map(|n| record.remove(n)).collect();
    state
        .write(&record)
        .context("cannot write the install record")?;
    let applied = daemon_client::apply(config).await;
    report_daemon(config, &applied);
    if applied.old_files_unused() && daemon_client::apply_to_others(config).await {
        state.collect_garbage(&record);
    }
    for p in &removed {
        output::line(&format!("{} {}: uninstalled", p.name, p.version));
    }
    Ok(ExitCode::SUCCESS)
}

/// Why `name` cannot be uninstalled, if it cannot: uninstall takes exact names of installed
/// plugins and nothing else, so no argument can reach a file outside the state directory.
fn refuse(name: &str, record: &Record) -> Option<String> {
    if record.get(name).is_some() {
        return None;
    }
    let installed = list_or_none(record.plugins.iter().map(|p| p.name.as_str()));
    Some(
        if name.contains('/') || name.starts_with('.') || name.starts_with('~') {
            format!("`{name}` is a path; uninstall takes the name of an installed plugin (installed: {installed})")
        } else if name.contains(['*', '?', '[', ']', '{', '}']) {
            format!("`{name}` is a pattern; uninstall takes exact names of installed plugins, never globs (installed: {installed})")
        } else if !manifest::is_valid_name(name) {
            format!("`{name}` is not a plugin name (installed: {installed})")
        } else {
            format!("no installed plugin is named `{name}` (installed: {installed})")
        },
    )
}

fn confirm(config: &Config, record: &Record, targets: &[String]) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "refusing to uninstall without confirmation: stdin is not a terminal; pass --yes"
        );
    }
    let what: Vec<String> = targets
        .iter()
        .filter_map(|n| record.get(n))
        .map(|p| format!("{} {}", p.name, p.version))
        .collect();
    eprint!(
        "Uninstall {}? A running daemon drains and stops them, then their installed copies under {} are deleted (sources in {} are kept). [y/N] ",
        what.join(", "),
        config.state_dir.display(),
        config.plugins_dir.display()
    );
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

fn report_daemon(config: &Config, applied: &Applied) {
    match applied {
        Applied::Done(report) => {
            let mut said = Vec::new();
            for (label, names) in [
                ("started", &report.started),
                ("replaced", &report.replaced),
                ("stopped", &report.removed),
            ] {
                if !names.is_empty() {
                    said.push(format!("{label} {}", names.join(", ")));
                }
            }
            if !said.is_empty() {
                output::line(&format!("daemon: {}", said.join("; ")));
            }
        }
        Applied::NoDaemon => output::line(&format!(
            "no daemon answers on {}; `worker serve` will run what is installed",
            config.socket.display()
        )),
        Applied::OtherStateDir(info) => output::line(&format!(
            "the daemon on {} ({}) runs the plugins of {}, not {}: it was not changed",
            config.socket.display(),
            info.name,
            info.state_dir.display(),
            config.state_dir.display()
        )),
        Applied::Failed(e) => output::line(&format!(
            "WARNING: the daemon on {} did not apply the change ({e}); run `worker reload`. Old installed copies are kept until then",
            config.socket.display()
        )),
    }
}

fn list_or_none<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
