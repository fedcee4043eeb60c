//! The glue: items flow through the library's backlog processing under a
//! `DeferredSemaphore`, each runs through a `Runner`, and each outcome goes
//! to stdout, the results file and the progress display as it finishes.

use std::cell::RefCell;
use std::future::Future;
use std::io::Write;
use std::num::NonZeroUsize;
use std::path::Path;
use std::pin::pin;
use std::time::Duration;

use anyhow::{bail, Context};
use deferred_semaphore::{
    Backlog, DeferredSemaphore, KeyedBacklog, KeyedLimiter, KeyedPermit, Outcome, OwnedPermit,
    Report, StopReason,
};
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWrite;
use tokio::sync::{Mutex, Notify};
use tokio::time::MissedTickBehavior;

use crate::config::{Config, ItemRules};
use crate::duration::format_duration;
use crate::exec::{Gauge, ItemResult, Job, MakeJob, ProcessRunner, Runner};
use crate::fleet::{self, LimiterSettings, SharedLimiter};
use crate::halt::HaltCounter;
use crate::journal::{
    self, Admission, AttemptEnd, AttemptRecord, Commit, Journal, JournalConfig, JournalError, Skip,
};
use crate::limits::{Gate, KeyLimits, StoppingGate};
use crate::outcome::ItemOutcome;
use crate::progress::{Progress, Summary};
use crate::results::ResultsWriter;
use crate::retry::{Attempts, Fleet, RetryEvent};
use crate::signals::{plural_items, Signals};
use crate::source::{self, Item, ItemKind};
use crate::stop::{Stop, StopCause, StopLevel, StopWatch};
use crate::template::{self, Template};

/// The number of items that may wait for a retry at once beyond twice
/// `--max-run`; past it, new items wait until a retry starts or ends.
const MAX_WAITING_RETRIES: usize = 1024;

/// How often the progress bar's running count is redrawn.
const REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// The destinations of each item's outcome.
#[derive(Debug)]
pub struct Sinks<W, F: Write> {
    /// Receives each command's standard output, one item at a time.
    pub stdout: W,
    /// Receives the standard output instead of `stdout`, with blocking
    /// writes while the progress bar is cleared, when both are on one
    /// terminal.
    pub terminal_stdout: Option<TerminalStdout>,
    /// Receives one JSON line per item, if a results file was requested.
    pub results: Option<ResultsWriter<F>>,
    /// Shows progress and gathers the summary.
    pub progress: Progress,
}

/// Standard output on a terminal, written with blocking calls.
pub struct TerminalStdout(pub Box<dyn Write + Send>);

/// An item together with what running it produced: the last attempt's
/// result and the item's outcome.
#[derive(Debug)]
struct Finished {
    item: Item,
    result: ItemResult,
    outcome: ItemOutcome,
    journal: Journaled,
}

/// The journal's part in an item's outcome.
#[derive(Debug)]
enum Journaled {
    /// The item ran, and its end is recorded or there is no journal.
    Recorded,
    /// The item did not run, for the given reason.
    Skipped(Skip),
    /// Writing to the journal failed, before or after the command ran.
    Failed { error: JournalError, ran: bool },
}

/// The sinks, and the first error that made writing to them impossible.
#[derive(Debug)]
struct SinkState<'a, W, F: Write> {
    sinks: &'a mut Sinks<W, F>,
    fatal: Option<anyhow::Error>,
    /// Whether a long wait for a shared lease was reported.
    lease_wait_reported: bool,
}

/// The maximum time a run waits at its end for its released leases to
/// reach Redis.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Everything a run needs besides its items, its jobs and its runner.
#[derive(Debug)]
pub struct RunSetup<'a> {
    /// The file that receives one JSON line per finished item.
    pub results: Option<&'a Path>,
    /// Whether to draw a progress bar instead of log lines.
    pub progress_bar: bool,
    /// Whether to write output with the progress bar cleared.
    pub clear_bar_for_output: bool,
    /// The journal of item states.
    pub journal: Option<&'a JournalConfig>,
    /// The maximum number of items running at once.
    pub max_run: NonZeroUsize,
    /// Retries, time limits and `--halt`.
    pub rules: &'a ItemRules,
    /// The time limit of the whole run.
    pub deadline: Option<Duration>,
    /// Whether the input may never end (standard input), so that items not
    /// started are left unread instead of recorded.
    pub endless_input: bool,
    /// The limiter shared with other processes (`--limiter`).
    pub limiter: Option<&'a LimiterSettings>,
}

/// Runs the backlog that `config` describes with real processes, then
/// prints the summary to stderr.
///
/// # Errors
///
/// Fails when the input or results file cannot be opened, when writing
/// stdout or the results file fails, and when reading the input fails.
pub async fn run(config: &Config) -> anyhow::Result<Summary> {
    let reader = source::open(&config.input)
        .await
        .with_context(|| format!("cannot open input file '{}'", config.input.display()))?;
    let (items, read_failure) = source::items(reader, config.format);
    let setup = RunSetup {
        results: config.results.as_deref(),
        progress_bar: config.progress_bar,
        clear_bar_for_output: config.clear_bar_for_output,
        journal: config.journal.as_ref(),
        max_run: config.max_run,
        rules: &config.rules,
        deadline: config.deadline,
        endless_input: config.input.as_os_str() == "-",
        limiter: config.limiter.as_ref(),
    };
    let runner = ProcessRunner::new(config.kill_after);
    let summary = run_items(&setup, &config.template, &runner, items).await?;
    if let Some(error) = read_failure.take() {
        return Err(error)
            .context("failed to read the input, so items after the error did not run");
    }
    Ok(summary)
}

/// Runs `items` with the jobs of `jobs` through `runner`, with signals,
/// the results file, the progress display and the journal that `setup`
/// asks for, then prints the summary to stderr.
///
/// # Errors
///
/// Fails when the results file or the journal cannot be opened, and when
/// writing stdout, the results file or the journal fails.
pub async fn run_items<J, R, S>(
    setup: &RunSetup<'_>,
    jobs: &J,
    runner: &R,
    items: S,
) -> anyhow::Result<Summary>
where
    J: MakeJob<Job = R::Job>,
    R: Runner,
    S: Stream<Item = Item>,
{
    let signals = Signals::install().context("cannot install the SIGINT and SIGTERM handlers")?;
    let results = match setup.results {
        Some(path) => Some(
            ResultsWriter::append_to(path)
                .with_context(|| format!("cannot open results file '{}'", path.display()))?,
        ),
        None => None,
    };
    let progress = if setup.progress_bar {
        Progress::bar()
    } else {
        Progress::log(Box::new(std::io::stderr()))
    };

    // Fused, because after an early stop the items left are read to record
    // them as not started, and the input may have ended already.
    let mut items = pin!(items.fuse());
    let stdout = tokio::io::stdout();
    // The bar can be cleared only around a blocking write. Such a write
    // stalls the runtime, and so the reading of other commands' output,
    // while the terminal is paused (Ctrl-S) or shows a large output.
    let terminal_stdout = setup
        .clear_bar_for_output
        .then(|| TerminalStdout(Box::new(std::io::stdout())));
    let mut sinks = Sinks {
        stdout,
        terminal_stdout,
        results,
        progress,
    };
    let fleet = match setup.limiter {
        Some(settings) => Some(
            fleet::connect(&settings.url, settings.timeout)
                .await
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let journal = match setup.journal {
        Some(journal_config) => Some(journal::open(journal_config).await?),
        None => None,
    };
    let stop = Stop::default();
    let processing = process(
        jobs,
        setup.max_run,
        setup.rules,
        &stop,
        runner,
        items.as_mut(),
        &mut sinks,
        journal.as_ref(),
        fleet.as_ref().map(|fleet| fleet as &dyn SharedLimiter),
    );
    let processed = tokio::select! {
        summary = processing => summary,
        never = signals.watch(&stop, setup.deadline, runner.gauge()) => match never {},
    };
    if let Some(fleet) = &fleet {
        // Dropped leases are released in the background. An exit before
        // those releases reach Redis would leave the leases held until they
        // expire, so the other processes would be short of them meanwhile.
        let _ = tokio::time::timeout(RELEASE_WAIT, fleet.limiter().wait_for_releases()).await;
    }
    // A run that stopped early finished without an error, but the journal
    // must still say that it did not complete.
    let outcome = match stop.cause() {
        Some(cause) if processed.is_ok() && stop.level() >= StopLevel::Soon => {
            format!("stopped: {cause}")
        }
        _ => journal::run_outcome(&processed),
    };
    let closed = match journal {
        Some(journal) => journal.close(&outcome).await,
        None => Ok(()),
    };
    let mut summary = processed?;
    closed?;
    summary.what_ran = Some(runner.what_runs());
    if stop.level() >= StopLevel::Soon {
        summary.stopped = stop.cause();
        // Standard input may never end, so only a file is read to the end.
        if setup.endless_input {
            summary.input_left_unread = true;
        } else {
            summary.not_started += record_not_started(items, &mut sinks, stop.cause()).await?;
        }
    }
    // A closed stderr must not turn a finished run into a failure.
    let _ = writeln!(std::io::stderr(), "{summary}");
    Ok(summary)
}

/// Runs every item of `items` through `runner`, at most `max_run` at once,
/// under `rules`, and sends each outcome to `sinks`.
///
/// Malformed items and items with a missing field take the same path as the
/// others, so that they are counted and recorded in order, but fail at once
/// without running anything. Once `stop` reaches [`StopLevel::Soon`], no
/// item is pulled from `items` any more.
///
/// # Errors
///
/// Fails, cancelling the items still running, once writing to stdout or to
/// the results file fails.
// The journal, the rules and the stop signal are separate inputs that
// callers and tests pass one by one, so a parameter struct would add nothing.
#[allow(clippy::too_many_arguments)]
pub async fn process<J, R, S, W, F>(
    template: &J,
    max_run: NonZeroUsize,
    rules: &ItemRules,
    stop: &Stop,
    runner: &R,
    items: S,
    sinks: &mut Sinks<W, F>,
    journal: Option<&Journal>,
    fleet: Option<&dyn SharedLimiter>,
) -> anyhow::Result<Summary>
where
    J: MakeJob<Job = R::Job>,
    R: Runner,
    S: Stream<Item = Item>,
    W: AsyncWrite + Unpin,
    F: Write,
{
    let state = Mutex::new(SinkState {
        sinks,
        fatal: None,
        lease_wait_reported: false,
    });
    let sink_failed = Notify::new();
    let halt = RefCell::new(HaltCounter::new(rules.halt));
    let attempts = Attempts {
        runner,
        policy: &rules.retry,
        timeout: rules.timeout,
        fleet: fleet.map(|limiter| Fleet { limiter, stop }),
    };
    let (state_ref, failed_ref, gauge) = (&state, &sink_failed, runner.gauge());
    let halt_ref = &halt;

    let mut stopping = stop.watch();
    let items = items.take_until(async move { stopping.reached(StopLevel::Soon).await });
    let consumer = move |outcome| consume(outcome, state_ref, failed_ref, gauge, (halt_ref, stop));
    // The same for every item, whichever limiter grants its permit.
    let item_run = ItemRun {
        template,
        attempts: &attempts,
        state: &state,
        journal,
        duplicate_keys_fail: rules.duplicate_keys_fail,
        key_limits: rules.limits.as_ref(),
        fleet,
    };
    let report = match &rules.limits {
        None => {
            let limiter = DeferredSemaphore::new(max_run.get());
            let limiter_ref = &limiter;
            let work = move |item: Item, permit: OwnedPermit| {
                let reacquire = move || async move { limiter_ref.acquire_owned().await.ok() };
                item_run.run(item, (permit, reacquire), stop.watch())
            };
            let backlog = Backlog::from_stream_with_permits(&limiter, items, work)
                .on_failure(rules.halt.failure_policy())
                .buffer(buffer_size(max_run, rules))
                .for_each(consumer);
            drive(backlog, &state, &sink_failed, gauge).await?
        }
        Some(limits) => {
            let limiter = StoppingGate::new(Gate::new(max_run, limits), stop.watch());
            let limiter_ref = &limiter;
            let key_of = |item: &Item| limits.key_of(item);
            let work = move |item: Item, permit: KeyedPermit<String>| {
                let key = permit.key().clone();
                let reacquire = move || {
                    let acquire = KeyedLimiter::acquire(limiter_ref, &key);
                    async move { acquire.await.ok() }
                };
                item_run.run(item, (permit, reacquire), stop.watch())
            };
            // `--halt` and the signals stop the run through `stop`, which
            // ends `items` and lets every waiting acquire through at once
            // (see `StoppingGate`), so the items in the look-ahead window
            // reach the consumer as not started.
            let backlog = KeyedBacklog::from_stream_with_permits(&limiter, items, key_of, work)
                .buffer(buffer_size(max_run, rules))
                .for_each(consumer);
            drive(backlog, &state, &sink_failed, gauge).await?
        }
    };
    let mut state = state.into_inner();
    // The last outcome's write can fail in the same poll that ends the
    // backlog, and then `drive` sees the end first.
    if let Some(error) = state.fatal.take() {
        return Err(error);
    }
    // A stop by the failure policy is `--halt`, which `consume` reports, and
    // a limiter error after a stop is the stop itself.
    if let Some(reason @ StopReason::Limiter(_)) = &report.stopped {
        if stop.level() < StopLevel::Soon {
            bail!("the backlog stopped early: {reason}");
        }
    }
    let mut summary = state.sinks.progress.finish(gauge.max());
    summary.not_started += report.not_started.len() as u64;
    Ok(summary)
}

/// Returns how many items may be in flight at once: running, waiting for a
/// retry without a permit, or waiting for the consumer. Retries get room of
/// their own, so that items waiting out a long backoff do not stop new
/// items from starting.
fn buffer_size(max_run: NonZeroUsize, rules: &ItemRules) -> NonZeroUsize {
    let base = max_run.saturating_mul(NonZeroUsize::new(2).expect("2 is not zero"));
    if rules.retry.retries == 0 {
        return base;
    }
    base.saturating_add(MAX_WAITING_RETRIES)
}

/// Polls the backlog to its end while redrawing progress, and gives up at
/// once when a sink has failed.
async fn drive<W, F>(
    backlog: impl Future<Output = Report>,
    state: &Mutex<SinkState<'_, W, F>>,
    sink_failed: &Notify,
    gauge: &Gauge,
) -> anyhow::Result<Report>
where
    F: Write,
{
    let mut backlog = pin!(backlog);
    let mut refresh = tokio::time::interval(REFRESH_INTERVAL);
    refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            report = &mut backlog => return Ok(report),
            () = sink_failed.notified() => {
                let fatal = state.lock().await.fatal.take();
                return Err(fatal.unwrap_or_else(|| anyhow::anyhow!("writing an outcome failed")));
            }
            _ = refresh.tick() => {
                // The consumer holds the lock only briefly, so skipping one
                // redraw while it does is fine.
                if let Ok(state) = state.try_lock() {
                    state.sinks.progress.refresh(gauge.running());
                }
            }
        }
    }
}

/// The parts shared by every item's run: the command, the attempt rules,
/// the sinks and the journal.
struct ItemRun<'a, 'r, 's, J, R, W, F: Write> {
    template: &'a J,
    attempts: &'a Attempts<'r, R>,
    state: &'a Mutex<SinkState<'s, W, F>>,
    journal: Option<&'a Journal>,
    duplicate_keys_fail: bool,
    /// The limits that make an item's key for the shared limiter.
    key_limits: Option<&'a KeyLimits>,
    /// The shared limiter, named in the lines about lost leases.
    fleet: Option<&'a dyn SharedLimiter>,
}

// Only references and flags, so it copies whatever its type parameters are.
impl<J, R, W, F: Write> Clone for ItemRun<'_, '_, '_, J, R, W, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<J, R, W, F: Write> Copy for ItemRun<'_, '_, '_, J, R, W, F> {}

impl<'a, 'r, 's, J, R, W, F> ItemRun<'a, 'r, 's, J, R, W, F>
where
    J: MakeJob<Job = R::Job>,
    R: Runner,
    F: Write,
{
    /// Runs `item` under the permit of `permit`, which its second half
    /// acquires again for a retry.
    fn run<P, A, AF>(
        self,
        item: Item,
        permit: (P, A),
        stop: StopWatch,
    ) -> impl Future<Output = Result<Finished, Finished>> + use<'a, 'r, 's, J, R, W, F, P, A, AF>
    where
        A: Fn() -> AF,
        AF: Future<Output = Option<P>>,
    {
        run_item(item, permit, self, stop)
    }
}

/// Runs one item with its retries, or fails it at once when it cannot be
/// run. With a journal, the item is marked running before its command
/// starts, each retry is recorded, and its end is recorded after the last
/// attempt. The `Err` side marks the item as failed for the backlog's counts.
async fn run_item<J, R, W, F: Write, P, A, AF>(
    item: Item,
    permit: (P, A),
    ItemRun {
        template,
        attempts,
        state,
        journal,
        duplicate_keys_fail,
        key_limits,
        fleet,
    }: ItemRun<'_, '_, '_, J, R, W, F>,
    stop: StopWatch,
) -> Result<Finished, Finished>
where
    J: MakeJob<Job = R::Job>,
    R: Runner,
    A: Fn() -> AF,
    AF: Future<Output = Option<P>>,
{
    let admission = match journal {
        Some(journal) => match journal.admit(&item).await {
            Ok(admission) => admission,
            Err(error) => return Err(Finished::journal_failed(item, error, false)),
        },
        None => Admission::Untracked,
    };
    let key = match admission {
        Admission::Run { key, .. } => Some(key),
        Admission::Untracked => None,
        Admission::Skip(Skip::Duplicate { first_line }) if duplicate_keys_fail => {
            let reason = format!(
                "same journal key as item {first_line}: both have the same Message-ID (or \
                 the same bytes) and domain. Give each message its own Message-ID, or use \
                 --key sha256"
            );
            let result = ItemResult::failed(reason.clone());
            let outcome = ItemOutcome::Failed {
                attempts: 0,
                last_error: reason,
            };
            return Err(Finished::new(item, result, outcome, Journaled::Recorded));
        }
        Admission::Skip(skip) => {
            let outcome = ItemOutcome::NotStarted {
                attempts: 0,
                cause: None,
            };
            let skipped = Journaled::Skipped(skip);
            return Ok(Finished::new(item, ItemResult::default(), outcome, skipped));
        }
        Admission::NoKey(reason) => {
            let result = ItemResult::failed(reason.clone());
            let outcome = ItemOutcome::Failed {
                attempts: 0,
                last_error: reason,
            };
            return Err(Finished::new(item, result, outcome, Journaled::Recorded));
        }
    };

    // The first journal error of a retry, reported once the item ends.
    let retry_error: RefCell<Option<JournalError>> = RefCell::new(None);
    let (result, outcome) = match template.job_for(&item) {
        Ok(job) => {
            let (index, place) = (item.index, item.place());
            let place = place.as_str();
            let (key, retry_error) = (key.as_deref(), &retry_error);
            let notify = move |event: RetryEvent| async move {
                if let (Some(journal), Some(key)) = (journal, key) {
                    if let Err(error) = record_retry(journal, key, &event).await {
                        retry_error.borrow_mut().get_or_insert(error);
                    }
                }
                match &event {
                    RetryEvent::Waiting(notice) => {
                        let mut state = state.lock().await;
                        state.sinks.progress.retrying(index, place, notice);
                    }
                    RetryEvent::GivenBack { stopped } => {
                        let url = fleet.map(|fleet| fleet.url()).unwrap_or_default();
                        let what = if *stopped {
                            "stopped its command"
                        } else {
                            "did not record its ended command done"
                        };
                        let text = format!(
                            "item {index}: lease lost on {url}; {what} and gave the item back"
                        );
                        state.lock().await.sinks.progress.note(text);
                    }
                    RetryEvent::LeaseWait(waited) => {
                        let mut state = state.lock().await;
                        // Reported once per run, because every item waits
                        // on the same full limit.
                        if !state.lease_wait_reported {
                            state.lease_wait_reported = true;
                            let (url, grace) = match fleet {
                                Some(fleet) => (fleet.url(), fleet.grace_left().await),
                                None => (String::new(), None),
                            };
                            let why = match grace {
                                Some(left) => format!(
                                    "the name grants nothing for {} more, as a new name \
                                     or one whose data Redis lost waits one lease time",
                                    format_duration(left)
                                ),
                                None => format!(
                                    "its limit is full; `backlog limits {url}` shows the \
                                     holders"
                                ),
                            };
                            let text = format!(
                                "item {index}: waiting over {} for a lease on {url}: {why}",
                                format_duration(*waited)
                            );
                            state.sinks.progress.note(text);
                        }
                    }
                    RetryEvent::Starting { .. } | RetryEvent::Leased(_) => {}
                }
            };
            let shared_key = shared_key_of(&item, key_limits);
            attempts
                .run(job, permit, shared_key.as_deref(), stop, notify)
                .await
        }
        Err(reason) => {
            let result = ItemResult::failed(reason.clone());
            let outcome = ItemOutcome::Failed {
                attempts: 0,
                last_error: reason,
            };
            (result, outcome)
        }
    };

    let mut finished = Finished::new(item, result, outcome, Journaled::Recorded);
    if let Some(error) = retry_error.into_inner() {
        finished.journal = Journaled::Failed { error, ran: true };
    } else if let (Some(journal), Some(key)) = (journal, key) {
        let end = attempt_end(&finished.result, &finished.outcome);
        match journal
            .finish_attempt(&key, end, finished.result.fence)
            .await
        {
            Ok(Commit::Recorded) => {}
            Ok(Commit::Rejected { fence, stored }) => {
                let reason = rejected_commit_reason(fence, stored);
                let text = format!("item {}: {reason}", finished.item.index);
                state.lock().await.sinks.progress.note(text);
                let attempts = finished.outcome.attempts();
                finished.outcome = ItemOutcome::GivenBack { attempts, reason };
            }
            Err(error) => finished.journal = Journaled::Failed { error, ran: true },
        }
    }
    if finished.outcome.is_done() {
        Ok(finished)
    } else {
        Err(finished)
    }
}

/// Returns the key an item's leases of the shared limiter are taken
/// under: the recipient domain of an email, the rendered `--per-key`
/// template of a command's item, or `None` for the global limit alone.
///
/// A key that renders empty takes the global limit alone, as an item
/// without a key does: Redis has no limit of its own for it.
fn shared_key_of(item: &Item, key_limits: Option<&KeyLimits>) -> Option<String> {
    let key = match (&item.kind, key_limits) {
        (ItemKind::Mail(envelope), _) => Some(envelope.domain.clone()),
        (_, Some(limits)) if limits.key.is_some() => Some(limits.key_of(item)),
        _ => None,
    };
    key.filter(|key| !key.is_empty())
}

/// Returns why the journal rejected recording an item done under
/// `fence`.
fn rejected_commit_reason(fence: u64, stored: Option<u64>) -> String {
    match stored {
        Some(stored) if stored > fence => {
            format!("commit rejected: fence {fence} is older than the item's fence {stored}")
        }
        Some(stored) => {
            format!("commit rejected: fence {fence} is not the item's fence {stored}")
        }
        None => format!("commit rejected: fence {fence} no longer holds the item"),
    }
}

/// Records a step of an item's retries: a failed attempt that will be
/// retried, or given back after a lost lease, leaves the item pending
/// until its next attempt marks it running again, with one more attempt.
/// A shared lease's fence is stored with the attempt that holds it.
async fn record_retry(
    journal: &Journal,
    key: &str,
    event: &RetryEvent,
) -> Result<(), JournalError> {
    match event {
        RetryEvent::Waiting(notice) => {
            let record = AttemptRecord {
                exit_code: None,
                signal: None,
                error: Some(notice.failure.clone()),
                stderr_tail: Vec::new(),
            };
            let end = AttemptEnd::WillRetry(record);
            journal.finish_attempt(key, end, None).await.map(drop)
        }
        RetryEvent::GivenBack { .. } => {
            let end = AttemptEnd::GivenBack("its shared lease was lost".to_owned());
            journal.finish_attempt(key, end, None).await.map(drop)
        }
        RetryEvent::Leased(fence) => journal.set_fence(key, *fence).await,
        RetryEvent::Starting { fence, .. } => journal.start_attempt(key, *fence).await.map(drop),
        RetryEvent::LeaseWait(_) => Ok(()),
    }
}

/// Returns how the journal records an item's last attempt: a stopped or
/// never-started attempt leaves the item pending for the next run.
fn attempt_end(result: &ItemResult, outcome: &ItemOutcome) -> AttemptEnd {
    match outcome {
        ItemOutcome::Done { .. } => AttemptEnd::Succeeded(AttemptRecord::from_result(result)),
        ItemOutcome::Failed { .. } | ItemOutcome::TimedOut { .. } => {
            AttemptEnd::Failed(AttemptRecord::from_result(result))
        }
        ItemOutcome::GivenBack { reason, .. } => AttemptEnd::GivenBack(reason.clone()),
        ItemOutcome::Interrupted { .. } | ItemOutcome::NotStarted { .. } => {
            let reason = outcome
                .reason()
                .unwrap_or_else(|| outcome.name().to_owned());
            AttemptEnd::Interrupted(reason)
        }
    }
}

impl MakeJob for Template {
    type Job = Job;

    fn job_for(&self, item: &Item) -> Result<Job, String> {
        match &item.kind {
            ItemKind::Malformed { reason, .. } | ItemKind::Unsendable { reason, .. } => {
                return Err(reason.clone())
            }
            ItemKind::Mail(_) => return Err("an email is not a command's item".to_owned()),
            ItemKind::Text(_) | ItemKind::Json(_) => {}
        }
        let argv = self.render(&item.kind).map_err(|error| error.to_string())?;
        let mut stdin = template::item_text(&item.kind).into_bytes();
        stdin.push(b'\n');
        Ok(Job { argv, stdin })
    }
}

/// Sends one outcome to the sinks and applies `--halt` to it. After the
/// first failed write, later outcomes are dropped because the run is
/// stopping.
async fn consume<W, F>(
    outcome: Outcome<Finished, Finished>,
    state: &Mutex<SinkState<'_, W, F>>,
    sink_failed: &Notify,
    gauge: &Gauge,
    (halt, stop): (&RefCell<HaltCounter>, &Stop),
) where
    W: AsyncWrite + Unpin,
    F: Write,
{
    let (Ok(finished) | Err(finished)) = outcome.result;
    let failed = !matches!(
        finished.outcome,
        ItemOutcome::Done { .. } | ItemOutcome::NotStarted { .. } | ItemOutcome::GivenBack { .. }
    );
    // An item the journal skipped did not run, so `--halt` does not count it.
    let skipped = matches!(finished.journal, Journaled::Skipped(_));
    let halt_level = if skipped {
        None
    } else {
        halt.borrow_mut().record(failed)
    };
    if let Some(level) = halt_level {
        let rule = halt.borrow().halt().to_string();
        announce_halt(&rule, level, gauge.running());
        stop.request(level, StopCause::Halt(rule));
    }

    let mut state = state.lock().await;
    if state.fatal.is_some() {
        return;
    }
    if let Err(error) = state.sinks.record(&finished, gauge.running()).await {
        state.fatal = Some(error);
        sink_failed.notify_one();
    }
}

fn announce_halt(rule: &str, level: StopLevel, running: usize) {
    let items = plural_items(running);
    let what = if level == StopLevel::Now {
        "killing"
    } else {
        "waiting for"
    };
    // Best effort, as the other progress lines: a closed stderr must not
    // stop the run.
    let _ = writeln!(
        std::io::stderr(),
        "--halt {rule} reached: {what} {running} running {items}"
    );
}

/// Records each item left in `items` as not started in the results file,
/// and returns how many there were.
async fn record_not_started<S, W, F>(
    items: S,
    sinks: &mut Sinks<W, F>,
    cause: Option<StopCause>,
) -> anyhow::Result<u64>
where
    S: Stream<Item = Item>,
    F: Write,
{
    let outcome = ItemOutcome::NotStarted { attempts: 0, cause };
    let result = ItemResult::default();
    let mut count = 0;
    let mut items = pin!(items);
    while let Some(item) = items.next().await {
        if let Some(results) = &mut sinks.results {
            results
                .write(&item, &result, &outcome)
                .context("cannot write to the results file")?;
        }
        count += 1;
    }
    Ok(count)
}

impl std::fmt::Debug for TerminalStdout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TerminalStdout")
    }
}

impl Finished {
    fn new(item: Item, result: ItemResult, outcome: ItemOutcome, journal: Journaled) -> Self {
        Finished {
            item,
            result,
            outcome,
            journal,
        }
    }

    fn journal_failed(item: Item, error: JournalError, ran: bool) -> Self {
        let reason = error.to_string();
        let result = ItemResult::failed(reason.clone());
        let outcome = ItemOutcome::Failed {
            attempts: 0,
            last_error: reason,
        };
        Finished::new(item, result, outcome, Journaled::Failed { error, ran })
    }
}

impl<W: AsyncWrite + Unpin, F: Write> Sinks<W, F> {
    /// Records the item first, so that the results file is complete even
    /// when writing stdout fails.
    async fn record(&mut self, finished: &Finished, running: usize) -> anyhow::Result<()> {
        let Finished {
            item,
            result,
            outcome,
            journal,
        } = finished;
        match journal {
            Journaled::Skipped(skip) => {
                self.progress.skipped(item, skip, running);
                return Ok(());
            }
            Journaled::Failed { error, ran: false } => {
                let place = item.place();
                return Err(anyhow::Error::new(error.clone()))
                    .with_context(|| format!("cannot start the item of {place}"));
            }
            Journaled::Recorded | Journaled::Failed { ran: true, .. } => {}
        }
        self.write_outcome(item, result, outcome, running).await?;
        if let Journaled::Failed { error, .. } = journal {
            let place = item.place();
            return Err(anyhow::Error::new(error.clone())).with_context(|| {
                format!("the item of {place} finished, but the journal does not record it")
            });
        }
        Ok(())
    }

    async fn write_outcome(
        &mut self,
        item: &Item,
        result: &ItemResult,
        outcome: &ItemOutcome,
        running: usize,
    ) -> anyhow::Result<()> {
        if let Some(results) = &mut self.results {
            results
                .write(item, result, outcome)
                .context("cannot write to the results file")?;
        }
        self.progress.finished(item, result, outcome, running);
        let written = match &mut self.terminal_stdout {
            Some(terminal) => {
                let output = &result.stdout;
                self.progress
                    .suspend(|| output.write_blocking(&mut *terminal.0))
            }
            None => result.stdout.write_to(&mut self.stdout).await,
        };
        written.context("cannot write to standard output")
    }
}

#[cfg(test)]
mod tests {
    use std::io::sink;

    use futures_util::stream;

    use std::cell::Cell;

    use super::*;
    use crate::exec::MockRunner;
    use crate::fleet::fake::FakeLimiter;
    use crate::halt::parse_halt;
    use crate::retry::{RetryOn, RetryPolicy};

    fn rules() -> ItemRules {
        ItemRules {
            retry: RetryPolicy {
                retries: 0,
                delay: Duration::from_secs(1),
                retry_on: RetryOn::ExitCodes(vec![75]),
            },
            timeout: None,
            halt: crate::halt::Halt::Never,
            limits: None,
            duplicate_keys_fail: false,
        }
    }

    fn records_of(sinks: Sinks<Vec<u8>, Vec<u8>>) -> Vec<serde_json::Value> {
        let results = sinks.results.unwrap().into_inner();
        results
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).unwrap())
            .collect()
    }

    fn text_items(lines: &[&str]) -> Vec<Item> {
        let to_item = |(index, line): (usize, &&str)| Item {
            index: index as u64,
            line: index as u64 + 1,
            kind: ItemKind::Text(line.to_string()),
        };
        lines.iter().enumerate().map(to_item).collect()
    }

    fn sinks() -> Sinks<Vec<u8>, Vec<u8>> {
        Sinks {
            stdout: Vec::new(),
            terminal_stdout: None,
            results: Some(ResultsWriter::new(Vec::new())),
            progress: Progress::log(Box::new(sink())),
        }
    }

    /// A terminal stand-in whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct SharedScreen(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for SharedScreen {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn process_writes_terminal_output_blocking() {
        let template = Template::parse(&["sleep".to_owned(), "{}".to_owned()], false);
        let runner = MockRunner::new(sleep_and_echo);
        let max_run = NonZeroUsize::new(3).unwrap();
        let items = stream::iter(text_items(&["30", "10", "20"]));
        let screen = SharedScreen::default();
        let mut sinks = sinks();
        sinks.terminal_stdout = Some(TerminalStdout(Box::new(screen.clone())));
        process(
            &template,
            max_run,
            &rules(),
            &Stop::default(),
            &runner,
            items,
            &mut sinks,
            None,
            None,
        )
        .await
        .unwrap();

        assert!(sinks.stdout.is_empty());
        assert_eq!(*screen.0.lock().unwrap(), b"10\n20\n30\n");
    }

    /// Replies after a delay of `argv[1]` milliseconds, echoing the argument.
    fn sleep_and_echo(job: &Job) -> (Duration, ItemResult) {
        let millis: u64 = job.argv[1].parse().unwrap();
        let result = ItemResult {
            exit_code: Some(if millis == 0 { 1 } else { 0 }),
            stdout: format!("{millis}\n").into_bytes().into(),
            ..ItemResult::default()
        };
        (Duration::from_millis(millis), result)
    }

    async fn process_with_mock(lines: &[&str], max_run: usize) -> anyhow::Result<Summary> {
        let template = Template::parse(&["sleep".to_owned(), "{}".to_owned()], false);
        let runner = MockRunner::new(sleep_and_echo);
        let max_run = NonZeroUsize::new(max_run).unwrap();
        let items = stream::iter(text_items(lines));
        process(
            &template,
            max_run,
            &rules(),
            &Stop::default(),
            &runner,
            items,
            &mut sinks(),
            None,
            None,
        )
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn process_respects_max_run() {
        let summary = process_with_mock(&["100"; 7], 3).await.unwrap();
        assert_eq!(summary.succeeded, 7);
        assert_eq!(summary.max_running, 3);
        assert!(summary.wall_time >= Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn process_counts_failures() {
        let summary = process_with_mock(&["10", "0", "10", "0"], 2).await.unwrap();
        assert_eq!((summary.succeeded, summary.failed), (2, 2));
        let lines: Vec<u64> = summary.failures.iter().map(|f| f.line).collect();
        assert_eq!(lines, [2, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn process_fails_malformed_without_running() {
        let mut items = text_items(&["10", "malformed", "10"]);
        items[1].kind = ItemKind::Malformed {
            raw: "x".to_owned(),
            reason: "invalid UTF-8".to_owned(),
        };
        let template = Template::parse(&["sleep".to_owned(), "{}".to_owned()], false);
        let runner = MockRunner::new(sleep_and_echo);
        let items = stream::iter(items);
        let summary = process(
            &template,
            NonZeroUsize::MIN,
            &rules(),
            &Stop::default(),
            &runner,
            items,
            &mut sinks(),
            None,
            None,
        )
        .await
        .unwrap();

        assert_eq!(
            (summary.succeeded, summary.failed, summary.malformed),
            (2, 1, 1)
        );
        assert_eq!(summary.failures[0].line, 2);
        assert_eq!(summary.failures[0].reason, "invalid UTF-8");
        // Only the two good items slept: the malformed one ran nothing.
        assert_eq!(summary.wall_time, Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn process_writes_outcomes_in_completion_order() {
        let template = Template::parse(&["sleep".to_owned(), "{}".to_owned()], false);
        let runner = MockRunner::new(sleep_and_echo);
        let max_run = NonZeroUsize::new(3).unwrap();
        let items = stream::iter(text_items(&["30", "10", "20"]));
        let mut sinks = sinks();
        process(
            &template,
            max_run,
            &rules(),
            &Stop::default(),
            &runner,
            items,
            &mut sinks,
            None,
            None,
        )
        .await
        .unwrap();

        assert_eq!(sinks.stdout, b"10\n20\n30\n");
        let results = sinks.results.unwrap().into_inner();
        let records: Vec<serde_json::Value> = results
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).unwrap())
            .collect();
        let indexes: Vec<u64> = records
            .iter()
            .map(|r| r["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indexes, [1, 2, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn process_retries_without_holding_permit() {
        // Item "temp" exits 75 on its first attempt only; "other" succeeds.
        let temp_attempts = Cell::new(0);
        let runner = MockRunner::new(|job: &Job| {
            let code = if job.argv[1] == "temp" {
                temp_attempts.set(temp_attempts.get() + 1);
                if temp_attempts.get() == 1 {
                    75
                } else {
                    0
                }
            } else {
                0
            };
            let result = ItemResult {
                exit_code: Some(code),
                stdout: format!("{}\n", job.argv[1]).into_bytes().into(),
                ..ItemResult::default()
            };
            (Duration::from_millis(100), result)
        });
        let template = Template::parse(&["run".to_owned(), "{}".to_owned()], false);
        let mut rules = rules();
        rules.retry.retries = 2;
        let items = stream::iter(text_items(&["temp", "other"]));
        let mut sinks = sinks();
        let stop = Stop::default();
        let summary = process(
            &template,
            NonZeroUsize::MIN,
            &rules,
            &stop,
            &runner,
            items,
            &mut sinks,
            None,
            None,
        )
        .await
        .unwrap();

        assert_eq!((summary.succeeded, summary.failed), (2, 0));
        assert_eq!(summary.retried, 1);
        // "other" ran during the backoff of "temp", with one slot for both.
        assert_eq!(sinks.stdout, b"other\ntemp\n");
        assert_eq!(summary.max_running, 1);
        let records = records_of(sinks);
        assert_eq!(records[1]["item"], "temp");
        assert_eq!(records[1]["attempts"], 2);
        assert_eq!(records[1]["outcome"], "done");
    }

    /// A journal in a temporary directory, the fake shared limiter and a
    /// count of the commands started, for the tests of `--limiter`.
    struct FleetRun {
        _dir: tempfile::TempDir,
        journal_path: std::path::PathBuf,
        count: Cell<u32>,
        limiter: FakeLimiter,
        stop: Stop,
    }

    impl FleetRun {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let journal_path = dir.path().join("journal.db");
            Self {
                _dir: dir,
                journal_path,
                count: Cell::new(0),
                limiter: FakeLimiter::default(),
                stop: Stop::default(),
            }
        }

        /// Runs `lines` (`sleep` milliseconds each) with the fake shared
        /// limiter and the journal, counting the commands started, while
        /// `meanwhile` runs beside them. Returns the summary, the results
        /// records and the log.
        async fn process(
            &self,
            lines: &[&str],
            meanwhile: impl Future<Output = ()>,
        ) -> (Summary, Vec<serde_json::Value>, String) {
            let runner = MockRunner::new(|job: &Job| {
                self.count.set(self.count.get() + 1);
                sleep_and_echo(job)
            });
            let template = Template::parse(&["sleep".to_owned(), "{}".to_owned()], false);
            let config = JournalConfig {
                path: self.journal_path.clone(),
                key: journal::KeyRule::Hash,
                retry_failed: false,
                jsonl: false,
            };
            let (journal, _) = Journal::open(&config).await.unwrap();
            let items = stream::iter(text_items(lines));
            let log = SharedScreen::default();
            let mut sinks = sinks();
            sinks.progress = Progress::log(Box::new(log.clone()));
            let rules = rules();
            let processing = process(
                &template,
                NonZeroUsize::MIN,
                &rules,
                &self.stop,
                &runner,
                items,
                &mut sinks,
                Some(&journal),
                Some(&self.limiter),
            );
            let (summary, ()) = tokio::join!(processing, meanwhile);
            journal.close("completed").await.unwrap();
            let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
            (summary.unwrap(), records_of(sinks), log)
        }

        /// Waits until `expected` commands have started.
        async fn started(&self, expected: u32) {
            while self.count.get() < expected {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }

        /// Returns the state, attempts, error and fence of the item `text`
        /// in the journal.
        fn journal_row(&self, text: &str) -> (String, u32, Option<String>, Option<u64>) {
            let conn = rusqlite::Connection::open(&self.journal_path).unwrap();
            conn.query_row(
                "SELECT state, attempts, error, fence FROM items WHERE item = ?1",
                [text],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .unwrap()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lost_lease_stops_and_gives_back() {
        let run = FleetRun::new();
        let lose_first = async {
            run.started(1).await;
            run.limiter.granted.borrow()[0].handle.lose();
        };
        let (summary, records, log) = run.process(&["1000"], lose_first).await;

        // Retries are 0, yet the item ran again under a new lease.
        assert_eq!((summary.succeeded, summary.failed), (1, 0));
        assert_eq!(run.count.get(), 2);
        let granted = run.limiter.granted.borrow();
        assert_eq!(granted.len(), 2);
        assert_eq!(granted[1].key, None);
        assert_eq!(granted[1].fence, 2);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0]["outcome"], "done");
        assert_eq!(records[0]["attempts"], 2);
        assert_eq!(records[0]["fence"], 2);
        let line = "item 0: lease lost on redis://fake:1/test; stopped its command and gave the \
                    item back";
        assert!(log.contains(line), "{log}");
        let (state, attempts, _, fence) = run.journal_row("1000");
        assert_eq!((state.as_str(), attempts, fence), ("done", 2, Some(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn lost_lease_at_end_is_not_done() {
        let run = FleetRun::new();
        // The loss is never signalled, so only the check before recording
        // the item done can see it.
        let lose_first = async {
            run.started(1).await;
            run.limiter.granted.borrow()[0].handle.lose_unnoticed();
        };
        let (summary, records, log) = run.process(&["100"], lose_first).await;

        assert_eq!(summary.succeeded, 1);
        assert_eq!(run.count.get(), 2);
        assert_eq!(run.limiter.granted.borrow().len(), 2);
        assert_eq!(records[0]["attempts"], 2);
        assert_eq!(records[0]["fence"], 2);
        let line = "item 0: lease lost on redis://fake:1/test; did not record its ended command \
                    done and gave the item back";
        assert!(log.contains(line), "{log}");
        let (state, attempts, _, fence) = run.journal_row("100");
        assert_eq!((state.as_str(), attempts, fence), ("done", 2, Some(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn lost_lease_while_stopping_is_given_back() {
        let run = FleetRun::new();
        let stop_then_lose = async {
            run.started(1).await;
            run.stop.request(StopLevel::Soon, StopCause::Interrupt);
            run.limiter.granted.borrow()[0].handle.lose();
        };
        let (summary, records, _) = run.process(&["1000"], stop_then_lose).await;

        assert_eq!((summary.succeeded, summary.failed), (0, 0));
        assert_eq!(run.count.get(), 1);
        assert_eq!(run.limiter.granted.borrow().len(), 1);
        assert_eq!(records[0]["outcome"], "given_back");
        assert_eq!(records[0]["error"], "given back: its shared lease was lost");
        let (state, attempts, error, _) = run.journal_row("1000");
        assert_eq!((state.as_str(), attempts), ("pending", 1));
        assert_eq!(
            error.as_deref(),
            Some("given back: its shared lease was lost")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_failure_fails_closed() {
        let run = FleetRun::new();
        let fail_later = async {
            run.started(1).await;
            *run.limiter.fail_with.borrow_mut() = Some("Redis is gone".to_owned());
        };
        let lines = ["100", "200", "300"];
        let (summary, records, _) = run.process(&lines, fail_later).await;

        // The running item finished and was recorded, and nothing new started.
        assert_eq!(summary.succeeded, 1);
        assert_eq!(run.count.get(), 1);
        assert_eq!(run.limiter.granted.borrow().len(), 1);
        assert_eq!(records[0]["outcome"], "done");
        let cause = StopCause::Limiter {
            url: "redis://fake:1/test".to_owned(),
            message: "Redis is gone".to_owned(),
        };
        assert_eq!(run.stop.cause(), Some(cause));
        assert_eq!(run.stop.level(), StopLevel::Soon);
        assert!(records.len() >= 2, "{records:?}");
        for record in &records[1..] {
            assert_eq!(record["outcome"], "not_started");
            assert_eq!(
                record["error"],
                "not started: the limiter redis://fake:1/test failed"
            );
        }
        let (state, attempts, error, _) = run.journal_row("200");
        assert_eq!((state.as_str(), attempts), ("pending", 1));
        assert!(error
            .unwrap()
            .contains("the limiter redis://fake:1/test failed"));
    }

    #[test]
    fn shared_key_follows_per_key() {
        let item = &text_items(&["a.example"])[0];
        assert_eq!(shared_key_of(item, None), None);
        let limits = KeyLimits {
            key: Some(Template::parse(&["{}".to_owned()], false)),
            per_key: NonZeroUsize::new(2),
            rate: None,
            per_key_rate: None,
        };
        assert_eq!(
            shared_key_of(item, Some(&limits)).as_deref(),
            Some("a.example")
        );
        let rate_only = KeyLimits {
            key: None,
            ..limits
        };
        assert_eq!(shared_key_of(item, Some(&rate_only)), None);
        let empty = &text_items(&[""])[0];
        assert_eq!(shared_key_of(empty, Some(&limits)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn process_halt_now_kills_running() {
        let template = Template::parse(&["sleep".to_owned(), "{}".to_owned()], false);
        let runner = MockRunner::new(sleep_and_echo);
        let mut rules = rules();
        rules.halt = parse_halt("now,fail=1").unwrap();
        let items = stream::iter(text_items(&["1000", "0", "1000", "1000"]));
        let mut sinks = sinks();
        let stop = Stop::default();
        let max_run = NonZeroUsize::new(2).unwrap();
        let summary = process(
            &template, max_run, &rules, &stop, &runner, items, &mut sinks, None, None,
        )
        .await
        .unwrap();

        assert_eq!(stop.level(), StopLevel::Now);
        assert_eq!(
            (summary.succeeded, summary.failed, summary.killed),
            (0, 2, 1)
        );
        assert!(summary.wall_time < Duration::from_millis(100));
        let records = records_of(sinks);
        assert_eq!(records.len(), 2);
        assert_eq!(records[1]["outcome"], "interrupted");
        assert_eq!(records[1]["error"], "killed: --halt now,fail=1 was reached");
    }
}
