//! The journal: an SQLite file that records each item's state across runs,
//! so that a killed and rerun backlog skips what finished and runs again
//! what did not.
//!
//! An item is marked `running`, and the mark committed, before its command
//! starts. It is marked `done` or `failed` only after the command has
//! exited. One writer thread owns the SQLite connection and commits the
//! requests that arrive together in one transaction. Async code only sends
//! on a channel and awaits a reply, so SQLite never blocks the runtime. A kill can therefore leave at most one `running` mark
//! per command that was running, and never a `done` for a command that did
//! not finish.

mod error;
mod owner;
pub mod store;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::cli::JournalArgs;
use crate::exec::ItemResult;
use crate::source::{Item, ItemKind};
use crate::template::{self, Template};

pub use self::error::{Access, JournalError};
pub use self::owner::{Liveness, Owner};
use self::store::{ClaimRequest, Op, Reply, Store};
pub use self::store::{Commit, Started};

/// The maximum number of requests committed in one transaction.
const MAX_BATCH: usize = 512;

/// The journal settings of `backlog run`.
#[derive(Debug)]
pub struct JournalConfig {
    /// The SQLite file.
    pub path: PathBuf,
    /// The rule that makes an item's identity.
    pub key: KeyRule,
    /// Whether items that failed in an earlier run run again.
    pub retry_failed: bool,
    /// Whether items are JSON Lines, which changes both the hash and what
    /// a `--key` template can name.
    pub jsonl: bool,
}

/// The rule that makes an item's identity, its key in the journal.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyRule {
    /// The SHA-256 of the item's text, in hexadecimal.
    Hash,
    /// The key an email's envelope carries, described by the text.
    Given(String),
    /// A template rendered with the item, as the command's arguments are.
    Template {
        /// The template as given to `--key`.
        source: String,
        /// The parsed template.
        template: Template,
    },
}

/// Whether an item runs, decided by the journal before its command starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The item is marked running: run its command. `attempt` counts from 1
    /// over every run of the journal.
    Run {
        /// The number of this attempt.
        attempt: u32,
    },
    /// The item does not run this time.
    Skip(Skip),
}

/// The reason an item does not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// An earlier run finished it.
    Done,
    /// An earlier run failed it, and `--retry-failed` is not set.
    Failed {
        /// The last error recorded for it.
        error: String,
    },
    /// An earlier line of this input has the same key.
    Duplicate {
        /// The line of the item with that key that this run took.
        first_line: u64,
    },
}

/// The record of one attempt: its exit status and errors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptRecord {
    /// The exit code, if the command exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the command, if one did.
    pub signal: Option<i32>,
    /// The reason the attempt failed, or `None` when it succeeded.
    pub error: Option<String>,
    /// The last lines of the command's standard error.
    pub stderr_tail: Vec<String>,
}

/// The end of one attempt of an item.
#[derive(Debug, Clone, PartialEq, Eq)]
// Only `Succeeded` and `Failed` are built outside tests until runs retry
// items or stop on a signal.
#[allow(dead_code)]
pub enum AttemptEnd {
    /// The command succeeded: the item is done.
    Succeeded(AttemptRecord),
    /// The command failed and no attempt follows: the item has failed.
    Failed(AttemptRecord),
    /// The command failed and another attempt follows: the item is pending
    /// until `Journal::start_attempt` marks it running again.
    WillRetry(AttemptRecord),
    /// The attempt was stopped before it finished, for the given reason:
    /// the item is pending and runs again on the next run.
    Interrupted(String),
    /// The attempt lost its shared lease (`--limiter`), for the given
    /// reason: the item is pending, neither done nor failed, and another
    /// attempt may take it.
    GivenBack(String),
}

/// The journal's decision about an item, made before it runs.
#[derive(Debug)]
pub enum Admission {
    /// The item is marked running: run it, then record the end of the attempt.
    Run {
        /// The item's key, for the later records.
        key: String,
        /// The number of this attempt, counted over every run.
        #[allow(dead_code)]
        attempt: u32,
    },
    /// The item does not run.
    Skip(Skip),
    /// The item is not recorded because it is malformed: it fails as without
    /// a journal.
    Untracked,
    /// The item fails without running because its key cannot be made.
    NoKey(String),
}

/// The handle of an open journal, used from async code.
///
/// Every request goes to the writer thread and resolves once the batch
/// that contains it is committed.
#[derive(Debug)]
pub struct Journal {
    requests: mpsc::Sender<Request>,
    writer: Option<thread::JoinHandle<()>>,
    key: KeyRule,
}

/// A request to the writer thread.
#[derive(Debug)]
enum Request {
    Op(Op, oneshot::Sender<Result<Reply, JournalError>>),
    Close(String, oneshot::Sender<Result<(), JournalError>>),
}

impl JournalConfig {
    /// Builds the journal settings, or `None` without `--journal`.
    ///
    /// # Errors
    ///
    /// Fails when `--key` contains no placeholder, which would give every
    /// item the same key.
    pub fn from_args(args: JournalArgs, jsonl: bool) -> anyhow::Result<Option<Self>> {
        let Some(path) = args.journal else {
            return Ok(None);
        };
        let key = match args.key {
            Some(source) => {
                let option = format!("--key '{source}'");
                let template = Template::parse_key(&source, jsonl, &option, "email")
                    .map_err(anyhow::Error::msg)?;
                KeyRule::Template { template, source }
            }
            None => KeyRule::Hash,
        };
        Ok(Some(JournalConfig {
            path,
            key,
            retry_failed: args.retry_failed,
            jsonl,
        }))
    }

    /// Returns the key rule as stored in the journal, with the input format,
    /// so that a later run with another rule or format is rejected.
    pub fn key_rule(&self) -> String {
        let rule = self.key.describe();
        if self.jsonl {
            format!("{rule} with --jsonl")
        } else {
            rule
        }
    }
}

impl KeyRule {
    /// Returns the rule as stored in the journal, so that a later run with
    /// another rule is rejected.
    pub fn describe(&self) -> String {
        match self {
            KeyRule::Hash => "the SHA-256 of each item (no --key)".to_owned(),
            KeyRule::Template { source, .. } => format!("--key '{source}'"),
            KeyRule::Given(description) => description.clone(),
        }
    }

    /// Makes the key of an item, or `Ok(None)` for a malformed item, which
    /// the journal does not track.
    ///
    /// # Errors
    ///
    /// Fails when the key template names a field the item does not have.
    pub fn key(&self, item: &ItemKind) -> Result<Option<String>, String> {
        match item {
            ItemKind::Malformed { .. } | ItemKind::Unsendable { .. } => return Ok(None),
            ItemKind::Mail(envelope) => return Ok(Some(envelope.key.clone())),
            ItemKind::Text(_) | ItemKind::Json(_) => {}
        }
        match self {
            KeyRule::Given(_) => Ok(None),
            // A JSON item hashes re-serialised with its keys sorted, so that
            // spacing and key order do not change its key.
            KeyRule::Hash => {
                let text = match item {
                    ItemKind::Json(value) => sorted_keys(value).to_string(),
                    other => template::item_text(other),
                };
                let digest = Sha256::digest(text.as_bytes());
                Ok(Some(hex(&digest)))
            }
            KeyRule::Template { template, .. } => match template.render(item) {
                Ok(mut rendered) => Ok(Some(rendered.remove(0))),
                Err(error) => Err(format!("cannot make the item's key: {error}")),
            },
        }
    }
}

/// Returns a copy of `value` whose objects list their keys in sorted order,
/// at every depth.
fn sorted_keys(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;

    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by_key(|(key, _)| *key);
            let sorted = entries
                .into_iter()
                .map(|(key, value)| (key.clone(), sorted_keys(value)))
                .collect();
            Value::Object(sorted)
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted_keys).collect()),
        other => other.clone(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl AttemptRecord {
    /// Creates the record of an attempt from its command's result.
    pub fn from_result(result: &ItemResult) -> Self {
        AttemptRecord {
            exit_code: result.exit_code,
            signal: result.signal,
            error: result.failure_reason(),
            stderr_tail: result.stderr_tail.clone(),
        }
    }

    fn interrupted(reason: &str) -> Self {
        AttemptRecord {
            error: Some(format!("interrupted: {reason}")),
            ..AttemptRecord::default()
        }
    }

    fn given_back(reason: &str) -> Self {
        AttemptRecord {
            error: Some(format!("given back: {reason}")),
            ..AttemptRecord::default()
        }
    }
}

impl Journal {
    /// Opens the journal, takes its run lock and starts the writer thread.
    ///
    /// # Errors
    ///
    /// Fails with a message naming the file and the fix when the journal
    /// cannot be opened, is not a journal, or is in use by a live run.
    pub async fn open(config: &JournalConfig) -> Result<(Self, Started), JournalError> {
        let (path, key_rule) = (config.path.clone(), config.key_rule());
        let retry_failed = config.retry_failed;
        let (requests, receiver) = mpsc::channel();
        let (opened_tx, opened_rx) = oneshot::channel();
        let writer = thread::Builder::new()
            .name("backlog-journal".to_owned())
            .spawn(move || match Store::open(&path, &key_rule, retry_failed) {
                Ok((store, started)) => {
                    if opened_tx.send(Ok(started)).is_ok() {
                        serve(store, &receiver);
                    }
                }
                Err(error) => drop(opened_tx.send(Err(error))),
            })
            .map_err(|e| JournalError::new(format!("cannot start the journal thread: {e}")))?;
        let started = opened_rx.await.map_err(|_| writer_gone(&config.path))??;
        let journal = Journal {
            requests,
            writer: Some(writer),
            key: config.key.clone(),
        };
        Ok((journal, started))
    }

    /// Decides whether `item` runs, and marks it running if it does. The
    /// mark is committed when this returns.
    ///
    /// NOTE: a skipped item also waits for a commit, and at most `--max-run`
    /// claims share one, so skipping a long finished prefix of the input
    /// costs one fsync per `--max-run` items.
    ///
    /// # Errors
    ///
    /// Fails when the journal cannot be written.
    pub async fn admit(&self, item: &Item) -> Result<Admission, JournalError> {
        let key = match self.key.key(&item.kind) {
            Ok(Some(key)) => key,
            Ok(None) => return Ok(Admission::Untracked),
            Err(reason) => return Ok(Admission::NoKey(reason)),
        };
        let request = ClaimRequest {
            key: key.clone(),
            line: item.line,
            text: template::item_text(&item.kind),
        };
        match self.send(Op::Claim(request)).await? {
            Reply::Claim(Claim::Run { attempt }) => Ok(Admission::Run { key, attempt }),
            Reply::Claim(Claim::Skip(skip)) => Ok(Admission::Skip(skip)),
            other => unreachable!("a claim got the reply {other:?}"),
        }
    }

    /// Marks an item that `admit` let run as running again, for a retry,
    /// under the shared lease with `fence` if there is one, and returns the
    /// number of the new attempt.
    ///
    /// # Errors
    ///
    /// Fails when the journal cannot be written.
    pub async fn start_attempt(&self, key: &str, fence: Option<u64>) -> Result<u32, JournalError> {
        match self.send(Op::StartAttempt(key.to_owned(), fence)).await? {
            Reply::Attempt(attempt) => Ok(attempt),
            other => unreachable!("a new attempt got the reply {other:?}"),
        }
    }

    /// Stores the fence of the shared lease that the item's running
    /// attempt, the first one, holds.
    ///
    /// # Errors
    ///
    /// Fails when the journal cannot be written.
    pub async fn set_fence(&self, key: &str, fence: u64) -> Result<(), JournalError> {
        self.send(Op::SetFence(key.to_owned(), fence)).await?;
        Ok(())
    }

    /// Records how an attempt ended. A success under a shared lease is
    /// recorded only if the item still has the lease's `fence`, and is
    /// rejected otherwise. The record is committed when this returns.
    ///
    /// # Errors
    ///
    /// Fails when the journal cannot be written.
    pub async fn finish_attempt(
        &self,
        key: &str,
        end: AttemptEnd,
        fence: Option<u64>,
    ) -> Result<Commit, JournalError> {
        match self
            .send(Op::FinishAttempt(key.to_owned(), end, fence))
            .await?
        {
            Reply::Finished(commit) => Ok(commit),
            other => unreachable!("the end of an attempt got the reply {other:?}"),
        }
    }

    /// Ends the run with `outcome`, releases the lock and stops the writer
    /// thread. Items still marked running go back to pending.
    ///
    /// # Errors
    ///
    /// Fails when the journal cannot be written.
    pub async fn close(mut self, outcome: &str) -> Result<(), JournalError> {
        let (reply, receiver) = oneshot::channel();
        let closed = match self
            .requests
            .send(Request::Close(outcome.to_owned(), reply))
        {
            Ok(()) => receiver.await.unwrap_or_else(|_| Err(writer_stopped())),
            Err(_) => Err(writer_stopped()),
        };
        if let Some(writer) = self.writer.take() {
            // The thread ends right after its reply, so this wait is short.
            drop(writer.join());
        }
        closed
    }

    async fn send(&self, op: Op) -> Result<Reply, JournalError> {
        let (reply, receiver) = oneshot::channel();
        self.requests
            .send(Request::Op(op, reply))
            .map_err(|_| writer_stopped())?;
        receiver.await.unwrap_or_else(|_| Err(writer_stopped()))
    }
}

/// Opens the journal of a run and reports on stderr when the previous run
/// died, because its unfinished items run again.
///
/// # Errors
///
/// Fails as `Journal::open` does.
pub async fn open(config: &JournalConfig) -> anyhow::Result<Journal> {
    let (journal, started) = Journal::open(config).await?;
    if let Some(died) = started.died {
        let Owner { pid, host, .. } = &died.owner;
        let items = if died.running == 1 { "item" } else { "items" };
        // A closed stderr must not stop the run, so this line is best effort.
        let _ = writeln!(
            std::io::stderr(),
            "journal: run {} (pid {pid} on {host}) ended without finishing; \
             its {} running {items} run again",
            died.run,
            died.running
        );
    }
    Ok(journal)
}

/// Returns how a run ended, as the journal records it.
pub fn run_outcome<T>(processed: &anyhow::Result<T>) -> String {
    match processed {
        Ok(_) => "completed".to_owned(),
        Err(error) => format!("stopped: {error:#}"),
    }
}

fn writer_gone(path: &Path) -> JournalError {
    JournalError::new(format!(
        "cannot open journal '{}': the journal thread stopped",
        path.display()
    ))
}

fn writer_stopped() -> JournalError {
    JournalError::new("the journal thread stopped unexpectedly".to_owned())
}

/// Serves requests until the journal is closed or every handle is gone.
///
/// Requests that queued while the last batch was being committed make up
/// the next batch, so one commit (one fsync) serves many items when many
/// finish at once. Replies go out only after the commit, so no command
/// starts before its `running` mark is committed. Only a batch that ends an
/// item waits for an fsync (see `Store::apply`).
fn serve(mut store: Store, requests: &mpsc::Receiver<Request>) {
    while let Ok(first) = requests.recv() {
        let mut ops = Vec::new();
        let mut replies = Vec::new();
        let mut close = None;
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Request::Op(op, reply) => {
                    ops.push(op);
                    replies.push(reply);
                }
                Request::Close(outcome, reply) => {
                    close = Some((outcome, reply));
                    break;
                }
            }
            if ops.len() < MAX_BATCH {
                next = requests.try_recv().ok();
            }
        }
        if !ops.is_empty() {
            match store.apply(&ops) {
                Ok(results) => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        drop(reply.send(Ok(result)));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        drop(reply.send(Err(error.clone())));
                    }
                }
            }
        }
        if let Some((outcome, reply)) = close {
            drop(reply.send(store.close(&outcome)));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn hash_key_is_stable_and_ignores_json_layout() {
        let text = KeyRule::Hash.key(&ItemKind::Text("abc".to_owned()));
        assert_eq!(
            text.unwrap().unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let spaced: serde_json::Value =
            serde_json::from_str(r#"{ "b": 1, "a": {"y": 2, "x": [{"q": 1, "p": 0}]} }"#).unwrap();
        let compact: serde_json::Value =
            serde_json::from_str(r#"{"a":{"x":[{"p":0,"q":1}],"y":2},"b":1}"#).unwrap();
        assert_eq!(
            KeyRule::Hash.key(&ItemKind::Json(spaced)),
            KeyRule::Hash.key(&ItemKind::Json(compact))
        );
    }

    #[test]
    fn template_key_renders_fields() {
        let source = "{email}".to_owned();
        let rule = KeyRule::Template {
            template: Template::parse(std::slice::from_ref(&source), true),
            source,
        };
        let item = ItemKind::Json(json!({"email": "a@example.com", "n": 1}));
        assert_eq!(rule.key(&item).unwrap().as_deref(), Some("a@example.com"));
        let missing = rule.key(&ItemKind::Json(json!({"n": 1}))).unwrap_err();
        assert_eq!(
            missing,
            "cannot make the item's key: field `email` not found in item"
        );
    }

    #[test]
    fn malformed_item_has_no_key() {
        let item = ItemKind::Malformed {
            raw: "x".to_owned(),
            reason: "bad".to_owned(),
        };
        assert_eq!(KeyRule::Hash.key(&item), Ok(None));
    }
}
