//! `[[tests]]` in `plugin.toml`: the self-tests `worker plugins test` runs, each for a
//! declared task, with what it expects.

use super::{to_json, Expect, SelfTest, TaskDecl};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSelfTest {
    task: String,
    #[serde(default)]
    args: Vec<toml::Value>,
    #[serde(default)]
    kwargs: toml::Table,
    expect: Option<toml::Value>,
    expect_error: Option<String>,
}

/// The `[[tests]]` entries, each for a declared task, with what it expects.
pub(super) fn self_tests(
    raw: Vec<RawSelfTest>,
    tasks: &[TaskDecl],
) -> Result<Vec<SelfTest>, String> {
    let mut tests = Vec::new();
    for (i, t) in raw.into_iter().enumerate() {
        let at = format!("key `tests` (entry {})", i + 1);
        if !tasks.iter().any(|d| d.name == t.task) {
            return Err(format!(
                "{at}: task `{}` is not declared in [[tasks]]",
                t.task
            ));
        }
        let expect = match (t.expect, t.expect_error) {
            (Some(_), Some(_)) => {
                return Err(format!("{at}: give `expect` or `expect_error`, not both"))
            }
            (Some(v), None) => Expect::Result(to_json(&v)),
            (None, Some(e)) => Expect::Error(e),
            (None, None) => Expect::Success,
        };
        tests.push(SelfTest {
            task: t.task,
            args: t.args.iter().map(to_json).collect(),
            kwargs: match to_json(&t.kwargs) {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            expect,
        });
    }
    Ok(tests)
}
