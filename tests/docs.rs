//! The README and the book (`docs/`) checked against the repository and the code: every
//! relative link and `#anchor` resolves, every `worker` line of a `sh,runnable` block parses
//! with the real argument definitions, the command-line reference is what the code generates,
//! and `SUMMARY.md` lists every page. Nothing is run and no network is used.
//!
//! `WORKER_UPDATE_DOCS=1 cargo test --test docs` rewrites `docs/src/reference/cli.md`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn book_src() -> PathBuf {
    root().join("docs/src")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every `.md` file under `dir`, sorted.
fn markdown_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a readable directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The README and every page of the book.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md")];
    docs.extend(markdown_files(&book_src()));
    docs
}

/// `a/./b/../c` -> `a/c`, without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn shown(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The text mdBook renders for a page: each `{{#include FILE}}` replaced by the file (paths
/// are relative to the page; a `:anchor` or line range after the path is ignored, the whole
/// file is taken). A missing file is an error here, as it is for `mdbook build`.
fn expanded(path: &Path) -> String {
    expand(path, &read(path), 0)
}

fn expand(path: &Path, text: &str, depth: usize) -> String {
    assert!(depth < 8, "{}: includes nest too deep", shown(path));
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{#include ") {
        let end = start
            + rest[start..]
                .find("}}")
                .unwrap_or_else(|| panic!("{}: unclosed {{{{#include", shown(path)));
        out.push_str(&rest[..start]);
        let spec = rest[start + "{{#include ".len()..end].trim();
        let file = spec.split(':').next().unwrap_or(spec);
        let target = normalize(&path.parent().expect("a file has a directory").join(file));
        assert!(
            target.is_file(),
            "{}: includes {file}, which does not exist",
            shown(path)
        );
        out.push_str(&expand(&target, &read(&target), depth + 1));
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A fenced code block: its info string and its lines.
struct CodeBlock {
    info: String,
    lines: Vec<String>,
}

/// A document split into prose (code blocks blanked out) and its fenced code blocks.
struct Parsed {
    prose: String,
    blocks: Vec<CodeBlock>,
}

fn parse(text: &str) -> Parsed {
    let mut prose = String::new();
    let mut blocks = Vec::new();
    let mut open: Option<(String, CodeBlock)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let fence: String = trimmed
            .chars()
            .take_while(|&c| c == '`' || c == '~')
            .collect();
        let is_fence = fence.len() >= 3 && fence.chars().all(|c| c == fence.as_bytes()[0] as char);
        match open.take() {
            Some((opening, block)) if is_fence && fence.starts_with(&opening) => {
                if trimmed[fence.len()..].trim().is_empty() {
                    blocks.push(block);
                } else {
                    open = Some((opening, block));
                }
            }
            Some((opening, mut block)) => {
                block.lines.push(line.to_string());
                open = Some((opening, block));
            }
            None if is_fence => {
                let info = trimmed[fence.len()..].trim().to_string();
                open = Some((
                    fence,
                    CodeBlock {
                        info,
                        lines: Vec::new(),
                    },
                ));
            }
            None => {
                prose.push_str(line);
            }
        }
        prose.push('\n');
    }
    if let Some((_, block)) = open {
        blocks.push(block);
    }
    Parsed { prose, blocks }
}

/// Prose without inline code spans (a backtick run closes with a run of the same length, also
/// across lines), so a `[x](y)` inside code is not taken for a link.
fn without_code_spans(prose: &str) -> String {
    let chars: Vec<char> = prose.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|&&c| c == '`').count();
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let n = chars[j..].iter().take_while(|&&c| c == '`').count();
                if n == run {
                    close = Some(j + n);
                    break;
                }
                j += n;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                // Keep the line count, drop the code.
                out.extend(chars[i..end].iter().filter(|&&c| c == '\n'));
                out.push_str("CODE");
                i = end;
            }
            None => {
                out.extend(&chars[i..i + run]);
                i += run;
            }
        }
    }
    out
}

/// Every link target in the prose: `[text](target)` and `[label]: target` definitions.
fn link_targets(prose: &str) -> Vec<String> {
    let prose = without_code_spans(prose);
    let mut targets = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        if let Some(end) = after.find(')') {
            let target = after[..end].split_whitespace().next().unwrap_or("");
            targets.push(target.trim_matches(['<', '>']).to_string());
        }
        rest = after;
    }
    for line in prose.lines() {
        let line = line.trim_start();
        if let (true, Some(at)) = (line.starts_with('['), line.find("]: ")) {
            targets.push(
                line[at + 3..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            );
        }
    }
    targets
}

/// A heading's anchor as GitHub and mdBook make it: markup dropped, lower case, letters,
/// digits, `-` and `_` kept, spaces to `-`, everything else dropped.
fn slug(heading: &str) -> String {
    // `[text](url)` -> `text`
    let mut text = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        match rest[open..].find("](").map(|m| open + m) {
            Some(mid) if rest[mid..].contains(')') => {
                text.push_str(&rest[..open]);
                text.push_str(&rest[open + 1..mid]);
                let close = mid + rest[mid..].find(')').expect("checked above");
                rest = &rest[close + 1..];
            }
            _ => break,
        }
    }
    text.push_str(rest);
    text.trim()
        .chars()
        .filter_map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                Some(c.to_lowercase().next().unwrap_or(c))
            } else if c == ' ' {
                Some('-')
            } else {
                None
            }
        })
        .collect()
}

/// The anchors of a document's headings, duplicates numbered as GitHub and mdBook number them.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for line in parse(text).prose.lines() {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(line[hashes..].trim().trim_end_matches('#'));
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

fn is_external(target: &str) -> bool {
    target.contains("://") || target.starts_with("mailto:")
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let book = book_src();
    let mut problems = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let in_book = doc.starts_with(&book);
        let text = if in_book { expanded(&doc) } else { read(&doc) };
        let dir = doc.parent().expect("a file has a directory");
        for target in link_targets(&parse(&text).prose) {
            if target.is_empty() || is_external(&target) {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((file, anchor)) => (file, Some(anchor)),
                None => (target.as_str(), None),
            };
            let resolved = if file.is_empty() {
                doc.clone()
            } else {
                normalize(&dir.join(file))
            };
            if !resolved.exists() {
                problems.push(format!("{}: `{target}`: no such file", shown(&doc)));
                continue;
            }
            // The built book holds only what is under docs/src: a link out of it would be
            // broken there (include the file in a page instead).
            if in_book && !resolved.starts_with(&book) {
                problems.push(format!(
                    "{}: `{target}` leaves docs/src, so it is broken in the built book",
                    shown(&doc)
                ));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if resolved.extension().is_none_or(|e| e != "md") {
                problems.push(format!(
                    "{}: `{target}`: an anchor into a non-Markdown file",
                    shown(&doc)
                ));
                continue;
            }
            let heads = if resolved.starts_with(&book) {
                anchors(&expanded(&resolved))
            } else {
                anchors(&read(&resolved))
            };
            if !heads.contains(anchor) {
                problems.push(format!(
                    "{}: `{target}`: no heading with anchor `{anchor}` in {}",
                    shown(&doc),
                    shown(&resolved)
                ));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the parser broken?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

/// Shell words of a plain command line (quotes and backslashes as sh reads them), or why it is
/// not plain.
fn shell_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("unclosed single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("unclosed double quote".into()),
                        },
                        Some(c @ ('$' | '`')) => {
                            return Err(format!("`{c}` inside double quotes"));
                        }
                        Some(c) => word.push(c),
                        None => return Err("unclosed double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.push(chars.next().ok_or("a trailing backslash")?);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '|' | ';' | '<' | '>' | '$' | '`' | '(' | ')' => {
                return Err(format!("shell syntax `{c}`"));
            }
            '&' => {
                // Only a trailing `&` (run in the background, maybe before a comment) is plain.
                let rest: String = chars.clone().collect();
                let rest = rest.trim_start();
                if !(rest.is_empty() || rest.starts_with('#')) {
                    return Err("shell syntax `&`".into());
                }
                break;
            }
            '#' if !in_word => break,
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The words of a command line; `$W` (the docs' alias for the built binary) is the one
/// unquoted expansion allowed, and only as the program.
fn command_words(line: &str) -> Result<Vec<String>, String> {
    match line.strip_prefix("$W ") {
        Some(rest) => {
            let mut words = shell_words(rest)?;
            words.insert(0, "$W".into());
            Ok(words)
        }
        None => shell_words(line),
    }
}

/// The arguments after the program, when the line runs `worker` (as `worker`, `$W`,
/// `cargo run --release --`, each maybe after `sudo -u USER`).
fn worker_args(words: &[String]) -> Option<&[String]> {
    let mut words = words;
    if words.len() > 3 && words[0] == "sudo" && words[1] == "-u" {
        words = &words[3..];
    }
    match words {
        [first, rest @ ..] if first == "worker" || first == "$W" => Some(rest),
        [cargo, run, release, dashes, rest @ ..]
            if cargo == "cargo" && run == "run" && release == "--release" && dashes == "--" =>
        {
            Some(rest)
        }
        _ => None,
    }
}

#[test]
fn runnable_examples_parse() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        for block in parse(&read(&doc)).blocks {
            let mut info = block.info.split([',', ' ']);
            let lang = info.next().unwrap_or("");
            if !info.any(|attr| attr == "runnable") {
                continue;
            }
            if !matches!(lang, "sh" | "bash" | "console") {
                problems.push(format!(
                    "{}: `{}`: runnable blocks are shell",
                    shown(&doc),
                    block.info
                ));
                continue;
            }
            for line in &block.lines {
                let line = line.trim();
                let is_worker_line = line.starts_with("$W ")
                    || line.starts_with("worker ")
                    || line.starts_with("cargo run --release -- ")
                    || (line.starts_with("sudo -u ") && line.contains(" worker "));
                if !is_worker_line {
                    continue;
                }
                let words = match command_words(line) {
                    Ok(words) => words,
                    Err(why) => {
                        problems.push(format!(
                            "{}: `{line}`: {why}; keep such lines out of runnable blocks",
                            shown(&doc)
                        ));
                        continue;
                    }
                };
                let Some(args) = worker_args(&words) else {
                    continue;
                };
                checked += 1;
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                if let Err(e) = worker::cli::parses(&args) {
                    problems.push(format!("{}: `{line}`:\n{e}", shown(&doc)));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} runnable lines found");
    assert!(
        problems.is_empty(),
        "runnable examples that do not parse:\n{}",
        problems.join("\n")
    );
}

#[test]
fn shell_words_read_plain_lines_only() {
    assert_eq!(
        command_words(r#"$W task run fibonacci 30 --kwargs '{"stream": true}'   # items"#).unwrap(),
        [
            "$W",
            "task",
            "run",
            "fibonacci",
            "30",
            "--kwargs",
            r#"{"stream": true}"#
        ]
    );
    assert_eq!(shell_words("worker serve &").unwrap(), ["worker", "serve"]);
    assert_eq!(
        shell_words("worker serve &   # the daemon").unwrap(),
        ["worker", "serve"]
    );
    assert_eq!(
        shell_words(r#"worker task run hello.hello '"ops"'"#).unwrap()[3],
        "hello.hello"
    );
    assert!(shell_words("worker plugins list | head").is_err());
    assert!(shell_words("worker serve && worker reload").is_err());
    assert!(shell_words("worker task run x $(cat args)").is_err());
    assert!(worker::cli::parses(&["plugins", "list", "--json"]).is_ok());
    assert!(worker::cli::parses(&["plugins", "list", "--jsn"]).is_err());
}

#[test]
fn anchors_are_slugged_as_github_and_mdbook_do() {
    assert_eq!(slug("`plugin.toml` reference"), "plugintoml-reference");
    assert_eq!(slug("7. Versioning"), "7-versioning");
    assert_eq!(
        slug("Delivery guarantees (stronger than Celery's defaults)"),
        "delivery-guarantees-stronger-than-celerys-defaults"
    );
    assert_eq!(slug("`worker plugins install`"), "worker-plugins-install");
    let heads = anchors("# A\n\n## Setup\n\n```sh\n# not a heading\n```\n\n## Setup\n");
    assert_eq!(
        heads.into_iter().collect::<Vec<_>>(),
        ["a", "setup", "setup-1"]
    );
}

#[test]
fn cli_reference_is_generated_from_the_code() {
    let path = book_src().join("reference/cli.md");
    let generated = worker::cli::reference_markdown();
    if std::env::var_os("WORKER_UPDATE_DOCS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("cannot write docs/src/reference/cli.md");
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    if on_disk != generated {
        let first = on_disk
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(on_disk.lines().count().min(generated.lines().count()));
        panic!(
            "docs/src/reference/cli.md is not what the argument definitions generate (first \
             difference at line {}); rewrite it with `WORKER_UPDATE_DOCS=1 cargo test --test docs`",
            first + 1
        );
    }
}

#[test]
fn summary_lists_every_page_and_every_listed_page_exists() {
    let book = book_src();
    let summary = book.join("SUMMARY.md");
    let mut listed = BTreeSet::new();
    let mut problems = Vec::new();
    for target in link_targets(&parse(&read(&summary)).prose) {
        if target.is_empty() {
            problems.push("SUMMARY.md: a draft chapter (empty link); give it a page".to_string());
            continue;
        }
        let path = normalize(&book.join(&target));
        if !path.is_file() {
            problems.push(format!("SUMMARY.md lists `{target}`, which does not exist"));
        }
        if !listed.insert(path) {
            problems.push(format!("SUMMARY.md lists `{target}` twice"));
        }
    }
    for page in markdown_files(&book) {
        if page != summary && !listed.contains(&page) {
            problems.push(format!("{} is not in SUMMARY.md", shown(&page)));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn readme_keeps_the_two_commands_and_stays_a_landing_page() {
    let readme = read(&root().join("README.md"));
    for block in [
        "```sh\ncargo run --release -- run fibonacci 26        # prints 121393 (builds the plugin's venv first)\n```\n",
        "```sh\ncargo test --workspace\n```\n",
    ] {
        assert!(readme.contains(block), "README.md lost the block:\n{block}");
    }
    let lines = readme.lines().count();
    assert!(
        lines <= 220,
        "README.md has {lines} lines: move the details into the book"
    );
}

#[test]
fn user_docs_do_not_talk_about_how_the_work_was_organised() {
    let mut problems = Vec::new();
    for doc in documents() {
        for (n, line) in read(&doc).lines().enumerate() {
            let lower = line.to_lowercase();
            let numbered = lower
                .match_indices("issue ")
                .any(|(at, m)| lower[at + m.len()..].starts_with(|c: char| c.is_ascii_digit()));
            if numbered || lower.contains("this issue") || lower.contains("issue's") {
                problems.push(format!("{}:{}: {line}", shown(&doc), n + 1));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "say what the thing is, not which issue made it:\n{}",
        problems.join("\n")
    );
}
