//! File-action tasks (the Ngenea Hub contract) and Ngenea queue names, for Rust plugins: the
//! same API as the Python and Node SDKs.
//!
//! ```no_run
//! use plugin_protocol::files::{expand_paths, FileActionStatus};
//! use plugin_protocol::plugin::Plugin;
//!
//! Plugin::new("my-plugin", "1.0.0")
//!     .task("my-plugin", "Acts on files", |ctx, params| {
//!         let mut status = FileActionStatus::from_task(ctx, params)?;
//!         let paths = params.kwargs.get("paths").cloned().unwrap_or_default();
//!         for page in expand_paths(paths.as_array().cloned().unwrap_or_default(), 1000) {
//!             for file in page {
//!                 status.add("processed", file, None)?;
//!             }
//!         }
//!         Ok(status.dump())
//!     })
//!     .run()
//!     .expect("stdin/stdout are usable");
//! ```

use crate::methods::TaskRunParams;
use crate::plugin::{TaskContext, TaskError};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `processed`, `skipped` (already in the desired state), `aborted` (later tasks must not
/// process it), `failures`, `inprogress`.
pub const FILE_STATES: [&str; 5] = ["processed", "skipped", "aborted", "failures", "inprogress"];

/// A path given as a string or an object with a string `path`, as an object.
fn path_object(path: Value) -> Result<Map<String, Value>, TaskError> {
    match path {
        Value::String(p) => Ok(Map::from_iter([("path".to_string(), Value::String(p))])),
        Value::Object(o) if o.get("path").is_some_and(Value::is_string) => Ok(o),
        other => Err(TaskError::new(
            "TypeError",
            format!("a path is a string or an object with a string `path`, not {other}"),
        )),
    }
}

/// The result payload Ngenea Hub expects of a file-action task (see the Python SDK's README
/// for its shape). `aborted` and `inprogress` appear once a file is added with them.
#[derive(Debug, Clone)]
pub struct FileActionStatus {
    pub task: String,
    pub input_paths: Vec<Value>,
    pub jobid: Value,
    pub queue: Option<String>,
    pub started: String,
    details: Vec<(&'static str, Vec<Value>)>,
}

impl FileActionStatus {
    pub fn new(
        task: impl Into<String>,
        input_paths: impl IntoIterator<Item = Value>,
        jobid: Value,
        queue: Option<String>,
    ) -> Result<Self, TaskError> {
        let input_paths = input_paths
            .into_iter()
            .map(|p| path_object(p).map(Value::Object))
            .collect::<Result<_, _>>()?;
        Ok(FileActionStatus {
            task: task.into(),
            input_paths,
            jobid,
            queue,
            started: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false),
            details: vec![
                ("failures", vec![]),
                ("processed", vec![]),
                ("skipped", vec![]),
            ],
        })
    }

    /// From the running task: its `jobid` and `paths` kwargs, its name and its queue.
    pub fn from_task(ctx: &TaskContext, params: &TaskRunParams) -> Result<Self, TaskError> {
        let paths = match params.kwargs.get("paths") {
            Some(Value::Array(paths)) => paths.clone(),
            _ => Vec::new(),
        };
        let jobid = params.kwargs.get("jobid").cloned().unwrap_or(Value::Null);
        Self::new(&params.task, paths, jobid, ctx.queue().map(str::to_string))
    }

    /// Records what happened to one file; `message` says why. An unknown state is an error.
    pub fn add(
        &mut self,
        state: &str,
        path: impl Into<Value>,
        message: Option<&str>,
    ) -> Result<Value, TaskError> {
        let Some(state) = FILE_STATES.iter().find(|s| **s == state) else {
            return Err(TaskError::new(
                "ValueError",
                format!(
                    "unknown file state {state:?}; use one of {}",
                    FILE_STATES.join(", ")
                ),
            ));
        };
        let mut entry = path_object(path.into())?;
        if let Some(message) = message {
            entry.insert("message".into(), json!([message]));
        }
        let entry = Value::Object(entry);
        match self.details.iter_mut().find(|(s, _)| s == state) {
            Some((_, entries)) => entries.push(entry.clone()),
            None => self.details.push((state, vec![entry.clone()])),
        }
        Ok(entry)
    }

    fn entries(&self, state: &str) -> &[Value] {
        self.details
            .iter()
            .find(|(s, _)| *s == state)
            .map(|(_, e)| e.as_slice())
            .unwrap_or_default()
    }

    /// The payload to return from the task.
    pub fn dump(&self) -> Value {
        let next: Vec<Value> = self
            .entries("processed")
            .iter()
            .chain(self.entries("skipped"))
            .map(|e| json!({ "path": e["path"] }))
            .collect();
        let summary: Map<String, Value> = self
            .details
            .iter()
            .map(|(s, e)| (s.to_string(), json!(e.len())))
            .collect();
        let details: Map<String, Value> = self
            .details
            .iter()
            .map(|(s, e)| (s.to_string(), Value::Array(e.clone())))
            .collect();
        json!({
            "jobid": self.jobid,
            "paths": next,
            "status": {
                "task": self.task,
                "input_paths": self.input_paths,
                "input_total": self.input_paths.len(),
                "summary": summary,
                "details": details,
                "started": self.started,
            }
        })
    }
}

/// A [`FileActionStatus`] that also streams added files to the caller in batches of
/// `batch_size` files or every `interval`, whichever first; each batch is one `task.stream`
/// item `{"jobid", "task", "files": [{"path", "state", ...}]}`. `dump` sends the rest first.
pub struct StreamTaskResults<'a> {
    pub status: FileActionStatus,
    ctx: &'a TaskContext,
    batch: Vec<Value>,
    pub batch_size: usize,
    pub interval: Duration,
    last_flush: Instant,
}

impl<'a> StreamTaskResults<'a> {
    pub fn new(status: FileActionStatus, ctx: &'a TaskContext) -> Self {
        StreamTaskResults {
            status,
            ctx,
            batch: Vec::new(),
            batch_size: 500,
            interval: Duration::from_secs(1),
            last_flush: Instant::now(),
        }
    }

    pub fn add(
        &mut self,
        state: &str,
        path: impl Into<Value>,
        message: Option<&str>,
    ) -> Result<(), TaskError> {
        let mut entry = self.status.add(state, path, message)?;
        entry["state"] = json!(state);
        self.batch.push(entry);
        if self.batch.len() >= self.batch_size || self.last_flush.elapsed() >= self.interval {
            self.flush();
        }
        Ok(())
    }

    /// Sends the files added since the last batch, if any.
    pub fn flush(&mut self) {
        if !self.batch.is_empty() {
            let files = std::mem::take(&mut self.batch);
            self.ctx.stream(vec![
                json!({ "jobid": self.status.jobid, "task": self.status.task, "files": files }),
            ]);
        }
        self.last_flush = Instant::now();
    }

    pub fn dump(&mut self) -> Value {
        self.flush();
        self.status.dump()
    }
}

/// Pages of at most `page_size` path objects of the files under `paths`: folders expand
/// recursively and lazily (one directory listing at a time), symlinks are listed and never
/// followed, a folder reached twice is listed once. Extra keys of a given path object are kept
/// on the files under it.
pub fn expand_paths(paths: Vec<Value>, page_size: usize) -> ExpandPaths {
    ExpandPaths {
        given: paths.into_iter().rev().collect(),
        stack: Vec::new(),
        extra: Map::new(),
        seen: HashSet::new(),
        page_size: page_size.max(1),
    }
}

/// The iterator of [`expand_paths`].
pub struct ExpandPaths {
    given: Vec<Value>,
    stack: Vec<PathBuf>,
    extra: Map<String, Value>,
    seen: HashSet<(u64, u64)>,
    page_size: usize,
}

impl ExpandPaths {
    fn file(&self, path: PathBuf) -> Value {
        let mut entry = self.extra.clone();
        entry.insert("path".into(), json!(path.display().to_string()));
        Value::Object(entry)
    }
}

impl Iterator for ExpandPaths {
    type Item = Vec<Value>;

    fn next(&mut self) -> Option<Vec<Value>> {
        let mut page = Vec::new();
        while page.len() < self.page_size {
            let Some(path) = self.stack.pop() else {
                let Some(given) = self.given.pop() else {
                    // Every given path is done: the last, partial page (if any).
                    return (!page.is_empty()).then_some(page);
                };
                let Ok(mut given) = path_object(given) else {
                    continue;
                };
                let root = given
                    .remove("path")
                    .and_then(|p| p.as_str().map(PathBuf::from));
                self.extra = given;
                self.stack.extend(root);
                continue;
            };
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {
                    if self.seen.insert((meta.dev(), meta.ino())) {
                        let mut children: Vec<PathBuf> = std::fs::read_dir(&path)
                            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                            .unwrap_or_default();
                        children.sort();
                        self.stack.extend(children.into_iter().rev());
                    }
                }
                _ => page.push(self.file(path)),
            }
        }
        Some(page)
    }
}

/// A queue name in the Ngenea 2.4 format `site.queue#function`, e.g. `london.highpriority#custom`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedQueueName {
    pub site: Option<String>,
    pub queue: String,
    pub function: Option<String>,
}

impl ParsedQueueName {
    pub fn parse(name: &str) -> Self {
        let (base, function) = match name.split_once('#') {
            Some((base, f)) => (base, Some(f.to_string()).filter(|f| !f.is_empty())),
            None => (name, None),
        };
        match base.split_once('.') {
            Some((site, queue)) => ParsedQueueName {
                site: Some(site.to_string()).filter(|s| !s.is_empty()),
                queue: queue.to_string(),
                function,
            },
            None => ParsedQueueName {
                site: None,
                queue: base.to_string(),
                function,
            },
        }
    }

    /// The queue of the task running on this thread (`None` outside a task or off a queue).
    pub fn current() -> Option<Self> {
        current_task_queue_name().map(|q| Self::parse(&q))
    }
}

impl fmt::Display for ParsedQueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_queue_name(
            self.site.as_deref(),
            &self.queue,
            self.function.as_deref(),
        ))
    }
}

/// `site.queue#function` (`queue#function` without a site; no `#` without a function).
pub fn format_queue_name(site: Option<&str>, queue: &str, function: Option<&str>) -> String {
    let name = match site {
        Some(site) => format!("{site}.{queue}"),
        None => queue.to_string(),
    };
    match function {
        Some(function) => format!("{name}#{function}"),
        None => name,
    }
}

/// The queue the task running on this thread was consumed from (kept by the SDK's task
/// threads, [`crate::plugin`]).
pub use crate::plugin::current_task_queue_name;

/// The site of the running task's queue.
pub fn current_site() -> Option<String> {
    ParsedQueueName::current().and_then(|q| q.site)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_exactly_the_hub_contract() {
        let inputs = vec![json!("/mmfs1/data/f1"), json!({"path": "/mmfs1/data/f2"})];
        let mut status = FileActionStatus::new("my-plugin", inputs, json!(100), None).unwrap();
        status.add("processed", "/mmfs1/data/f1", None).unwrap();
        status
            .add(
                "failures",
                json!({"path": "/mmfs1/data/f2"}),
                Some("Reason xyz for the failure"),
            )
            .unwrap();
        let mut out = status.dump();
        let started = out["status"]
            .as_object_mut()
            .unwrap()
            .remove("started")
            .unwrap();
        assert!(started.as_str().unwrap().ends_with("+00:00"), "{started}");
        assert_eq!(
            out,
            json!({"jobid": 100, "paths": [{"path": "/mmfs1/data/f1"}],
                   "status": {"task": "my-plugin",
                              "input_paths": [{"path": "/mmfs1/data/f1"}, {"path": "/mmfs1/data/f2"}],
                              "input_total": 2,
                              "summary": {"failures": 1, "processed": 1, "skipped": 0},
                              "details": {"failures": [{"path": "/mmfs1/data/f2", "message": ["Reason xyz for the failure"]}],
                                          "processed": [{"path": "/mmfs1/data/f1"}], "skipped": []}}})
        );
    }

    #[test]
    fn states_paths_and_errors() {
        let mut status = FileActionStatus::new("t", vec![], json!(7), None).unwrap();
        status
            .add("skipped", json!({"path": "/s", "size": 3}), None)
            .unwrap();
        status.add("aborted", "/a", Some("why")).unwrap();
        status.add("processed", "/p", None).unwrap();
        let out = status.dump();
        assert_eq!(out["paths"], json!([{"path": "/p"}, {"path": "/s"}]));
        assert_eq!(out["status"]["summary"]["aborted"], 1);
        assert_eq!(
            out["status"]["details"]["skipped"],
            json!([{"path": "/s", "size": 3}])
        );
        assert_eq!(
            status.add("done", "/x", None).unwrap_err().exc_type,
            "ValueError"
        );
        assert_eq!(
            status.add("processed", 42, None).unwrap_err().exc_type,
            "TypeError"
        );
    }

    #[test]
    fn folders_expand_in_pages_without_following_symlinks() {
        let root = std::env::temp_dir().join(format!("expand-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        for name in ["a/1", "a/b/2", "a/b/3", "top"] {
            std::fs::write(root.join(name), "").unwrap();
        }
        std::os::unix::fs::symlink(&root, root.join("a/loop")).unwrap();
        let given = json!({"path": root.display().to_string(), "jobid": 1});
        let pages: Vec<Vec<Value>> = expand_paths(vec![given], 2).collect();
        let mut files: Vec<String> = pages
            .iter()
            .flatten()
            .map(|f| {
                f["path"]
                    .as_str()
                    .unwrap()
                    .strip_prefix(&format!("{}/", root.display()))
                    .unwrap()
                    .to_string()
            })
            .collect();
        files.sort();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(files, ["a/1", "a/b/2", "a/b/3", "a/loop", "top"]);
        assert!(pages.iter().all(|p| p.len() <= 2));
        assert!(pages.iter().flatten().all(|f| f["jobid"] == 1));
    }

    #[test]
    fn queue_names_round_trip_and_follow_the_running_task() {
        let q = ParsedQueueName::parse("london.highpriority#custom");
        assert_eq!(
            (q.site.as_deref(), q.queue.as_str(), q.function.as_deref()),
            (Some("london"), "highpriority", Some("custom"))
        );
        for name in [
            "london.highpriority#custom",
            "london.highpriority",
            "highpriority#custom",
            "celery",
        ] {
            assert_eq!(ParsedQueueName::parse(name).to_string(), name);
        }
        assert_eq!(
            format_queue_name(Some("paris"), "low", Some("checksum")),
            "paris.low#checksum"
        );
        assert_eq!(current_task_queue_name(), None);
        let inside = crate::plugin_tasks::with_current_queue(
            Some("london.highpriority#custom".into()),
            || {
                (
                    current_site(),
                    ParsedQueueName::current().map(|q| q.to_string()),
                )
            },
        );
        assert_eq!(
            inside,
            (
                Some("london".into()),
                Some("london.highpriority#custom".into())
            )
        );
        assert_eq!(current_site(), None);
    }
}
