//! Raw command-line arguments, as clap parses them.

use std::ops::RangeInclusive;
use std::path::PathBuf;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::duration::{parse_duration, parse_positive_duration};
use crate::halt::{parse_halt, Halt};
use crate::limits::{parse_burst, parse_per_key, parse_rate, PerKeyArg, RateArg};
use crate::retry::{parse_retry_delay, parse_retry_on, RetryOn};

/// The values `--max-run` accepts.
pub const MAX_RUN_RANGE: RangeInclusive<u64> = 1..=1_000_000;

/// The end of `backlog run --help`: the exit statuses, the braces to double
/// with --jsonl and the length limit of one argument.
const RUN_AFTER_HELP: &str = "\
Exit status:
  0    every item succeeded, or was skipped as done earlier or as a duplicate key
  1    some item failed, in this run or, with --journal, in an earlier one
  2    invalid arguments, or the run could not go on
  124  --deadline passed
  130  interrupted by Ctrl-C
  141  standard output was closed, as by `backlog run ... | head`
  143  stopped by SIGTERM

With --jsonl, every `{name}` whose name is letters, digits, `_`, `.` and `-`
is a field placeholder, so other braces around such a word must be doubled:
awk's `{print}` becomes `{{print}}`.

Linux limits one argument to 128 KiB. For large items, let the command read
the item from its standard input instead of passing `{}` as an argument.";

/// The end of `backlog mail --help`: the JSON fields and the credentials.
const MAIL_AFTER_HELP: &str = "\
Mail merge (--jsonl) fields: from, to (a string or a list), cc, bcc,
subject, text, html, headers (an object of strings), reply_to.

The SMTP user name and password come from BACKLOG_SMTP_USERNAME and
BACKLOG_SMTP_PASSWORD, never from the URL.

Exit status: as for `backlog run`; 1 when a message failed.";

/// Works through a backlog of items, running a command for each under limits.
#[derive(Debug, Parser)]
#[command(name = "backlog", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `backlog`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs COMMAND once per item of INPUT, at most --max-run at once.
    ///
    /// In COMMAND and ARGS, `{}` becomes the item. With --jsonl, `{field}`
    /// becomes that field of the item and `{a.b}` a nested field. `{{` and
    /// `}}` write literal braces. The item is also written to the command's
    /// standard input.
    ///
    /// Each command runs in a process group of its own, so Ctrl-C reaches
    /// backlog alone. The first Ctrl-C (or SIGTERM) starts nothing new and
    /// waits for the running commands; the second sends their process
    /// groups SIGTERM, then SIGKILL after --kill-after.
    #[command(after_help = RUN_AFTER_HELP)]
    Run(Box<RunArgs>),
    /// Sends email messages over SMTP, at most --max-run sessions at once
    /// and at most --per-domain per recipient domain.
    ///
    /// INPUT is an .eml file, an mbox file (a name ending in .mbox or .mbx,
    /// or a first line starting with `From `), or a folder, whose files
    /// (not subfolders, not hidden files) are read in name order. With
    /// --jsonl, each line of INPUT is one message to build (mail merge).
    ///
    /// A message goes out in one envelope per recipient domain, each its
    /// own SMTP session and item, with every recipient's reply recorded.
    /// 2xx is delivered, 4xx is retried (--retries), 5xx fails. A 421
    /// reply or a refused connection also halves that domain's
    /// --per-domain limit until --retry-delay has passed.
    #[command(after_help = MAIL_AFTER_HELP)]
    Mail(Box<MailArgs>),
    /// Shows the state of a journal: counts by state, failed items with
    /// their last error, and items that were running when a run died.
    Status(StatusArgs),
    /// Sets the limits that `--limiter` processes share in Redis, then
    /// shows them with the leases held now.
    ///
    /// The changes given are applied in order: --lease, --global,
    /// --per-key-default, --key, --remove-key. Without any, the limits are
    /// only shown. A new NAME grants nothing for one lease after its first
    /// change. The table of holders lists each lease: its key (`-` for the
    /// global limit alone), its holder (host:pid), its fence, its age and
    /// the time before it expires, sorted by key, then by age.
    Limits(LimitsArgs),
}

/// The end of `backlog limits --help`.
const LIMITS_AFTER_HELP: &str = "\
The password comes from BACKLOG_REDIS_PASSWORD, never from the URL.

Exit status: 0 when the changes are applied and shown, 2 on invalid
arguments or when Redis cannot be reached.";

/// The arguments of `backlog run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Sets the maximum number of commands running at once.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = parse_max_run)]
    pub max_run: u64,

    /// Reads each line as one JSON object instead of plain text, and makes
    /// `{name}` in COMMAND a field of the item.
    #[arg(long)]
    pub jsonl: bool,

    /// Appends one JSON line per finished item to FILE.
    #[arg(long, value_name = "FILE")]
    pub results: Option<PathBuf>,

    #[command(flatten)]
    pub journal: JournalArgs,

    /// Sets the file to read items from, one per line. `-` reads standard input.
    #[arg(value_name = "INPUT")]
    pub input: PathBuf,

    /// Sets the command to run per item, with its arguments, after `--`.
    #[arg(value_name = "COMMAND", last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub retry: RetryArgs,

    #[command(flatten)]
    pub stop: StopArgs,

    #[command(flatten)]
    pub limiter: LimiterArgs,
}

/// The arguments of `backlog mail`.
#[derive(Debug, Args)]
pub struct MailArgs {
    /// Sets the SMTP server: smtp://host[:port] (port 25; STARTTLS when the
    /// server offers it, or always with ?starttls=required, never with
    /// ?starttls=never) or smtps://host[:port] (port 465, TLS throughout).
    #[arg(long, value_name = "URL")]
    pub smtp: String,

    /// Trusts the certificates in the PEM file FILE as roots, besides the
    /// bundled Mozilla roots, when checking the server's TLS certificate:
    /// for a company CA or a self-signed test server.
    #[arg(long, value_name = "FILE")]
    pub smtp_ca: Option<PathBuf>,

    /// Sets the maximum number of SMTP sessions at once.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = parse_max_run)]
    pub max_run: u64,

    /// Sets the maximum number of SMTP sessions at once per recipient domain.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub per_domain: u32,

    /// Sets the maximum rate of SMTP sessions started over all domains, as
    /// N/s, N/m or N/h. A session waiting for the rate does not take a
    /// --max-run slot.
    #[arg(long, value_name = "N/s", value_parser = parse_rate)]
    pub rate: Option<RateArg>,

    /// Sets how many sessions may start at once after a pause, under --rate.
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_burst)]
    pub burst: std::num::NonZeroU32,

    /// Reads each line of INPUT as one JSON object to build a message from.
    #[arg(long)]
    pub jsonl: bool,

    /// Appends one JSON line per envelope to FILE, with each recipient's
    /// reply code and text.
    #[arg(long, value_name = "FILE")]
    pub results: Option<PathBuf>,

    /// Records each envelope's state in the SQLite file FILE, so that a
    /// rerun sends only what was not delivered.
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,

    /// Sets a message's identity in the journal: `message-id` (its
    /// Message-ID header, or its SHA-256 when it has none) or `sha256`.
    #[arg(
        long,
        value_name = "RULE",
        default_value = "message-id",
        requires = "journal"
    )]
    pub key: String,

    /// Sends again the envelopes that failed in an earlier run of the
    /// journal, which are skipped otherwise.
    #[arg(long, requires = "journal")]
    pub retry_failed: bool,

    /// Sets the maximum number of retries of an envelope whose recipients
    /// got a temporary failure (4xx, or no connection). 5xx replies are
    /// never retried.
    #[arg(long, value_name = "N", default_value_t = 5, help_heading = "Retries")]
    pub retries: u32,

    /// Sets the wait before the first retry. Each later retry waits twice as
    /// long, up to 5m, scaled by a random factor from 0.5 to 1.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_retry_delay,
          help_heading = "Retries")]
    pub retry_delay: Duration,

    /// Sets the time limit of each attempt (one SMTP session, waiting for
    /// the domain included). A timed-out attempt fails and is not retried,
    /// because the server may have taken the message.
    #[arg(long, value_name = "DUR", value_parser = parse_positive_duration,
          help_heading = "Time limits and stopping")]
    pub timeout: Option<Duration>,

    /// Sets the time limit of the whole run; then exits with 124.
    #[arg(long, value_name = "DUR", value_parser = parse_positive_duration,
          help_heading = "Time limits and stopping")]
    pub deadline: Option<Duration>,

    /// Sets when failed envelopes stop the run, as for `backlog run`.
    #[arg(long, value_name = "WHEN", default_value = "never", value_parser = parse_halt,
          help_heading = "Time limits and stopping")]
    pub halt: Halt,

    /// Sets the .eml files, mbox files or folders to send, or JSON Lines
    /// files with --jsonl.
    #[arg(value_name = "INPUT", required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,

    #[command(flatten)]
    pub limiter: LimiterArgs,
}

/// The limits shared with other backlog processes through Redis.
#[derive(Debug, Args)]
#[command(next_help_heading = "Limits shared by a fleet")]
pub struct LimiterArgs {
    /// Shares the limits stored in Redis under NAME with every backlog
    /// process that uses the same URL: redis://[USER@]HOST:PORT/NAME. Each
    /// attempt takes a lease under the global limit, and under the limit of
    /// its key (the --per-key key, or the recipient domain of `mail`),
    /// after the local limits. The password comes from
    /// BACKLOG_REDIS_PASSWORD, the user from the URL or
    /// BACKLOG_REDIS_USERNAME. Set the limits with `backlog limits`.
    #[arg(long, value_name = "URL")]
    pub limiter: Option<String>,

    /// Sets how long a grant may wait while Redis cannot be reached, as in
    /// 10s or 2m. Then the run starts nothing new and exits with status 2.
    /// Running items finish, or are stopped when their leases lapse.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_positive_duration,
          requires = "limiter")]
    pub limiter_timeout: Duration,
}

/// The arguments of `backlog limits`.
#[derive(Debug, Args)]
#[command(after_help = LIMITS_AFTER_HELP)]
pub struct LimitsArgs {
    /// The shared limits to show or change: redis://[USER@]HOST:PORT/NAME,
    /// the URL the workers pass to --limiter.
    #[arg(value_name = "URL")]
    pub url: String,

    /// Sets the maximum number of leases at once over all processes and
    /// keys.
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub global: Option<u64>,

    /// Sets the maximum number of leases at once of each key that has no
    /// limit of its own, or `none` to leave such keys to the global limit
    /// alone.
    #[arg(long, value_name = "N|none", value_parser = parse_optional_limit)]
    pub per_key_default: Option<PerKeyDefault>,

    /// Sets the maximum number of leases at once of one key, as KEY=N.
    /// Repeat it for several keys.
    #[arg(long = "key", value_name = "KEY=N", value_parser = parse_key_limit)]
    pub keys: Vec<(String, u64)>,

    /// Removes the limit of one key, which then takes --per-key-default.
    /// Repeat it for several keys.
    #[arg(long = "remove-key", value_name = "KEY")]
    pub remove_keys: Vec<String>,

    /// Sets how long a lease lives without renewal, as in 30s. A process
    /// that dies or stalls loses its leases after this time.
    #[arg(long, value_name = "DUR", value_parser = parse_positive_duration)]
    pub lease: Option<Duration>,

    /// Sets how long to wait while Redis cannot be reached, as in 10s or
    /// 2m.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_positive_duration)]
    pub limiter_timeout: Duration,

    /// Prints one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The limits per key and on the rate of starts.
#[derive(Debug, Args)]
#[command(next_help_heading = "Limits per key and rate")]
pub struct LimitArgs {
    /// Sets the maximum number of commands running at once per key, as
    /// TEMPLATE=N. TEMPLATE takes the placeholders of COMMAND and renders
    /// each item's key: `--per-key '{domain}=2'` with --jsonl runs at most
    /// 2 commands per domain, within --max-run. An item whose key is at its
    /// limit does not hold up items of other keys.
    #[arg(long, value_name = "TEMPLATE=N", value_parser = parse_per_key)]
    pub per_key: Option<PerKeyArg>,

    /// Sets the maximum rate of command starts over all items, as N/s, N/m
    /// or N/h. A command waiting for the rate does not take a --max-run
    /// slot.
    #[arg(long, value_name = "N/s", value_parser = parse_rate)]
    pub rate: Option<RateArg>,

    /// Sets the maximum rate of command starts per key of --per-key, as
    /// N/s, N/m or N/h.
    #[arg(long, value_name = "N/s", value_parser = parse_rate, requires = "per_key")]
    pub per_key_rate: Option<RateArg>,

    /// Sets how many commands may start at once after a pause, under
    /// --rate and --per-key-rate.
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_burst)]
    pub burst: std::num::NonZeroU32,
}

/// The options that retry failed attempts.
#[derive(Debug, Args)]
#[command(next_help_heading = "Retries")]
pub struct RetryArgs {
    /// Sets the maximum number of retries per item after its first attempt.
    /// Only failures that --retry-on-exit lists are retried. With the
    /// default of 0, every failure is final, exit status 75 included.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub retries: u32,

    /// Sets the wait before the first retry, as in 500ms, 2s or 1m. Each
    /// later retry waits twice as long, up to 5m, scaled by a random factor
    /// from 0.5 to 1. A waiting retry gives its --max-run slot back.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_retry_delay)]
    pub retry_delay: Duration,

    /// Sets the exit statuses retried, separated by commas, or `any` to
    /// retry every failure (non-zero exit, signal or timeout). The default
    /// 75 is EX_TEMPFAIL, "temporary failure, try again later".
    #[arg(long, value_name = "CODES", default_value = "75", value_parser = parse_retry_on)]
    pub retry_on_exit: RetryOn,
}

/// The options that bound the time of items and of the run, and stop it
/// early.
#[derive(Debug, Args)]
#[command(next_help_heading = "Time limits and stopping")]
pub struct StopArgs {
    /// Sets the time limit of each attempt, as in 500ms, 30s or 5m. Once it
    /// passes, the command's process group gets SIGTERM, then SIGKILL after
    /// --kill-after, and the attempt fails as timed out.
    #[arg(long, value_name = "DUR", value_parser = parse_positive_duration)]
    pub timeout: Option<Duration>,

    /// Sets how long a terminated command gets between SIGTERM and SIGKILL.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub kill_after: Duration,

    /// Sets the time limit of the whole run. Once it passes, nothing new
    /// starts, running commands are terminated as on --timeout, the rest of
    /// the items are reported as not started, and backlog exits with 124.
    #[arg(long, value_name = "DUR", value_parser = parse_positive_duration)]
    pub deadline: Option<Duration>,

    /// Sets when failed items stop the run: `never`, or `soon` or `now`
    /// followed by `,fail=N` (N failed items) or `,fail=P%` (P% of at least
    /// 3 finished items). `soon` starts nothing new and lets running
    /// commands finish. `now` also terminates them, as on --timeout.
    #[arg(long, value_name = "WHEN", default_value = "never", value_parser = parse_halt)]
    pub halt: Halt,
}

/// The journal options of `backlog run`.
#[derive(Debug, Args)]
pub struct JournalArgs {
    /// Records each item's state in the SQLite file FILE, so that a rerun
    /// skips the items that finished and runs again those that did not.
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,

    /// Sets the identity of an item in the journal, with the placeholders of
    /// COMMAND: for example `{id}` with --jsonl. Default: the SHA-256 of the
    /// item's text.
    #[arg(long, value_name = "TEMPLATE", requires = "journal")]
    pub key: Option<String>,

    /// Runs again the items that failed in an earlier run of the journal,
    /// which are skipped otherwise.
    #[arg(long, requires = "journal")]
    pub retry_failed: bool,
}

/// The arguments of `backlog status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Sets the journal to read, as written by `backlog run --journal`.
    #[arg(long, value_name = "FILE")]
    pub journal: PathBuf,

    /// Prints one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Parses a limit of `backlog limits`: a whole number from 1 to the
/// limiter's `MAX_LIMIT`.
fn parse_limit(value: &str) -> Result<u64, String> {
    let max = deferred_semaphore_redis::MAX_LIMIT;
    match value.parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a whole number from 1 to {max} (got '{value}')"
        )),
    }
}

/// The value of `--per-key-default`: a limit, or `None` for `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerKeyDefault(pub Option<u64>);

/// Parses `--per-key-default`: a limit, or `none`.
fn parse_optional_limit(value: &str) -> Result<PerKeyDefault, String> {
    if value == "none" {
        return Ok(PerKeyDefault(None));
    }
    parse_limit(value)
        .map(|limit| PerKeyDefault(Some(limit)))
        .map_err(|_| {
            let max = deferred_semaphore_redis::MAX_LIMIT;
            format!("expected a whole number from 1 to {max} or `none` (got '{value}')")
        })
}

/// Parses `--key`: `KEY=N`, split at the last `=`.
fn parse_key_limit(value: &str) -> Result<(String, u64), String> {
    let max = deferred_semaphore_redis::MAX_LIMIT;
    let expected = format!("expected KEY=N with N a whole number from 1 to {max} (got '{value}')");
    let Some((key, limit)) = value.rsplit_once('=') else {
        return Err(expected);
    };
    match parse_limit(limit) {
        Ok(limit) if !key.is_empty() => Ok((key.to_owned(), limit)),
        _ => Err(expected),
    }
}

/// Parses `--max-run`, naming the valid range for a non-number as well as
/// for a number out of range, which clap's ranged parser does not do.
fn parse_max_run(value: &str) -> Result<u64, String> {
    let (min, max) = (MAX_RUN_RANGE.start(), MAX_RUN_RANGE.end());
    match value.parse::<u64>() {
        Ok(n) if MAX_RUN_RANGE.contains(&n) => Ok(n),
        Ok(_) => Err(format!("must be between {min} and {max}")),
        Err(_) => Err(format!("must be a whole number between {min} and {max}")),
    }
}
