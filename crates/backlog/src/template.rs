//! Placeholders in the command line: parsed once, rendered per item.
//!
//! `{}` is the item. With JSON Lines input, `{name}` is a field of the item,
//! where the name matches `[A-Za-z0-9_][A-Za-z0-9_.-]*` and dots reach into
//! nested objects (or arrays, by position). `{{` and `}}` write literal
//! braces. Any other brace text, such as awk's `{print $1}`, stays as it is,
//! so that commands with braces of their own need no escaping.

use std::fmt;

use serde_json::Value;

use crate::source::ItemKind;

/// The command line with its placeholders located.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    args: Vec<Vec<Segment>>,
}

/// The shells whose `-c` script must not contain a placeholder.
const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox"];

/// One piece of an argument.
#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    /// `{}`: the whole item.
    Item,
    /// `{a.b}`: a field of a JSON item, as a dotted path.
    Field(String),
}

/// The error of rendering a field placeholder that the item does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldNotFound {
    path: String,
}

impl Template {
    /// Parses every argument. `fields` enables `{name}` placeholders, which
    /// only JSON items can fill.
    pub fn parse(argv: &[String], fields: bool) -> Self {
        let args = argv.iter().map(|arg| parse_arg(arg, fields)).collect();
        Template { args }
    }

    /// Returns the program name when it contains no placeholder, so that it
    /// can be checked before any item runs.
    pub fn fixed_program(&self) -> Option<&str> {
        match self.args.first()?.as_slice() {
            [Segment::Literal(program)] => Some(program),
            _ => None,
        }
    }

    /// Returns the shell and the script argument when the template runs a
    /// shell with `-c` and puts a placeholder inside the script, where the
    /// shell would run any shell syntax an item contains.
    pub fn placeholder_in_shell_script(&self) -> Option<(&str, String)> {
        let program = self.fixed_program()?;
        let name = program.rsplit('/').next().unwrap_or(program);
        if !SHELLS.contains(&name) {
            return None;
        }
        // The script is the first operand after the options, and one of the
        // options must contain `c` (as in `-c`, `-ec` or `-xc`).
        let mut saw_c = false;
        for arg in &self.args[1..] {
            match arg.as_slice() {
                [Segment::Literal(text)] if text == "--" => break,
                [Segment::Literal(text)] if text.starts_with('-') || text.starts_with('+') => {
                    saw_c |= text.starts_with('-') && !text.starts_with("--") && text.contains('c');
                }
                script => {
                    let has_placeholder = script
                        .iter()
                        .any(|segment| !matches!(segment, Segment::Literal(_)));
                    return (saw_c && has_placeholder).then(|| (name, unparse(script)));
                }
            }
        }
        None
    }

    /// Parses a one-argument template that makes an item's key, such as
    /// `--key` or `--per-key`. `option` is the option as given and
    /// `example` a field to suggest, both for the error.
    ///
    /// # Errors
    ///
    /// Fails when the template contains no placeholder, which would give
    /// every item the same key.
    pub fn parse_key(
        source: &str,
        fields: bool,
        option: &str,
        example: &str,
    ) -> Result<Self, String> {
        let template = Template::parse(&[source.to_owned()], fields);
        if template.fixed_program().is_none() {
            return Ok(template);
        }
        let needs = if fields { "" } else { " with --jsonl" };
        Err(format!(
            "{option} contains no placeholder, so every item would get the same key. \
             Use {{}} for the whole item, or a field such as {{{example}}}{needs}"
        ))
    }

    /// Renders the argument vector for one item.
    pub fn render(&self, item: &ItemKind) -> Result<Vec<String>, FieldNotFound> {
        self.args.iter().map(|arg| render_arg(arg, item)).collect()
    }
}

impl fmt::Display for FieldNotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}` not found in item", self.path)
    }
}

impl std::error::Error for FieldNotFound {}

fn parse_arg(arg: &str, fields: bool) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut literal = String::new();
    let mut rest = arg;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("{{") {
            literal.push('{');
            rest = after;
        } else if let Some(after) = rest.strip_prefix("}}") {
            literal.push('}');
            rest = after;
        } else if let Some((segment, after)) = parse_placeholder(rest, fields) {
            segments.extend(take_literal(&mut literal));
            segments.push(segment);
            rest = after;
        } else {
            literal.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    segments.extend(take_literal(&mut literal));
    segments
}

/// Parses a placeholder at the start of `text`, returning it and the text
/// after it, or `None` when `text` does not start with one.
fn parse_placeholder(text: &str, fields: bool) -> Option<(Segment, &str)> {
    let inner = text.strip_prefix('{')?;
    let close = inner.find('}')?;
    let (name, after) = (&inner[..close], &inner[close + 1..]);
    if name.is_empty() {
        Some((Segment::Item, after))
    } else if fields && is_field_name(name) {
        Some((Segment::Field(name.to_owned()), after))
    } else {
        None
    }
}

fn is_field_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn take_literal(literal: &mut String) -> Option<Segment> {
    (!literal.is_empty()).then(|| Segment::Literal(std::mem::take(literal)))
}

fn render_arg(segments: &[Segment], item: &ItemKind) -> Result<String, FieldNotFound> {
    let mut arg = String::new();
    for segment in segments {
        match segment {
            Segment::Literal(text) => arg.push_str(text),
            Segment::Item => arg.push_str(&item_text(item)),
            Segment::Field(path) => arg.push_str(&field_text(item, path)?),
        }
    }
    Ok(arg)
}

/// Writes an argument back as it was given, for error messages.
fn unparse(segments: &[Segment]) -> String {
    let mut text = String::new();
    for segment in segments {
        match segment {
            Segment::Literal(literal) => {
                text.push_str(&literal.replace('{', "{{").replace('}', "}}"))
            }
            Segment::Item => text.push_str("{}"),
            Segment::Field(path) => {
                text.push('{');
                text.push_str(path);
                text.push('}');
            }
        }
    }
    text
}

/// Returns the text that `{}` and standard input get for an item.
///
/// A JSON item is re-serialised compactly. Its keys keep their input order
/// and its numbers keep their digits (only an exponent gains a `+`), because
/// serde_json is built with the `preserve_order` and `arbitrary_precision`
/// features.
pub fn item_text(item: &ItemKind) -> String {
    match item {
        ItemKind::Text(line) => line.clone(),
        ItemKind::Json(value) => value.to_string(),
        ItemKind::Malformed { raw, .. } => raw.clone(),
        ItemKind::Mail(envelope) => envelope.place(),
        ItemKind::Unsendable { place, .. } => place.clone(),
    }
}

fn field_text(item: &ItemKind, path: &str) -> Result<String, FieldNotFound> {
    let not_found = || FieldNotFound {
        path: path.to_owned(),
    };
    let ItemKind::Json(value) = item else {
        return Err(not_found());
    };
    match lookup(value, path).ok_or_else(not_found)? {
        Value::String(text) => Ok(text.clone()),
        other => Ok(other.to_string()),
    }
}

fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |value, key| match value {
        Value::Object(map) => map.get(key),
        Value::Array(items) => items.get(key.parse::<usize>().ok()?),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn render_one(arg: &str, item: &ItemKind) -> Result<String, String> {
        let fields = matches!(item, ItemKind::Json(_));
        let template = Template::parse(&[arg.to_owned()], fields);
        match template.render(item) {
            Ok(mut argv) => Ok(argv.remove(0)),
            Err(error) => Err(error.to_string()),
        }
    }

    #[test]
    fn render_text_item_placeholders() {
        let item = ItemKind::Text("a.txt".to_owned());
        let cases = [
            ("{}", "a.txt"),
            ("--out={}.sha", "--out=a.txt.sha"),
            ("{}{}", "a.txta.txt"),
            ("{{", "{"),
            ("}}", "}"),
            ("{{}}", "{}"),
            ("{{}", "{}"),
            ("{}}", "a.txt}"),
            ("{print $1}", "{print $1}"),
            ("{a}", "{a}"),
            ("{", "{"),
            ("}", "}"),
            ("no braces", "no braces"),
            ("é{}ü", "éa.txtü"),
        ];
        for (arg, expected) in cases {
            assert_eq!(
                render_one(arg, &item).as_deref(),
                Ok(expected),
                "arg {arg:?}"
            );
        }
    }

    #[test]
    fn render_json_item_placeholders() {
        let item = ItemKind::Json(json!({
            "a": "x y",
            "n": 3,
            "o": {"b": "deep", "c": [1, 2]},
            "list": ["first", "second"],
        }));
        let cases = [
            ("{a}", "x y"),
            ("{n}", "3"),
            ("{o.b}", "deep"),
            ("{o.c}", "[1,2]"),
            ("{o}", r#"{"b":"deep","c":[1,2]}"#),
            ("{list.1}", "second"),
            ("--name={a}.txt", "--name=x y.txt"),
            ("{{a}}", "{a}"),
            ("{print $1}", "{print $1}"),
            ("{-a}", "{-a}"),
        ];
        for (arg, expected) in cases {
            assert_eq!(
                render_one(arg, &item).as_deref(),
                Ok(expected),
                "arg {arg:?}"
            );
        }
    }

    #[test]
    fn render_json_item_whole() {
        let item = ItemKind::Json(json!({"a": 1, "b": "two"}));
        assert_eq!(
            render_one("{}", &item).as_deref(),
            Ok(r#"{"a":1,"b":"two"}"#)
        );
    }

    #[test]
    fn render_json_keeps_digits_and_order() {
        let line = r#"{"z": 12345678901234567890123, "f": 1.10, "e": 1e2, "a": 0.1}"#;
        let item = ItemKind::Json(serde_json::from_str(line).unwrap());
        assert_eq!(
            render_one("{}", &item).as_deref(),
            Ok(r#"{"z":12345678901234567890123,"f":1.10,"e":1e+2,"a":0.1}"#)
        );
        assert_eq!(
            render_one("{z}", &item).as_deref(),
            Ok("12345678901234567890123")
        );
        assert_eq!(render_one("{e}", &item).as_deref(), Ok("1e+2"));
    }

    #[test]
    fn render_missing_field_fails() {
        let item = ItemKind::Json(json!({"a": {"b": 1}}));
        let cases = [
            ("{missing}", "field `missing` not found in item"),
            ("{a.c}", "field `a.c` not found in item"),
            ("{a.b.c}", "field `a.b.c` not found in item"),
            ("x{a..b}", "field `a..b` not found in item"),
        ];
        for (arg, expected) in cases {
            assert_eq!(
                render_one(arg, &item),
                Err(expected.to_owned()),
                "arg {arg:?}"
            );
        }
    }

    #[test]
    fn placeholder_in_shell_script_detected() {
        let check = |args: &[&str], fields: bool| {
            let argv: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
            Template::parse(&argv, fields)
                .placeholder_in_shell_script()
                .map(|(shell, script)| (shell.to_owned(), script))
        };
        let found = |shell: &str, script: &str| Some((shell.to_owned(), script.to_owned()));

        assert_eq!(
            check(&["sh", "-c", "echo {}"], false),
            found("sh", "echo {}")
        );
        assert_eq!(
            check(&["/bin/bash", "-ec", "cat {name}"], true),
            found("bash", "cat {name}")
        );
        assert_eq!(check(&["sh", "-e", "-c", "x{}"], false), found("sh", "x{}"));
        // The safe form passes the item as a positional parameter.
        assert_eq!(check(&["sh", "-c", "echo \"$1\"", "sh", "{}"], false), None);
        // A shell running a script file, and programs that are not shells.
        assert_eq!(check(&["sh", "script.sh", "{}"], false), None);
        assert_eq!(check(&["echo", "-c", "{}"], false), None);
        // Without --jsonl, `{name}` is literal text and safe.
        assert_eq!(check(&["sh", "-c", "awk '{print}'"], false), None);
        assert_eq!(check(&["sh", "--", "-c", "{}"], false), None);
    }

    #[test]
    fn parse_fixed_program() {
        let argv = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let plain = Template::parse(&argv(&["sha256sum", "{}"]), false);
        assert_eq!(plain.fixed_program(), Some("sha256sum"));
        let escaped = Template::parse(&argv(&["a{{b"]), false);
        assert_eq!(escaped.fixed_program(), Some("a{b"));
        let placeholder = Template::parse(&argv(&["{}", "x"]), false);
        assert_eq!(placeholder.fixed_program(), None);
    }
}
