//! Items read from a file or standard input, as an async stream.
//!
//! Reading is asynchronous so that standard input can be endless, and each
//! line is read with a bound so that an over-long line costs at most
//! [`MAX_LINE_BYTES`] of memory before the rest of it is skipped.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::stream::{self, Stream};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

/// The maximum length of a line accepted as an item, in bytes, not counting
/// the line ending.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// How many bytes of an over-long line are kept to show in its failure.
const OVER_LONG_PREFIX_BYTES: usize = 256;

/// The buffer size for reading input, in bytes.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The UTF-8 byte order mark, which some editors write at the start of a
/// file and which is skipped there.
const BYTE_ORDER_MARK: &[u8] = b"\xef\xbb\xbf";

/// The format that turns lines of input into items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Each non-empty line is an item of text.
    Lines,
    /// Each non-empty line is one JSON object.
    JsonLines,
}

/// One item of the backlog.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The 0-based position among the items, malformed ones included.
    pub index: u64,
    /// The 1-based line number in the input, empty lines included.
    pub line: u64,
    /// The item's content.
    pub kind: ItemKind,
}

/// The content of an item.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemKind {
    /// One envelope of an email message: the message and its recipients in
    /// one domain, for `backlog mail`.
    Mail(std::sync::Arc<crate::mail::message::Envelope>),
    /// A message of `backlog mail` that cannot be sent, with the reason.
    Unsendable {
        /// The message's position: its file, and its number in an mbox or
        /// its line in JSON Lines.
        place: String,
        /// The reason it cannot be sent.
        reason: String,
    },
    /// A line of text, without its line ending.
    Text(String),
    /// A JSON object.
    Json(Value),
    /// A line that cannot be an item, with the reason.
    Malformed {
        /// The line as lossy UTF-8, or only its start for an over-long line.
        raw: String,
        /// The reason the line is not an item.
        reason: String,
    },
}

impl Item {
    /// Returns where the item is in the input, as progress and the summary
    /// show it: `line N`, or the file (and message) of an email.
    pub fn place(&self) -> String {
        match &self.kind {
            ItemKind::Mail(envelope) => envelope.place(),
            ItemKind::Unsendable { place, .. } => place.clone(),
            _ => format!("line {}", self.line),
        }
    }

    /// Returns whether the item could not be read as an item at all.
    pub fn is_malformed(&self) -> bool {
        matches!(
            self.kind,
            ItemKind::Malformed { .. } | ItemKind::Unsendable { .. }
        )
    }
}

/// A slot that receives the error that ended reading early, if any.
///
/// The stream itself yields only items, so a read error is kept here for the
/// caller to check once the stream has ended.
#[derive(Debug, Clone, Default)]
pub struct ReadFailure(Arc<Mutex<Option<io::Error>>>);

/// A line as read, before it is parsed into an item.
#[derive(Debug)]
struct RawLine {
    number: u64,
    bytes: Vec<u8>,
    too_long: bool,
}

/// Reads lines with a bound on how much of one line is held in memory.
#[derive(Debug)]
struct LineReader<R> {
    reader: R,
    lines_read: u64,
}

impl ReadFailure {
    /// Takes the error that ended reading, leaving the slot empty.
    pub fn take(&self) -> Option<io::Error> {
        self.lock().take()
    }

    fn set(&self, error: io::Error) {
        *self.lock() = Some(error);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<io::Error>> {
        // A panic while holding this lock cannot leave the option half-written.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Opens `path` for reading items, or standard input when it is `-`.
pub async fn open(path: &Path) -> io::Result<Box<dyn AsyncBufRead + Unpin + Send>> {
    if path.as_os_str() == "-" {
        let stdin = tokio::io::stdin();
        return Ok(Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, stdin)));
    }
    let file = tokio::fs::File::open(path).await?;
    if file.metadata().await?.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is a directory; give a file of items, one per line",
        ));
    }
    Ok(Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, file)))
}

/// Returns the stream of items read from `reader`, and the slot that
/// receives a read error that ends the stream early.
pub fn items<R>(reader: R, format: Format) -> (impl Stream<Item = Item>, ReadFailure)
where
    R: AsyncBufRead + Unpin,
{
    let failure = ReadFailure::default();
    let reader = LineReader {
        reader,
        lines_read: 0,
    };
    let state = (reader, 0u64, failure.clone());
    let stream = stream::unfold(state, move |(mut reader, index, failure)| async move {
        let raw = match reader.next_non_empty().await {
            Ok(raw) => raw?,
            Err(error) => {
                failure.set(error);
                return None;
            }
        };
        let item = Item {
            index,
            line: raw.number,
            kind: parse_item(raw, format),
        };
        Some((item, (reader, index + 1, failure)))
    });
    (stream, failure)
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    async fn next_non_empty(&mut self) -> io::Result<Option<RawLine>> {
        loop {
            match self.next_line().await? {
                Some(raw) if raw.bytes.is_empty() && !raw.too_long => continue,
                other => return Ok(other),
            }
        }
    }

    /// Reads one line, keeping at most one byte over the limit so that a
    /// `\r` before the `\n` can still be stripped from a line at the limit.
    /// The first line may also start with a byte order mark, which is
    /// dropped and does not count towards the limit.
    async fn next_line(&mut self) -> io::Result<Option<RawLine>> {
        let first = self.lines_read == 0;
        let max_kept = MAX_LINE_BYTES + 1 + if first { BYTE_ORDER_MARK.len() } else { 0 };
        let mut bytes = Vec::new();
        let mut too_long = false;
        let mut read_any = false;
        let mut newline = false;
        while !newline {
            let buffer = self.reader.fill_buf().await?;
            if buffer.is_empty() {
                break;
            }
            read_any = true;
            let end = buffer.iter().position(|&b| b == b'\n');
            newline = end.is_some();
            let chunk = &buffer[..end.unwrap_or(buffer.len())];
            let room = max_kept.saturating_sub(bytes.len());
            too_long |= chunk.len() > room;
            bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
            let consumed = chunk.len() + usize::from(newline);
            self.reader.consume(consumed);
        }
        if !read_any {
            return Ok(None);
        }
        self.lines_read += 1;
        if first && bytes.starts_with(BYTE_ORDER_MARK) {
            bytes.drain(..BYTE_ORDER_MARK.len());
        }
        // A cut line's last byte is not its end, so only a whole line, the
        // last one without a newline included, loses its `\r`.
        if !too_long && bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        too_long |= bytes.len() > MAX_LINE_BYTES;
        let number = self.lines_read;
        Ok(Some(RawLine {
            number,
            bytes,
            too_long,
        }))
    }
}

fn parse_item(raw: RawLine, format: Format) -> ItemKind {
    if raw.too_long {
        let prefix = &raw.bytes[..OVER_LONG_PREFIX_BYTES.min(raw.bytes.len())];
        return ItemKind::Malformed {
            raw: String::from_utf8_lossy(prefix).into_owned(),
            reason: format!("line is longer than the limit of {MAX_LINE_BYTES} bytes"),
        };
    }
    let text = match String::from_utf8(raw.bytes) {
        Ok(text) => text,
        Err(error) => {
            let offset = error.utf8_error().valid_up_to();
            let reason = format!("invalid UTF-8 at byte offset {offset}");
            let raw = String::from_utf8_lossy(error.as_bytes()).into_owned();
            return ItemKind::Malformed { raw, reason };
        }
    };
    match format {
        Format::Lines => ItemKind::Text(text),
        Format::JsonLines => parse_json(text),
    }
}

fn parse_json(text: String) -> ItemKind {
    let reason = match serde_json::from_str::<Value>(&text) {
        Ok(value @ Value::Object(_)) => return ItemKind::Json(value),
        Ok(other) => format!("not a JSON object but {}", json_type_name(&other)),
        Err(error) => {
            // serde_json ends its message with the position in the parsed
            // text, whose line number would clash with the input's.
            let message = error.to_string();
            let message = message
                .rsplit_once(" at line ")
                .map_or(message.as_str(), |(start, _)| start);
            format!("invalid JSON at column {}: {message}", error.column())
        }
    };
    ItemKind::Malformed { raw: text, reason }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use serde_json::json;

    use super::*;

    /// Reads `input` through a small buffer, so that lines cross buffer ends.
    async fn read_all(input: &[u8], format: Format) -> Vec<Item> {
        let reader = BufReader::with_capacity(7, input);
        let (stream, failure) = items(reader, format);
        let items = stream.collect().await;
        assert!(failure.take().is_none());
        items
    }

    fn text(s: &str) -> ItemKind {
        ItemKind::Text(s.to_owned())
    }

    fn reason(kind: &ItemKind) -> &str {
        match kind {
            ItemKind::Malformed { reason, .. } => reason,
            other => panic!("expected a malformed item, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn read_lines_skips_empty_lines() {
        let items = read_all(b"a\n\nb\r\n\r\nc", Format::Lines).await;
        let summary: Vec<_> = items.iter().map(|i| (i.index, i.line, &i.kind)).collect();
        assert_eq!(
            summary,
            [(0, 1, &text("a")), (1, 3, &text("b")), (2, 5, &text("c"))]
        );
    }

    #[tokio::test]
    async fn read_lines_keeps_inner_spaces_and_lone_cr() {
        let items = read_all(b"  x y \na\rb\n", Format::Lines).await;
        assert_eq!(items[0].kind, text("  x y "));
        assert_eq!(items[1].kind, text("a\rb"));
    }

    #[tokio::test]
    async fn read_strips_cr_of_last_line() {
        let items = read_all(b"a\r\nb\r", Format::Lines).await;
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].kind, text("a"));
        assert_eq!(items[1].kind, text("b"));
    }

    #[tokio::test]
    async fn read_skips_byte_order_mark() {
        let items = read_all(b"\xef\xbb\xbfa\n\xef\xbb\xbfb\n", Format::Lines).await;
        assert_eq!(items[0].kind, text("a"));
        // Only a mark at the start of the input is skipped.
        assert_eq!(items[1].kind, text("\u{feff}b"));
        let json = read_all(b"\xef\xbb\xbf{\"a\":1}\n", Format::JsonLines).await;
        assert_eq!(json[0].kind, ItemKind::Json(json!({"a": 1})));
    }

    #[tokio::test]
    async fn read_line_at_limit_after_byte_order_mark() {
        let mut input = b"\xef\xbb\xbf".to_vec();
        input.extend(vec![b'x'; MAX_LINE_BYTES]);
        let items = read_all(&input, Format::Lines).await;
        assert!(matches!(&items[0].kind, ItemKind::Text(t) if t.len() == MAX_LINE_BYTES));
    }

    #[tokio::test]
    async fn read_empty_input_yields_nothing() {
        assert!(read_all(b"", Format::Lines).await.is_empty());
        assert!(read_all(b"\n\n", Format::Lines).await.is_empty());
    }

    #[tokio::test]
    async fn read_invalid_utf8_is_malformed() {
        let items = read_all(b"ok\nbad \xff\xfe\nok2\n", Format::Lines).await;
        assert_eq!(items.len(), 3);
        assert!(reason(&items[1].kind).starts_with("invalid UTF-8"));
        assert_eq!(items[1].line, 2);
        assert_eq!(items[2].kind, text("ok2"));
    }

    #[tokio::test]
    async fn read_line_at_limit_is_accepted() {
        let mut input = vec![b'x'; MAX_LINE_BYTES];
        input.extend_from_slice(b"\r\nnext\n");
        let items = read_all(&input, Format::Lines).await;
        assert_eq!(items.len(), 2);
        assert!(matches!(&items[0].kind, ItemKind::Text(t) if t.len() == MAX_LINE_BYTES));
        assert_eq!(items[1].kind, text("next"));
    }

    #[tokio::test]
    async fn read_over_long_line_is_malformed() {
        let mut input = b"first\n".to_vec();
        input.extend(vec![b'x'; MAX_LINE_BYTES + 1]);
        input.extend_from_slice(b"\nlast\n");
        let items = read_all(&input, Format::Lines).await;
        assert_eq!(items.len(), 3);
        assert_eq!(items[1].line, 2);
        assert!(reason(&items[1].kind).contains("longer than the limit"));
        let ItemKind::Malformed { raw, .. } = &items[1].kind else {
            unreachable!()
        };
        assert_eq!(raw.len(), OVER_LONG_PREFIX_BYTES);
        assert_eq!(items[2].kind, text("last"));
        assert_eq!(items[2].line, 3);
    }

    #[tokio::test]
    async fn read_over_long_last_line_is_malformed() {
        let input = vec![b'x'; MAX_LINE_BYTES * 2];
        let items = read_all(&input, Format::Lines).await;
        assert_eq!(items.len(), 1);
        assert!(reason(&items[0].kind).contains("longer than the limit"));
    }

    #[tokio::test]
    async fn read_json_lines() {
        let input = b"{\"a\":1}\n\n{bad\n[1]\n{\"b\":{\"c\":\"d\"}}\n";
        let items = read_all(input, Format::JsonLines).await;
        assert_eq!(items.len(), 4);
        assert_eq!(items[0].kind, ItemKind::Json(json!({"a": 1})));
        assert!(reason(&items[1].kind).starts_with("invalid JSON"));
        assert_eq!(items[1].line, 3);
        assert_eq!(reason(&items[2].kind), "not a JSON object but an array");
        assert_eq!(items[3].kind, ItemKind::Json(json!({"b": {"c": "d"}})));
        assert_eq!((items[3].index, items[3].line), (3, 5));
    }

    /// A reader whose every read fails.
    struct FailingReader;

    impl tokio::io::AsyncRead for FailingReader {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Err(io::Error::other("disk on fire")))
        }
    }

    #[tokio::test]
    async fn read_error_ends_stream_and_is_kept() {
        use tokio::io::AsyncReadExt;

        let reader = BufReader::new((b"a\nb\n" as &[u8]).chain(FailingReader));
        let (stream, failure) = items(reader, Format::Lines);
        let items: Vec<Item> = stream.collect().await;
        assert_eq!(items.len(), 2);
        let error = failure.take().expect("the read error is kept");
        assert_eq!(error.to_string(), "disk on fire");
    }

    #[tokio::test]
    async fn read_json_malformed_keeps_raw_line() {
        let items = read_all(b"not json\n", Format::JsonLines).await;
        let ItemKind::Malformed { raw, .. } = &items[0].kind else {
            panic!("expected a malformed item");
        };
        assert_eq!(raw, "not json");
    }
}
