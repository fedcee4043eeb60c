//! The final outcome of one item, after all its attempts.

use std::time::Duration;

use crate::duration::format_duration;
use crate::exec::ItemResult;
use crate::group::Termination;
use crate::stop::StopCause;

/// The final outcome of one item, as a journal or the results file records
/// it and the summary counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    /// The command exited with status 0.
    Done {
        /// Attempts made, the successful one included.
        attempts: u32,
    },
    /// The item failed for good: a non-zero exit status, a signal, a command
    /// that could not start, or a malformed item (with 0 attempts).
    Failed {
        /// Attempts made.
        attempts: u32,
        /// The reason the last attempt failed.
        last_error: String,
    },
    /// The last attempt ran longer than `--timeout` and was terminated.
    TimedOut {
        /// Attempts made.
        attempts: u32,
        /// The timeout that the last attempt exceeded.
        after: Duration,
    },
    /// The command was terminated because the run stopped now: Ctrl-C
    /// twice, `--deadline` or `--halt now`.
    Interrupted {
        /// Attempts made, the terminated one included.
        attempts: u32,
        /// The cause that stopped the run.
        cause: Option<StopCause>,
    },
    /// The last attempt lost its shared lease (`--limiter`), or its success
    /// could not be recorded under the lease's fence: the item is neither
    /// done nor failed, and a later run takes it again.
    GivenBack {
        /// Attempts made.
        attempts: u32,
        /// The reason the item was given back.
        reason: String,
    },
    /// The item was read but never ran, or its next attempt never started,
    /// because the run was stopping.
    NotStarted {
        /// Attempts made: 0, or the failed attempts of an item whose retry
        /// was still waiting for its backoff.
        attempts: u32,
        /// The cause that stopped the run.
        cause: Option<StopCause>,
    },
}

impl ItemOutcome {
    /// Classifies the last attempt's result after `attempts` attempts.
    pub fn from_last_attempt(result: &ItemResult, attempts: u32, cause: Option<StopCause>) -> Self {
        match result.terminated {
            Some(Termination::TimedOut(after)) => ItemOutcome::TimedOut { attempts, after },
            Some(Termination::Stopped) => ItemOutcome::Interrupted { attempts, cause },
            Some(Termination::LeaseLost) => ItemOutcome::GivenBack {
                attempts,
                reason: "its shared lease was lost".to_owned(),
            },
            None => match result.failure_reason() {
                None => ItemOutcome::Done { attempts },
                Some(last_error) => ItemOutcome::Failed {
                    attempts,
                    last_error,
                },
            },
        }
    }

    /// Returns the name used in the results file.
    pub fn name(&self) -> &'static str {
        match self {
            ItemOutcome::Done { .. } => "done",
            ItemOutcome::Failed { .. } => "failed",
            ItemOutcome::TimedOut { .. } => "timed_out",
            ItemOutcome::Interrupted { .. } => "interrupted",
            ItemOutcome::GivenBack { .. } => "given_back",
            ItemOutcome::NotStarted { .. } => "not_started",
        }
    }

    /// Returns how many times the item's command was started.
    pub fn attempts(&self) -> u32 {
        match self {
            ItemOutcome::Done { attempts }
            | ItemOutcome::Failed { attempts, .. }
            | ItemOutcome::TimedOut { attempts, .. }
            | ItemOutcome::Interrupted { attempts, .. }
            | ItemOutcome::GivenBack { attempts, .. } => *attempts,
            ItemOutcome::NotStarted { attempts, .. } => *attempts,
        }
    }

    /// Returns whether the item succeeded.
    pub fn is_done(&self) -> bool {
        matches!(self, ItemOutcome::Done { .. })
    }

    /// Returns why the item did not succeed, or `None` when it did.
    pub fn reason(&self) -> Option<String> {
        let with_cause = |what: &str, cause: &Option<StopCause>| match cause {
            Some(cause) => format!("{what}: {cause}"),
            None => what.to_owned(),
        };
        match self {
            ItemOutcome::Done { .. } => None,
            ItemOutcome::Failed { last_error, .. } => Some(last_error.clone()),
            ItemOutcome::TimedOut { after, .. } => {
                Some(format!("timed out after {}", format_duration(*after)))
            }
            ItemOutcome::Interrupted { cause, .. } => Some(with_cause("killed", cause)),
            ItemOutcome::GivenBack { reason, .. } => Some(format!("given back: {reason}")),
            ItemOutcome::NotStarted { cause, .. } => Some(with_cause("not started", cause)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_last_attempt_classifies() {
        let ok = ItemResult {
            exit_code: Some(0),
            ..ItemResult::default()
        };
        assert_eq!(
            ItemOutcome::from_last_attempt(&ok, 2, None),
            ItemOutcome::Done { attempts: 2 }
        );
        let failed = ItemResult {
            exit_code: Some(75),
            ..ItemResult::default()
        };
        let outcome = ItemOutcome::from_last_attempt(&failed, 3, None);
        assert_eq!(outcome.reason().as_deref(), Some("exit status 75"));
        assert_eq!(outcome.attempts(), 3);
        let timed_out = ItemResult {
            terminated: Some(Termination::TimedOut(Duration::from_secs(2))),
            ..ItemResult::default()
        };
        let outcome = ItemOutcome::from_last_attempt(&timed_out, 1, None);
        assert_eq!(outcome.name(), "timed_out");
        assert_eq!(outcome.reason().as_deref(), Some("timed out after 2s"));
        let stopped = ItemResult {
            terminated: Some(Termination::Stopped),
            ..ItemResult::default()
        };
        let outcome = ItemOutcome::from_last_attempt(&stopped, 1, Some(StopCause::Interrupt));
        assert_eq!(outcome.name(), "interrupted");
        assert_eq!(outcome.reason().as_deref(), Some("killed: interrupted"));
    }

    #[test]
    fn not_started_names_cause() {
        let cause = Some(StopCause::Deadline(Duration::from_secs(1)));
        let outcome = ItemOutcome::NotStarted { attempts: 0, cause };
        assert_eq!(outcome.attempts(), 0);
        assert_eq!(
            outcome.reason().as_deref(),
            Some("not started: the deadline of 1s passed")
        );
    }
}
