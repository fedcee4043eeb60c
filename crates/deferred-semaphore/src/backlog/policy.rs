//! The outcomes, failure policy and final report of backlog processing.

use std::error::Error;
use std::fmt;
use std::num::NonZeroU64;

/// The outcome of one item's work, tagged with the item's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<T, E> {
    /// The item's 0-based position in the source.
    pub index: u64,
    /// The result the work returned.
    pub result: Result<T, E>,
}

/// When backlog processing stops early because items failed.
///
/// GNU parallel calls this `--halt`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum FailurePolicy {
    /// Runs every item whatever fails.
    #[default]
    KeepGoing,
    /// Once the threshold is reached, starts nothing new and lets running
    /// work finish.
    StopSoon(Threshold),
    /// Once the threshold is reached, cancels running work by dropping it.
    StopNow(Threshold),
}

/// How many failures trigger a [`FailurePolicy`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// After this many failed items.
    Failures(NonZeroU64),
    /// Once at least `min_finished` items have finished and this percentage
    /// of them failed.
    Percent {
        /// The share of finished items that failed, above 0 and at most 100.
        percent: f64,
        /// Finished items needed before the share counts, so that one early
        /// failure does not stop a large backlog.
        min_finished: u64,
    },
}

impl Threshold {
    /// Returns whether `failed` failures among `finished` finished items
    /// reach the threshold.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::Threshold;
    ///
    /// let half = Threshold::Percent { percent: 50.0, min_finished: 4 };
    /// assert!(!half.reached(2, 3));
    /// assert!(half.reached(2, 4));
    /// ```
    pub fn reached(&self, failed: u64, finished: u64) -> bool {
        match *self {
            Threshold::Failures(n) => failed >= n.get(),
            Threshold::Percent {
                percent,
                min_finished,
            } => {
                // At least one failure, so that a percent of 0 (which
                // `Backlog::on_failure` rejects) could never stop a clean run.
                failed > 0
                    && finished >= min_finished.max(1)
                    && failed as f64 * 100.0 >= percent * finished as f64
            }
        }
    }
}

/// The reason backlog processing stopped before the source ran out.
#[derive(Debug)]
pub enum StopReason {
    /// The failure policy's threshold was reached.
    Failures,
    /// The limiter failed to grant a permit, for example because it was
    /// closed.
    Limiter(Box<dyn Error + Send + Sync>),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Failures => f.write_str("too many items failed"),
            StopReason::Limiter(error) => write!(f, "the limiter failed: {error}"),
        }
    }
}

/// Counts of what happened to the items of a finished backlog.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Report {
    /// Items whose work started.
    pub started: u64,
    /// Items whose work returned `Ok`.
    pub succeeded: u64,
    /// Items whose work returned `Err`.
    pub failed: u64,
    /// Positions of items whose running work was cancelled by
    /// [`FailurePolicy::StopNow`], in input order.
    pub cancelled: Vec<u64>,
    /// Positions of items pulled into the look-ahead window of a
    /// [`KeyedBacklog`](crate::KeyedBacklog) that never started because
    /// processing stopped early, in input order. Always empty for a
    /// [`Backlog`](crate::Backlog), which pulls an item only to start it.
    pub not_started: Vec<u64>,
    /// The reason processing stopped early, if it did.
    pub stopped: Option<StopReason>,
    /// The maximum number of items whose work ran at the same moment.
    pub max_running: usize,
}
