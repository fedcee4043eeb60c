//! `backlog mail`: sends email messages over SMTP through the same engine
//! as `backlog run`, one envelope (a message's recipients in one domain)
//! per item.

pub mod domains;
pub mod message;
pub mod smtp;

use std::io::IsTerminal;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::stream::{self, Stream, StreamExt};

use crate::cli::MailArgs;
use crate::config::ItemRules;
use crate::engine::{self, RunSetup};
use crate::fleet::LimiterSettings;
use crate::journal::{JournalConfig, KeyRule};
use crate::limits::KeyLimits;
use crate::progress::Summary;
use crate::retry::{RetryOn, RetryPolicy};
use crate::source::{self, Format, Item, ItemKind};

use self::domains::DomainLimits;
use self::message::{MailKey, Place};
use self::smtp::{MailJobs, SmtpRunner, SmtpServer};

/// How long one network read or write of a session may wait.
const IO_TIMEOUT: Duration = Duration::from_secs(300);

/// The validated settings of `backlog mail`.
#[derive(Debug)]
pub struct MailConfig {
    /// The files to read, folders already listed.
    pub files: Vec<PathBuf>,
    /// Whether the files are JSON Lines for mail merge.
    pub jsonl: bool,
    /// The SMTP server.
    pub server: SmtpServer,
    /// The maximum number of sessions at once.
    pub max_run: NonZeroUsize,
    /// The maximum number of sessions at once per recipient domain.
    pub per_domain: usize,
    /// The rule that makes a message's journal key.
    pub key: MailKey,
    /// The results file.
    pub results: Option<PathBuf>,
    /// The journal.
    pub journal: Option<JournalConfig>,
    /// Retries, time limits and `--halt`.
    pub rules: ItemRules,
    /// The time limit of the whole run.
    pub deadline: Option<Duration>,
    /// The limiter shared with other processes (`--limiter`).
    pub limiter: Option<LimiterSettings>,
}

impl MailConfig {
    /// Validates the arguments of `backlog mail` and lists its input files.
    ///
    /// # Errors
    ///
    /// Fails on an invalid `--smtp` URL, an invalid `--smtp-ca` file and
    /// an input that cannot be read.
    pub fn from_args(args: MailArgs) -> anyhow::Result<Self> {
        let mut server = smtp::parse_smtp_url(&args.smtp, |name| std::env::var(name).ok())
            .map_err(anyhow::Error::msg)
            .context("invalid --smtp")?;
        if let Some(path) = &args.smtp_ca {
            server
                .trust_roots_from(path)
                .map_err(anyhow::Error::msg)
                .context("invalid --smtp-ca")?;
        }
        let mut files = Vec::new();
        for input in &args.inputs {
            list_input(input, &mut files)?;
        }
        let key = match args.key.as_str() {
            "message-id" => MailKey::MessageId,
            "sha256" => MailKey::Sha256,
            other => bail!("--key must be message-id or sha256 (got '{other}')"),
        };
        let max_run = usize::try_from(args.max_run)
            .ok()
            .and_then(NonZeroUsize::new)
            .context("--max-run does not fit in this platform's address size")?;
        let journal = args.journal.map(|path| JournalConfig {
            path,
            key: KeyRule::Given(key_description(key)),
            retry_failed: args.retry_failed,
            // The key already names its source, so the input format adds
            // nothing to the stored rule.
            jsonl: false,
        });
        Ok(MailConfig {
            files,
            jsonl: args.jsonl,
            server,
            max_run,
            per_domain: args.per_domain as usize,
            key,
            results: args.results,
            journal,
            rules: ItemRules {
                retry: RetryPolicy {
                    retries: args.retries,
                    delay: args.retry_delay,
                    // Only temporary SMTP failures are retried: a timeout
                    // may come after the server took the message.
                    retry_on: RetryOn::ExitCodes(Vec::new()),
                },
                timeout: args.timeout,
                halt: args.halt,
                // Keyed by domain: an envelope waits for its domain's slot
                // without holding a --max-run slot, and other domains go on.
                duplicate_keys_fail: true,
                limits: Some(KeyLimits {
                    key: None,
                    per_key: NonZeroUsize::new(args.per_domain as usize),
                    rate: args.rate.map(|rate| rate.to_rate(args.burst)),
                    per_key_rate: None,
                }),
            },
            deadline: args.deadline,
            limiter: args.limiter.settings()?,
        })
    }
}

fn key_description(key: MailKey) -> String {
    match key {
        MailKey::MessageId => {
            "the Message-ID of each message, or its SHA-256, with the domain".to_owned()
        }
        MailKey::Sha256 => "the SHA-256 of each message, with the domain (--key sha256)".to_owned(),
    }
}

/// Adds `input` to `files`: a file, or the files of a folder (not its
/// subfolders), by name, without the hidden ones.
fn list_input(input: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let metadata = std::fs::metadata(input)
        .with_context(|| format!("cannot read input '{}'", input.display()))?;
    if !metadata.is_dir() {
        files.push(input.to_path_buf());
        return Ok(());
    }
    let entries = std::fs::read_dir(input)
        .with_context(|| format!("cannot list folder '{}'", input.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list folder '{}'", input.display()))?;
        let hidden = entry.file_name().as_encoded_bytes().starts_with(b".");
        let path = entry.path();
        if !hidden && path.is_file() {
            found.push(path);
        }
    }
    found.sort();
    files.extend(found);
    Ok(())
}

/// Sends the messages that `config` names, then prints the summary.
///
/// # Errors
///
/// Fails as `backlog run` does when the results file or the journal
/// cannot be used.
pub async fn run(config: &MailConfig) -> anyhow::Result<Summary> {
    let progress_bar = std::io::stderr().is_terminal();
    let setup = RunSetup {
        results: config.results.as_deref(),
        progress_bar,
        clear_bar_for_output: false,
        journal: config.journal.as_ref(),
        max_run: config.max_run,
        rules: &config.rules,
        deadline: config.deadline,
        endless_input: false,
        limiter: config.limiter.as_ref(),
    };
    // A slowed-down domain gets its limit back after the first retry's wait.
    let cooldown = config.rules.retry.delay.max(Duration::from_secs(1));
    let domains = DomainLimits::new(config.per_domain, cooldown);
    let runner = SmtpRunner::new(config.server.clone(), domains, IO_TIMEOUT);
    let items = items(config.files.clone(), config.jsonl, config.key);
    engine::run_items(&setup, &MailJobs, &runner, items).await
}

/// Returns the envelopes of every message of `files`, as items. Each file
/// is read when the items before it have been taken.
pub fn items(files: Vec<PathBuf>, jsonl: bool, key: MailKey) -> impl Stream<Item = Item> {
    stream::iter(files)
        .then(move |file| async move { read_file(&file, jsonl, key).await })
        .flat_map(stream::iter)
        .enumerate()
        .map(|(index, kind)| Item {
            index: index as u64,
            line: index as u64 + 1,
            kind,
        })
}

/// Reads the envelopes of one file, or the reasons its messages cannot be
/// sent.
async fn read_file(file: &Path, jsonl: bool, key: MailKey) -> Vec<ItemKind> {
    if jsonl {
        return read_json_lines(file, key).await;
    }
    let bytes = match tokio::fs::read(file).await {
        Ok(bytes) => bytes,
        Err(error) => {
            return vec![ItemKind::Unsendable {
                place: file.display().to_string(),
                reason: format!("cannot read the file: {error}"),
            }]
        }
    };
    if message::is_mbox(file, &bytes) {
        let messages = message::split_mbox(&bytes);
        if messages.is_empty() {
            return vec![ItemKind::Unsendable {
                place: file.display().to_string(),
                reason: "no message in the mbox file".to_owned(),
            }];
        }
        let mut kinds = Vec::new();
        for (number, bytes) in messages.iter().enumerate() {
            let place = Place {
                message: Some(number as u64 + 1),
                ..Place::file(file)
            };
            kinds.extend(kinds_of(&place, message::envelopes(&place, bytes, key)));
        }
        return kinds;
    }
    let place = Place::file(file);
    kinds_of(&place, message::envelopes(&place, &bytes, key))
}

async fn read_json_lines(file: &Path, key: MailKey) -> Vec<ItemKind> {
    let unreadable = |error: std::io::Error| ItemKind::Unsendable {
        place: file.display().to_string(),
        reason: format!("cannot read the file: {error}"),
    };
    let reader = match source::open(file).await {
        Ok(reader) => reader,
        Err(error) => return vec![unreadable(error)],
    };
    let (lines, failure) = source::items(reader, Format::JsonLines);
    let lines: Vec<Item> = lines.collect().await;
    let mut kinds = Vec::new();
    for line in lines {
        let place = Place {
            line: Some(line.line),
            ..Place::file(file)
        };
        let envelopes = match line.kind {
            ItemKind::Json(serde_json::Value::Object(object)) => {
                message::envelopes_from_json(&place, &object, key)
            }
            ItemKind::Malformed { reason, .. } => Err(reason),
            _ => Err("not a JSON object".to_owned()),
        };
        kinds.extend(kinds_of(&place, envelopes));
    }
    if let Some(error) = failure.take() {
        kinds.push(unreadable(error));
    }
    kinds
}

fn kinds_of(place: &Place, envelopes: Result<Vec<message::Envelope>, String>) -> Vec<ItemKind> {
    match envelopes {
        Ok(envelopes) => envelopes
            .into_iter()
            .map(|envelope| ItemKind::Mail(Arc::new(envelope)))
            .collect(),
        Err(reason) => vec![ItemKind::Unsendable {
            place: place.to_string(),
            reason,
        }],
    }
}
