//! Errors returned by the semaphore and its permits.

use std::fmt;

/// The reason an [`acquire`](crate::DeferredSemaphore::acquire) failed.
///
/// Matches tokio's `AcquireError` for a closed semaphore, and adds the case of
/// a request for more tokens than the limit, which could never be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireError {
    /// The semaphore was closed before the tokens were granted.
    Closed,
    /// More tokens were requested than the limit allows.
    ExceedsLimit {
        /// The number of tokens requested.
        requested: usize,
        /// The limit when the request was rejected.
        limit: usize,
    },
}

impl fmt::Display for AcquireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcquireError::Closed => f.write_str("semaphore closed"),
            AcquireError::ExceedsLimit { requested, limit } => {
                write!(f, "requested {requested} tokens but the limit is {limit}")
            }
        }
    }
}

impl std::error::Error for AcquireError {}

/// The reason a [`try_acquire`](crate::DeferredSemaphore::try_acquire) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryAcquireError {
    /// The semaphore was closed.
    Closed,
    /// Too few tokens are free now, or other acquirers are queued first.
    NoTokens,
    /// More tokens were requested than the limit allows.
    ExceedsLimit {
        /// The number of tokens requested.
        requested: usize,
        /// The limit when the request was rejected.
        limit: usize,
    },
}

impl fmt::Display for TryAcquireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryAcquireError::Closed => f.write_str("semaphore closed"),
            TryAcquireError::NoTokens => f.write_str("no tokens available"),
            TryAcquireError::ExceedsLimit { requested, limit } => {
                write!(f, "requested {requested} tokens but the limit is {limit}")
            }
        }
    }
}

impl std::error::Error for TryAcquireError {}

/// An invalid limit passed to [`try_new`] or [`set_limit`].
///
/// A limit must be at least 1, because a semaphore with no tokens could never
/// grant anything and every waiter would hang.
///
/// [`try_new`]: crate::DeferredSemaphore::try_new
/// [`set_limit`]: crate::DeferredSemaphore::set_limit
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError {
    limit: usize,
}

impl LimitError {
    pub(crate) fn new(limit: usize) -> Self {
        LimitError { limit }
    }

    /// Returns the rejected limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid limit {}: a limit must be between 1 and {}",
            self.limit,
            crate::core::MAX_TOKENS
        )
    }
}

impl std::error::Error for LimitError {}
