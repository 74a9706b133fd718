//! What makes an `initialize` reply acceptable, as one pure function shared by the instance
//! actor and `worker plugins test`, so both judge a plugin by the same rules and words.

use crate::manifest::Manifest;
use plugin_protocol::{
    protocol_major, ErrorObject, InitializeParams, InitializeResult, InstanceRef, Limits, PeerInfo,
    PROTOCOL_VERSION,
};
use serde_json::Value;

/// The `initialize` request's params for instance `index` of the plugin: built here once for
/// the daemon and `plugins test` alike.
pub fn initialize_params(
    m: &Manifest,
    worker_name: &str,
    max_line_bytes: usize,
    index: u32,
) -> InitializeParams {
    InitializeParams {
        protocol_version: PROTOCOL_VERSION.into(),
        worker: PeerInfo {
            name: worker_name.into(),
            version: crate::WORKER_VERSION.into(),
        },
        plugin: InstanceRef {
            name: m.name.clone(),
            instance: index,
        },
        settings: m.settings.clone(),
        limits: Limits {
            max_line_bytes: max_line_bytes as u64,
            concurrency: m.concurrency,
        },
        queue_backend: m
            .backends
            .queue_backend
            .as_ref()
            .map(|q| plugin_protocol::QueueBackendInit { window: q.window }),
    }
}

/// Why an `initialize` reply was refused; each says which rule failed and how to fix it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandshakeError {
    #[error("its `initialize` result is malformed: {0}")]
    Malformed(String),
    #[error("it answered `initialize` with error {code}: {message}")]
    Refused { code: i64, message: String },
    #[error("it speaks protocol version {0} but this worker speaks {PROTOCOL_VERSION} (major versions must match)")]
    ProtocolVersion(String),
    #[error("it introduces itself as `{reported}` but plugin.toml names it `{declared}` (make the names match)")]
    Name { reported: String, declared: String },
    #[error("it serves task(s) {} that plugin.toml does not declare (add them to [[tasks]])", .0.join(", "))]
    Undeclared(Vec<String>),
    #[error("plugin.toml declares task(s) {} that the plugin does not serve", .0.join(", "))]
    Missing(Vec<String>),
}

/// Checks the reply to `initialize` against the manifest: well-formed, the same protocol major
/// version, the manifest's name, and exactly the declared tasks.
pub fn check(
    reply: Result<Value, ErrorObject>,
    m: &Manifest,
) -> Result<InitializeResult, HandshakeError> {
    let result: InitializeResult = match reply {
        Ok(value) => {
            serde_json::from_value(value).map_err(|e| HandshakeError::Malformed(e.to_string()))?
        }
        Err(e) => {
            return Err(HandshakeError::Refused {
                code: e.code,
                message: e.message,
            })
        }
    };
    if protocol_major(&result.protocol_version) != protocol_major(PROTOCOL_VERSION) {
        return Err(HandshakeError::ProtocolVersion(result.protocol_version));
    }
    if result.plugin.name != m.name {
        return Err(HandshakeError::Name {
            reported: result.plugin.name,
            declared: m.name.clone(),
        });
    }
    let declared: Vec<&str> = m.task_names().collect();
    let undeclared: Vec<String> = result
        .tasks
        .iter()
        .map(|t| t.name.clone())
        .filter(|t| !declared.contains(&t.as_str()))
        .collect();
    if !undeclared.is_empty() {
        return Err(HandshakeError::Undeclared(undeclared));
    }
    let missing: Vec<String> = declared
        .into_iter()
        .filter(|d| !result.tasks.iter().any(|t| t.name == *d))
        .map(str::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(HandshakeError::Missing(missing));
    }
    Ok(result)
}

/// A warning when the plugin reports another version than its manifest: allowed (the
/// manifest's version decides installs) but worth fixing, since logs and status would disagree.
pub fn version_mismatch(result: &InitializeResult, m: &Manifest) -> Option<String> {
    (result.plugin.version != m.version).then(|| {
        format!(
            "it reports version {} but plugin.toml says {} (make them match)",
            result.plugin.version, m.version
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn manifest() -> Manifest {
        Manifest::parse(
            "name = \"p\"\nversion = \"1\"\ncommand = [\"x\"]\n[[tasks]]\nname = \"a\"\n",
            Path::new("/p"),
        )
        .unwrap()
    }

    fn reply(version: &str, tasks: &[&str]) -> Result<Value, ErrorObject> {
        let tasks: Vec<Value> = tasks.iter().map(|t| json!({ "name": t })).collect();
        Ok(
            json!({"protocol_version": version, "plugin": {"name": "p", "version": "1"}, "tasks": tasks}),
        )
    }

    #[test]
    fn each_rule_names_itself() {
        assert!(check(reply("1.3", &["a"]), &manifest()).is_ok());
        assert!(check(reply("2.0", &["a"]), &manifest())
            .unwrap_err()
            .to_string()
            .contains("protocol version 2.0"));
        assert!(check(reply("1.0", &["a", "b"]), &manifest())
            .unwrap_err()
            .to_string()
            .contains("b that plugin.toml does not declare"));
        assert!(check(reply("1.0", &[]), &manifest())
            .unwrap_err()
            .to_string()
            .contains("declares task(s) a"));
        assert!(check(Ok(json!([1])), &manifest())
            .unwrap_err()
            .to_string()
            .contains("malformed"));
        assert!(check(Err(ErrorObject::new(-1, "no")), &manifest())
            .unwrap_err()
            .to_string()
            .contains("error -1: no"));
        let other = Ok(
            json!({"protocol_version": "1.0", "plugin": {"name": "q", "version": "1"}, "tasks": [{"name": "a"}]}),
        );
        assert!(check(other, &manifest())
            .unwrap_err()
            .to_string()
            .contains("introduces itself as `q` but plugin.toml names it `p`"));
        let newer = Ok(
            json!({"protocol_version": "1.0", "plugin": {"name": "p", "version": "2"}, "tasks": [{"name": "a"}]}),
        );
        let r = check(newer, &manifest()).expect("a version mismatch is allowed");
        assert_eq!(
            version_mismatch(&r, &manifest()).unwrap(),
            "it reports version 2 but plugin.toml says 1 (make them match)"
        );
    }
}
