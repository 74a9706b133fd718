//! The CLI's view of a running daemon on the control socket: its live status, and asking it to
//! apply the install record after an install or uninstall.

use crate::config::Config;
use crate::control::{Client, StatusReport, WorkerInfo};
use crate::supervisor::ReloadReport;
use serde_json::json;
use std::io::ErrorKind;

/// Live status, or `None` when no daemon answers.
pub async fn status(config: &Config) -> Option<StatusReport> {
    let mut client = Client::connect(&config.socket).await.ok()?;
    let reply = client
        .call("plugins.status", json!({}), |_| {})
        .await
        .ok()?
        .ok()?;
    serde_json::from_value(reply).ok()
}

/// What became of asking the daemon to apply the install record.
#[derive(Debug)]
pub enum Applied {
    /// It applied the record; replaced and removed plugins have stopped.
    Done(ReloadReport),
    /// No daemon answers on the socket: the record takes effect when one starts.
    NoDaemon,
    /// The daemon on the socket runs another state directory's plugins.
    OtherStateDir(WorkerInfo),
    /// A daemon is there but the request failed; what it runs is unknown.
    Failed(String),
}

impl Applied {
    /// True when no daemon may still run files the record no longer names.
    pub fn old_files_unused(&self) -> bool {
        !matches!(self, Applied::Failed(_))
    }
}

/// Asks the daemon on the socket to reload from the install record and to answer only once
/// replaced and removed plugins have drained and stopped.
pub async fn apply(config: &Config) -> Applied {
    let mut client = match Client::connect(&config.socket).await {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Applied::NoDaemon
        }
        Err(e) => return Applied::Failed(e.to_string()),
    };
    let info: WorkerInfo = match client.call("ping", json!({}), |_| {}).await {
        Ok(Ok(v)) => match serde_json::from_value(v) {
            Ok(info) => info,
            Err(e) => return Applied::Failed(format!("unexpected ping answer: {e}")),
        },
        Ok(Err(e)) => return Applied::Failed(e.message),
        Err(e) => return Applied::Failed(e.to_string()),
    };
    if !same_dir(&info.state_dir, &config.state_dir) {
        return Applied::OtherStateDir(info);
    }
    match client
        .call("plugins.reload", json!({"wait": true}), |_| {})
        .await
    {
        Ok(Ok(v)) => match serde_json::from_value(v) {
            Ok(report) => Applied::Done(report),
            Err(e) => Applied::Failed(format!("unexpected reload answer: {e}")),
        },
        Ok(Err(e)) => Applied::Failed(e.message),
        Err(e) => Applied::Failed(e.to_string()),
    }
}

fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Asks every other live daemon registered in the state directory (on another socket than
/// `config.socket`) to apply the record too. True when all did, so old copies may go.
pub async fn apply_to_others(config: &Config) -> bool {
    let mut all = true;
    for d in crate::install::daemons::live(&config.state_dir) {
        if same_dir(&d.socket, &config.socket) {
            continue;
        }
        let other = Config {
            socket: d.socket.clone(),
            ..config.clone()
        };
        match apply(&other).await {
            Applied::Done(_) => {}
            outcome => {
                eprintln!(
                    "daemon pid {} on {} did not apply the install record ({outcome:?}); old copies are kept until it does",
                    d.pid,
                    d.socket.display()
                );
                all = false;
            }
        }
    }
    all
}
