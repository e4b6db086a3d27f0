//! The man pages stay true to the program.
//!
//! - `man/workers.toml.5` defines every configuration key, under the section of its table: the
//!   keys are read from the schema itself (the fields of the `Raw*` structs in `src/config.rs`)
//!   and from the packaged config `packaging/workers.toml` (commented-out keys included), and
//!   the packaged config in turn lists every key of the schema. Keys the page defines but the
//!   schema does not know fail too.
//! - `man/gte-supervisor.1` names every subcommand and option that `--help` lists.
//! - Both pages render without a single groff warning (`groff -man -ww -z`), when groff is
//!   installed; without it that check prints "SKIPPED" and passes.
//!
//! Std only; the binary is the real one (`CARGO_BIN_EXE_gte-supervisor`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_gte-supervisor");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// Top-level keys are described under this `.SH` heading of workers.toml(5); a table's keys under
/// `.SH [table]`.
const TOP_LEVEL: &str = "TOP-LEVEL KEYS";

fn read(rel: &str) -> String {
    let path = Path::new(MANIFEST_DIR).join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A key as (table, name); the table is "" for top-level keys.
type Key = (String, String);

fn show(key: &Key) -> String {
    if key.0.is_empty() {
        key.1.clone()
    } else {
        format!("[{}] {}", key.0, key.1)
    }
}

fn is_ident(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Keys of the schema: every `pub name: Type` field of every `struct Raw*` in src/config.rs
/// (honouring `#[serde(rename = "...")]`). A field whose type is itself a `Raw*` struct is a
/// table; the struct's fields belong to it. Returns (keys, tables).
fn schema_keys() -> (BTreeSet<Key>, BTreeSet<String>) {
    let src = read("src/config.rs");
    // struct name -> its fields (name, type)
    let mut structs: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut rename: Option<String> = None;
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("pub struct Raw") {
            let name = rest
                .split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or("");
            if rest.trim_end().ends_with('{') {
                current = Some(format!("Raw{name}"));
                structs.entry(format!("Raw{name}")).or_default();
            }
            continue;
        }
        let Some(name) = &current else { continue };
        if t == "}" {
            current = None;
            continue;
        }
        if t.starts_with("#[serde(") && t.contains("rename") {
            rename = t
                .split("rename = \"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map(str::to_string);
            continue;
        }
        if let Some(field) = t.strip_prefix("pub ") {
            if let Some((fname, ty)) = field.split_once(':') {
                let key = rename.take().unwrap_or_else(|| fname.trim().to_string());
                structs
                    .get_mut(name)
                    .expect("current struct")
                    .push((key, ty.trim().trim_end_matches(',').to_string()));
            }
        }
    }
    assert!(
        structs.contains_key("RawConfig"),
        "src/config.rs has no `pub struct RawConfig {{`: update this test"
    );
    let mut keys = BTreeSet::new();
    let mut tables = BTreeSet::new();
    let mut walk = vec![(String::new(), "RawConfig".to_string())];
    while let Some((table, sname)) = walk.pop() {
        let fields = structs
            .get(&sname)
            .unwrap_or_else(|| panic!("struct {sname} not found in src/config.rs"));
        for (key, ty) in fields {
            let nested = ty
                .split(|c: char| !c.is_alphanumeric())
                .find(|w| w.starts_with("Raw") && structs.contains_key(*w));
            match nested {
                Some(inner) => {
                    assert!(
                        table.is_empty(),
                        "nested tables are not expected: {table}.{key}"
                    );
                    tables.insert(key.clone());
                    walk.push((key.clone(), inner.to_string()));
                }
                None => {
                    keys.insert((table.clone(), key.clone()));
                }
            }
        }
    }
    (keys, tables)
}

/// Keys written in packaging/workers.toml, also those in comments (`# command = [...]`), each
/// with the table it stands in (a commented-out `# [table]` header counts too).
fn packaged_keys() -> BTreeSet<Key> {
    let text = read("packaging/workers.toml");
    let mut keys = BTreeSet::new();
    let mut table = String::new();
    for line in text.lines() {
        let t = line.trim();
        let t = t.strip_prefix('#').map(str::trim).unwrap_or(t);
        if let Some(h) = t.strip_prefix('[') {
            // `[[process]]` (an array of tables) counts as table `process`.
            let h = h
                .strip_prefix('[')
                .map_or(h, |inner| inner.strip_suffix(']').unwrap_or(inner));
            if let Some(name) = h.strip_suffix(']') {
                if is_ident(name) {
                    table = name.to_string();
                }
            }
            continue;
        }
        if let Some((k, _)) = t.split_once('=') {
            let k = k.trim();
            if is_ident(k) {
                keys.insert((table.clone(), k.to_string()));
            }
        }
    }
    keys
}

/// Strips groff escapes that can appear inside a name: `\-` → `-`, `\%`, `\&`, font changes.
fn unescape(s: &str) -> String {
    let mut s = s.replace("\\-", "-").replace("\\%", "").replace("\\&", "");
    for f in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        s = s.replace(f, "");
    }
    s
}

/// The first word of a font-macro line (`.B word`, `.BI word " x"`, `.BR word ,`), unquoted.
fn macro_word(line: &str) -> Option<String> {
    let rest = [".BI ", ".BR ", ".B ", ".IR ", ".I "]
        .iter()
        .find_map(|m| line.strip_prefix(m))?;
    let rest = rest.trim_start();
    let word = if let Some(q) = rest.strip_prefix('"') {
        q.split('"').next()?
    } else {
        rest.split_whitespace().next()?
    };
    Some(unescape(word))
}

/// Terms of a man page: the word each top-level `.TP` entry defines (not those of a list nested
/// in `.RS` ... `.RE`), grouped by the `.SH` section it is in.
fn defined_terms(page: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = String::new();
    let mut after_tp = false;
    let mut depth = 0usize;
    for line in page.lines() {
        if let Some(h) = line.strip_prefix(".SH ") {
            section = unescape(h.trim().trim_matches('"'));
            // An array of tables (`.SH [[process]]`) holds the keys of table `process`.
            if let Some(inner) = section
                .strip_prefix("[[")
                .and_then(|s| s.strip_suffix("]]"))
            {
                section = format!("[{inner}]");
            }
            after_tp = false;
            depth = 0;
            continue;
        }
        if line.starts_with(".RS") {
            depth += 1;
            continue;
        }
        if line.starts_with(".RE") {
            depth = depth.saturating_sub(1);
            continue;
        }
        if line == ".TP" {
            after_tp = depth == 0;
            continue;
        }
        if after_tp {
            if let Some(w) = macro_word(line) {
                out.entry(section.clone()).or_default().insert(w);
            }
            after_tp = false;
        }
    }
    out
}

#[test]
fn every_config_key_is_defined_in_workers_toml_5() {
    let (schema, tables) = schema_keys();
    let packaged = packaged_keys();
    let page = read("man/workers.toml.5");
    let terms = defined_terms(&page);
    let section_of = |table: &str| {
        if table.is_empty() {
            TOP_LEVEL.to_string()
        } else {
            format!("[{table}]")
        }
    };

    let mut missing = Vec::new();
    for key in schema.iter().chain(packaged.iter()) {
        let section = section_of(&key.0);
        if !terms.get(&section).is_some_and(|t| t.contains(&key.1)) {
            missing.push(format!(
                "{} (expected as `.TP` / `.B {}` under `.SH {section}`)",
                show(key),
                key.1
            ));
        }
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "man/workers.toml.5 does not describe these keys:\n  {}",
        missing.join("\n  ")
    );

    for table in &tables {
        assert!(
            terms.contains_key(&section_of(table))
                || page.contains(&format!(".SH [{table}]"))
                || page.contains(&format!(".SH [[{table}]]")),
            "man/workers.toml.5 has no `.SH [{table}]` section"
        );
    }

    // The other way round: a key the page describes must exist.
    let mut stale = Vec::new();
    for (section, words) in &terms {
        let table = if section == TOP_LEVEL {
            String::new()
        } else if let Some(t) = section.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            t.to_string()
        } else {
            continue;
        };
        for w in words {
            if !schema.contains(&(table.clone(), w.clone())) {
                stale.push(format!(
                    "{} (under .SH {section})",
                    show(&(table.clone(), w.clone()))
                ));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "man/workers.toml.5 describes keys that src/config.rs does not accept:\n  {}",
        stale.join("\n  ")
    );
}

#[test]
fn packaged_config_lists_every_key() {
    let (schema, _) = schema_keys();
    let packaged = packaged_keys();
    let missing: Vec<String> = schema.difference(&packaged).map(show).collect();
    assert!(
        missing.is_empty(),
        "packaging/workers.toml (the installed /etc/gte-supervisor/workers.toml) should list every \
         key, commented out if need be; missing:\n  {}",
        missing.join("\n  ")
    );
    let unknown: Vec<String> = packaged.difference(&schema).map(show).collect();
    assert!(
        unknown.is_empty(),
        "packaging/workers.toml names keys src/config.rs does not accept:\n  {}",
        unknown.join("\n  ")
    );
}

/// `gte-supervisor --help`, or `gte-supervisor help COMMAND` (which also works for `help`).
fn help(command: Option<&str>) -> String {
    let mut cmd = Command::new(BIN);
    match command {
        Some(c) => cmd.args(["help", c]),
        None => cmd.arg("--help"),
    };
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run gte-supervisor --help");
    assert!(
        out.status.success(),
        "gte-supervisor help {command:?} failed: {out:?}"
    );
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// (subcommands, options) of a clap help text.
fn parse_help(text: &str) -> (Vec<String>, Vec<String>) {
    let mut commands = Vec::new();
    let mut options = Vec::new();
    let mut block = "";
    for line in text.lines() {
        if !line.starts_with(' ') {
            block = line.trim_end_matches(':');
            continue;
        }
        let t = line.trim_start();
        // An entry starts two spaces in; its continuation lines are indented further.
        if line.len() - t.len() > 6 {
            continue;
        }
        match block {
            "Commands" => {
                if let Some(name) = t.split_whitespace().next() {
                    commands.push(name.to_string());
                }
            }
            "Options" => {
                for word in t.split(|c: char| c.is_whitespace() || c == ',') {
                    if word.starts_with('-') && word.len() > 1 {
                        options.push(word.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    (commands, options)
}

#[test]
fn every_subcommand_and_option_is_in_gte_supervisor_1() {
    let page = read("man/gte-supervisor.1");
    let text = unescape(&page);
    let terms = defined_terms(&page);
    let all_terms: BTreeSet<&String> = terms.values().flatten().collect();

    let (commands, options) = parse_help(&help(None));
    assert!(
        commands.iter().any(|c| c == "check"),
        "no commands parsed from --help"
    );
    assert!(
        options.iter().any(|o| o == "--config"),
        "no options parsed from --help"
    );
    let mut missing = Vec::new();
    let mut seen = BTreeSet::new();
    for option in &options {
        if seen.insert(option.clone()) && !text.contains(option.as_str()) {
            missing.push(format!("option {option}"));
        }
    }
    for command in &commands {
        if !all_terms.contains(command) {
            missing.push(format!("command {command} (expected as a `.TP` entry)"));
        }
        let (_, sub_options) = parse_help(&help(Some(command)));
        for option in sub_options {
            if seen.insert(option.clone()) && !text.contains(option.as_str()) {
                missing.push(format!("option {option} (of {command})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "man/gte-supervisor.1 does not mention what --help lists:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn man_pages_carry_the_package_version() {
    let version = env!("CARGO_PKG_VERSION");
    for page in ["man/gte-supervisor.1", "man/workers.toml.5"] {
        let th = read(page)
            .lines()
            .find(|l| l.starts_with(".TH "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("{page}: no .TH line"));
        assert!(
            th.contains(&format!("\"gte-supervisor {version}\"")),
            "{page}: .TH should name gte-supervisor {version}: {th}"
        );
    }
}

#[test]
fn man_pages_render_without_groff_warnings() {
    let available = Command::new("groff")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        // Straight to the terminal: `cargo test` does not capture direct writes to stderr.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: groff not installed (`apt-get install groff-base`); man pages not rendered"
        );
        return;
    }
    for page in ["man/gte-supervisor.1", "man/workers.toml.5"] {
        let out = Command::new("groff")
            .args(["-man", "-ww", "-z"])
            .arg(Path::new(MANIFEST_DIR).join(page))
            .stdin(Stdio::null())
            .output()
            .expect("run groff");
        let messages = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && messages.is_empty(),
            "groff -man -ww -z {page}: {}\n{messages}",
            out.status
        );
    }
}
