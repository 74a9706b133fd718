//! Printing task progress and results the same way for `run` and `task run`, and writing to
//! stdout without panicking when the reader went away (`worker plugins list | head`).

use crate::task::{Failure, TaskEvent};
use serde_json::Value;
use std::io::Write;

/// Writes a line to stdout; a closed pipe ends the process quietly.
pub fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// Progress to stderr, streamed items to stdout (one JSON value per line).
pub fn event(ev: &TaskEvent) {
    match ev {
        TaskEvent::Progress {
            done,
            total,
            message,
        } => {
            let total = total.map(|t| format!("/{t}")).unwrap_or_default();
            let message = message
                .as_deref()
                .map(|m| format!(" {m}"))
                .unwrap_or_default();
            eprintln!("progress: {done}{total}{message}");
        }
        TaskEvent::Stream { items } => {
            for item in items {
                line(&item.to_string());
            }
        }
        TaskEvent::Log { line } => eprintln!("log: {line}"),
        TaskEvent::Retrying { attempt, reason } => {
            eprintln!("attempt {attempt} failed ({reason}); running it again")
        }
    }
}

pub fn result(value: &Value) {
    line(&value.to_string());
}

pub fn failure(f: &Failure) {
    eprintln!("error: {}: {}", f.exc_type, f.message);
    if let Some(tb) = &f.traceback {
        eprintln!("{}", tb.trim_end());
    }
}

/// Positional task arguments: JSON where they parse (`26`, `"x"`, `[1,2]`), else strings.
pub fn parse_args(args: &[String]) -> Vec<Value> {
    args.iter()
        .map(|a| serde_json::from_str(a).unwrap_or_else(|_| Value::String(a.clone())))
        .collect()
}

pub fn parse_kwargs(kwargs: Option<&str>) -> anyhow::Result<serde_json::Map<String, Value>> {
    match kwargs {
        None => Ok(Default::default()),
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(map)) => Ok(map),
            _ => anyhow::bail!("--kwargs must be a JSON object, e.g. --kwargs '{{\"n\": 3}}'"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn args_are_json_when_they_parse() {
        let args = parse_args(&["26".into(), "hello".into(), "[1,2]".into(), "\"7\"".into()]);
        assert_eq!(
            args,
            vec![json!(26), json!("hello"), json!([1, 2]), json!("7")]
        );
    }

    #[test]
    fn kwargs_must_be_an_object() {
        assert!(parse_kwargs(Some("[1]")).is_err());
        assert_eq!(parse_kwargs(Some("{\"a\":1}")).unwrap()["a"], 1);
    }
}
