//! The journal's SQLite file: its schema, the run lock and the item
//! records. During a run only the journal's writer thread (`serve` in the
//! parent module) owns a `Store`, so SQLite never blocks the async runtime.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::error::{Access, JournalError};
use super::owner::{Liveness, Owner};
use super::{AttemptEnd, AttemptRecord, Claim, Skip};

/// The SQLite application id of a journal, "blog" in ASCII, which
/// distinguishes a journal from any other SQLite file.
pub const APPLICATION_ID: i32 = 0x626c_6f67;

/// The schema version this build writes, kept in `user_version`. Version 2
/// added the `fence` column of `items`. A run migrates a version 1 journal,
/// and `status` reads both.
pub const SCHEMA_VERSION: i32 = 2;

/// How long a connection waits for another connection's SQLite lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The maximum number of bytes of an item's text kept for `status`.
const ITEM_TEXT_BYTES: usize = 1024;

const SCHEMA: &str = "
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
CREATE TABLE runs (
    id          INTEGER PRIMARY KEY,
    pid         INTEGER NOT NULL,
    host        TEXT NOT NULL,
    boot_id     TEXT NOT NULL,
    start_ticks INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    outcome     TEXT
) STRICT;
CREATE TABLE lock (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    run INTEGER NOT NULL REFERENCES runs (id)
) STRICT;
CREATE TABLE items (
    key         TEXT PRIMARY KEY,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts    INTEGER NOT NULL,
    run         INTEGER NOT NULL REFERENCES runs (id),
    line        INTEGER NOT NULL,
    item        TEXT NOT NULL,
    exit_code   INTEGER,
    signal      INTEGER,
    error       TEXT,
    stderr_tail TEXT,
    started_at  INTEGER,
    finished_at INTEGER,
    fence       INTEGER
) STRICT, WITHOUT ROWID;
CREATE INDEX items_by_state ON items (state);
";

/// The columns of `items` in schema version 1, checked when an existing
/// journal is opened.
const ITEM_COLUMNS_V1: [&str; 12] = [
    "key",
    "state",
    "attempts",
    "run",
    "line",
    "item",
    "exit_code",
    "signal",
    "error",
    "stderr_tail",
    "started_at",
    "finished_at",
];

/// The column that schema version 2 adds to `items`: the fencing token of
/// the shared lease the item's current attempt runs under, or NULL without
/// `--limiter`.
const FENCE_COLUMN: &str = "fence";

/// The kind of database that `check_schema` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schema {
    /// An empty database, which a run may turn into a journal.
    Empty,
    /// A journal of schema version 1, without fences.
    Version1,
    /// A journal of the current schema version.
    Current,
}

/// The open journal of the current run, which holds the run lock.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    run: i64,
    retry_failed: bool,
}

/// The facts about a starting run that the journal reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The id of the new run.
    pub run: i64,
    /// The previous run, when it ended without closing the journal.
    pub died: Option<DiedRun>,
}

/// A run that ended without closing the journal: it was killed, or its
/// machine went down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiedRun {
    /// The id of the run.
    pub run: i64,
    /// The process that ran it.
    pub owner: Owner,
    /// How many items it left marked as running.
    pub running: u64,
}

/// A run as recorded in the `runs` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    /// The run id, counting up from 1.
    pub id: i64,
    /// The process that ran it.
    pub owner: Owner,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_at: i64,
    /// When it ended, or `None` while it runs or when it died.
    pub finished_at: Option<i64>,
    /// Its outcome, or `None` while it runs or when it died.
    pub outcome: Option<String>,
}

/// One item to record before its command starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The identity of the item.
    pub key: String,
    /// The item's 1-based line in the current input.
    pub line: u64,
    /// The item's text, shortened for storage.
    pub text: String,
}

/// A request to the writer thread, applied inside a batch transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Decides whether an item runs, and marks it running if so.
    Claim(ClaimRequest),
    /// Marks an item running again for another attempt, under the shared
    /// lease with the given fence, if any.
    StartAttempt(String, Option<u64>),
    /// Stores the fence of the shared lease the running attempt holds.
    SetFence(String, u64),
    /// Records how an attempt ended. With the attempt's fence, a success is
    /// recorded only if the item still has that fence.
    FinishAttempt(String, AttemptEnd, Option<u64>),
}

/// The reply to one `Op`, sent once its batch is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Claim(Claim),
    Attempt(u32),
    Fenced,
    Finished(Commit),
}

/// Whether the end of an attempt was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The end is recorded, or there was nothing to record it on.
    Recorded,
    /// The success of an attempt under fence `fence` was not recorded,
    /// because the item's stored fence is `stored`: a later attempt, or
    /// another claim, owns the item now.
    Rejected {
        /// The fence of the attempt.
        fence: u64,
        /// The fence stored with the item, NULL when it has none.
        stored: Option<u64>,
    },
}

/// The columns of an item that a claim looks at.
struct Existing {
    state: String,
    run: i64,
    attempts: u32,
    line: u64,
    error: Option<String>,
}

/// Returns the current time in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// Opens the journal at `path` read-only, for `backlog status`.
///
/// # Errors
///
/// Fails when the file is missing, is not a journal or has another schema.
pub fn open_read_only(path: &Path) -> Result<Connection, JournalError> {
    if !path.exists() {
        return Err(JournalError::new(format!(
            "journal '{}' not found. Pass the file that `backlog run --journal` wrote",
            path.display()
        )));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| JournalError::sqlite(path, Access::Open, &e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| JournalError::sqlite(path, Access::Open, &e))?;
    if check_schema(&conn, path)? == Schema::Empty {
        return Err(JournalError::new(format!(
            "'{}' is an empty SQLite database, not a backlog journal: no run has used it",
            path.display()
        )));
    }
    Ok(conn)
}

/// Checks that `conn` contains a journal of this schema version or of
/// version 1, and returns which, or `Schema::Empty` for an empty database.
fn check_schema(conn: &Connection, path: &Path) -> Result<Schema, JournalError> {
    let read = |e: rusqlite::Error| JournalError::sqlite(path, Access::Read, &e);
    let application_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(read)?;
    let version: i32 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(read)?;
    let tables = table_names(conn).map_err(read)?;
    if application_id == 0 && version == 0 && tables.is_empty() {
        return Ok(Schema::Empty);
    }
    let fix = "Pass another path to --journal, or move that file away";
    if application_id != APPLICATION_ID {
        return Err(JournalError::new(format!(
            "'{}' is an SQLite database but not a backlog journal (its tables: {}). {fix}",
            path.display(),
            if tables.is_empty() {
                "none".to_owned()
            } else {
                tables.join(", ")
            },
        )));
    }
    let (schema, mut expected) = match version {
        1 => (Schema::Version1, ITEM_COLUMNS_V1.to_vec()),
        SCHEMA_VERSION => (Schema::Current, ITEM_COLUMNS_V1.to_vec()),
        _ => {
            return Err(JournalError::new(format!(
                "journal '{}' has schema version {version}, but this backlog reads versions 1 \
                 to {SCHEMA_VERSION} only. Use the backlog that wrote it, or pass another path \
                 to --journal",
                path.display(),
            )))
        }
    };
    if schema == Schema::Current {
        expected.push(FENCE_COLUMN);
    }
    let columns = item_columns(conn).map_err(read)?;
    if columns != expected {
        return Err(JournalError::new(format!(
            "journal '{}' has a different schema: its items table has the columns [{}]. {fix}",
            path.display(),
            columns.join(", "),
        )));
    }
    Ok(schema)
}

fn table_names(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut statement =
        conn.prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")?;
    let names = statement.query_map([], |row| row.get(0))?;
    names.collect()
}

fn item_columns(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare("SELECT name FROM pragma_table_info('items') ORDER BY cid")?;
    let names = statement.query_map([], |row| row.get(0))?;
    names.collect()
}

/// Reads the run that holds the lock on the journal, if any.
///
/// # Errors
///
/// Fails when the query fails.
pub fn lock_holder(conn: &Connection) -> rusqlite::Result<Option<RunRecord>> {
    conn.query_row(
        &format!("SELECT {RUN_COLUMNS} FROM lock JOIN runs ON runs.id = lock.run"),
        [],
        run_record,
    )
    .optional()
}

/// Reads the latest run recorded in the journal, if any.
///
/// # Errors
///
/// Fails when the query fails.
pub fn last_run(conn: &Connection) -> rusqlite::Result<Option<RunRecord>> {
    conn.query_row(
        &format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY id DESC LIMIT 1"),
        [],
        run_record,
    )
    .optional()
}

const RUN_COLUMNS: &str =
    "runs.id, runs.pid, runs.host, runs.boot_id, runs.start_ticks, runs.started_at, \
     runs.finished_at, runs.outcome";

fn run_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        id: row.get(0)?,
        owner: Owner {
            pid: row.get(1)?,
            host: row.get(2)?,
            boot_id: row.get(3)?,
            start_ticks: row.get(4)?,
        },
        started_at: row.get(5)?,
        finished_at: row.get(6)?,
        outcome: row.get(7)?,
    })
}

/// Formats milliseconds since the Unix epoch as a UTC date and time, such
/// as `2024-03-01 17:04:05 UTC`.
pub fn utc_text(ms: i64) -> String {
    let seconds = ms.div_euclid(1000);
    let (days, second_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_date(days);
    let (hour, minute, second) = (
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
    );
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02} UTC")
}

/// Converts days since 1970-01-01 to a proleptic Gregorian date, counting
/// in 400-year eras that start on March 1 so that leap days come last.
fn civil_date(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Store {
    /// Opens or creates the journal at `path`, checks its schema and key
    /// rule, and takes the run lock for a new run.
    ///
    /// # Errors
    ///
    /// Fails when the file cannot be opened or written, is not a journal,
    /// was made with another `--key`, or is locked by a live run.
    pub fn open(
        path: &Path,
        key_rule: &str,
        retry_failed: bool,
    ) -> Result<(Self, Started), JournalError> {
        let open_error = |e: rusqlite::Error| JournalError::sqlite(path, Access::Open, &e);
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(path, flags).map_err(open_error)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
        // The first statement reads the file header, so a file that is not
        // a database fails here.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(open_error)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(JournalError::new(format!(
                "cannot open journal '{}': SQLite cannot use write-ahead logging there \
                 (journal mode stays '{mode}'). Put the journal on a local file system",
                path.display()
            )));
        }
        // FULL makes a commit durable across a power loss, so a rebooted
        // machine never reruns an item recorded as done. `apply` lowers it
        // to NORMAL for batches that end no item.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_error)?;

        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(open_error)?;
        match check_schema(&tx, path)? {
            Schema::Empty => create_schema(&tx, key_rule).map_err(open_error)?,
            Schema::Version1 => migrate_to_fences(&tx).map_err(open_error)?,
            Schema::Current => {}
        }
        check_key_rule(&tx, path, key_rule)?;
        let died = take_lock(&tx, path)?;
        let owner = Owner::current();
        tx.execute(
            "INSERT INTO runs (pid, host, boot_id, start_ticks, started_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                owner.pid,
                owner.host,
                owner.boot_id,
                owner.start_ticks,
                now_ms()
            ],
        )
        .map_err(open_error)?;
        let run = tx.last_insert_rowid();
        tx.execute(
            "INSERT OR REPLACE INTO lock (id, run) VALUES (1, ?1)",
            [run],
        )
        .map_err(open_error)?;
        tx.commit().map_err(open_error)?;

        let store = Store {
            conn,
            path: path.to_owned(),
            run,
            retry_failed,
        };
        Ok((store, Started { run, died }))
    }

    /// Applies `ops` in one transaction and returns one reply per op. A
    /// failure rolls back the whole batch, so no reply is sent for an op
    /// that is not committed.
    ///
    /// # Errors
    ///
    /// Fails when SQLite cannot read or write the journal.
    pub fn apply(&mut self, ops: &[Op]) -> Result<Vec<Reply>, JournalError> {
        let (run, retry_failed) = (self.run, self.retry_failed);
        let write_error = |e: rusqlite::Error| JournalError::sqlite(&self.path, Access::Write, &e);
        // Only a final state must survive a power loss: a lost `running`
        // mark leaves the item pending, and a pending item runs again just
        // as a running one does. So only a batch that ends an item pays for
        // an fsync, and that fsync also makes the batches before it durable,
        // because the write-ahead log is written in order.
        let ends_an_item = ops.iter().any(|op| {
            matches!(
                op,
                Op::FinishAttempt(_, AttemptEnd::Succeeded(_) | AttemptEnd::Failed(_), _)
            )
        });
        let synchronous = if ends_an_item { "FULL" } else { "NORMAL" };
        self.conn
            .pragma_update(None, "synchronous", synchronous)
            .map_err(write_error)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(write_error)?;
        let mut replies = Vec::with_capacity(ops.len());
        for op in ops {
            let reply = match op {
                Op::Claim(request) => claim(&tx, run, retry_failed, request).map(Reply::Claim),
                Op::StartAttempt(key, fence) => {
                    start_attempt(&tx, run, key, *fence).map(Reply::Attempt)
                }
                Op::SetFence(key, fence) => {
                    set_fence(&tx, run, key, *fence).map(|()| Reply::Fenced)
                }
                Op::FinishAttempt(key, end, fence) => {
                    finish_attempt(&tx, run, key, end, *fence).map(Reply::Finished)
                }
            };
            replies.push(reply.map_err(write_error)?);
        }
        tx.commit().map_err(write_error)?;
        Ok(replies)
    }

    /// Ends the run: items it left running go back to pending, the run
    /// gets its end time and `outcome`, and the lock is released.
    ///
    /// # Errors
    ///
    /// Fails when SQLite cannot write the journal.
    pub fn close(mut self, outcome: &str) -> Result<(), JournalError> {
        let write_error = |e: rusqlite::Error| JournalError::sqlite(&self.path, Access::Write, &e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(write_error)?;
        let now = now_ms();
        tx.execute(
            "UPDATE items SET state = 'pending', error = ?2, finished_at = ?3 \
             WHERE run = ?1 AND state = 'running'",
            params![self.run, format!("interrupted: {outcome}"), now],
        )
        .map_err(write_error)?;
        tx.execute(
            "UPDATE runs SET finished_at = ?2, outcome = ?3 WHERE id = ?1",
            params![self.run, now, outcome],
        )
        .map_err(write_error)?;
        tx.execute("DELETE FROM lock WHERE run = ?1", [self.run])
            .map_err(write_error)?;
        tx.commit().map_err(write_error)?;
        self.conn
            .close()
            .map_err(|(_, e)| JournalError::sqlite(&self.path, Access::Write, &e))
    }
}

fn create_schema(tx: &Connection, key_rule: &str) -> rusqlite::Result<()> {
    tx.execute_batch(SCHEMA)?;
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.execute(
        "INSERT INTO meta (name, value) VALUES ('key_rule', ?1)",
        [key_rule],
    )?;
    Ok(())
}

/// Migrates a version 1 journal to the current version by adding the
/// `fence` column, NULL for every item, as a run without `--limiter` writes.
fn migrate_to_fences(tx: &Connection) -> rusqlite::Result<()> {
    tx.execute_batch("ALTER TABLE items ADD COLUMN fence INTEGER")?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
}

/// Checks that the journal was made with the same `--key`, because keys made
/// by another rule would never match and every item would run again.
fn check_key_rule(tx: &Connection, path: &Path, key_rule: &str) -> Result<(), JournalError> {
    let stored: String = tx
        .query_row(
            "SELECT value FROM meta WHERE name = 'key_rule'",
            [],
            |row| row.get(0),
        )
        .map_err(|e| JournalError::sqlite(path, Access::Read, &e))?;
    if stored == key_rule {
        return Ok(());
    }
    Err(JournalError::new(format!(
        "journal '{}' identifies items by {stored}, but this run would use {key_rule}. \
         Give the same --key as the runs that made it, or pass another path to --journal",
        path.display()
    )))
}

/// Takes over the run lock when its holder is gone, or fails when it still
/// runs. Returns the run that died holding it, if any.
fn take_lock(tx: &Connection, path: &Path) -> Result<Option<DiedRun>, JournalError> {
    let read_error = |e: rusqlite::Error| JournalError::sqlite(path, Access::Read, &e);
    let Some(holder) = lock_holder(tx).map_err(read_error)? else {
        return Ok(None);
    };
    let Owner { pid, host, .. } = &holder.owner;
    let started = utc_text(holder.started_at);
    let path = path.display();
    let in_use = format!(
        "journal '{path}' is in use by run {} (pid {pid} on host {host}, started {started})",
        holder.id
    );
    match holder.owner.liveness() {
        Liveness::Alive => Err(JournalError::new(format!(
            "{in_use}. Wait for that run to end or stop it, then run again: \
             two runs on one journal would run items twice"
        ))),
        Liveness::OtherHost => Err(JournalError::new(format!(
            "{in_use}, which this machine cannot check. If that run has ended, \
             release its lock with: sqlite3 '{path}' 'DELETE FROM lock'"
        ))),
        Liveness::Gone => {
            let running = tx
                .query_row(
                    "SELECT count(*) FROM items WHERE run = ?1 AND state = 'running'",
                    [holder.id],
                    |row| row.get(0),
                )
                .map_err(read_error)?;
            Ok(Some(DiedRun {
                run: holder.id,
                owner: holder.owner,
                running,
            }))
        }
    }
}

fn claim(
    tx: &Connection,
    run: i64,
    retry_failed: bool,
    request: &ClaimRequest,
) -> rusqlite::Result<Claim> {
    let existing = tx
        .query_row(
            "SELECT state, run, attempts, line, error FROM items WHERE key = ?1",
            [&request.key],
            |row| {
                Ok(Existing {
                    state: row.get(0)?,
                    run: row.get(1)?,
                    attempts: row.get(2)?,
                    line: row.get(3)?,
                    error: row.get(4)?,
                })
            },
        )
        .optional()?;
    let text = shorten(&request.text, ITEM_TEXT_BYTES);
    let Some(existing) = existing else {
        tx.execute(
            "INSERT INTO items (key, state, attempts, run, line, item, started_at) \
             VALUES (?1, 'running', 1, ?2, ?3, ?4, ?5)",
            params![request.key, run, request.line, text, now_ms()],
        )?;
        return Ok(Claim::Run { attempt: 1 });
    };
    if existing.run == run {
        return Ok(Claim::Skip(Skip::Duplicate {
            first_line: existing.line,
        }));
    }
    let skip = match existing.state.as_str() {
        "done" => Some(Skip::Done),
        "failed" if !retry_failed => Some(Skip::Failed {
            error: existing.error.unwrap_or_default(),
        }),
        _ => None,
    };
    if let Some(skip) = skip {
        // Marking the item as seen by this run lets a later line with the
        // same key in this input count as a duplicate.
        tx.execute(
            "UPDATE items SET run = ?2, line = ?3 WHERE key = ?1",
            params![request.key, run, request.line],
        )?;
        return Ok(Claim::Skip(skip));
    }
    let attempt = existing.attempts + 1;
    tx.execute(
        "UPDATE items SET state = 'running', attempts = ?2, run = ?3, line = ?4, item = ?5, \
         started_at = ?6, finished_at = NULL, fence = NULL WHERE key = ?1",
        params![request.key, attempt, run, request.line, text, now_ms()],
    )?;
    Ok(Claim::Run { attempt })
}

fn start_attempt(
    tx: &Connection,
    run: i64,
    key: &str,
    fence: Option<u64>,
) -> rusqlite::Result<u32> {
    tx.query_row(
        "UPDATE items SET state = 'running', attempts = attempts + 1, started_at = ?3, \
         finished_at = NULL, fence = ?4 WHERE key = ?1 AND run = ?2 RETURNING attempts",
        params![key, run, now_ms(), fence],
        |row| row.get(0),
    )
}

fn set_fence(tx: &Connection, run: i64, key: &str, fence: u64) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE items SET fence = ?3 WHERE key = ?1 AND run = ?2 AND state = 'running'",
        params![key, run, fence],
    )?;
    Ok(())
}

/// Records the end of an attempt. A success under a fence is a conditional
/// write: it changes the item only while the item's stored fence is the
/// attempt's, and is rejected otherwise.
fn finish_attempt(
    tx: &Connection,
    run: i64,
    key: &str,
    end: &AttemptEnd,
    fence: Option<u64>,
) -> rusqlite::Result<Commit> {
    let (state, record) = match end {
        AttemptEnd::Succeeded(record) => ("done", record),
        AttemptEnd::Failed(record) => ("failed", record),
        AttemptEnd::WillRetry(record) => ("pending", record),
        AttemptEnd::Interrupted(reason) => ("pending", &AttemptRecord::interrupted(reason)),
        AttemptEnd::GivenBack(reason) => ("pending", &AttemptRecord::given_back(reason)),
    };
    let stderr_tail = (!record.stderr_tail.is_empty()).then(|| record.stderr_tail.join("\n"));
    let fenced = match (end, fence) {
        (AttemptEnd::Succeeded(_), Some(fence)) => Some(fence),
        _ => None,
    };
    let changed = tx.execute(
        "UPDATE items SET state = ?3, exit_code = ?4, signal = ?5, error = ?6, stderr_tail = ?7, \
         finished_at = ?8 WHERE key = ?1 AND run = ?2 AND state = 'running' \
         AND (?9 IS NULL OR fence IS ?9)",
        params![
            key,
            run,
            state,
            record.exit_code,
            record.signal,
            record.error,
            stderr_tail,
            now_ms(),
            fenced
        ],
    )?;
    let Some(fence) = fenced.filter(|_| changed == 0) else {
        return Ok(Commit::Recorded);
    };
    let stored = tx
        .query_row("SELECT fence FROM items WHERE key = ?1", [key], |row| {
            row.get(0)
        })
        .optional()?
        .flatten();
    Ok(Commit::Rejected { fence, stored })
}

/// Returns the longest start of `text` of at most `max` bytes that ends on
/// a character boundary.
fn shorten(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use tempfile::TempDir;

    use super::*;

    const RULE: &str = "test keys";

    fn claim_op(key: &str, line: u64) -> Op {
        Op::Claim(ClaimRequest {
            key: key.to_owned(),
            line,
            text: format!("text of {key}"),
        })
    }

    fn claim_one(store: &mut Store, key: &str, line: u64) -> Claim {
        match store.apply(&[claim_op(key, line)]).unwrap().remove(0) {
            Reply::Claim(claim) => claim,
            other => panic!("a claim got {other:?}"),
        }
    }

    fn finish(store: &mut Store, key: &str, end: AttemptEnd) {
        let op = Op::FinishAttempt(key.to_owned(), end, None);
        assert_eq!(
            store.apply(&[op]).unwrap(),
            [Reply::Finished(Commit::Recorded)]
        );
    }

    fn finish_fenced(store: &mut Store, key: &str, fence: u64) -> Commit {
        let end = AttemptEnd::Succeeded(AttemptRecord::default());
        let op = Op::FinishAttempt(key.to_owned(), end, Some(fence));
        match store.apply(&[op]).unwrap().remove(0) {
            Reply::Finished(commit) => commit,
            other => panic!("a finish got {other:?}"),
        }
    }

    fn stored_fence(path: &Path, key: &str) -> Option<u64> {
        let conn = Connection::open(path).unwrap();
        conn.query_row("SELECT fence FROM items WHERE key = ?1", [key], |row| {
            row.get(0)
        })
        .unwrap()
    }

    fn failure(code: i32) -> AttemptRecord {
        AttemptRecord {
            exit_code: Some(code),
            error: Some(format!("exit status {code}")),
            stderr_tail: vec!["first".to_owned(), "last".to_owned()],
            ..AttemptRecord::default()
        }
    }

    /// Returns the state, attempts and error of `key`, read on another
    /// connection, as a later run or `status` would see them.
    fn row(path: &Path, key: &str) -> (String, u32, Option<String>) {
        let conn = Connection::open(path).unwrap();
        conn.query_row(
            "SELECT state, attempts, error FROM items WHERE key = ?1",
            [key],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .unwrap()
    }

    /// Returns a temporary directory and the path of a journal in it.
    fn new_journal() -> (TempDir, PathBuf) {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("journal.db");
        (dir, path)
    }

    /// Creates the journal at `path` and closes it.
    fn create_closed(path: &Path) {
        let (store, _) = Store::open(path, RULE, false).unwrap();
        store.close("completed").unwrap();
    }

    /// Records a successful attempt of `key`.
    fn succeed(store: &mut Store, key: &str) {
        finish(store, key, AttemptEnd::Succeeded(AttemptRecord::default()));
    }

    /// Drops `store` without closing it, as a run killed with SIGKILL
    /// would, and makes its lock holder look like a process that has ended.
    fn abandon(store: Store, path: &Path) {
        drop(store);
        let conn = Connection::open(path).unwrap();
        conn.execute("UPDATE runs SET start_ticks = start_ticks + 1", [])
            .unwrap();
    }

    #[test]
    fn claim_runs_new_item_and_skips_done() {
        let (_dir, path) = new_journal();
        let (mut store, started) = Store::open(&path, RULE, false).unwrap();
        assert_eq!(started, Started { run: 1, died: None });
        assert_eq!(claim_one(&mut store, "a", 1), Claim::Run { attempt: 1 });
        assert_eq!(row(&path, "a").0, "running");
        succeed(&mut store, "a");
        assert_eq!(row(&path, "a"), ("done".to_owned(), 1, None));
        store.close("completed").unwrap();

        let (mut store, started) = Store::open(&path, RULE, false).unwrap();
        assert_eq!(started.run, 2);
        assert_eq!(claim_one(&mut store, "a", 3), Claim::Skip(Skip::Done));
        store.close("completed").unwrap();
    }

    #[test]
    fn claim_skips_duplicate_in_same_run() {
        let (_dir, path) = new_journal();
        let (mut store, _) = Store::open(&path, RULE, false).unwrap();
        let replies = store
            .apply(&[claim_op("a", 1), claim_op("b", 2), claim_op("a", 3)])
            .unwrap();
        let duplicate = Claim::Skip(Skip::Duplicate { first_line: 1 });
        assert_eq!(
            replies,
            [
                Reply::Claim(Claim::Run { attempt: 1 }),
                Reply::Claim(Claim::Run { attempt: 1 }),
                Reply::Claim(duplicate),
            ]
        );
    }

    #[test]
    fn failed_item_runs_again_only_with_retry_failed() {
        let (_dir, path) = new_journal();
        let (mut store, _) = Store::open(&path, RULE, false).unwrap();
        claim_one(&mut store, "a", 1);
        finish(&mut store, "a", AttemptEnd::Failed(failure(3)));
        store.close("completed").unwrap();

        let (mut store, _) = Store::open(&path, RULE, false).unwrap();
        let skipped = Claim::Skip(Skip::Failed {
            error: "exit status 3".to_owned(),
        });
        assert_eq!(claim_one(&mut store, "a", 1), skipped);
        store.close("completed").unwrap();

        let (mut store, _) = Store::open(&path, RULE, true).unwrap();
        assert_eq!(claim_one(&mut store, "a", 1), Claim::Run { attempt: 2 });
    }

    #[test]
    fn retry_and_interruption_are_recorded_per_attempt() {
        let (_dir, path) = new_journal();
        let (mut store, _) = Store::open(&path, RULE, false).unwrap();
        claim_one(&mut store, "a", 1);
        finish(&mut store, "a", AttemptEnd::WillRetry(failure(1)));
        let error = Some("exit status 1".to_owned());
        assert_eq!(row(&path, "a"), ("pending".to_owned(), 1, error));

        let op = Op::StartAttempt("a".to_owned(), None);
        assert_eq!(store.apply(&[op]).unwrap(), [Reply::Attempt(2)]);
        assert_eq!(row(&path, "a").0, "running");
        finish(
            &mut store,
            "a",
            AttemptEnd::Interrupted("SIGINT".to_owned()),
        );
        let error = Some("interrupted: SIGINT".to_owned());
        assert_eq!(row(&path, "a"), ("pending".to_owned(), 2, error));
        store.close("stopped: SIGINT").unwrap();

        let (mut store, _) = Store::open(&path, RULE, false).unwrap();
        assert_eq!(claim_one(&mut store, "a", 1), Claim::Run { attempt: 3 });
    }

    #[test]
    fn close_returns_running_items_to_pending() {
        let (_dir, path) = new_journal();
        let (mut store, _) = Store::open(&path, RULE, false).unwrap();
        claim_one(&mut store, "a", 1);
        store
            .close("stopped: cannot write to standard output")
            .unwrap();
        let (state, attempts, error) = row(&path, "a");
        assert_eq!((state.as_str(), attempts), ("pending", 1));
        assert_eq!(
            error.as_deref(),
            Some("interrupted: stopped: cannot write to standard output")
        );
    }

    #[test]
    fn live_lock_rejects_second_run() {
        let (_dir, path) = new_journal();
        let (_store, _) = Store::open(&path, RULE, false).unwrap();
        let error = Store::open(&path, RULE, false).unwrap_err().to_string();
        let expected = format!(
            "journal '{}' is in use by run 1 (pid {} on host ",
            path.display(),
            std::process::id()
        );
        assert!(error.starts_with(&expected), "{error}");
    }

    #[test]
    fn dead_lock_holder_is_taken_over() {
        let (_dir, path) = new_journal();
        let (mut killed, _) = Store::open(&path, RULE, false).unwrap();
        claim_one(&mut killed, "a", 1);
        claim_one(&mut killed, "b", 2);
        succeed(&mut killed, "b");
        // The run dies: no close, its lock and running marks stay.
        abandon(killed, &path);

        let (mut store, started) = Store::open(&path, RULE, false).unwrap();
        let died = started.died.expect("the dead run is reported");
        assert_eq!((died.run, died.running), (1, 1));
        assert_eq!(died.owner.pid, std::process::id());
        assert_eq!(claim_one(&mut store, "a", 1), Claim::Run { attempt: 2 });
        assert_eq!(claim_one(&mut store, "b", 2), Claim::Skip(Skip::Done));
    }

    #[test]
    fn other_key_rule_is_rejected() {
        let (_dir, path) = new_journal();
        create_closed(&path);
        let error = Store::open(&path, "other keys", false).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("identifies items by test keys, but this run would use other keys"),
            "{error}"
        );
    }

    #[test]
    fn fenced_success_is_recorded() {
        let (_dir, path) = new_journal();
        let (mut store, _) = Store::open(&path, RULE, false).unwrap();
        claim_one(&mut store, "a", 1);
        assert_eq!(stored_fence(&path, "a"), None);
        let op = Op::SetFence("a".to_owned(), 7);
        assert_eq!(store.apply(&[op]).unwrap(), [Reply::Fenced]);
        assert_eq!(stored_fence(&path, "a"), Some(7));
        assert_eq!(finish_fenced(&mut store, "a", 7), Commit::Recorded);
        assert_eq!(row(&path, "a").0, "done");
    }

    #[test]
    fn stale_fenced_commit_is_rejected() {
        let (_dir, path) = new_journal();
        let (mut store, _) = Store::open(&path, RULE, false).unwrap();
        claim_one(&mut store, "a", 1);
        store.apply(&[Op::SetFence("a".to_owned(), 7)]).unwrap();
        // The lease of fence 7 was lost and a later attempt took fence 9.
        let given_back = AttemptEnd::GivenBack("lease lost".to_owned());
        finish(&mut store, "a", given_back);
        let error = Some("given back: lease lost".to_owned());
        assert_eq!(row(&path, "a"), ("pending".to_owned(), 1, error));
        let op = Op::StartAttempt("a".to_owned(), Some(9));
        assert_eq!(store.apply(&[op]).unwrap(), [Reply::Attempt(2)]);

        let rejected = Commit::Rejected {
            fence: 7,
            stored: Some(9),
        };
        assert_eq!(finish_fenced(&mut store, "a", 7), rejected);
        assert_eq!(row(&path, "a").0, "running");
        assert_eq!(finish_fenced(&mut store, "a", 9), Commit::Recorded);
        assert_eq!(row(&path, "a").0, "done");
    }

    #[test]
    fn fenced_commit_after_other_claim_is_rejected() {
        let (_dir, path) = new_journal();
        let (mut killed, _) = Store::open(&path, RULE, false).unwrap();
        claim_one(&mut killed, "a", 1);
        killed.apply(&[Op::SetFence("a".to_owned(), 3)]).unwrap();
        abandon(killed, &path);

        // A later run claims the item again, which clears its fence.
        let (mut store, _) = Store::open(&path, RULE, false).unwrap();
        assert_eq!(claim_one(&mut store, "a", 1), Claim::Run { attempt: 2 });
        assert_eq!(stored_fence(&path, "a"), None);
        let rejected = Commit::Rejected {
            fence: 3,
            stored: None,
        };
        assert_eq!(finish_fenced(&mut store, "a", 3), rejected);
        assert_eq!(row(&path, "a").0, "running");
    }

    #[test]
    fn version_1_journal_is_migrated() {
        let (_dir, path) = new_journal();
        let (mut store, _) = Store::open(&path, RULE, false).unwrap();
        claim_one(&mut store, "a", 1);
        succeed(&mut store, "a");
        store.close("completed").unwrap();
        // Turn the journal back into what version 1 wrote.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("ALTER TABLE items DROP COLUMN fence; PRAGMA user_version = 1")
            .unwrap();
        drop(conn);

        let conn = open_read_only(&path).unwrap();
        assert_eq!(item_columns(&conn).unwrap(), ITEM_COLUMNS_V1);
        drop(conn);

        let (mut store, _) = Store::open(&path, RULE, false).unwrap();
        assert_eq!(claim_one(&mut store, "a", 1), Claim::Skip(Skip::Done));
        claim_one(&mut store, "b", 2);
        store.apply(&[Op::SetFence("b".to_owned(), 5)]).unwrap();
        store.close("completed").unwrap();
        let conn = Connection::open(&path).unwrap();
        let version: i32 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(item_columns(&conn).unwrap().last().unwrap(), FENCE_COLUMN);
        assert_eq!(stored_fence(&path, "a"), None);
        assert_eq!(stored_fence(&path, "b"), Some(5));
    }

    #[test]
    fn unknown_schema_version_is_rejected() {
        let (_dir, path) = new_journal();
        create_closed(&path);
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 3).unwrap();
        drop(conn);
        let error = Store::open(&path, RULE, false).unwrap_err().to_string();
        assert!(error.contains("has schema version 3"), "{error}");
    }

    #[test]
    fn utc_text_formats_known_dates() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_text(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_text(1_709_312_645_999), "2024-03-01 17:04:05 UTC");
        assert_eq!(utc_text(-1000), "1969-12-31 23:59:59 UTC");
    }

    #[test]
    fn shorten_keeps_characters_whole() {
        assert_eq!(shorten("abc", 5), "abc");
        assert_eq!(shorten("abc", 2), "ab");
        assert_eq!(shorten("aé", 2), "a");
    }
}
