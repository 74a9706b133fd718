//! `worker run NAME [ARGS...]`: one task, no daemon. Starts only the plugin that serves NAME
//! (one instance), so a broken or unbuilt other plugin cannot get in the way: its installed
//! copy if it is installed, else its source in the plugins directory (when that needs no
//! install steps).

use super::output;
use super::serve::pool_options;
use crate::config::Config;
use crate::dispatch::{Dispatcher, TaskUpdate};
use crate::install::registry::StateDir;
use crate::manifest;
use crate::supervisor::Supervisor;
use crate::task::{Cancellation, Outcome, TaskRequest};
use clap::Args;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Task name
    pub name: String,
    /// Positional arguments; each is read as JSON if it parses, else as a string
    #[arg(allow_negative_numbers = true)]
    pub args: Vec<String>,
    /// Keyword arguments as a JSON object
    #[arg(long)]
    pub kwargs: Option<String>,
}

pub async fn run(config: Config, args: RunArgs) -> anyhow::Result<ExitCode> {
    let installed = StateDir::new(&config.state_dir)
        .discover()
        .map_err(anyhow::Error::msg)?;
    let serves = |m: &manifest::Manifest| m.task_names().any(|t| t == args.name);
    // An uninstalled plugin with install steps, or whose user cannot read its source, runs
    // from a scratch copy, kept until the end.
    let (mut plugin, _scratch) = match installed.plugins.iter().find(|m| serves(m)) {
        Some(m) => (m.clone(), None),
        None => match from_source(&config, &args.name, &installed)? {
            m if m.install.is_empty()
                && super::plugins::runs_from_source(&m, config.plugin_user.as_deref()) =>
            {
                (m, None)
            }
            m => {
                let (scratch, built) = super::plugins::scratch_build(&m, |l| eprintln!("{l}"))
                    .await
                    .map_err(|e| anyhow::anyhow!("plugin `{}` is not installed and building it failed: {e}; see `worker plugins install {}`", m.name, m.name))?;
                (built, Some(scratch))
            }
        },
    };
    plugin.instances = 1;
    let request = TaskRequest::new(
        &args.name,
        output::parse_args(&args.args),
        output::parse_kwargs(args.kwargs.as_deref())?,
    );
    let task_id = request.id.clone();
    let supervisor = Arc::new(Supervisor::start(vec![plugin], pool_options(&config)));
    let dispatcher = Dispatcher::new(supervisor.clone());
    let mut run = dispatcher.submit(request);
    let mut interrupted = false;
    let outcome = loop {
        tokio::select! {
            update = run.next() => match update {
                Some(TaskUpdate::Event(ev)) => output::event(&ev),
                Some(TaskUpdate::Done(outcome)) => break outcome,
                None => unreachable!("a task run ends with Done"),
            },
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                eprintln!("interrupted: cancelling task {task_id}");
                let cancel = Cancellation::requested("interrupted (Ctrl-C)");
                dispatcher.cancel(&task_id, cancel).await;
            }
        }
    };
    drop(run);
    supervisor.stop(None).await;
    Ok(match outcome {
        Outcome::Success(value) => {
            output::result(&value);
            ExitCode::SUCCESS
        }
        Outcome::Failure(f) => {
            output::failure(&f);
            ExitCode::FAILURE
        }
    })
}

/// The uninstalled plugin in the plugins directory that serves `task`.
fn from_source(
    config: &Config,
    task: &str,
    installed: &manifest::Discovery,
) -> anyhow::Result<manifest::Manifest> {
    let dir = &config.plugins_dir;
    let found = super::available::discover(config)?;
    if let Some(m) = found
        .plugins
        .iter()
        .find(|m| m.task_names().any(|t| t == task))
    {
        return Ok(m.clone());
    }
    let known: Vec<&str> = installed
        .plugins
        .iter()
        .chain(&found.plugins)
        .flat_map(|m| m.task_names())
        .collect();
    let mut msg = format!(
        "no plugin installed or in {} serves task `{task}`; known tasks: {}",
        dir.display(),
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    );
    for e in installed.errors.iter().chain(&found.errors) {
        msg.push_str(&format!("\n  (skipped a broken plugin: {e})"));
    }
    anyhow::bail!(msg)
}
