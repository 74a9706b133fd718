//! `provides` in `plugin.toml` (protocol 1.5): a plugin that is a queue backend (it offers the
//! worker tasks from its own queue) or a result backend (it stores final states), with the
//! `[queue_backend]` and `[result_backend]` tables that tune each.

use plugin_protocol::provides;
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Default and bounds of `[queue_backend] window`.
pub const DEFAULT_WINDOW: u32 = 16;
pub const MAX_WINDOW: u32 = 10_000;

/// What a plugin provides besides tasks; `None` for what it does not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Backends {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_backend: Option<QueueBackend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_backend: Option<ResultBackend>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueBackend {
    /// `task.offer` requests one process may have unanswered.
    pub window: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResultBackend {
    /// The task names whose final states it stores: a name, a prefix ending in `*`, or `*`.
    pub tasks: Vec<String>,
}

impl ResultBackend {
    pub fn stores(&self, task: &str) -> bool {
        self.tasks.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => task.starts_with(prefix),
            None => p == task,
        })
    }
}

impl Backends {
    /// The names `provides` lists, for `inspect` and status.
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        if self.queue_backend.is_some() {
            kinds.push(provides::QUEUE_BACKEND);
        }
        if self.result_backend.is_some() {
            kinds.push(provides::RESULT_BACKEND);
        }
        kinds
    }

    pub fn is_empty(&self) -> bool {
        self.queue_backend.is_none() && self.result_backend.is_none()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueueBackend {
    #[serde(default)]
    window: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResultBackend {
    #[serde(default)]
    tasks: Option<Spanned<Vec<String>>>,
}

impl super::Checker<'_> {
    /// `provides` and its tables, checked together: a table needs its kind in `provides`.
    pub(super) fn backends(
        &self,
        provides: Option<Spanned<Vec<String>>>,
        queue_backend: Option<Spanned<RawQueueBackend>>,
        result_backend: Option<Spanned<RawResultBackend>>,
    ) -> Result<Backends, String> {
        let (listed, span) = match provides {
            Some(p) => {
                let span = p.span();
                (p.into_inner(), span)
            }
            None => (Vec::new(), 0..0),
        };
        for kind in &listed {
            if kind != provides::QUEUE_BACKEND && kind != provides::RESULT_BACKEND {
                let msg = format!(
                    "`{kind}` is not something a plugin provides; use \"{}\" or \"{}\"",
                    provides::QUEUE_BACKEND,
                    provides::RESULT_BACKEND
                );
                return Err(self.err("provides", span, &msg));
            }
        }
        let has = |kind: &str| listed.iter().any(|k| k == kind);
        let queue = self.queue_backend(has(provides::QUEUE_BACKEND), queue_backend)?;
        let results = self.result_backend(has(provides::RESULT_BACKEND), result_backend)?;
        Ok(Backends {
            queue_backend: queue,
            result_backend: results,
        })
    }

    fn queue_backend(
        &self,
        provided: bool,
        table: Option<Spanned<RawQueueBackend>>,
    ) -> Result<Option<QueueBackend>, String> {
        if !provided {
            return match table {
                Some(t) => Err(self.err(
                    "queue_backend",
                    t.span(),
                    "add \"queue_backend\" to `provides` to use this table",
                )),
                None => Ok(None),
            };
        }
        let window = match table.and_then(|t| t.into_inner().window) {
            Some(w) if *w.get_ref() == 0 || *w.get_ref() > MAX_WINDOW => {
                let msg = format!("must be between 1 and {MAX_WINDOW}");
                return Err(self.err("queue_backend.window", w.span(), &msg));
            }
            Some(w) => w.into_inner(),
            None => DEFAULT_WINDOW,
        };
        Ok(Some(QueueBackend { window }))
    }

    fn result_backend(
        &self,
        provided: bool,
        table: Option<Spanned<RawResultBackend>>,
    ) -> Result<Option<ResultBackend>, String> {
        if !provided {
            return match table {
                Some(t) => Err(self.err(
                    "result_backend",
                    t.span(),
                    "add \"result_backend\" to `provides` to use this table",
                )),
                None => Ok(None),
            };
        }
        let tasks = match table.and_then(|t| t.into_inner().tasks) {
            Some(t) if t.get_ref().is_empty() || t.get_ref().iter().any(|p| !valid_pattern(p)) => {
                let msg =
                    "list task names, prefixes ending in `*`, or \"*\" (a `*` only at the end)";
                return Err(self.err("result_backend.tasks", t.span(), msg));
            }
            Some(t) => t.into_inner(),
            None => vec!["*".to_string()],
        };
        Ok(Some(ResultBackend { tasks }))
    }
}

fn valid_pattern(p: &str) -> bool {
    !p.trim().is_empty() && !p.trim_end_matches('*').contains('*') && p.matches('*').count() <= 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    fn parse(extra: &str) -> Result<Manifest, String> {
        let text = format!("name = \"q\"\nversion = \"1.0.0\"\ncommand = [\"/bin/true\"]\n{extra}");
        Manifest::parse(&text, std::path::Path::new("/tmp")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_queue_backend_needs_no_task_and_gets_the_default_window() {
        let m = parse("provides = [\"queue_backend\"]").unwrap();
        assert_eq!(m.backends.queue_backend, Some(QueueBackend { window: 16 }));
        assert_eq!(m.backends.result_backend, None);
        let m = parse("provides = [\"queue_backend\"]\n[queue_backend]\nwindow = 3").unwrap();
        assert_eq!(m.backends.queue_backend.unwrap().window, 3);
    }

    #[test]
    fn a_result_backend_stores_what_its_patterns_name() {
        let m = parse("provides = [\"result_backend\"]").unwrap();
        assert!(m.backends.result_backend.unwrap().stores("anything"));
        let m =
            parse("provides = [\"result_backend\"]\n[result_backend]\ntasks = [\"pg.*\", \"add\"]")
                .unwrap();
        let r = m.backends.result_backend.unwrap();
        assert!(r.stores("pg.copy") && r.stores("add"));
        assert!(!r.stores("addition") && !r.stores("other"));
    }

    #[test]
    fn mistakes_are_named_with_the_fix() {
        let cases = [
            ("provides = [\"queue\"]", "not something a plugin provides"),
            (
                "events = [\"*\"]\n[queue_backend]\nwindow = 4",
                "add \"queue_backend\" to `provides`",
            ),
            (
                "events = [\"*\"]\n[result_backend]\ntasks = [\"*\"]",
                "add \"result_backend\" to `provides`",
            ),
            (
                "provides = [\"queue_backend\"]\n[queue_backend]\nwindow = 0",
                "between 1 and 10000",
            ),
            (
                "provides = [\"result_backend\"]\n[result_backend]\ntasks = []",
                "list task names",
            ),
            (
                "provides = [\"result_backend\"]\n[result_backend]\ntasks = [\"a*b\"]",
                "only at the end",
            ),
            ("", "declare at least one [[tasks]] entry"),
        ];
        for (extra, expected) in cases {
            let err = parse(extra).unwrap_err();
            assert!(err.contains(expected), "{extra:?}: {err}");
        }
    }
}
