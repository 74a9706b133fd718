//! Applying the install record to a running daemon: what SIGHUP, `worker reload` and a
//! finished install or uninstall ask for. The record belongs to the state directory, not to
//! the supervisor; this is where the two meet.

use crate::dispatch::Dispatcher;
use crate::install::registry::StateDir;
use crate::supervisor::ReloadReport;
use std::time::Duration;

/// Where a daemon reads the installed plugins from, and how long replaced ones may drain.
#[derive(Debug, Clone)]
pub struct ReloadSettings {
    pub state: StateDir,
    pub drain: Duration,
}

pub use crate::install::registry::RecordError as ReloadError;

/// Reads the install record again and applies it (see `Supervisor::reload`). An installed
/// plugin whose copy is missing or broken is reported in `failed` and keeps running as it was.
pub async fn apply_install_record(
    dispatcher: &Dispatcher,
    settings: &ReloadSettings,
    wait: bool,
) -> Result<ReloadReport, ReloadError> {
    let found = settings.state.discover()?;
    let mut manifests = found.plugins;
    let mut broken = Vec::new();
    let running = dispatcher.manifests();
    for e in &found.errors {
        tracing::error!("reload: plugin skipped: {e}");
        // A plugin whose manifest broke keeps running as it was rather than vanishing.
        if let Some(m) = running.iter().find(|m| e.path.starts_with(&m.dir)) {
            manifests.push((**m).clone());
        }
        broken.push((e.path.display().to_string(), e.message.clone()));
    }
    let mut report = dispatcher.reload(manifests, settings.drain, wait).await;
    report.failed.extend(broken);
    dispatcher.metrics().plugins_applied(&report);
    Ok(report)
}
