//! The results file: one JSON line per finished item, written as it
//! finishes so that a killed run still leaves a record of what it did.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::exec::{ItemResult, RecipientReply};
use crate::outcome::ItemOutcome;
use crate::source::{Item, ItemKind};

/// Appends one JSON line per item to a writer, each in one `write` call.
#[derive(Debug)]
pub struct ResultsWriter<W: Write> {
    out: W,
    /// The record being written, kept to reuse its allocation.
    record: Vec<u8>,
    /// The bytes written before the next record: a line break after a cut
    /// record, once.
    record_prefix: &'static [u8],
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
    /// Each recipient's last SMTP reply, for an email.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    recipients: &'a [RecipientReply],
    /// The fencing token of the last attempt's shared lease, with
    /// `--limiter`.
    #[serde(skip_serializing_if = "Option::is_none")]
    fence: Option<u64>,
}

/// The item as it appears in a record: a string for a line of text or a
/// malformed line, the object itself for a JSON item.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum RecordItem<'a> {
    Text(&'a str),
    Json(&'a Value),
}

impl ResultsWriter<File> {
    /// Opens `path` for appending, creating it if needed.
    ///
    /// The file is unbuffered and opened with `O_APPEND`, so that each
    /// record reaches it in one `write(2)` call. POSIX requires only that an
    /// `O_APPEND` write moves to the end of the file and writes with no
    /// other change in between. Linux local file systems (ext4, XFS, btrfs,
    /// tmpfs) also hold the inode lock for the whole call, so a record of any
    /// size lands whole and unbroken by another process appending to the
    /// same file.
    ///
    /// A short write still splits a record: on a full disk, past the file
    /// size limit, or when a fatal signal arrives during the copy. A file
    /// that ends in part of a line gets a line break before the first
    /// record, so only the cut record is lost.
    ///
    /// NOTE: when another run finishes a record between that check and
    /// the first write, the line break leaves an empty line instead. NFS
    /// does not make `O_APPEND` atomic at all.
    pub fn append_to(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let mut writer = ResultsWriter::new(file);
        if ends_in_cut_line(path) {
            writer.record_prefix = b"\n";
        }
        Ok(writer)
    }
}

/// Returns whether `path` is a regular file whose last byte is not a line
/// break. A file that cannot be read counts as whole. Other kinds of file
/// are not opened, because opening a FIFO to read could block.
fn ends_in_cut_line(path: &Path) -> bool {
    let length = match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_file() => metadata.len(),
        _ => return false,
    };
    let Ok(file) = File::open(path) else {
        return false;
    };
    let mut last = [0u8; 1];
    length > 0 && matches!(file.read_at(&mut last, length - 1), Ok(1)) && last[0] != b'\n'
}

impl<W: Write> ResultsWriter<W> {
    /// Creates a writer of records to `out`.
    pub fn new(out: W) -> Self {
        ResultsWriter {
            out,
            record: Vec::new(),
            record_prefix: b"",
        }
    }

    /// Writes the record of one finished item, with the result of its last
    /// attempt, in one `write_all`, which on a file is one `write(2)` call
    /// unless the write comes up short.
    pub fn write(
        &mut self,
        item: &Item,
        result: &ItemResult,
        outcome: &ItemOutcome,
    ) -> io::Result<()> {
        self.record.clear();
        self.record.extend_from_slice(self.record_prefix);
        serde_json::to_writer(&mut self.record, &Record::new(item, result, outcome))?;
        self.record.push(b'\n');
        self.out.write_all(&self.record)?;
        self.record_prefix = b"";
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
            ItemKind::Mail(envelope) => RecordItem::Json(envelope.description()),
            ItemKind::Unsendable { place, .. } => RecordItem::Text(place),
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
            recipients: &result.recipients,
            fence: result.fence,
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

    /// A writer that keeps each `write` call's bytes apart.
    #[derive(Default)]
    struct WriteCalls(Vec<Vec<u8>>);

    impl Write for WriteCalls {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.push(bytes.to_vec());
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn write_issues_one_call_per_record() {
        let item = Item {
            index: 0,
            line: 1,
            kind: ItemKind::Text("x".repeat(60 * 1024)),
        };
        let result = ItemResult {
            exit_code: Some(0),
            stderr_tail: vec!["e".repeat(20 * 1024)],
            ..ItemResult::default()
        };
        let mut writer = ResultsWriter::new(WriteCalls::default());
        let outcome = ItemOutcome::Done { attempts: 1 };
        writer.write(&item, &result, &outcome).unwrap();
        writer.write(&item, &result, &outcome).unwrap();

        let calls = writer.into_inner().0;
        assert_eq!(calls.len(), 2);
        for call in &calls {
            assert_eq!(call.last(), Some(&b'\n'));
            let record: Value = serde_json::from_slice(call).unwrap();
            assert_eq!(record["item"].as_str().unwrap().len(), 60 * 1024);
        }
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
            attempts: 0,
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
