//! The stdio of one plugin process: spawning it (with its data directory and, when strict,
//! its private tmp), the stderr reader, and the stdout and stdin the instance reads and
//! writes itself.

use super::LaunchSpec;
use crate::framed::FramedReader;
use crate::supervisor::cgroup::InstanceCgroup;
use crate::supervisor::process::{self, LogOrigin, TaskLog};
use crate::supervisor::{containment, identity};
use std::path::{Path, PathBuf};
use tokio::process::Child;
use tokio::sync::mpsc;

/// Lines from outside the actor (offer answers) waiting for it to queue them for stdin.
const LATE_LINES: usize = 256;

/// A plugin process's stdio: the stderr reader, stdout, and stdin.
pub(super) struct Io {
    /// Read by the instance itself (see `process::next_stdout_event`).
    pub(super) stdout: FramedReader<tokio::process::ChildStdout>,
    /// Written by the instance itself (see `stdin.rs`).
    pub(super) stdin: tokio::process::ChildStdin,
    /// Lines for stdin from outside the actor: offer answers hold a sender.
    pub(super) late_tx: mpsc::Sender<Vec<u8>>,
    pub(super) late_rx: mpsc::Receiver<Vec<u8>>,
    pub(super) stderr_reader: tokio::task::JoinHandle<()>,
    /// In the environment of every process of this plugin process's tree.
    pub(super) marker: String,
    /// The process's own cgroup, where the worker has a cgroup tree.
    pub(super) cgroup: Option<InstanceCgroup>,
    /// The task the stderr reader also sends lines to, if any.
    pub(super) task_log: TaskLog,
}

type Dirs = (Option<PathBuf>, Option<PathBuf>);

/// The plugin's data directory and (when strict) its private tmp under `state`, made, given to
/// its user, and checked to be within that user's reach.
fn plugin_dirs(
    spec: &LaunchSpec,
    state: &Path,
    identity: Option<&identity::Identity>,
) -> std::io::Result<Dirs> {
    let name = &spec.manifest.name;
    let data = process::plugin_dir(state, "data", name)?;
    let strict = spec.manifest.sandbox == crate::manifest::Sandbox::Strict;
    let tmp = strict
        .then(|| process::plugin_dir(state, "tmp", name))
        .transpose()?;
    for dir in std::iter::once(&data).chain(tmp.as_ref()) {
        identity::give(dir, identity)?;
        if let Some(id) = identity {
            identity::check_reach(id, dir).map_err(|e| {
                std::io::Error::other(format!(
                    "{e}: make the state directory searchable by others (`chmod 755 {}`)",
                    state.display()
                ))
            })?;
        }
    }
    Ok((Some(data), tmp))
}

impl Io {
    /// Spawns the plugin's process and starts reading and writing its stdio.
    pub(super) fn start(spec: &LaunchSpec) -> Result<(Child, Io), String> {
        let marker = containment::new_marker();
        let name = &spec.manifest.name;
        let identity = identity::of(&spec.manifest, spec.plugin_user.as_deref())
            .map_err(|e| format!("cannot choose the user to run as: {e}"))?;
        if let Some(id) = &identity {
            identity::check_reach(id, &spec.manifest.dir).map_err(|e| {
                format!("{e}: make that directory searchable by `{}`, install the plugin where its user can read it, or name another `user`", id.name)
            })?;
        }
        let (data, tmp) = match &spec.state_dir {
            Some(state) => plugin_dirs(spec, state, identity.as_ref()).map_err(|e| {
                format!(
                    "cannot prepare the plugin's directories under {}: {e}",
                    state.display()
                )
            })?,
            None => (None, None),
        };
        let cgroup = spec
            .cgroups
            .as_ref()
            .map(|tree| tree.create(name, spec.index, &spec.manifest.limits))
            .transpose()
            .map_err(|e| format!("cannot make the plugin process's cgroup: {e}"))?;
        let launch = process::Launch {
            cgroup: cgroup.as_ref(),
            instance: spec.index,
            marker: &marker,
            data: data.as_deref(),
            tmp: tmp.as_deref(),
            identity: identity.as_ref(),
        };
        let mut child = process::spawn(&spec.manifest, launch).map_err(|e| {
            format!(
                "could not start `{}`: {e} (check `command` in {}/plugin.toml)",
                spec.manifest.program().display(),
                spec.manifest.dir.display()
            )
        })?;
        let origin = LogOrigin {
            plugin: spec.manifest.name.clone(),
            instance: spec.index,
            pid: child.id().unwrap_or(0),
        };
        let stderr = child.stderr.take().expect("stderr is piped");
        let task_log = TaskLog::default();
        let stderr_reader =
            process::read_stderr(stderr, origin, spec.stderr.clone(), task_log.clone());
        let pipe = child.stdout.take().expect("stdout is piped");
        let stdout = FramedReader::new(pipe, spec.max_line_bytes);
        let stdin = child.stdin.take().expect("stdin is piped");
        let (late_tx, late_rx) = mpsc::channel(LATE_LINES);
        let io = Io {
            cgroup,
            marker,
            stdout,
            stdin,
            late_tx,
            late_rx,
            stderr_reader,
            task_log,
        };
        Ok((child, io))
    }
}
