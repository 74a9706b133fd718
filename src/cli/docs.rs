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
