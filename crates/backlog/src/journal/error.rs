//! Journal errors as the user reads them: what failed, on which file, and
//! what to do next.

use std::fmt;
use std::path::Path;

use rusqlite::ErrorCode;

/// A failure to open, read or write the journal, with its message ready to
/// print. It is cloned to every item whose request was in the failed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalError {
    message: String,
}

/// The kind of journal access that failed, for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Open,
    Read,
    Write,
}

impl JournalError {
    /// Creates an error with a message that already names the file.
    pub fn new(message: String) -> Self {
        JournalError { message }
    }

    /// Describes an SQLite error on the journal at `path`, with the fix.
    pub fn sqlite(path: &Path, access: Access, error: &rusqlite::Error) -> Self {
        let path = path.display();
        let verb = match access {
            Access::Open => "open",
            Access::Read => "read",
            Access::Write => "write to",
        };
        let rerun = "then run the same command again: items recorded as done are skipped";
        let replace = "Move the file away or pass another path to --journal \
            (a new journal starts empty, so every item runs again)";
        let message = match error.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) => {
                format!("'{path}' is not a backlog journal: the file is not an SQLite database. {replace}")
            }
            Some(ErrorCode::DatabaseCorrupt) => {
                format!("journal '{path}' is corrupt ({error}). {replace}")
            }
            // NOTE: tests reach the write-error branch below through a file
            // size limit (EFBIG), never this one, which needs a full disk.
            Some(ErrorCode::DiskFull) => format!(
                "cannot {verb} journal '{path}': the disk is full. Free space on its file system, {rerun}"
            ),
            Some(ErrorCode::SystemIoFailure) => format!(
                "cannot {verb} journal '{path}': {error}. The disk may be full or failing, or a file \
                 size limit was reached. Fix that, {rerun}"
            ),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => format!(
                "cannot {verb} journal '{path}': another process kept it locked ({error}). \
                 Stop the other process, {rerun}"
            ),
            Some(
                ErrorCode::CannotOpen | ErrorCode::ReadOnly | ErrorCode::PermissionDenied,
            ) => format!(
                "cannot {verb} journal '{path}': {error}. Check that its folder exists and that \
                 you may write to the file and its folder"
            ),
            _ => format!("cannot {verb} journal '{path}': {error}"),
        };
        JournalError { message }
    }
}

impl fmt::Display for JournalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JournalError {}
