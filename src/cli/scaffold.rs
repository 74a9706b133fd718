//! `worker plugins create NAME --lang python|node|rust`: a working plugin to start from, with
//! one example task and a self-test, so `worker plugins test NAME` passes unchanged.

use super::output;
use crate::config::Config;
use crate::manifest;
use std::path::Path;
use std::process::ExitCode;

/// Where a scaffold installs an SDK from: this checkout's `plugin-protocol/<rel>`, or, in the
/// packaged build (or when the checkout is gone), `packaged`, which the Debian package ships.
fn sdk_source(rel: &str, packaged: String) -> String {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("plugin-protocol")
        .join(rel);
    if cfg!(feature = "packaged") || !checkout.exists() {
        packaged
    } else {
        checkout.display().to_string()
    }
}

/// The Python SDK: the checkout's package, or the packaged wheel (installed with no network).
fn python_sdk() -> String {
    let wheel = format!("worker_plugin-{PYTHON_SDK_VERSION}-py3-none-any.whl");
    sdk_source("python", format!("/usr/share/worker/sdk/python/{wheel}"))
}

/// The version in `plugin-protocol/python/pyproject.toml` (the packaged wheel's name has it).
const PYTHON_SDK_VERSION: &str = "1.5.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Python,
    Node,
    Rust,
}

pub fn create(config: &Config, name: &str, lang: Lang) -> anyhow::Result<ExitCode> {
    if !manifest::is_valid_name(name) {
        anyhow::bail!("`{name}` is not a valid plugin name: use 1-64 characters from a-z, 0-9, `-`, `_` and `.`, starting with a letter or digit");
    }
    let dir = config.plugins_dir.join(name);
    if dir.exists() {
        anyhow::bail!(
            "{} already exists; choose another name or remove it first",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir)?;
    let task = format!("{name}.hello");
    let files = match lang {
        Lang::Python => python(name, &task),
        Lang::Node => node(name, &task),
        Lang::Rust => rust(name, &task),
    };
    for (file, content) in &files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, content)?;
    }
    output::line(&format!(
        "created {} ({lang:?}) with task `{task}`:",
        dir.display()
    ));
    for (file, _) in &files {
        output::line(&format!("  {}", Path::new(name).join(file).display()));
    }
    output::line(&format!(
        "try it: worker plugins test {name}, then: worker plugins install {name}"
    ));
    Ok(ExitCode::SUCCESS)
}

fn manifest(name: &str, task: &str, command: &str, install: &str) -> String {
    format!(
        r#"name = "{name}"
version = "0.1.0"
description = "{name}: describe what it does"
command = {command}
{install}
instances = 1
concurrency = 4

[[tasks]]
name = "{task}"
description = "Greets someone"
params = {{ who = "string: whom to greet (default: world)" }}

# Self-tests for `worker plugins test {name}`.
[[tests]]
task = "{task}"
args = ["world"]
expect = "hello, world"
"#
    )
}

fn readme(name: &str, task: &str, how: &str) -> String {
    format!(
        "# {name}\n\nA `worker` plugin. Its task `{task}` greets its first argument.\n\n{how}\n\n\
         - Check it: `worker plugins test {name}` (runs the install steps in a scratch copy, then the handshake, protocol conformance and the `[[tests]]` in plugin.toml).\n\
         - Install it: `worker plugins install {name}` (a running daemon starts it; bump `version` for each update).\n\
         - Run it once: `worker run {task} world`.\n\
         - Add a task: write the handler, declare it under `[[tasks]]` in plugin.toml, add a `[[tests]]` entry.\n\
         - Log to stderr, never stdout: stdout carries the protocol.\n"
    )
}

fn python(name: &str, task: &str) -> Vec<(String, String)> {
    let main = format!(
        r#""""The {name} plugin."""

from worker_plugin import Plugin

plugin = Plugin("{name}", "0.1.0")


@plugin.task("{task}", description="Greets someone")
def hello(ctx, who="world"):
    ctx.progress(1, 1)
    return "hello, %s" % who


if __name__ == "__main__":
    plugin.run()
"#
    );
    vec![
        (
            "plugin.toml".into(),
            manifest(
                name,
                task,
                r#"[".venv/bin/python", "-u", "main.py"]"#,
 &format!(
                    r#"# Run by `worker plugins install` in the installed copy: the plugin's own virtualenv
# with the worker SDK and requirements.txt, so its dependencies never meet the worker's or
# another plugin's.
install = [
  ["/usr/bin/python3", "-m", "venv", ".venv"],
  [".venv/bin/python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", {:?}],
  [".venv/bin/python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", "requirements.txt"],
]"#,
                    python_sdk()
                ),
            ),
        ),
        ("main.py".into(), main),
        (
            "requirements.txt".into(),
            "# This plugin's own dependencies, one per line (installed into its .venv).\n".into(),
        ),
        (
            "README.md".into(),
            readme(
                name,
                task,
                "Python, with the `worker-plugin` SDK installed into the plugin's own .venv by the install steps. Dependencies go in requirements.txt.",
            ),
        ),
    ]
}

fn node(name: &str, task: &str) -> Vec<(String, String)> {
    let main = format!(
        r#"// The {name} plugin, with the worker's Node.js SDK (installed into node_modules).
'use strict';
const {{ Plugin }} = require('worker-plugin');

const plugin = new Plugin('{name}', '0.1.0');
plugin.task('{task}', {{ description: 'Greets someone' }}, (ctx, who = 'world') => {{
  ctx.progress(1, 1);
  return `hello, ${{who}}`;
}});
plugin.run();
"#
    );
    let package = format!(
        "{{\n  \"name\": \"{name}\",\n  \"version\": \"0.1.0\",\n  \"private\": true,\n  \"dependencies\": {{\n    \"worker-plugin\": \"file:{}\"\n  }}\n}}\n",
        node_sdk()
    );
    vec![
        (
            "plugin.toml".into(),
            manifest(
                name,
                task,
                r#"["/usr/bin/node", "main.js"]"#,
                r#"# Run by `worker plugins install` in the installed copy: its own node_modules, with the
# SDK copied in (--install-links), so it needs nothing outside its directory at run time.
install = [["npm", "install", "--install-links", "--omit=dev", "--no-audit", "--no-fund"]]"#,
            ),
        ),
        ("main.js".into(), main),
        ("package.json".into(), package),
        (
            "README.md".into(),
            readme(
                name,
                task,
                "Node.js, with the `worker-plugin` SDK (a dependency in package.json, installed into node_modules by the install step). Add dependencies to package.json.",
            ),
        ),
    ]
}

/// The Node.js SDK: the checkout's package, or the packaged copy.
fn node_sdk() -> String {
    sdk_source("node", "/usr/share/worker/sdk/node".into())
}

fn rust(name: &str, task: &str) -> Vec<(String, String)> {
    let crate_name = name.replace('.', "-");
    // Inside this checkout, depend on its protocol crate by path; elsewhere, by version.
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin-protocol");
    let dep = if sdk.is_dir() {
        format!(
            "plugin-protocol = {{ path = {:?} }}",
            sdk.display().to_string()
        )
    } else {
        format!("plugin-protocol = \"{}\"", env!("CARGO_PKG_VERSION"))
    };
    let cargo = format!(
        "[package]\nname = \"{crate_name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\n{dep}\nserde_json = \"1\"\n\n# Its own workspace, so it never joins an enclosing one.\n[workspace]\n"
    );
    let main = format!(
        r#"//! The {name} plugin.

use plugin_protocol::plugin::Plugin;
use serde_json::{{json, Value}};

fn main() {{
    let result = Plugin::new("{name}", env!("CARGO_PKG_VERSION"))
        .task("{task}", "Greets someone", |ctx, params| {{
            ctx.progress(1, Some(1), None);
            let who = params.args.first().and_then(Value::as_str).unwrap_or("world");
            Ok(json!(format!("hello, {{who}}")))
        }})
        .run();
    if let Err(e) = result {{
        eprintln!("{name}: {{e}}");
        std::process::exit(1);
    }}
}}
"#
    );
    vec![
        (
            "plugin.toml".into(),
            manifest(
                name,
                task,
                &format!("[\"target/release/{crate_name}\"]"),
                "# Run by `worker plugins install` (and `worker plugins test`) in a copy of this directory.\ninstall = [[\"cargo\", \"build\", \"--release\", \"--quiet\"]]",
            ),
        ),
        ("Cargo.toml".into(), cargo),
        ("src/main.rs".into(), main),
        (
            "README.md".into(),
            readme(
                name,
                task,
                "Rust, with the `plugin-protocol` SDK. Install builds it with `cargo build --release`.",
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_packaged_wheel_name_follows_the_python_sdk_version() {
        let pyproject = include_str!("../../plugin-protocol/python/pyproject.toml");
        let version = format!("version = \"{}\"", super::PYTHON_SDK_VERSION);
        assert!(
            pyproject.contains(&version),
            "bump PYTHON_SDK_VERSION with pyproject.toml"
        );
    }
}
