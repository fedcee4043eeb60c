//! The results file: one JSON line per finished item, written as it
//! finishes so that a killed run still leaves a record of what it did.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::exec::ItemResult;
use crate::outcome::ItemOutcome;
use crate::source::{Item, ItemKind};

/// Appends one JSON line per item to a writer, flushing after each.
#[derive(Debug)]
pub struct ResultsWriter<W: Write> {
    out: W,
}

/// One line of the results file.
#[derive(Debug, Serialize)]
struct Record<'a> {
    index: u64,
    line: u64,
    item: RecordItem<'a>,
    ok: bool,
    outcome: &'static str,
    attempts: u32,
    exit_code: Option<i32>,
    signal: Option<i32>,
    duration_ms: f64,
    stderr_tail: &'a [String],
    error: Option<String>,
}

/// The item as it appears in a record: a string for a line of text or a
/// malformed line, the object itself for a JSON item.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum RecordItem<'a> {
    Text(&'a str),
    Json(&'a Value),
}

impl ResultsWriter<BufWriter<File>> {
    /// Opens `path` for appending, creating it if needed.
    pub fn append_to(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(ResultsWriter::new(BufWriter::new(file)))
    }
}

impl<W: Write> ResultsWriter<W> {
    /// Creates a writer of records to `out`.
    pub fn new(out: W) -> Self {
        ResultsWriter { out }
    }

    /// Writes and flushes the record of one finished item, with the result
    /// of its last attempt.
    pub fn write(
        &mut self,
        item: &Item,
        result: &ItemResult,
        outcome: &ItemOutcome,
    ) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, &Record::new(item, result, outcome))?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    /// Returns the underlying writer.
    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<'a> Record<'a> {
    fn new(item: &'a Item, result: &'a ItemResult, outcome: &ItemOutcome) -> Self {
        let record_item = match &item.kind {
            ItemKind::Text(text) => RecordItem::Text(text),
            ItemKind::Json(value) => RecordItem::Json(value),
            ItemKind::Malformed { raw, .. } => RecordItem::Text(raw),
        };
        Record {
            index: item.index,
            line: item.line,
            item: record_item,
            ok: outcome.is_done(),
            outcome: outcome.name(),
            attempts: outcome.attempts(),
            exit_code: result.exit_code,
            signal: result.signal,
            duration_ms: result.duration.as_secs_f64() * 1000.0,
            stderr_tail: &result.stderr_tail,
            error: outcome.reason(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn write_one(kind: ItemKind, result: &ItemResult) -> Value {
        let outcome = ItemOutcome::from_last_attempt(result, 1, None);
        write_outcome(kind, result, &outcome)
    }

    fn write_outcome(kind: ItemKind, result: &ItemResult, outcome: &ItemOutcome) -> Value {
        let item = Item {
            index: 4,
            line: 7,
            kind,
        };
        let mut writer = ResultsWriter::new(Vec::new());
        writer.write(&item, result, outcome).unwrap();
        let bytes = writer.into_inner();
        assert_eq!(bytes.last(), Some(&b'\n'));
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn write_success_record() {
        let result = ItemResult {
            exit_code: Some(0),
            duration: Duration::from_millis(1500),
            ..ItemResult::default()
        };
        let record = write_one(ItemKind::Text("a b".to_owned()), &result);
        let expected = json!({
            "index": 4, "line": 7, "item": "a b", "ok": true, "outcome": "done",
            "attempts": 1, "exit_code": 0,
            "signal": null, "duration_ms": 1500.0, "stderr_tail": [], "error": null,
        });
        assert_eq!(record, expected);
    }

    #[test]
    fn write_json_item_as_object() {
        let result = ItemResult {
            exit_code: Some(2),
            stderr_tail: vec!["boom".to_owned()],
            ..ItemResult::default()
        };
        let record = write_one(ItemKind::Json(json!({"a": [1]})), &result);
        assert_eq!(record["item"], json!({"a": [1]}));
        assert_eq!(record["ok"], json!(false));
        assert_eq!(record["error"], json!("exit status 2"));
        assert_eq!(record["stderr_tail"], json!(["boom"]));
    }

    #[test]
    fn write_malformed_record() {
        let kind = ItemKind::Malformed {
            raw: "{bad".to_owned(),
            reason: "invalid JSON: x".to_owned(),
        };
        let result = ItemResult::failed("invalid JSON: x".to_owned());
        let outcome = ItemOutcome::Failed {
            attempts: 0,
            last_error: "invalid JSON: x".to_owned(),
        };
        let record = write_outcome(kind, &result, &outcome);
        assert_eq!(record["attempts"], json!(0));
        assert_eq!(record["outcome"], json!("failed"));
        assert_eq!(record["item"], json!("{bad"));
        assert_eq!(record["exit_code"], Value::Null);
        assert_eq!(record["error"], json!("invalid JSON: x"));
    }

    #[test]
    fn write_not_started_record() {
        let outcome = ItemOutcome::NotStarted {
            cause: Some(crate::stop::StopCause::Interrupt),
        };
        let kind = ItemKind::Text("later".to_owned());
        let record = write_outcome(kind, &ItemResult::default(), &outcome);
        assert_eq!(record["ok"], json!(false));
        assert_eq!(record["outcome"], json!("not_started"));
        assert_eq!(record["attempts"], json!(0));
        assert_eq!(record["error"], json!("not started: interrupted"));
    }
}
