//! The progress display on stderr while the backlog runs, and the summary
//! at the end.

use std::fmt::{self, Write as _};
use std::io::Write;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
// Tokio's clock, so that tests with paused time see the wall time they simulate.
use tokio::time::Instant;

use crate::duration::format_duration;
use crate::exec::ItemResult;
use crate::journal::Skip;
use crate::outcome::ItemOutcome;
use crate::retry::RetryNotice;
use crate::source::Item;
use crate::stop::StopCause;

/// How many failed items the summary lists.
const SUMMARY_FAILURES: usize = 10;

/// The maximum length in bytes of a failure reason or a stderr line as the
/// log, the summary and `backlog status` show it, before the note of the
/// bytes left out.
pub const MAX_SHOWN_BYTES: usize = 300;

/// Shows progress as a bar on a terminal, or as one log line per item.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    view: View,
    summary: Summary,
}

enum View {
    /// A progress bar, with failures printed above it.
    Bar(ProgressBar),
    /// One line per finished item, for logs and pipes.
    Log(Box<dyn Write + Send>),
}

/// The counts and failures of a finished run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Items whose command exited with status 0.
    pub succeeded: u64,
    /// Items that failed, malformed, timed out and killed ones included.
    pub failed: u64,
    /// Items that failed because their line was not a valid item.
    pub malformed: u64,
    /// Items skipped because the journal records them as done.
    pub skipped_done: u64,
    /// Items skipped because the journal records them as failed.
    pub skipped_failed: u64,
    /// Items skipped because an earlier line has the same key.
    pub duplicates: u64,
    /// Items whose last attempt ran longer than `--timeout`.
    pub timed_out: u64,
    /// Items whose command was killed because the run stopped now.
    pub killed: u64,
    /// Items that succeeded or failed after more than one attempt.
    pub retried: u64,
    /// Items read but never run because the run was stopping, including
    /// those left in an input file.
    pub not_started: u64,
    /// The cause that stopped the run before its input ran out, if any.
    pub stopped: Option<StopCause>,
    /// Whether the run stopped with standard input not read to its end.
    pub input_left_unread: bool,
    /// The first failed items in the order they finished, items skipped
    /// because they failed in an earlier run included.
    pub failures: Vec<Failure>,
    /// The time from the start of the run to its end.
    pub wall_time: Duration,
    /// The maximum number of commands seen running at once.
    pub max_running: usize,
    /// The name of a unit of work in the summary: `command` by default, or
    /// `SMTP session`.
    pub what_ran: Option<&'static str>,
}

/// A failed item as the summary lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The 1-based line number of the item.
    pub line: u64,
    /// The item's position, as `line N` or an email's file.
    pub place: String,
    /// The reason it failed.
    pub reason: String,
}

impl fmt::Debug for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            View::Bar(_) => f.write_str("Bar"),
            View::Log(_) => f.write_str("Log"),
        }
    }
}

impl Progress {
    /// Creates a progress display that draws a bar on stderr.
    pub fn bar() -> Self {
        let bar = ProgressBar::new_spinner();
        // The template is a constant, so it can only fail if it is edited
        // into something invalid, which the CLI tests would catch.
        let style = ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .expect("the progress template is valid");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(100));
        Progress::with_view(View::Bar(bar))
    }

    /// Creates a progress display that writes one line per item to `out`.
    pub fn log(out: Box<dyn Write + Send>) -> Self {
        Progress::with_view(View::Log(out))
    }

    fn with_view(view: View) -> Self {
        Progress {
            started: Instant::now(),
            view,
            summary: Summary::default(),
        }
    }

    /// Counts a finished item and shows it.
    pub fn finished(
        &mut self,
        item: &Item,
        result: &ItemResult,
        outcome: &ItemOutcome,
        running: usize,
    ) {
        let failure = describe_failure(result, outcome);
        self.count(item, outcome, failure.as_deref());
        let line = self.log_line(item, result, outcome, failure.as_deref());
        match &mut self.view {
            View::Bar(bar) => {
                if failure.is_some() {
                    bar.println(line);
                }
            }
            // Progress lines are best effort: a closed stderr must not stop
            // the backlog.
            View::Log(out) => drop(writeln!(out, "{line}")),
        }
        self.refresh(running);
    }

    /// Counts an item that the journal skipped and shows it.
    pub fn skipped(&mut self, item: &Item, skip: &Skip, running: usize) {
        let summary = &mut self.summary;
        let reason = match skip {
            Skip::Done => {
                summary.skipped_done += 1;
                "done in an earlier run".to_owned()
            }
            Skip::Failed { error } => {
                summary.skipped_failed += 1;
                let error = printable(error, MAX_SHOWN_BYTES);
                let reason = format!("failed in an earlier run: {error}");
                if summary.failures.len() < SUMMARY_FAILURES {
                    let (line, place, reason) = (item.line, item.place(), reason.clone());
                    summary.failures.push(Failure {
                        line,
                        place,
                        reason,
                    });
                }
                reason
            }
            Skip::Duplicate { first_line } => {
                summary.duplicates += 1;
                format!("same key as line {first_line}")
            }
        };
        let elapsed = self.started.elapsed().as_secs_f64();
        let (index, place) = (item.index, item.place());
        let text = format!("{elapsed:>6.2}s  skip   #{index} {place}: {reason}");
        match &mut self.view {
            View::Bar(bar) => {
                if matches!(skip, Skip::Failed { .. }) {
                    bar.println(text);
                }
            }
            View::Log(out) => drop(writeln!(out, "{text}")),
        }
        self.refresh(running);
    }

    /// Shows that item `index`, at `place` in the input, waits to retry.
    pub fn retrying(&mut self, index: u64, place: &str, notice: &RetryNotice) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let RetryNotice {
            failure,
            attempt,
            max_attempts,
            delay,
        } = notice;
        let delay = format_duration(*delay);
        let failure = printable(failure, MAX_SHOWN_BYTES);
        let text = format!(
            "{elapsed:>6.2}s  retry  #{index} {place}: {failure}; attempt {attempt} of {max_attempts} in {delay}"
        );
        match &mut self.view {
            View::Bar(bar) => bar.println(text),
            View::Log(out) => drop(writeln!(out, "{text}")),
        }
    }

    /// Shows one line about the run, above the bar or in the log.
    pub fn note(&mut self, text: String) {
        match &mut self.view {
            View::Bar(bar) => bar.println(text),
            View::Log(out) => drop(writeln!(out, "{text}")),
        }
    }

    /// Runs `write` with the progress bar cleared from the screen, then
    /// draws the bar again, below what `write` printed.
    pub fn suspend<R>(&self, write: impl FnOnce() -> R) -> R {
        match &self.view {
            View::Bar(bar) => bar.suspend(write),
            View::Log(_) => write(),
        }
    }

    /// Redraws the counts, with `running` commands running now.
    pub fn refresh(&self, running: usize) {
        if let View::Bar(bar) = &self.view {
            let summary = &self.summary;
            let (done, failed) = (summary.succeeded, summary.failed);
            let skipped = summary.skipped();
            bar.set_message(format!(
                "done {done}  failed {failed}  skipped {skipped}  running {running}"
            ));
        }
    }

    /// Removes the bar and returns the summary of the run.
    pub fn finish(&mut self, max_running: usize) -> Summary {
        if let View::Bar(bar) = &self.view {
            bar.finish_and_clear();
        }
        self.summary.wall_time = self.started.elapsed();
        self.summary.max_running = max_running;
        std::mem::take(&mut self.summary)
    }

    fn count(&mut self, item: &Item, outcome: &ItemOutcome, failure: Option<&str>) {
        let summary = &mut self.summary;
        if outcome.attempts() > 1 {
            summary.retried += 1;
        }
        let Some(reason) = failure else {
            summary.succeeded += 1;
            return;
        };
        match outcome {
            // A given-back item is neither done nor failed: another
            // attempt, in another process or a later run, may take it.
            ItemOutcome::NotStarted { .. } | ItemOutcome::GivenBack { .. } => {
                summary.not_started += 1;
                return;
            }
            ItemOutcome::TimedOut { .. } => summary.timed_out += 1,
            ItemOutcome::Interrupted { .. } => summary.killed += 1,
            ItemOutcome::Done { .. } | ItemOutcome::Failed { .. } => {}
        }
        summary.failed += 1;
        if item.is_malformed() {
            summary.malformed += 1;
        }
        if summary.failures.len() < SUMMARY_FAILURES {
            let (line, place) = (item.line, item.place());
            let reason = reason.to_owned();
            summary.failures.push(Failure {
                line,
                place,
                reason,
            });
        }
    }

    fn log_line(
        &self,
        item: &Item,
        result: &ItemResult,
        outcome: &ItemOutcome,
        failure: Option<&str>,
    ) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let (index, place) = (item.index, item.place());
        let attempts = outcome.attempts();
        let Some(reason) = failure else {
            let duration = result.duration.as_secs_f64();
            let tries = if attempts > 1 {
                format!(", {attempts} attempts")
            } else {
                String::new()
            };
            return format!("{elapsed:>6.2}s  ok     #{index} {place} ({duration:.2}s{tries})");
        };
        let tag = match outcome {
            ItemOutcome::NotStarted { .. } => "SKIP  ",
            ItemOutcome::Interrupted { .. } => "KILLED",
            ItemOutcome::GivenBack { .. } => "BACK  ",
            _ => "FAILED",
        };
        format!("{elapsed:>6.2}s  {tag} #{index} {place}: {reason}")
    }
}

/// Returns why an item failed, followed by the last line its command wrote
/// to stderr and the number of attempts when there were several, or `None`
/// when it succeeded. Both parts are made [`printable`], because they go to
/// a terminal or a log.
fn describe_failure(result: &ItemResult, outcome: &ItemOutcome) -> Option<String> {
    let reason = printable(&outcome.reason()?, MAX_SHOWN_BYTES);
    let attempts = outcome.attempts();
    let reason = if attempts > 1 {
        format!("{reason} (after {attempts} attempts)")
    } else {
        reason
    };
    let last_stderr = result
        .stderr_tail
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty());
    match last_stderr {
        Some(line) => Some(format!("{reason}: {}", printable(line, MAX_SHOWN_BYTES))),
        None => Some(reason),
    }
}

/// Escapes `text` for a terminal and cuts it to at most `max_bytes` bytes,
/// followed by `…(N more bytes)` when bytes of `text` are left out.
///
/// Control characters other than tab, which could move the cursor, clear
/// the screen or retitle the window, become `\x1b` (C0 and DEL) or `\u{9b}`
/// (C1). So do the bidirectional formatting characters, which can make a
/// line show in another order than its bytes.
pub fn printable(text: &str, max_bytes: usize) -> String {
    let mut shown = String::new();
    for (offset, c) in text.char_indices() {
        let before = shown.len();
        if c == '\t' || !(c.is_control() || is_bidi_control(c)) {
            shown.push(c);
        } else if c.is_ascii() {
            let _ = write!(shown, "\\x{:02x}", u32::from(c));
        } else {
            let _ = write!(shown, "\\u{{{:x}}}", u32::from(c));
        }
        if shown.len() > max_bytes {
            shown.truncate(before);
            let left_out = text.len() - offset;
            let _ = write!(shown, "…({left_out} more bytes)");
            break;
        }
    }
    shown
}

/// Returns whether `c` is one of the Unicode bidirectional formatting
/// characters (embeddings, overrides and isolates).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "done {}, failed {}", self.succeeded, self.failed)?;
        let kinds = [
            (self.malformed, "malformed"),
            (self.timed_out, "timed out"),
            (self.killed, "killed"),
        ];
        let kinds: Vec<String> = kinds
            .iter()
            .filter(|(count, _)| *count > 0)
            .map(|(count, kind)| format!("{count} {kind}"))
            .collect();
        if !kinds.is_empty() {
            write!(f, " ({})", kinds.join(", "))?;
        }
        if self.not_started > 0 {
            write!(f, ", not started {}", self.not_started)?;
        }
        if self.retried > 0 {
            write!(f, ", retried {}", self.retried)?;
        }
        self.fmt_skipped(f)?;
        let wall_time = self.wall_time.as_secs_f64();
        let what = self.what_ran.unwrap_or("command");
        let commands = if self.max_running == 1 {
            what.to_owned()
        } else {
            format!("{what}s")
        };
        write!(f, ", wall time {wall_time:.2}s")?;
        write!(f, ", at most {} {commands} ran at once", self.max_running)?;
        self.fmt_failures(f)?;
        self.fmt_stop(f)
    }
}

impl Summary {
    /// Returns whether every item succeeded, now or in an earlier run.
    pub fn all_succeeded(&self) -> bool {
        self.failed == 0
            && self.skipped_failed == 0
            && self.not_started == 0
            && self.stopped.is_none()
    }

    /// Returns the number of items the journal skipped.
    pub fn skipped(&self) -> u64 {
        self.skipped_done + self.skipped_failed + self.duplicates
    }

    fn fmt_skipped(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.skipped() == 0 {
            return Ok(());
        }
        let parts = [
            (self.skipped_done, "done earlier"),
            (self.skipped_failed, "failed earlier"),
            (self.duplicates, "with a duplicate key"),
        ];
        let parts: Vec<String> = parts
            .iter()
            .filter(|(count, _)| *count > 0)
            .map(|(count, what)| format!("{count} {what}"))
            .collect();
        write!(f, ", skipped {} ({})", self.skipped(), parts.join(", "))
    }

    fn fmt_stop(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(cause) = &self.stopped else {
            return Ok(());
        };
        write!(f, "\nstopped early: {cause}")?;
        if self.input_left_unread {
            write!(f, "; the rest of standard input was not read")?;
        } else if self.not_started > 0 {
            let items = crate::signals::plural_items(self.not_started as usize);
            write!(f, "; {} {items} not started", self.not_started)?;
        }
        Ok(())
    }

    fn fmt_failures(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.failures.is_empty() {
            return Ok(());
        }
        let listed = self.failures.len();
        let failed = self.failed + self.skipped_failed;
        if (listed as u64) < failed {
            write!(f, "\nfirst {listed} of {failed} failed items:")?;
        } else {
            write!(f, "\nfailed items:")?;
        }
        for failure in &self.failures {
            write!(f, "\n  {}: {}", failure.place, failure.reason)?;
        }
        if self.skipped_failed > 0 {
            write!(
                f,
                "\nadd --retry-failed to run the items that failed earlier again"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ItemKind;

    fn outcome_of(result: &ItemResult) -> ItemOutcome {
        ItemOutcome::from_last_attempt(result, 1, None)
    }

    fn item(index: u64, kind: ItemKind) -> Item {
        Item {
            index,
            line: index + 1,
            kind,
        }
    }

    #[test]
    fn summary_counts_and_lists_failures() {
        let mut progress = Progress::log(Box::new(std::io::sink()));
        let ok = ItemResult {
            exit_code: Some(0),
            ..ItemResult::default()
        };
        let failed = ItemResult {
            exit_code: Some(1),
            stderr_tail: vec!["first".to_owned(), "last".to_owned(), String::new()],
            ..ItemResult::default()
        };
        let malformed = ItemKind::Malformed {
            raw: String::new(),
            reason: "invalid JSON".to_owned(),
        };
        let text = |t: &str| ItemKind::Text(t.to_owned());
        progress.finished(&item(0, text("a")), &ok, &outcome_of(&ok), 0);
        progress.finished(&item(1, text("b")), &failed, &outcome_of(&failed), 0);
        let reason = ItemResult::failed("invalid JSON".to_owned());
        let not_run = ItemOutcome::Failed {
            attempts: 0,
            last_error: "invalid JSON".to_owned(),
        };
        progress.finished(&item(2, malformed), &reason, &not_run, 0);
        let summary = progress.finish(2);

        assert_eq!(
            (summary.succeeded, summary.failed, summary.malformed),
            (1, 2, 1)
        );
        let text = summary.to_string();
        assert!(
            text.starts_with("done 1, failed 2 (1 malformed), wall time "),
            "{text}"
        );
        assert!(
            text.contains(", at most 2 commands ran at once\nfailed items:"),
            "{text}"
        );
        assert!(text.contains("\n  line 2: exit status 1: last"), "{text}");
        assert!(text.contains("\n  line 3: invalid JSON"), "{text}");
    }

    /// A log destination whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct SharedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for SharedLog {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Fails one item whose command wrote `stderr`, and returns the log and
    /// the summary as printed.
    fn fail_with_stderr(stderr: &str) -> (String, String) {
        let log = SharedLog::default();
        let mut progress = Progress::log(Box::new(log.clone()));
        let failed = ItemResult {
            exit_code: Some(1),
            stderr_tail: vec![stderr.to_owned()],
            ..ItemResult::default()
        };
        let outcome = ItemOutcome::Failed {
            attempts: 1,
            last_error: failed.failure_reason().unwrap(),
        };
        progress.finished(
            &item(0, ItemKind::Text("a".to_owned())),
            &failed,
            &outcome,
            0,
        );
        let summary = progress.finish(1).to_string();
        let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        (log, summary)
    }

    #[test]
    fn failure_escapes_control_characters() {
        let (log, summary) = fail_with_stderr("\x1b[2J\x1b]0;title\x07bad\tthing\r\u{9b}\u{202e}");
        let expected = r"exit status 1: \x1b[2J\x1b]0;title\x07bad	thing\x0d\u{9b}\u{202e}";
        assert!(log.contains(expected), "{log}");
        assert!(summary.contains(expected), "{summary}");
        assert!(!log.contains('\x1b'), "{log:?}");
        assert!(!summary.contains('\x1b'), "{summary:?}");
    }

    #[test]
    fn failure_caps_long_stderr_line() {
        let (log, summary) = fail_with_stderr(&"é".repeat(32 * 1024));
        let line = log.lines().next().unwrap();
        assert!(line.len() < 2 * MAX_SHOWN_BYTES, "{} bytes", line.len());
        let shown = line.matches('é').count();
        let more = format!("…({} more bytes)", 64 * 1024 - 2 * shown);
        assert!(line.ends_with(&more), "{line}");
        assert!(summary.lines().all(|l| l.len() < 2 * MAX_SHOWN_BYTES));
        assert!(summary.contains(&more), "{summary}");
    }

    #[test]
    fn printable_keeps_short_text() {
        assert_eq!(printable("plain text", 300), "plain text");
        assert_eq!(printable("abcdef", 3), "abc…(3 more bytes)");
        assert_eq!(printable("ab\x1b", 3), "ab…(1 more bytes)");
        assert_eq!(printable("", 3), "");
    }

    #[test]
    fn summary_limits_listed_failures() {
        let mut progress = Progress::log(Box::new(std::io::sink()));
        let failed = ItemResult::failed("down".to_owned());
        for index in 0..12 {
            let outcome = outcome_of(&failed);
            progress.finished(
                &item(index, ItemKind::Text("x".to_owned())),
                &failed,
                &outcome,
                0,
            );
        }
        let summary = progress.finish(1);
        assert_eq!(summary.failures.len(), SUMMARY_FAILURES);
        assert!(summary.to_string().contains("first 10 of 12 failed items:"));
        assert!(summary.to_string().contains("at most 1 command ran"));
    }

    #[test]
    fn summary_counts_stops_and_retries() {
        let mut progress = Progress::log(Box::new(std::io::sink()));
        let x = || item(0, ItemKind::Text("x".to_owned()));
        let ok = ItemResult {
            exit_code: Some(0),
            ..ItemResult::default()
        };
        progress.finished(&x(), &ok, &ItemOutcome::Done { attempts: 3 }, 0);
        let after = Duration::from_secs(1);
        let timed_out = ItemOutcome::TimedOut { attempts: 1, after };
        progress.finished(&x(), &ItemResult::default(), &timed_out, 0);
        let cause = Some(StopCause::Interrupt);
        let killed = ItemOutcome::Interrupted {
            attempts: 1,
            cause: cause.clone(),
        };
        progress.finished(&x(), &ItemResult::default(), &killed, 0);
        let skipped = ItemOutcome::NotStarted { attempts: 0, cause };
        progress.finished(&x(), &ItemResult::default(), &skipped, 0);
        let mut summary = progress.finish(1);
        summary.stopped = Some(StopCause::Interrupt);

        assert_eq!((summary.succeeded, summary.failed), (1, 2));
        assert_eq!((summary.timed_out, summary.killed), (1, 1));
        assert_eq!((summary.retried, summary.not_started), (1, 1));
        assert!(!summary.all_succeeded());
        let text = summary.to_string();
        let counts = "done 1, failed 2 (1 timed out, 1 killed), not started 1, retried 1,";
        assert!(text.starts_with(counts), "{text}");
        assert!(
            text.ends_with("\nstopped early: interrupted; 1 item not started"),
            "{text}"
        );
    }
}
