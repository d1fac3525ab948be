//! Text from the other side, made safe to show a person.
//!
//! A host (or a relay) controls file names, error messages, paths, its
//! platform string and ssh's diagnostics. Printed raw, their control
//! characters drive the terminal: set the window title, clear the screen,
//! move the cursor over what kitepipe printed (OpenSSH fixed the same class
//! in scp as CVE-2019-6109 and escapes such text with `snmprintf`/`vis`).
//! [`escape`] is the one function that turns such text into one line that
//! shows every character and drives nothing: C0 controls (tab excepted),
//! DEL, C1 controls and Unicode's bidirectional overrides become visible
//! escapes (`\x1b`, `\n`, `\u{9b}`); [`escape_bytes`] does the same for
//! bytes and shows invalid UTF-8 as `\xHH`. Backslashes stay as they are,
//! so escaping twice changes nothing (a message may be escaped where it is
//! made and again where it is printed). Scripts that need exact names use
//! JSON output instead (`kitepipe remote HOST ls --json`).

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` must not reach a terminal as it is.
fn unsafe_char(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        c if (c as u32) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

/// `text` as one line that drives no terminal (see the module docs).
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Bytes as one line that drives no terminal; invalid UTF-8 shows as `\xHH`.
pub fn escape_bytes(bytes: &[u8]) -> Cow<'_, str> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return escape(text);
    }
    let mut out = String::with_capacity(bytes.len() + 16);
    for chunk in bytes.utf8_chunks() {
        out.push_str(&escape(chunk.valid()));
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    Cow::Owned(out)
}

/// `value` as compact JSON that drives no terminal either: JSON escapes C0
/// controls itself; DEL, C1 controls and bidirectional overrides become
/// `\uXXXX` too, so a script reads the exact string and a person who
/// prints it sees nothing move.
pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, SafeJson);
    if value.serialize(&mut ser).is_err() {
        return String::new();
    }
    // serde_json writes UTF-8, and SafeJson writes only ASCII escapes.
    String::from_utf8(out).unwrap_or_default()
}

struct SafeJson;

impl serde_json::ser::Formatter for SafeJson {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut rest = fragment;
        while let Some((i, c)) = rest.char_indices().find(|&(_, c)| unsafe_char(c)) {
            writer.write_all(&rest.as_bytes()[..i])?;
            // Every unsafe char is in the Basic Multilingual Plane.
            write!(writer, "\\u{:04x}", c as u32)?;
            rest = &rest[i + c.len_utf8()..];
        }
        writer.write_all(rest.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_drives_a_terminal() {
        let cases: &[(&str, &str)] = &[
            ("plain name.txt", "plain name.txt"),
            ("tab\tstays", "tab\tstays"),
            ("\u{1b}]0;title\u{7}", "\\x1b]0;title\\x07"),
            ("a\nb\rc", "a\\nb\\rc"),
            ("del\u{7f}bs\u{8}", "del\\x7fbs\\x08"),
            ("c1\u{9b}31m", "c1\\u{9b}31m"),
            ("bidi\u{202e}txt", "bidi\\u{202e}txt"),
            ("ünïcödé ok", "ünïcödé ok"),
            ("back\\slash", "back\\slash"),
        ];
        for (input, want) in cases {
            assert_eq!(escape(input), *want, "{input:?}");
            // Escaping twice changes nothing.
            assert_eq!(escape(&escape(input)), *want, "{input:?} twice");
        }
    }

    #[test]
    fn json_escapes_del_c1_and_bidi_too() {
        let text = "a\u{1b}b\u{7f}c\u{9b}d\u{202e}e\"f";
        let out = json(text);
        assert_eq!(out, "\"a\\u001bb\\u007fc\\u009bd\\u202ee\\\"f\"");
        assert_eq!(serde_json::from_str::<String>(&out).unwrap(), text);
    }

    #[test]
    fn invalid_utf8_shows_as_hex() {
        assert_eq!(escape_bytes(b"ok\xff\xfe\x1b[2J"), "ok\\xff\\xfe\\x1b[2J");
        assert_eq!(escape_bytes(b"fine"), "fine");
    }
}
