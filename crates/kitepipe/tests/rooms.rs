//! The rooms of the library keep their shape: this test reads the source
//! files of `crates/kitepipe/src`, builds the file-level import graph and
//! fails on
//!
//! - a circle between files (a file that, through its imports, imports
//!   itself), and
//! - an import from one room into a room it must not depend on
//!   ([`ALLOWED`], from ARCHITECTURE.md's code map).
//!
//! An edge is any `use` of, or inline path to (`crate::room::file::item`,
//! `super::file::item`), an item of another file. A path is resolved to the
//! file that *defines* the item: through `use` and `pub use` re-exports
//! (`crate::link::Mux` is `link/mux.rs`, not `link/mod.rs`). A room's
//! `mod.rs` (or any file with child modules, like `link/mux.rs`) is the
//! hub of its children: imports between a file and the modules above it
//! are how a room shares its pieces and are not circles. Test code
//! (`tests.rs` files, `#[cfg(test)]` modules and imports) is left out.
//!
//! Std only, and a deliberately small reader of Rust: it understands the
//! code as this repository writes it (one item per `use`, nested braces,
//! `as` renames, `self`), not every program Rust accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Which rooms each room may import from (besides itself and the crate
/// root). A room is a directory under `src/` or a top-level file. The
/// layering (ARCHITECTURE.md): `pki` and `config` at the bottom (plain
/// data and certificates), `link` (the multiplexed link) above them,
/// `tunnel` and `pipe` (byte copies and the event pipe) over links,
/// `remote` (operations, agent, sessions) over the pipe's vocabulary only
/// through proto, and `relay` and `connector` (the two nodes) on top;
/// `demo` wires the nodes together.
const ALLOWED: &[(&str, &[&str])] = &[
    ("pki", &[]),
    ("metrics", &[]),
    ("config", &["pki"]),
    ("link", &["pki"]),
    ("tunnel", &["link"]),
    ("pagekite", &["link"]),
    ("remote", &["config", "link", "metrics", "pki", "tunnel"]),
    (
        "pipe",
        &["config", "link", "metrics", "pki", "remote", "tunnel"],
    ),
    (
        "relay",
        &[
            "config", "link", "metrics", "pagekite", "pipe", "pki", "remote", "tunnel",
        ],
    ),
    (
        "connector",
        &[
            "config", "link", "metrics", "pagekite", "pipe", "pki", "remote", "tunnel",
        ],
    ),
    (
        "demo",
        &[
            "config",
            "connector",
            "link",
            "metrics",
            "pagekite",
            "pipe",
            "pki",
            "relay",
            "remote",
            "tunnel",
        ],
    ),
];

/// Crate-wide helpers in top-level files (one home for the poison-ignoring
/// lock, the shutdown grace and the accept loop): every room may import
/// them, and they import none but each other.
const SHARED: &[&str] = &["accept", "local_guard", "shutdown", "sync"];

#[test]
fn no_circles_between_files() {
    let graph = Graph::read(&src_dir());
    let circles: Vec<String> = graph
        .circles()
        .iter()
        .map(|circle| graph.describe_circle(circle))
        .collect();
    assert!(
        circles.is_empty(),
        "circles between files (break each by moving the shared piece to its own file):\n{}",
        circles.join("\n")
    );
}

#[test]
fn rooms_import_only_downward() {
    let graph = Graph::read(&src_dir());
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (from, to, via) in graph.edges() {
        let (from_room, to_room) = (room(from), room(to));
        if from_room == to_room || to_room == "lib" || SHARED.contains(&to_room) {
            continue;
        }
        if SHARED.contains(&from_room) {
            wrong.push(format!(
                "{from} -> {to} ({via}): the shared helper {from_room} may import no room"
            ));
            continue;
        }
        let Some(may) = allowed.get(from_room) else {
            wrong.push(format!(
                "room {from_room} ({from}) is not in ALLOWED: add it, with the rooms it may import"
            ));
            continue;
        };
        if !may.contains(&to_room) {
            wrong.push(format!(
                "{from} -> {to} ({via}): {from_room} may not import {to_room}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the rooms' direction (ARCHITECTURE.md):\n{}",
        wrong.join("\n")
    );
}

/// The reader itself, on a small made-up crate: re-exports are followed to
/// the defining file, hubs are not circles, test code is left out.
#[test]
fn reader_follows_reexports_and_ignores_hubs_and_tests() {
    let dir = std::env::temp_dir().join(format!("kitepipe-rooms-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let files: &[(&str, &str)] = &[
        ("lib.rs", "pub mod a;\npub mod b;\n"),
        (
            "a/mod.rs",
            "mod one;\nmod two;\npub use one::{One, Shared as Common};\nuse crate::b::Bee;\n",
        ),
        (
            "a/one.rs",
            "use super::two::Two;\npub struct One;\npub struct Shared;\n",
        ),
        (
            "a/two.rs",
            "use super::Common; // \"crate::b::nope\" in a comment\nuse super::Hub;\n\
             pub struct Two;\n#[cfg(test)]\nmod tests {\n    use crate::a::one::One;\n}\n",
        ),
        (
            "b/mod.rs",
            "pub struct Bee;\nfn f() { let _ = crate::a::One; }\n",
        ),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let graph = Graph::read(&dir);
    let edges: BTreeSet<(String, String)> = graph
        .edges()
        .map(|(from, to, _)| (from.to_string(), to.to_string()))
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("a/mod.rs", "a/one.rs"),
        ("a/mod.rs", "b/mod.rs"),
        ("a/one.rs", "a/two.rs"),
        // `super::Common` is `one::Shared`, re-exported by the hub.
        ("a/two.rs", "a/one.rs"),
        ("a/two.rs", "a/mod.rs"),
        ("b/mod.rs", "a/one.rs"),
    ]
    .iter()
    .map(|(f, t)| (f.to_string(), t.to_string()))
    .collect();
    assert_eq!(edges, expected);
    let circles = graph.circles();
    assert_eq!(circles.len(), 1, "{circles:?}");
    assert_eq!(circles[0], ["a/one.rs", "a/two.rs"]);
    let _ = std::fs::remove_dir_all(&dir);
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The room of a file: its first directory, its name for a top-level file,
/// `lib` for the crate root.
fn room(file: &str) -> &str {
    match file.split_once('/') {
        Some((dir, _)) => dir,
        None if file == "lib.rs" => "lib",
        None => file.trim_end_matches(".rs"),
    }
}

/// Files and their imports.
struct Graph {
    /// Source files by module path (`[]` is the crate root).
    modules: BTreeMap<Vec<String>, String>,
    /// Per file: its module path and cleaned text (no comments, strings
    /// emptied, test modules cut).
    files: BTreeMap<String, (Vec<String>, String)>,
    /// Per file: name in scope through a `use` -> absolute path.
    uses: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

impl Graph {
    fn read(src: &Path) -> Graph {
        let mut paths = Vec::new();
        collect_rs(src, &mut paths);
        let mut modules = BTreeMap::new();
        let mut files = BTreeMap::new();
        for path in paths {
            let rel = path
                .strip_prefix(src)
                .unwrap()
                .to_str()
                .expect("UTF-8 file names")
                .to_string();
            let module = module_of(&rel);
            // Test modules in their own files are test code.
            if module.last().is_some_and(|m| m == "tests") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            modules.insert(module.clone(), rel.clone());
            files.insert(rel, (module, clean(&text)));
        }
        let mut graph = Graph {
            modules,
            files,
            uses: BTreeMap::new(),
        };
        let mut uses = BTreeMap::new();
        for (file, (module, text)) in &graph.files {
            let mut names = BTreeMap::new();
            for (path, name) in use_paths(text) {
                if let Some(abs) = graph.absolute(module, &path) {
                    names.insert(name, abs);
                }
            }
            uses.insert(file.clone(), names);
        }
        graph.uses = uses;
        graph
    }

    /// `path` as written in `module`, made absolute; `None` for paths into
    /// other crates.
    fn absolute(&self, module: &[String], path: &[String]) -> Option<Vec<String>> {
        let mut abs = module.to_vec();
        let mut rest = path;
        match rest.first()?.as_str() {
            "crate" => {
                abs.clear();
                rest = &rest[1..];
            }
            "self" => rest = &rest[1..],
            "super" => {
                while rest.first().is_some_and(|s| s == "super") {
                    abs.pop()?;
                    rest = &rest[1..];
                }
            }
            first => {
                let mut child = module.to_vec();
                child.push(first.to_string());
                if !self.modules.contains_key(&child) {
                    return None;
                }
            }
        }
        abs.extend(rest.iter().cloned());
        Some(abs)
    }

    /// The file defining what the absolute `path` names, following `use`
    /// re-exports.
    fn resolve(&self, path: &[String], depth: usize) -> Option<&str> {
        let prefix = (0..=path.len())
            .rev()
            .find(|&n| self.modules.contains_key(&path[..n]))?;
        let file = self.modules[&path[..prefix]].as_str();
        let Some(name) = path.get(prefix) else {
            return Some(file);
        };
        match self.uses[file].get(name) {
            Some(target) if depth < 16 => {
                let mut next = target.clone();
                next.extend(path[prefix + 1..].iter().cloned());
                self.resolve(&next, depth + 1).or(Some(file))
            }
            _ => Some(file),
        }
    }

    /// Every import edge (from, to, the path as written), between two
    /// different files; each pair once.
    fn edges(&self) -> impl Iterator<Item = (&str, &str, String)> {
        let mut edges = BTreeMap::new();
        for (file, (module, text)) in &self.files {
            let written = use_paths(text)
                .into_iter()
                .map(|(path, _)| path)
                .chain(inline_paths(text));
            for path in written {
                let Some(abs) = self.absolute(module, &path) else {
                    continue;
                };
                let Some(target) = self.resolve(&abs, 0) else {
                    continue;
                };
                if target != file {
                    edges
                        .entry((file.as_str(), target))
                        .or_insert_with(|| path.join("::"));
                }
            }
        }
        edges.into_iter().map(|((from, to), via)| (from, to, via))
    }

    /// Groups of files that import each other in a circle (strongly
    /// connected components of more than one file), leaving out edges
    /// between a file and the modules above it. Each group sorted.
    fn circles(&self) -> Vec<Vec<String>> {
        let names: Vec<&str> = self.files.keys().map(String::as_str).collect();
        let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut next = vec![Vec::new(); names.len()];
        for (from, to, _) in self.edges() {
            let (a, b) = (&self.files[from].0, &self.files[to].0);
            if a.starts_with(b) || b.starts_with(a) {
                continue;
            }
            next[index[from]].push(index[to]);
        }
        let mut circles: Vec<Vec<String>> = strongly_connected(&next)
            .into_iter()
            .filter(|group| group.len() > 1)
            .map(|group| {
                let mut files: Vec<String> = group.iter().map(|&i| names[i].to_string()).collect();
                files.sort();
                files
            })
            .collect();
        circles.sort();
        circles
    }

    /// A circle with the imports that close it, for the failure message.
    fn describe_circle(&self, circle: &[String]) -> String {
        let inside: Vec<String> = self
            .edges()
            .filter(|(from, to, _)| {
                circle.iter().any(|f| f == from) && circle.iter().any(|f| f == to)
            })
            .map(|(from, to, via)| format!("    {from} -> {to} ({via})"))
            .collect();
        format!("  {}:\n{}", circle.join(", "), inside.join("\n"))
    }
}

/// Tarjan's algorithm, iterative enough for a few hundred files.
fn strongly_connected(next: &[Vec<usize>]) -> Vec<Vec<usize>> {
    struct State<'a> {
        next: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        counter: usize,
        groups: Vec<Vec<usize>>,
    }
    fn visit(s: &mut State<'_>, v: usize) {
        s.index[v] = Some(s.counter);
        s.low[v] = s.counter;
        s.counter += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for &w in &s.next[v] {
            match s.index[w] {
                None => {
                    visit(s, w);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut group = Vec::new();
            loop {
                let w = s.stack.pop().expect("v is on the stack");
                s.on_stack[w] = false;
                group.push(w);
                if w == v {
                    break;
                }
            }
            s.groups.push(group);
        }
    }
    let n = next.len();
    let mut s = State {
        next,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        counter: 0,
        groups: Vec::new(),
    };
    for v in 0..n {
        if s.index[v].is_none() {
            visit(&mut s, v);
        }
    }
    s.groups
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `a/b.rs` -> `[a, b]`; `a/mod.rs` -> `[a]`; `lib.rs` -> `[]`.
fn module_of(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    if parts.last().is_some_and(|p| p == "mod") || rel == "lib.rs" {
        parts.pop();
    }
    parts
}

/// The text without comments, with string and char literals emptied, and
/// cut at the first `#[cfg(test)]` module (tests come last in a file);
/// `#[cfg(test)]` imports are dropped.
fn clean(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !ident_char_before(&chars, i)
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (0..hashes).all(|k| chars.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && (chars.get(i + 2) == Some(&'\'') || next == Some('\\')) {
            // A char literal ('x' or '\n'); a lifetime has no closing quote.
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    // Test code: a `#[cfg(test)]` module ends the file; a `#[cfg(test)]`
    // import is dropped.
    let mut kept = String::with_capacity(out.len());
    let mut lines = out.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" {
            let following = lines.peek().map(|l| l.trim()).unwrap_or("");
            let item = following
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ");
            if item.starts_with("mod ") {
                break;
            }
            if item.starts_with("use ") {
                // Skip the whole statement.
                for l in lines.by_ref() {
                    if l.contains(';') {
                        break;
                    }
                }
                continue;
            }
        }
        kept.push_str(line);
        kept.push('\n');
    }
    kept
}

fn ident_char_before(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// Every path a `use` statement brings in, with the name it binds.
fn use_paths(text: &str) -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find("use ") {
        let start = from + at;
        from = start + 4;
        // A statement: `use` as a whole word, at the start of an item.
        let before = text[..start].trim_end();
        let starts_item = before.is_empty()
            || before.ends_with([';', '{', '}', ']', ')'])
            || before.ends_with(" pub")
            || before.ends_with("\npub")
            || before == "pub";
        if !starts_item
            || (start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_'))
        {
            continue;
        }
        let Some(end) = text[from..].find(';') else {
            break;
        };
        let tree: String = text[from..from + end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        expand(&[], &tree, &mut out);
        from += end;
    }
    out
}

/// Expands a use tree (`a::{b, c::{d as e}, self}`) under `prefix`.
fn expand(prefix: &[String], tree: &str, out: &mut Vec<(Vec<String>, String)>) {
    let tree = tree.trim();
    if tree.is_empty() {
        return;
    }
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut base = prefix.to_vec();
        base.extend(segments(head));
        for part in split_top(inner) {
            expand(&base, part, out);
        }
        return;
    }
    let (path, alias) = match tree.split_once(" as ") {
        Some((path, alias)) => (path.trim(), Some(alias.trim())),
        None => (tree, None),
    };
    let mut full = prefix.to_vec();
    let segs = segments(path);
    if segs == ["self"] {
        let name = alias.map(str::to_string).or_else(|| full.last().cloned());
        if let Some(name) = name {
            out.push((full, name));
        }
        return;
    }
    if segs.last().is_some_and(|s| s == "*") {
        // A glob: an edge to the module, no names known.
        full.extend(segs[..segs.len() - 1].iter().cloned());
        out.push((full, "*".into()));
        return;
    }
    full.extend(segs);
    let name = alias
        .map(str::to_string)
        .or_else(|| full.last().cloned())
        .unwrap_or_default();
    if name != "_" {
        out.push((full, name));
    } else {
        out.push((full, String::new()));
    }
}

/// Splits at commas outside braces.
fn split_top(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn segments(path: &str) -> Vec<String> {
    path.split("::")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_start_matches("r#").to_string())
        .collect()
}

/// Paths written in code (not in `use`): `crate::a::b` and `super::a::b`.
fn inline_paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for root in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(root) {
            let start = from + at;
            from = start + root.len();
            let before = text[..start].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let end = text[start..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(text.len(), |n| start + n);
            let path = segments(&text[start..end]);
            if path.len() > 1 {
                out.push(path);
            }
        }
    }
    out
}
