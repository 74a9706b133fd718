//! `worker task run|cancel|list`: talk to a running daemon over the control socket.

use super::output;
use crate::config::Config;
use crate::control::{Client, SubmitParams};
use crate::dispatch::TaskListing;
use crate::task::{Failure, TaskEvent};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Submit a task and wait for its result (progress on stderr, items and result on stdout)
    Run(TaskRunArgs),
    /// Cancel a queued or running task by id
    Cancel {
        /// The task's id (`task run --id`, or as `task list` shows it)
        task_id: String,
        /// Why, sent to the plugin with `task.cancel` (default: "cancelled by request")
        #[arg(long)]
        reason: Option<String>,
    },
    /// Every task in flight: id, task, plugin, instance, pid, attempt, state, age, submitter
    List {
        /// Print JSON (`{tasks: [...]}`, as the control method `task.list` answers)
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct TaskRunArgs {
    /// Task name
    pub name: String,
    /// Positional arguments; each is read as JSON if it parses, else as a string
    #[arg(allow_negative_numbers = true)]
    pub args: Vec<String>,
    /// Keyword arguments as a JSON object
    #[arg(long)]
    pub kwargs: Option<String>,
    /// Task id (default: a random UUID)
    #[arg(long)]
    pub id: Option<String>,
    /// Seconds before the task is asked to stop (overrides the manifest)
    #[arg(long)]
    pub soft_time_limit: Option<f64>,
    /// Seconds before the plugin process running it is killed (overrides the manifest)
    #[arg(long)]
    pub hard_time_limit: Option<f64>,
    /// Keep the task running if this command is interrupted (by default it is cancelled)
    #[arg(long)]
    pub detach: bool,
}

pub async fn task(config: Config, cmd: TaskCommand) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(&config.socket).await?;
    match cmd {
        TaskCommand::Run(a) => run(&mut client, a).await,
        TaskCommand::Cancel { task_id, reason } => cancel(&mut client, &task_id, reason).await,
        TaskCommand::List { json } => {
            let reply = client.call("task.list", json!({}), |_| {}).await?;
            let doc = reply.map_err(|e| anyhow::anyhow!("task.list failed: {}", e.message))?;
            if json {
                output::line(&serde_json::to_string_pretty(&doc)?);
            } else {
                let tasks: Vec<TaskListing> = serde_json::from_value(doc["tasks"].clone())?;
                print_list(&tasks);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `worker task run`: submit, print events as they come, then the result.
async fn run(client: &mut Client, a: TaskRunArgs) -> anyhow::Result<ExitCode> {
    let params = SubmitParams {
        name: a.name,
        args: output::parse_args(&a.args),
        kwargs: output::parse_kwargs(a.kwargs.as_deref())?,
        id: a.id,
        soft_time_limit: a.soft_time_limit,
        hard_time_limit: a.hard_time_limit,
        detach: a.detach,
    };
    let reply = client
        .call("task.submit", serde_json::to_value(params)?, |n| {
            match n.method.as_str() {
                "task.accepted" => tracing::info!("task accepted: {}", n.params["task_id"]),
                "task.progress" | "task.stream" => {
                    let mut p = n.params;
                    let kind = if n.method == "task.progress" {
                        "progress"
                    } else {
                        "stream"
                    };
                    p["event"] = Value::from(kind);
                    if let Ok(ev) = serde_json::from_value::<TaskEvent>(p) {
                        output::event(&ev);
                    }
                }
                _ => {}
            }
        })
        .await?;
    Ok(match reply {
        Ok(v) => {
            output::result(&v["result"]);
            ExitCode::SUCCESS
        }
        Err(e) => {
            match e
                .data
                .and_then(|d| serde_json::from_value::<Failure>(d).ok())
            {
                Some(f) => output::failure(&f),
                None => eprintln!("error: {}", e.message),
            }
            ExitCode::FAILURE
        }
    })
}

/// `worker task cancel ID`.
async fn cancel(
    client: &mut Client,
    task_id: &str,
    reason: Option<String>,
) -> anyhow::Result<ExitCode> {
    let params = json!({ "task_id": task_id, "reason": reason });
    match client.call("task.cancel", params, |_| {}).await? {
        Ok(v) if v["cancelled"] == Value::Bool(true) => {
            eprintln!("cancel requested for task {task_id}");
            Ok(ExitCode::SUCCESS)
        }
        Ok(_) => {
            eprintln!("error: no task {task_id} is queued or running on this worker");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => anyhow::bail!("cancel failed: {}", e.message),
    }
}

fn print_list(tasks: &[TaskListing]) {
    if tasks.is_empty() {
        output::line("no tasks in flight");
        return;
    }
    output::line(&format!(
        "{:<36}  {:<20}  {:<16}  {:>4}  {:>7}  {:>3}  {:<7}  {:>8}  SUBMITTER",
        "ID", "TASK", "PLUGIN", "INST", "PID", "TRY", "STATE", "AGE"
    ));
    let dash = || "-".to_string();
    for t in tasks {
        output::line(&format!(
            "{:<36}  {:<20}  {:<16}  {:>4}  {:>7}  {:>3}  {:<7}  {:>7.1}s  {}",
            t.task_id,
            t.task,
            t.plugin.clone().unwrap_or_else(dash),
            t.instance.map(|i| i.to_string()).unwrap_or_else(dash),
            t.pid.map(|p| p.to_string()).unwrap_or_else(dash),
            t.attempt,
            t.state,
            t.age_secs,
            t.submitter
        ));
    }
}
