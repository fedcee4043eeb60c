//! `backlog status`: what a journal records, as text for a person or as
//! one JSON object.
//!
//! It opens the journal read-only, so it can run while a run writes to it.

use std::fmt::{self, Write as _};
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use rusqlite::Connection;
use serde::Serialize;

use crate::cli::StatusArgs;
use crate::journal::store::{self, RunRecord};
use crate::journal::{Access, JournalError, Liveness};
use crate::progress::{printable, MAX_SHOWN_BYTES};

/// How many items of each list the text output shows.
const TEXT_LIST_ITEMS: usize = 20;

/// How many characters of a key the text output shows.
const TEXT_KEY_CHARS: usize = 24;

/// Everything `status` shows.
#[derive(Debug, Serialize)]
struct Report {
    journal: String,
    counts: Counts,
    runs: u64,
    last_run: Option<RunView>,
    failed: Vec<ItemView>,
    /// Items marked running by a run that is no longer alive.
    interrupted: Vec<ItemView>,
}

#[derive(Debug, Default, Serialize)]
struct Counts {
    total: u64,
    pending: u64,
    running: u64,
    done: u64,
    failed: u64,
}

#[derive(Debug, Serialize)]
struct RunView {
    id: i64,
    pid: u32,
    host: String,
    started_at: String,
    finished_at: Option<String>,
    /// `running`, `completed`, `stopped`, or `died` for a run that ended
    /// without closing the journal.
    state: &'static str,
    outcome: Option<String>,
}

#[derive(Debug, Serialize)]
struct ItemView {
    key: String,
    line: u64,
    item: String,
    attempts: u32,
    exit_code: Option<i32>,
    signal: Option<i32>,
    error: Option<String>,
    stderr_tail: Vec<String>,
    started_at: Option<String>,
    finished_at: Option<String>,
}

/// Prints the status of the journal that `args` names to stdout.
///
/// # Errors
///
/// Fails when the journal is missing, is not a journal, or cannot be read.
pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let report = read(&args.journal)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{report}")?;
    }
    out.flush().context("cannot write to standard output")
}

fn read(path: &Path) -> Result<Report, JournalError> {
    let conn = store::open_read_only(path)?;
    let read_error = |e: rusqlite::Error| JournalError::sqlite(path, Access::Read, &e);
    // One read transaction gives a consistent view while a run writes.
    conn.execute_batch("BEGIN").map_err(read_error)?;
    let counts = counts(&conn).map_err(read_error)?;
    let runs = conn
        .query_row("SELECT count(*) FROM runs", [], |row| row.get(0))
        .map_err(read_error)?;
    let live_run = match store::lock_holder(&conn).map_err(read_error)? {
        Some(holder) if holder.owner.liveness() != Liveness::Gone => Some(holder.id),
        _ => None,
    };
    let last_run = store::last_run(&conn)
        .map_err(read_error)?
        .map(|run| run_view(run, live_run));
    let failed = items(&conn, "state = 'failed'", None).map_err(read_error)?;
    let interrupted =
        items(&conn, "state = 'running' AND run IS NOT ?1", live_run).map_err(read_error)?;
    Ok(Report {
        journal: path.display().to_string(),
        counts,
        runs,
        last_run,
        failed,
        interrupted,
    })
}

fn counts(conn: &Connection) -> rusqlite::Result<Counts> {
    let mut counts = Counts::default();
    let mut statement = conn.prepare("SELECT state, count(*) FROM items GROUP BY state")?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        let (state, count): (String, u64) = (row.get(0)?, row.get(1)?);
        counts.total += count;
        match state.as_str() {
            "pending" => counts.pending = count,
            "running" => counts.running = count,
            "done" => counts.done = count,
            _ => counts.failed = count,
        }
    }
    Ok(counts)
}

fn run_view(run: RunRecord, live_run: Option<i64>) -> RunView {
    let state = match (&run.outcome, live_run == Some(run.id)) {
        (_, true) => "running",
        (Some(outcome), false) if outcome == "completed" => "completed",
        (Some(_), false) => "stopped",
        (None, false) => "died",
    };
    RunView {
        id: run.id,
        pid: run.owner.pid,
        host: run.owner.host,
        started_at: store::utc_text(run.started_at),
        finished_at: run.finished_at.map(store::utc_text),
        state,
        outcome: run.outcome,
    }
}

fn items(conn: &Connection, filter: &str, run: Option<i64>) -> rusqlite::Result<Vec<ItemView>> {
    let sql = format!(
        "SELECT key, line, item, attempts, exit_code, signal, error, stderr_tail, started_at, \
         finished_at FROM items WHERE {filter} ORDER BY line"
    );
    let mut statement = conn.prepare(&sql)?;
    let parameters: &[&dyn rusqlite::ToSql] = if filter.contains("?1") { &[&run] } else { &[] };
    let views = statement.query_map(parameters, |row| {
        let stderr_tail: Option<String> = row.get(7)?;
        let started_at: Option<i64> = row.get(8)?;
        let finished_at: Option<i64> = row.get(9)?;
        Ok(ItemView {
            key: row.get(0)?,
            line: row.get(1)?,
            item: row.get(2)?,
            attempts: row.get(3)?,
            exit_code: row.get(4)?,
            signal: row.get(5)?,
            error: row.get(6)?,
            stderr_tail: stderr_tail
                .map(|tail| tail.lines().map(str::to_owned).collect())
                .unwrap_or_default(),
            started_at: started_at.map(store::utc_text),
            finished_at: finished_at.map(store::utc_text),
        })
    })?;
    views.collect()
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Counts {
            total,
            pending,
            running,
            done,
            failed,
        } = self.counts;
        writeln!(f, "journal {}", self.journal)?;
        writeln!(
            f,
            "items: {total} ({done} done, {failed} failed, {running} running, {pending} pending)"
        )?;
        match &self.last_run {
            Some(run) => writeln!(f, "runs: {}, the last {run}", self.runs)?,
            None => writeln!(f, "runs: none")?,
        }
        if !self.failed.is_empty() {
            writeln!(f, "\nfailed items ({}):", self.failed.len())?;
            fmt_items(f, &self.failed, |item| item.failure())?;
        }
        if !self.interrupted.is_empty() {
            writeln!(
                f,
                "\nitems that were running when their run died ({}), which the next run runs again:",
                self.interrupted.len()
            )?;
            fmt_items(f, &self.interrupted, |item| {
                let started = item.started_at.as_deref().unwrap_or("at an unknown time");
                format!("started {started}")
            })?;
        }
        Ok(())
    }
}

impl fmt::Display for RunView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (id, pid, host) = (self.id, self.pid, &self.host);
        write!(
            f,
            "run {id} (pid {pid} on {host}) started {}",
            self.started_at
        )?;
        let finished = self.finished_at.as_deref().unwrap_or("an unknown time");
        match self.state {
            "running" => write!(f, " and is still running"),
            "completed" => write!(f, " and completed at {finished}"),
            "died" => write!(f, " and died without finishing"),
            _ => write!(
                f,
                " and stopped at {finished}: {}",
                self.outcome.as_deref().unwrap_or_default()
            ),
        }
    }
}

impl ItemView {
    /// Returns the last error followed by the last line of standard error,
    /// escaped and cut for a terminal.
    fn failure(&self) -> String {
        let error = self.error.as_deref().unwrap_or("failed");
        let mut text = printable(error, MAX_SHOWN_BYTES);
        let last_stderr = self.stderr_tail.iter().rev().find(|l| !l.trim().is_empty());
        if let Some(line) = last_stderr {
            let _ = write!(text, ": {}", printable(line, MAX_SHOWN_BYTES));
        }
        text
    }

    fn short_key(&self) -> String {
        if self.key.chars().count() <= TEXT_KEY_CHARS {
            return self.key.clone();
        }
        let start: String = self.key.chars().take(TEXT_KEY_CHARS - 1).collect();
        format!("{start}…")
    }
}

fn fmt_items(
    f: &mut fmt::Formatter<'_>,
    items: &[ItemView],
    describe: impl Fn(&ItemView) -> String,
) -> fmt::Result {
    for item in items.iter().take(TEXT_LIST_ITEMS) {
        let attempts = if item.attempts == 1 {
            "attempt"
        } else {
            "attempts"
        };
        writeln!(
            f,
            "  line {}, {} {attempts}: {}",
            item.line,
            item.attempts,
            describe(item)
        )?;
        // The journal keeps at most 1 KiB of an item, and keys are cut
        // already, so both need only escaping.
        let text = printable(&item.item, usize::MAX);
        let key = printable(&item.short_key(), usize::MAX);
        writeln!(f, "    item {text}  key {key}")?;
    }
    if items.len() > TEXT_LIST_ITEMS {
        writeln!(
            f,
            "  and {} more: see `backlog status --json`",
            items.len() - TEXT_LIST_ITEMS
        )?;
    }
    Ok(())
}
