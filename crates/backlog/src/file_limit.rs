//! The limit on open file descriptors (`RLIMIT_NOFILE`), checked against
//! `--max-run` before the run starts, so that commands do not fail to
//! start with "Too many open files" when the limit is too low for the run.
//!
//! NOTE: the counts below are estimates for Linux. Descriptors that the
//! process inherited beyond stdin, stdout and stderr are not counted.

use std::num::NonZeroUsize;

use anyhow::{bail, Context};
use rlimit::Resource;

/// File descriptors that one unit of `--max-run` can keep open at once on
/// Linux with tokio 1.x. A running command has its stdin, stdout and stderr
/// pipes and the pidfd that tokio waits on. Each outcome, running or
/// waiting to be written, may also have the temporary file of an output
/// over [`crate::capture::MEMORY_BYTES`], and there are at most twice
/// `--max-run` of them: 4 + 2.
const FILES_PER_COMMAND: u64 = 6;

/// File descriptors the run keeps open besides its commands: standard
/// streams, the async runtime, the input, the results file, the journal's
/// SQLite files, the pipes of the command being spawned and a second handle
/// on the temporary file of the output being written. A run with one
/// command and no journal had 15 open (`ls /proc/PID/fd`, Linux 6.x); the
/// rest is a margin.
const FILES_BASE: u64 = 32;

/// Returns the number of file descriptors a run with `max_run` commands at
/// once can hold at the peak.
pub fn files_needed(max_run: NonZeroUsize) -> u64 {
    let max_run = u64::try_from(max_run.get()).unwrap_or(u64::MAX);
    max_run
        .saturating_mul(FILES_PER_COMMAND)
        .saturating_add(FILES_BASE)
}

/// Raises the soft limit on open files to the hard limit when the soft
/// limit is too low for `max_run` commands at once. The commands inherit
/// the raised limit.
///
/// # Errors
///
/// Fails, naming `--max-run`, the limit and the fix, when even the hard
/// limit is too low, and when the limit cannot be read or set.
pub fn ensure_room_for(max_run: NonZeroUsize) -> anyhow::Result<()> {
    let needed = files_needed(max_run);
    let (soft, hard) = Resource::NOFILE
        .get()
        .context("cannot read the limit on open files (RLIMIT_NOFILE)")?;
    if soft >= needed {
        return Ok(());
    }
    if hard < needed {
        bail!(too_low_message(max_run, needed, hard));
    }
    Resource::NOFILE
        .set(hard, hard)
        .with_context(|| format!("cannot raise the limit on open files from {soft} to {hard}"))
}

fn too_low_message(max_run: NonZeroUsize, needed: u64, hard: u64) -> String {
    let fits = hard.saturating_sub(FILES_BASE) / FILES_PER_COMMAND;
    let lower = if fits > 0 {
        format!("use --max-run {fits} or less, or ")
    } else {
        String::new()
    };
    format!(
        "--max-run {max_run} needs up to {needed} file descriptors, but the limit on open \
         files is {hard}. To fix it, {lower}raise the limit with `ulimit -n {needed}` in the \
         shell that starts backlog (raising the hard limit needs root or an entry in \
         /etc/security/limits.conf)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_needed_grows_with_max_run() {
        let one = files_needed(NonZeroUsize::MIN);
        let hundred = files_needed(NonZeroUsize::new(100).unwrap());
        assert_eq!(one, FILES_BASE + FILES_PER_COMMAND);
        assert_eq!(hundred, FILES_BASE + 100 * FILES_PER_COMMAND);
        assert_eq!(files_needed(NonZeroUsize::MAX), u64::MAX);
    }

    #[test]
    fn too_low_message_names_fix() {
        let max_run = NonZeroUsize::new(100).unwrap();
        let message = too_low_message(max_run, 432, 64);
        assert!(message.starts_with("--max-run 100 needs up to 432 file descriptors"));
        assert!(message.contains("the limit on open files is 64"));
        let fits = (64 - FILES_BASE) / FILES_PER_COMMAND;
        assert!(message.contains(&format!("use --max-run {fits} or less")));
        assert!(message.contains("`ulimit -n 432`"));
        let none_fit = too_low_message(max_run, 432, 20);
        assert!(!none_fit.contains("use --max-run"), "{none_fit}");
    }
}
