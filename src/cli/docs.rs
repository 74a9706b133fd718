//! Shell completions and man pages, generated from the argument definitions so they never
//! drift from the code (the Debian package ships both).

use super::Cli;
use anyhow::Context;
use clap::CommandFactory;
use std::path::Path;
use std::process::ExitCode;

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "worker", &mut script);
    // A closed pipe (`| head`) is the reader's choice, not an error.
    use std::io::Write;
    match std::io::stdout().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: cannot write the completion script: {e}");
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}

/// Writes `worker.1` and one `worker-<command>.1` per command (and nested command) into `dir`.
pub fn man_pages(dir: &Path) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let command = Cli::command();
    write_page(dir, "worker", command)?;
    Ok(ExitCode::SUCCESS)
}

fn write_page(dir: &Path, name: &str, command: clap::Command) -> anyhow::Result<()> {
    let command = command
        .name(name.to_string())
        .display_name(name.to_string());
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        let sub_name = format!("{name}-{}", sub.get_name());
        write_page(dir, &sub_name, sub.clone())?;
    }
    Ok(())
}

/// The command-line reference of the book (`docs/src/reference/cli.md`): every visible command,
/// its usage, about text, arguments and flags with their help, environment variable, default and
/// possible values. `tests/docs.rs` checks the file equals this (and rewrites it with
/// `WORKER_UPDATE_DOCS=1`), so the page never drifts from the definitions.
pub fn markdown() -> String {
    let mut command = Cli::command();
    command.build();
    let mut out = String::from(
        "# Command line\n\n\
         <!-- Generated from the argument definitions (src/cli/) by `WORKER_UPDATE_DOCS=1 cargo \
         test --test docs`; do not edit by hand. -->\n\n\
         Every option of `worker` below is global: it goes before or after the command, and each \
         is also a `worker.toml` key and a `WORKER_*` environment variable (flag > environment > \
         file > default; see the [configuration reference](worker-toml.md)). Every command \
         takes `-h`/`--help`; `worker --version` prints the version.\n",
    );
    render_command(&mut out, &mut command, true);
    out
}

fn render_command(out: &mut String, command: &mut clap::Command, top: bool) {
    let path = command
        .get_bin_name()
        .unwrap_or(command.get_name())
        .to_string();
    out.push_str(&format!("\n## `{path}`\n\n"));
    if let Some(about) = command.get_long_about().or(command.get_about()) {
        out.push_str(&format!("{}\n\n", one_paragraph(&about.to_string())));
    }
    let usage = command.render_usage().to_string();
    out.push_str(&format!("```text\n{}\n```\n", usage.trim_end()));

    let visible: Vec<clap::Command> = command
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set() && sub.get_name() != "help")
        .cloned()
        .collect();
    if !visible.is_empty() {
        out.push_str("\nCommands:\n\n");
        for sub in &visible {
            let sub_path = format!("{path} {}", sub.get_name());
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            out.push_str(&format!(
                "- [`{}`](#{}): {}\n",
                sub.get_name(),
                sub_path.replace(' ', "-"),
                one_paragraph(&about)
            ));
        }
    }

    // Generated flags (help, version) are said once at the top; global options only on `worker`.
    let args: Vec<&clap::Arg> = command
        .get_arguments()
        .filter(|arg| !arg.is_hide_set())
        .filter(|arg| !matches!(arg.get_id().as_str(), "help" | "version"))
        .filter(|arg| top || !arg.is_global_set())
        .collect();
    let (positionals, options): (Vec<_>, Vec<_>) =
        args.into_iter().partition(|a| a.is_positional());
    for (title, list) in [("Arguments", positionals), ("Options", options)] {
        if list.is_empty() {
            continue;
        }
        out.push_str(&format!("\n{title}:\n\n"));
        for arg in list {
            out.push_str(&format!("- {}\n", arg_line(arg)));
        }
    }

    for mut sub in visible {
        render_command(out, &mut sub, false);
    }
}

/// One list item: the flag or value as typed, then what it is, then its variable, default and
/// possible values.
fn arg_line(arg: &clap::Arg) -> String {
    let value = arg
        .get_value_names()
        .and_then(|names| names.first())
        .map(|name| name.to_string())
        .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
    let takes_value = arg.get_action().takes_values();
    let many = matches!(arg.get_action(), clap::ArgAction::Append)
        || arg.get_num_args().is_some_and(|n| n.max_values() > 1);
    let mut shown = if arg.is_positional() {
        let v = if arg.is_required_set() {
            format!("<{value}>")
        } else {
            format!("[{value}]")
        };
        if many {
            format!("{v}...")
        } else {
            v
        }
    } else {
        let mut names = Vec::new();
        if let Some(short) = arg.get_short() {
            names.push(format!("-{short}"));
        }
        if let Some(long) = arg.get_long() {
            names.push(format!("--{long}"));
        }
        let mut s = names.join(", ");
        if takes_value {
            s.push_str(&format!(" <{value}>"));
        }
        s
    };
    shown = format!("`{shown}`");
    let mut notes = Vec::new();
    if let Some(aliases) = arg.get_visible_aliases() {
        for alias in aliases {
            notes.push(format!("alias `--{alias}`"));
        }
    }
    if !arg.is_positional() && matches!(arg.get_action(), clap::ArgAction::Append) {
        notes.push("repeatable".to_string());
    }
    if let Some(env) = arg.get_env() {
        notes.push(format!("env `{}`", env.to_string_lossy()));
    }
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| format!("`{}`", v.to_string_lossy()))
        .collect();
    if !defaults.is_empty() && takes_value {
        notes.push(format!("default {}", defaults.join(", ")));
    }
    let possible: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| format!("`{}`", v.get_name()))
        .collect();
    if takes_value && !possible.is_empty() {
        notes.push(format!("one of {}", possible.join(", ")));
    }
    let help = arg
        .get_long_help()
        .or(arg.get_help())
        .map(|h| one_paragraph(&h.to_string()))
        .unwrap_or_default();
    let mut line = shown;
    if !notes.is_empty() {
        line.push_str(&format!(" ({})", notes.join("; ")));
    }
    if !help.is_empty() {
        line.push_str(&format!(": {help}"));
    }
    line
}

/// Help text on one line: a list item or a table cell cannot hold a paragraph break.
fn one_paragraph(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
