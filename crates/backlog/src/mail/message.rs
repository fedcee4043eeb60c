//! Email messages read from `.eml` files, mbox files and JSON Lines, and
//! the envelopes they are sent in: one per recipient domain.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, Mailboxes, MultiPart, SinglePart};
use lettre::Address;
use mailparse::{MailAddr, MailHeaderMap};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// The rule that makes a message's journal key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailKey {
    /// The Message-ID header, or the SHA-256 of the message when it has
    /// none.
    MessageId,
    /// The SHA-256 of the message (of the JSON object for mail merge).
    Sha256,
}

/// The position of a message in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The file it was read from.
    pub file: PathBuf,
    /// Its 1-based number within an mbox file.
    pub message: Option<u64>,
    /// Its 1-based line within a JSON Lines file.
    pub line: Option<u64>,
}

/// One message for the recipients of one domain: what one SMTP session
/// sends.
#[derive(Debug, PartialEq)]
pub struct Envelope {
    /// The position of the message in the input.
    pub place: Place,
    /// The recipients' domain, in lower case.
    pub domain: String,
    /// The envelope sender: the Sender header, or else the first From
    /// address.
    pub sender: Address,
    /// The recipients in `domain`, from To, Cc and Bcc, each once.
    pub recipients: Vec<Address>,
    /// The message as sent: CRLF line ends, without Bcc headers. It is
    /// shared by the envelopes of one message.
    pub data: Arc<[u8]>,
    /// The journal key: the message's identity and the domain.
    pub key: String,
    /// The envelope as the results file shows it.
    pub description: Value,
}

/// The fields of a mail merge line.
const JSON_FIELDS: [&str; 9] = [
    "from", "to", "cc", "bcc", "subject", "text", "html", "headers", "reply_to",
];

impl Place {
    /// Creates the place of a file that contains one message.
    pub fn file(file: &Path) -> Self {
        Place {
            file: file.to_path_buf(),
            message: None,
            line: None,
        }
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(message) = self.message {
            write!(f, " message {message}")?;
        }
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        Ok(())
    }
}

impl Envelope {
    /// Returns where the envelope's message is, with its domain.
    pub fn place(&self) -> String {
        format!("{} to {}", self.place, self.domain)
    }

    /// Returns the envelope as the results file shows it.
    pub fn description(&self) -> &Value {
        &self.description
    }
}

/// Returns whether `bytes`, read from `path`, is an mbox file: its name
/// ends in `.mbox` or `.mbx`, or its first line is a `From ` line.
pub fn is_mbox(path: &Path, bytes: &[u8]) -> bool {
    let by_name = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("mbox") || e.eq_ignore_ascii_case("mbx"));
    by_name || bytes.starts_with(b"From ")
}

/// Splits an mbox file into its messages. A message starts at a `From `
/// line at the start of the file or after an empty line; that line is not
/// part of it. `>From ` lines lose one `>` (mboxrd quoting).
pub fn split_mbox(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut messages: Vec<Vec<u8>> = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    let mut previous_empty = true;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if previous_empty && line.starts_with(b"From ") {
            if let Some(message) = current.take() {
                messages.push(message);
            }
            current = Some(Vec::new());
            previous_empty = false;
            continue;
        }
        previous_empty = content.is_empty();
        let Some(message) = current.as_mut() else {
            // Text before the first `From ` line belongs to no message.
            continue;
        };
        let quoted = line.iter().take_while(|&&b| b == b'>').count();
        if quoted > 0 && line[quoted..].starts_with(b"From ") {
            message.extend_from_slice(&line[1..]);
        } else {
            message.extend_from_slice(line);
        }
    }
    messages.extend(current);
    for message in &mut messages {
        // The empty line before the next `From ` line separates messages.
        if message.ends_with(b"\r\n\r\n") {
            message.truncate(message.len() - 2);
        } else if message.ends_with(b"\n\n") {
            message.pop();
        }
    }
    messages
}

/// Reads one message and splits it into one envelope per recipient domain.
///
/// # Errors
///
/// Fails with the reason when the message has no parsable headers, no
/// sender or no recipient, or an address is invalid.
pub fn envelopes(place: &Place, bytes: &[u8], key: MailKey) -> Result<Vec<Envelope>, String> {
    envelopes_with_identity(place, bytes, key, None)
}

fn envelopes_with_identity(
    place: &Place,
    bytes: &[u8],
    key: MailKey,
    identity: Option<String>,
) -> Result<Vec<Envelope>, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err("empty message".to_owned());
    }
    if !starts_with_header(bytes) {
        return Err("not an email message: its first line is not a header".to_owned());
    }
    let (headers, body_start) = mailparse::parse_headers(bytes)
        .map_err(|error| format!("cannot parse the headers: {error}"))?;
    if headers.is_empty() {
        return Err("no headers: not an email message".to_owned());
    }
    let sender_header = headers
        .get_first_header("Sender")
        .or_else(|| headers.get_first_header("From"))
        .ok_or("no From header")?;
    let sender_name = sender_header.get_key();
    let senders = address_list(&sender_header.get_value(), &sender_name)?;
    let sender = senders
        .into_iter()
        .next()
        .ok_or_else(|| format!("no address in the {sender_name} header"))?;

    let mut recipients = Vec::new();
    for name in ["To", "Cc", "Bcc"] {
        for header in headers.get_all_headers(name) {
            recipients.extend(address_list(&header.get_value(), name)?);
        }
    }
    if recipients.is_empty() {
        return Err("no recipient: no address in To, Cc or Bcc".to_owned());
    }

    check_lines(bytes)?;
    let data: Arc<[u8]> = without_bcc(&bytes[..body_start], &bytes[body_start..]).into();
    let identity = identity.unwrap_or_else(|| {
        let message_id = headers
            .get_first_value("Message-ID")
            .map(|id| id.trim().to_owned())
            .filter(|id| !id.is_empty());
        match (key, message_id) {
            (MailKey::MessageId, Some(id)) => id,
            _ => format!("sha256:{}", hex(&Sha256::digest(bytes))),
        }
    });
    Ok(by_domain(place, sender, recipients, &data, &identity))
}

/// Returns whether `bytes` starts with a header line: a name of printable
/// ASCII characters other than `:`, then `:`.
fn starts_with_header(bytes: &[u8]) -> bool {
    let name_length = bytes
        .iter()
        .take_while(|&&b| b.is_ascii_graphic() && b != b':')
        .count();
    name_length > 0 && bytes.get(name_length) == Some(&b':')
}

/// Groups `recipients` by domain, in order of first appearance, each
/// address once (addresses compare without case).
fn by_domain(
    place: &Place,
    sender: Address,
    recipients: Vec<Address>,
    data: &Arc<[u8]>,
    identity: &str,
) -> Vec<Envelope> {
    let mut domains: Vec<(String, Vec<Address>)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut slot: HashMap<String, usize> = HashMap::new();
    for recipient in recipients {
        if !seen.insert(AsRef::<str>::as_ref(&recipient).to_lowercase()) {
            continue;
        }
        let domain = recipient.domain().to_lowercase();
        let index = *slot.entry(domain.clone()).or_insert_with(|| {
            domains.push((domain, Vec::new()));
            domains.len() - 1
        });
        domains[index].1.push(recipient);
    }
    domains
        .into_iter()
        .map(|(domain, recipients)| {
            let mut description = json!({
                "file": place.file.display().to_string(),
                "message_id": identity,
                "from": sender.to_string(),
                "domain": domain,
                "to": recipients.iter().map(ToString::to_string).collect::<Vec<_>>(),
            });
            if let Some(message) = place.message {
                description["message"] = json!(message);
            }
            if let Some(line) = place.line {
                description["line"] = json!(line);
            }
            Envelope {
                place: place.clone(),
                key: format!("{identity} {domain}"),
                domain,
                sender: sender.clone(),
                recipients,
                data: Arc::clone(data),
                description,
            }
        })
        .collect()
}

/// Parses the addresses of one header, groups flattened.
fn address_list(value: &str, header: &str) -> Result<Vec<Address>, String> {
    let parsed = mailparse::addrparse(value)
        .map_err(|error| format!("invalid {header} header '{}': {error}", value.trim()))?;
    let mut addresses = Vec::new();
    for entry in parsed.iter() {
        let singles = match entry {
            MailAddr::Single(single) => std::slice::from_ref(single),
            MailAddr::Group(group) => group.addrs.as_slice(),
        };
        for single in singles {
            let address = Address::from_str(single.addr.trim()).map_err(|error| {
                format!("invalid address '{}' in {header}: {error}", single.addr)
            })?;
            addresses.push(address);
        }
    }
    Ok(addresses)
}

/// Returns the message with its Bcc headers removed and every line ended
/// by CRLF, as SMTP requires.
fn without_bcc(headers: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(headers.len() + body.len() + body.len() / 32);
    let mut in_bcc = false;
    for line in headers.split_inclusive(|&b| b == b'\n') {
        let continuation = line.first().is_some_and(|&b| b == b' ' || b == b'\t');
        if !continuation {
            in_bcc = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"bcc:");
        }
        if !in_bcc {
            push_crlf_line(&mut out, line);
        }
    }
    for line in body.split_inclusive(|&b| b == b'\n') {
        push_crlf_line(&mut out, line);
    }
    out
}

/// The maximum line length SMTP allows, without its CRLF (RFC 5321,
/// 4.5.3.1.6).
const MAX_LINE_BYTES: usize = 998;

/// Checks for what SMTP cannot carry as it is: a NUL byte, a carriage
/// return that does not end a line, and lines longer than
/// [`MAX_LINE_BYTES`]. Some servers take a bare CR before a dot for the end
/// of the data, which would let one message smuggle another.
fn check_lines(bytes: &[u8]) -> Result<(), String> {
    for (number, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let number = number + 1;
        let content = line.strip_suffix(b"\r").unwrap_or(line);
        if content.contains(&0) {
            return Err(format!(
                "line {number} contains a NUL byte, which SMTP cannot carry"
            ));
        }
        if content.contains(&b'\r') {
            return Err(format!(
                "line {number} contains a carriage return that does not end the line; \
                 SMTP needs CRLF or LF line ends"
            ));
        }
        if content.len() > MAX_LINE_BYTES {
            return Err(format!(
                "line {number} is {} bytes long, and SMTP allows at most {MAX_LINE_BYTES}; \
                 fold long header lines or wrap the body",
                content.len()
            ));
        }
    }
    Ok(())
}

fn push_crlf_line(out: &mut Vec<u8>, line: &[u8]) {
    let Some(content) = line.strip_suffix(b"\n") else {
        out.extend_from_slice(line);
        return;
    };
    out.extend_from_slice(content.strip_suffix(b"\r").unwrap_or(content));
    out.extend_from_slice(b"\r\n");
}

/// Builds the message of one mail merge line and splits it into
/// envelopes. Its Message-ID, unless `headers` sets one, is made from the
/// SHA-256 of the object, so that a rerun gives it the same identity.
///
/// # Errors
///
/// Fails with the reason when a field is missing, of the wrong type or
/// unknown, or an address is invalid.
pub fn envelopes_from_json(
    place: &Place,
    object: &Map<String, Value>,
    key: MailKey,
) -> Result<Vec<Envelope>, String> {
    if let Some(unknown) = object.keys().find(|k| !JSON_FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "unknown field '{unknown}'; the fields are {}",
            JSON_FIELDS.join(", ")
        ));
    }
    let digest = hex(&Sha256::digest(
        sorted(&Value::Object(object.clone())).to_string(),
    ));
    let from = text_field(object, "from")?.ok_or("no field 'from'")?;
    let from = Mailbox::from_str(from).map_err(|e| format!("invalid 'from' '{from}': {e}"))?;
    let mut builder = lettre::Message::builder().from(from.clone()).keep_bcc();
    let mut recipients = 0;
    for (field, add) in [
        ("to", lettre::message::MessageBuilder::to as fn(_, _) -> _),
        ("cc", lettre::message::MessageBuilder::cc),
        ("bcc", lettre::message::MessageBuilder::bcc),
        ("reply_to", lettre::message::MessageBuilder::reply_to),
    ] {
        for mailbox in mailbox_field(object, field)? {
            recipients += usize::from(field != "reply_to");
            builder = add(builder, mailbox);
        }
    }
    if recipients == 0 {
        return Err("no recipient: no address in To, Cc or Bcc".to_owned());
    }
    if let Some(subject) = text_field(object, "subject")? {
        builder = builder.subject(subject);
    }
    let mut message_id = None;
    if let Some(headers) = object.get("headers") {
        let Value::Object(headers) = headers else {
            return Err("field 'headers' must be an object of strings".to_owned());
        };
        for (name, value) in headers {
            let Value::String(value) = value else {
                return Err(format!("header '{name}' must be a string"));
            };
            if name.eq_ignore_ascii_case("message-id") {
                message_id = Some(value.clone());
                continue;
            }
            let header_name = HeaderName::new_from_ascii(name.clone())
                .map_err(|_| format!("invalid header name '{name}'"))?;
            builder = builder.raw_header(HeaderValue::new(header_name, value.clone()));
        }
    }
    let domain = from.email.domain().to_owned();
    let message_id = message_id.unwrap_or_else(|| format!("<{}@{domain}>", &digest[..32]));
    builder = builder.message_id(Some(message_id.clone()));
    let text = text_field(object, "text")?;
    let html = text_field(object, "html")?;
    let built = match (text, html) {
        (Some(text), Some(html)) => builder.multipart(MultiPart::alternative_plain_html(
            text.to_owned(),
            html.to_owned(),
        )),
        (None, Some(html)) => builder.singlepart(SinglePart::html(html.to_owned())),
        (text, None) => builder.singlepart(SinglePart::plain(text.unwrap_or("").to_owned())),
    };
    let message = built.map_err(|error| format!("cannot build the message: {error}"))?;
    let identity = match key {
        MailKey::MessageId => message_id,
        MailKey::Sha256 => format!("sha256:{digest}"),
    };
    envelopes_with_identity(place, &message.formatted(), key, Some(identity))
}

fn text_field<'a>(object: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, String> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(format!("field '{field}' must be a string")),
    }
}

/// Reads a field of addresses: a string (which may list several,
/// separated by commas) or a list of strings.
fn mailbox_field(object: &Map<String, Value>, field: &str) -> Result<Vec<Mailbox>, String> {
    let texts: Vec<&str> = match object.get(field) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(text)) => vec![text],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str())
            .collect::<Option<_>>()
            .ok_or_else(|| format!("field '{field}' must be a string or a list of strings"))?,
        Some(_) => {
            return Err(format!(
                "field '{field}' must be a string or a list of strings"
            ))
        }
    };
    let mut mailboxes = Vec::new();
    for text in texts {
        let parsed = Mailboxes::from_str(text)
            .map_err(|error| format!("invalid '{field}' address '{text}': {error}"))?;
        mailboxes.extend(parsed);
    }
    Ok(mailboxes)
}

fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by_key(|(key, _)| *key);
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place() -> Place {
        Place::file(Path::new("a.eml"))
    }

    #[test]
    fn splits_by_domain_and_strips_bcc() {
        let message = b"From: Ann <ann@example.org>\nTo: b@x.test, c@y.test\nCc: d@X.test\nBcc: e@y.test,\n f@z.test\nMessage-ID: <1@example.org>\nSubject: hi\n\nbody\n";
        let envelopes = envelopes(&place(), message, MailKey::MessageId).unwrap();
        let domains: Vec<_> = envelopes.iter().map(|e| e.domain.as_str()).collect();
        assert_eq!(domains, ["x.test", "y.test", "z.test"]);
        let to: Vec<String> = envelopes[0]
            .recipients
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(to, ["b@x.test", "d@X.test"]);
        assert_eq!(envelopes[1].recipients.len(), 2);
        assert_eq!(envelopes[0].sender.to_string(), "ann@example.org");
        assert_eq!(envelopes[0].key, "<1@example.org> x.test");
        let data = String::from_utf8(envelopes[0].data.to_vec()).unwrap();
        assert!(!data.to_lowercase().contains("bcc"), "{data}");
        assert!(!data.contains("f@z.test"), "{data}");
        assert!(data.ends_with("\r\n\r\nbody\r\n"), "{data:?}");
    }

    #[test]
    fn lines_smtp_cannot_carry_are_rejected() {
        let head = "From: a@one.test\nTo: b@x.test\n\n";
        let long = "x".repeat(999);
        let cases = [
            (
                format!("{head}ok\r.\r\nMAIL FROM:<e@e.test>\n"),
                "line 4 contains a carriage return",
            ),
            (format!("{head}a\0b\n"), "line 4 contains a NUL byte"),
            (format!("{head}{long}\n"), "line 4 is 999 bytes long"),
        ];
        for (message, expected) in cases {
            let error = envelopes(&place(), message.as_bytes(), MailKey::MessageId).unwrap_err();
            assert!(error.starts_with(expected), "{error}");
        }
        let fits = format!("{head}{}\r\n", "x".repeat(998));
        assert!(envelopes(&place(), fits.as_bytes(), MailKey::MessageId).is_ok());
    }

    #[test]
    fn sender_header_and_hash_key() {
        let message = b"From: a@one.test\nSender: s@two.test\nTo: b@x.test\n\nhi\n";
        let envelopes = envelopes(&place(), message, MailKey::MessageId).unwrap();
        assert_eq!(envelopes[0].sender.to_string(), "s@two.test");
        assert!(
            envelopes[0].key.starts_with("sha256:"),
            "{}",
            envelopes[0].key
        );
    }

    #[test]
    fn reasons_for_unsendable_messages() {
        let reason = |bytes: &[u8]| envelopes(&place(), bytes, MailKey::MessageId).unwrap_err();
        assert_eq!(reason(b"To: b@x.test\n\nhi\n"), "no From header");
        assert_eq!(
            reason(b"From: a@x.test\nSubject: s\n\nhi\n"),
            "no recipient: no address in To, Cc or Bcc"
        );
        assert_eq!(reason(b""), "empty message");
        assert_eq!(
            reason(b"\x89PNG\r\n\x1a\n\0\0"),
            "not an email message: its first line is not a header"
        );
        let bad = reason(b"From: a@x.test\nTo: nobody\n\n");
        assert!(bad.contains("'nobody'"), "{bad}");
    }

    #[test]
    fn mbox_splits_and_unquotes() {
        let mbox = b"From a@x Mon Jan 1 00:00:00 2024\nFrom: a@x.test\nTo: b@y.test\n\n>From here\n\nFrom b@x Mon Jan 1 00:00:00 2024\nFrom: c@x.test\nTo: d@y.test\n\ntwo\n";
        let messages = split_mbox(mbox);
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0], b"From: a@x.test\nTo: b@y.test\n\nFrom here\n");
        assert_eq!(messages[1], b"From: c@x.test\nTo: d@y.test\n\ntwo\n");
        assert!(is_mbox(Path::new("x.eml"), mbox));
        assert!(is_mbox(Path::new("x.MBOX"), b""));
        assert!(!is_mbox(Path::new("x.eml"), b"From: a@x.test\n"));
    }

    #[test]
    fn json_merge_builds_message() {
        let object = json!({
            "from": "Ann <ann@example.org>", "to": ["b@x.test", "c@y.test"],
            "bcc": "d@x.test", "subject": "Hello", "text": "Hi there",
            "headers": {"X-Campaign": "7"},
        });
        let place = Place {
            line: Some(3),
            ..Place::file(Path::new("m.jsonl"))
        };
        let envelopes =
            envelopes_from_json(&place, object.as_object().unwrap(), MailKey::MessageId).unwrap();
        assert_eq!(envelopes.len(), 2);
        assert_eq!(envelopes[0].recipients.len(), 2);
        let data = String::from_utf8(envelopes[0].data.to_vec()).unwrap();
        assert!(data.contains("X-Campaign: 7"), "{data}");
        assert!(!data.contains("d@x.test"), "{data}");
        assert!(envelopes[0].key.ends_with("@example.org> x.test"));
        // The same object gets the same identity on every run.
        let again =
            envelopes_from_json(&place, object.as_object().unwrap(), MailKey::MessageId).unwrap();
        assert_eq!(again[0].key, envelopes[0].key);
        assert_eq!(envelopes[0].place(), "m.jsonl line 3 to x.test");

        let bad = json!({"from": "a@x.test", "to": "b@x.test", "body": "x"});
        let error =
            envelopes_from_json(&place, bad.as_object().unwrap(), MailKey::MessageId).unwrap_err();
        assert!(error.starts_with("unknown field 'body'"), "{error}");
    }
}
