//! Python's `repr` of JSON values, as Celery's wire shows arguments and results in text:
//! `argsrepr`/`kwargsrepr` headers, `task-received` args, `task-succeeded` results, and the
//! `Type('message')` of `task-failed`.

use serde_json::{Map, Value};

/// At most this many characters of a result's repr, as Celery's `saferepr` keeps.
pub const RESULT_REPR_MAX: usize = 1024;

/// Python's `repr` of a JSON value, as `task-succeeded` carries a result (Celery's `saferepr`,
/// cut to 1024 characters).
pub fn repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(value, &mut out);
    if out.chars().count() > RESULT_REPR_MAX {
        out = out.chars().take(RESULT_REPR_MAX - 3).collect::<String>() + "...";
    }
    out
}

fn write_repr(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => out.push_str(&str_repr(s)),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => write_map(map, out),
    }
}

fn write_map(map: &Map<String, Value>, out: &mut String) {
    out.push('{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&str_repr(k));
        out.push_str(": ");
        write_repr(v, out);
    }
    out.push('}');
}

/// A Python string literal: single quotes unless the text has one and no double quote.
fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Positional arguments as Python shows a tuple: `(26,)`, `(1, 2)`, `()`.
pub fn args_repr(args: &[Value]) -> String {
    let items: Vec<String> = args.iter().map(repr).collect();
    match items.len() {
        1 => format!("({},)", items[0]),
        _ => format!("({})", items.join(", ")),
    }
}

/// Keyword arguments as Python shows a dict.
pub fn kwargs_repr(kwargs: &Map<String, Value>) -> String {
    let mut out = String::new();
    write_map(kwargs, &mut out);
    out
}

/// `ExcType('message')`, as Celery's `task-failed` carries `repr(exc)`.
pub fn exception_repr(exc_type: &str, message: &str) -> String {
    format!("{exc_type}({})", str_repr(message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_shown_as_python_shows_them() {
        assert_eq!(repr(&json!(5)), "5");
        assert_eq!(repr(&json!(null)), "None");
        assert_eq!(
            repr(&json!({"a": [true, false, 1.5], "b": "it's"})),
            "{'a': [True, False, 1.5], 'b': \"it's\"}"
        );
        assert_eq!(repr(&json!("a\nb'\"")), "'a\\nb\\'\"'");
        let long = repr(&json!("x".repeat(5000)));
        assert_eq!(long.chars().count(), RESULT_REPR_MAX);
        assert!(long.ends_with("..."));
        assert_eq!(exception_repr("ValueError", "bad"), "ValueError('bad')");
        assert_eq!(args_repr(&[json!(26)]), "(26,)");
        assert_eq!(args_repr(&[json!(1), json!("a")]), "(1, 'a')");
        assert_eq!(args_repr(&[]), "()");
    }
}
