//! `worker plugins list|inspect|test|create|install|uninstall` and `worker reload`: what is
//! installed and available, and, when a daemon answers on the control socket, how each
//! installed plugin's instances are doing right now.

use super::daemon_client;
use super::live::{instance_line, next_try};
use super::output;
use crate::config::Config;
use crate::control::Client;
use crate::install::registry::StateDir;
use crate::install::tree;
use crate::manifest::Manifest;
use crate::supervisor::status::PluginStatus;
use clap::Subcommand;
use serde_json::json;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// List installed plugins (with live instance state from a running daemon) and the
    /// plugins available in the plugins directory
    List {
        /// Machine-readable output (stable; its shape is in the book's Control API reference)
        #[arg(long)]
        json: bool,
    },
    /// Scaffold a working plugin (manifest, code with one task, README, self-test)
    Create {
        /// Plugin name; the scaffold goes to NAME/ in the plugins directory
        name: String,
        /// Language of the scaffold and its SDK
        #[arg(long, value_enum, default_value = "python")]
        lang: super::scaffold::Lang,
    },
    /// Install plugins from the plugins directory (none named = all available): copy, run
    /// their install steps, handshake, record, and start them in a running daemon
    Install {
        /// Plugins in the plugins directory (none: every available plugin)
        names: Vec<String>,
        /// Allow a downgrade, or reinstalling an installed version with different files
        #[arg(long)]
        force: bool,
    },
    /// Uninstall installed plugins by exact name: a running daemon drains and stops them,
    /// then their installed copies are deleted
    Uninstall {
        /// Installed plugins, by exact name
        names: Vec<String>,
        /// Every installed plugin
        #[arg(long)]
        all: bool,
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Start a plugin alone and check it: handshake, protocol conformance, its manifest's
    /// [[tests]], shutdown. Exit code 0 = pass
    Test {
        /// Plugin name
        name: String,
        /// Test the installed copy instead of the source in the plugins directory
        #[arg(long)]
        installed: bool,
    },
    /// Start a `failed` plugin again now in the running daemon (it is otherwise tried again
    /// after `restart.failed_retry`, or on reload)
    Restart {
        /// Plugin name
        name: String,
    },
    /// One plugin in detail: manifest, tasks, install record, instances, recent exits, last
    /// stderr lines
    Inspect {
        /// Plugin name
        name: String,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
}

pub async fn plugins(config: Config, cmd: PluginsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PluginsCommand::List { json } => super::list::list(&config, json).await,
        PluginsCommand::Inspect { name, json } => inspect(&config, &name, json).await,
        PluginsCommand::Test { name, installed } => test(&config, &name, installed).await,
        PluginsCommand::Restart { name } => restart(&config, &name).await,
        PluginsCommand::Create { name, lang } => super::scaffold::create(&config, &name, lang),
        PluginsCommand::Install { names, force } => {
            super::install::install(&config, &names, force).await
        }
        PluginsCommand::Uninstall { names, all, yes } => {
            super::install::uninstall(&config, &names, all, yes).await
        }
    }
}

/// `worker plugins restart NAME`: asks the daemon to start a failed plugin again.
async fn restart(config: &Config, name: &str) -> anyhow::Result<ExitCode> {
    let mut client = crate::control::Client::connect(&config.socket).await?;
    let reply = client
        .call(
            "plugins.restart",
            serde_json::json!({ "name": name }),
            |_| {},
        )
        .await?;
    let v = reply.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    if v["restarted"] == true {
        output::line(&format!("{name}: restarting (was failed)"));
    } else {
        output::line(&format!(
            "{name}: {}; not restarted (only a failed plugin is restarted; use `worker reload` to apply an install)",
            v["state"].as_str().unwrap_or("unknown")
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// `worker plugins test NAME`: the source as `install` would install it (install steps run in
/// a scratch copy first), or with `--installed` the installed copy.
async fn test(config: &Config, name: &str, installed: bool) -> anyhow::Result<ExitCode> {
    if installed {
        let state = StateDir::new(&config.state_dir);
        let found = state.discover().map_err(anyhow::Error::msg)?;
        let Some(m) = found.plugins.iter().find(|m| m.name == name) else {
            let root = state.plugin_root(name);
            if let Some(e) = found.errors.iter().find(|e| e.path.starts_with(&root)) {
                output::line(&format!("FAIL  manifest: {e}"));
                return Ok(ExitCode::FAILURE);
            }
            anyhow::bail!("no installed plugin named `{name}` (see `worker plugins list`)");
        };
        return super::plugin_test::test_manifest(config, m).await;
    }
    let found = super::available::discover(config)?;
    let Some(m) = found.plugins.iter().find(|m| m.name == name) else {
        if let Some(e) = found.error_for(name) {
            output::line(&format!("FAIL  manifest: {e}"));
            return Ok(ExitCode::FAILURE);
        }
        anyhow::bail!(
            "no plugin named `{name}` in {}",
            config.plugins_dir.display()
        );
    };
    if m.install.is_empty() && runs_from_source(m, config.plugin_user.as_deref()) {
        return super::plugin_test::test_manifest(config, m).await;
    }
    match scratch_build(m, output::line).await {
        Ok((_scratch, staged)) => super::plugin_test::test_manifest(config, &staged).await,
        Err(reason) => {
            output::line(&format!("FAIL  {reason}"));
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Whether `m` can run from its source directory: true unless it would run as a user who
/// cannot enter it (then it runs from a scratch copy; a wrong `user` is reported at its start).
pub(super) fn runs_from_source(m: &Manifest, plugin_user: Option<&str>) -> bool {
    match crate::supervisor::identity::of(m, plugin_user) {
        Ok(Some(id)) => crate::supervisor::identity::check_reach(&id, &m.dir).is_ok(),
        _ => true,
    }
}

/// A plugin's source copied into a scratch directory with its install steps run there, as
/// `plugins install` would build it but recorded nowhere: for `plugins test` and for `worker
/// run` of a plugin that is not installed. The copy lives as long as the returned directory.
pub(super) async fn scratch_build(
    m: &Manifest,
    say: fn(&str),
) -> Result<(tempfile::TempDir, Manifest), String> {
    let scratch = tempfile::Builder::new()
        .prefix(&format!("worker-scratch-{}-", m.name))
        .tempdir()
        .map_err(|e| format!("scratch directory: {e}"))?;
    use std::os::unix::fs::PermissionsExt;
    // Its user may not be the worker's (a root worker runs plugins as `nobody` by default).
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("scratch directory: {e}"))?;
    let copy = scratch.path().join(&m.name);
    say(&match m.install.len() {
        0 => format!(
            "copying {} where its user can read it ({})",
            m.name,
            copy.display()
        ),
        n => format!(
            "running {n} install step(s) of {} in a scratch copy ({})",
            m.name,
            copy.display()
        ),
    });
    tree::copy(&m.dir, &copy, tree::Symlinks::of(m)).map_err(|e| format!("copy: {e}"))?;
    let staged = m.relocated(&copy);
    let log_path = scratch.path().join("install.log");
    let mut log = std::fs::File::create(&log_path).map_err(|e| format!("install log: {e}"))?;
    if let Err(f) = crate::install::steps::run(&staged, &m.dir, &mut log).await {
        return Err(format!(
            "install step {} (`{}`): {f}",
            f.step,
            f.argv.join(" ")
        ));
    }
    Ok((scratch, staged))
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
        ("restarted (was failed)", &report.restarted),
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

/// `worker plugins inspect NAME`: the installed plugin (manifest of the installed copy, the
/// install record, live instances), or the available one when it is not installed.
async fn inspect(config: &Config, name: &str, json: bool) -> anyhow::Result<ExitCode> {
    let state = StateDir::new(&config.state_dir);
    let record = state.read().map_err(anyhow::Error::msg)?;
    let installed = record.get(name);
    let m = manifest_to_inspect(config, name, installed)?;
    let live = daemon_client::status(config).await;
    let status = live
        .as_ref()
        .and_then(|r| r.plugins.iter().find(|p| p.name == name));
    let tasks = task_docs(&m, installed);
    if json {
        let mut doc = serde_json::to_value(&m)?;
        doc["dir"] = json!(m.dir.display().to_string());
        doc["tasks"] = json!(tasks);
        doc["installed"] = json!(installed);
        doc["live"] = json!(status);
        output::line(&serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_manifest(&m, installed, &tasks);
    match status {
        None => output::line(&format!(
            "  not running in a daemon on {}",
            config.socket.display()
        )),
        Some(p) => print_live_detail(p),
    }
    Ok(ExitCode::SUCCESS)
}

/// The installed copy's manifest, else the source's; an error says what is wrong.
fn manifest_to_inspect(
    config: &Config,
    name: &str,
    installed: Option<&crate::install::registry::Installed>,
) -> anyhow::Result<Manifest> {
    if let Some(r) = installed {
        return Manifest::load(&r.dir).map_err(|e| {
            anyhow::anyhow!("installed plugin `{name}` has a broken copy: {e}; reinstall it with `worker plugins install {name} --force`")
        });
    }
    let found = super::available::discover(config)?;
    match found.plugins.iter().find(|m| m.name == name) {
        Some(m) => Ok(m.clone()),
        None => match found.error_for(name) {
            Some(e) => anyhow::bail!("plugin `{name}` has a broken manifest: {e}"),
            None => anyhow::bail!(
                "no plugin named `{name}` is installed or in {}",
                config.plugins_dir.display()
            ),
        },
    }
}

/// Each task with its description and params: from the manifest, else from what the plugin
/// said at its install handshake.
fn task_docs(
    m: &Manifest,
    installed: Option<&crate::install::registry::Installed>,
) -> Vec<serde_json::Value> {
    m.tasks
        .iter()
        .map(|t| {
            let reported = installed.and_then(|r| r.tasks.iter().find(|i| i.name == t.name));
            json!({
                "name": t.name,
                "description": t.description.clone().or_else(|| reported.and_then(|r| r.description.clone())),
                "params": t.params.clone().or_else(|| reported.and_then(|r| r.params.clone())),
            })
        })
        .collect()
}

fn print_manifest(
    m: &Manifest,
    installed: Option<&crate::install::registry::Installed>,
    tasks: &[serde_json::Value],
) {
    output::line(&format!("{} {}  ({})", m.name, m.version, m.dir.display()));
    if !m.description.is_empty() {
        output::line(&format!("  {}", m.description));
    }
    match installed {
        Some(r) => output::line(&format!(
            "  installed {} from {}\n  manifest sha256 {}\n  content sha256 {}",
            r.installed_at,
            r.source.display(),
            r.manifest_sha256,
            r.content_sha256
        )),
        None => output::line("  not installed (this is the source in the plugins directory)"),
    }
    output::line(&format!("  command: {}", m.command.join(" ")));
    for (i, step) in m.install.iter().enumerate() {
        output::line(&format!("  install step {}: {}", i + 1, step.join(" ")));
    }
    output::line(&format!(
        "  {} instance(s) x {} concurrent, max_attempts {}",
        m.instances, m.concurrency, m.max_attempts
    ));
    if let Some(q) = &m.backends.queue_backend {
        output::line(&format!(
            "  provides queue_backend: window {} offers per process",
            q.window
        ));
    }
    if let Some(r) = &m.backends.result_backend {
        output::line(&format!(
            "  provides result_backend: stores the results of {}",
            r.tasks.join(", ")
        ));
    }
    output::line("  tasks:");
    for t in tasks {
        let description = t["description"].as_str().map(|d| format!(" - {d}"));
        let name = t["name"].as_str().unwrap_or_default();
        output::line(&format!("    {name}{}", description.unwrap_or_default()));
        if !t["params"].is_null() {
            output::line(&format!("      params: {}", t["params"]));
        }
    }
}

/// A running plugin in detail: state, each instance with its recent exits and stderr.
fn print_live_detail(p: &PluginStatus) {
    output::line(&format!("  state: {}  queued: {}", p.state, p.queued));
    if let crate::supervisor::status::PluginState::Failed(reason) = &p.state {
        output::line(&format!("  failed: {reason}"));
        output::line(&format!("  {}", next_try(p)));
    }
    if let Some(b) = &p.backends {
        output::line(&format!("  {}", super::live::backends_line(b)));
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
