//! Counters of script calls, for round trips per unit of work.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts of one limiter's script calls and outcomes since it connected,
/// from [`RedisLimiter::stats`](crate::RedisLimiter::stats).
///
/// Each `*_calls` count is one round trip to Redis. A benchmark divides
/// their sum by the units of work done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Acquire script calls: grants, busy, grace and no-limit replies alike.
    pub acquire_calls: u64,
    /// Renew script calls. Each renews every lease of the limiter.
    pub renew_calls: u64,
    /// Release script calls.
    pub release_calls: u64,
    /// Leases granted.
    pub grants: u64,
    /// Leases found lost: by a renewal, a namespace reset or the deadline.
    pub lost: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) acquire_calls: AtomicU64,
    pub(crate) renew_calls: AtomicU64,
    pub(crate) release_calls: AtomicU64,
    pub(crate) grants: AtomicU64,
    pub(crate) lost: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            acquire_calls: self.acquire_calls.load(Ordering::Relaxed),
            renew_calls: self.renew_calls.load(Ordering::Relaxed),
            release_calls: self.release_calls.load(Ordering::Relaxed),
            grants: self.grants.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }
}
