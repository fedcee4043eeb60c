//! Run at most N units of async work at once, queue the rest fairly, and
//! collect every outcome.
//!
//! This crate rebuilds Twisted's `DeferredSemaphore`, `DeferredLock` and
//! `DeferredList` for async Rust, and adds what a long-running backlog needs:
//! a limit that can change at run time, cancellation that never lets the
//! limit be exceeded, and lazy processing of an endless backlog in memory
//! bounded by the limit.
//!
//! | need | use |
//! | --- | --- |
//! | at most N at once, first come, first served | [`DeferredSemaphore`] |
//! | one at a time | [`DeferredLock`] |
//! | a long or endless list of items under a limit | [`Backlog`] |
//! | at most N at once, and at most M per key (host, account) | [`KeyedSemaphore`] |
//! | a backlog whose items each have a key, without head-of-line blocking | [`KeyedBacklog`] |
//! | anything that hands out permits | the [`Limiter`] trait |
//!
//! # Features
//!
//! - `tokio`: adds [`DeferredSemaphore::spawn`][spawn], which starts work eagerly on
//!   the tokio runtime, as Twisted's `run` does.
//! - `rate`: adds `Rate`, `RateLimited` and `PerKeyRate`, rate limits (with
//!   the GCRA of the `governor` crate) on top of any limiter, global or per
//!   key. They sleep on tokio's timer, so they need a tokio runtime.
//!
//! Nothing else depends on a runtime: every future here works under any
//! executor.
//!
//! # Coming from Twisted
//!
//! The names below are those of Twisted 26.10. They map one to one, and the
//! order in which work is admitted is the same: tokens go to waiters strictly
//! first come, first served, and a new acquire never overtakes a queued one.
//!
//! | Twisted | here |
//! | --- | --- |
//! | `DeferredSemaphore(tokens)` | [`DeferredSemaphore::new`] (panics on 0), [`DeferredSemaphore::try_new`] (returns an error on 0) |
//! | `sem.limit`, `sem.tokens`, `len(sem.waiting)` | [`limit()`](DeferredSemaphore::limit), [`tokens()`](DeferredSemaphore::tokens), [`waiting()`](DeferredSemaphore::waiting) |
//! | `sem.acquire()` then `sem.release()` | `let permit = sem.acquire().await?;` and dropping `permit` |
//! | `async with sem:` | `let _permit = sem.acquire().await?;` for the rest of the scope |
//! | `sem.run(f, *args)` | [`sem.run(\|\| f(args))`](DeferredSemaphore::run) (lazy) or [`sem.spawn(...)`][spawn] (eager, `tokio` feature) |
//! | assigning `sem.limit` (wakes no waiter) | [`set_limit`](DeferredSemaphore::set_limit) |
//! | none | [`acquire_many`](DeferredSemaphore::acquire_many), [`try_acquire`](DeferredSemaphore::try_acquire), [`close`](DeferredSemaphore::close) |
//! | `DeferredLock()`, `lock.locked` | [`DeferredLock::new`], [`DeferredLock::locked`] |
//! | `DeferredList(ds)` | [`DeferredList::new(futures).await`](DeferredList) |
//! | `(True, value)`, `(False, failure)` | `Ok(value)`, `Err(error)` |
//! | `fireOnOneCallback=True`, result `(value, index)` | [`fire_on_one_callback`](DeferredList::fire_on_one_callback), result [`FirstSuccess`] `{ index, value, rest }` |
//! | `fireOnOneErrback=True`, `FirstError` | [`fire_on_one_errback`](DeferredList::fire_on_one_errback), [`FirstError`] |
//! | `gatherResults(ds)` | [`gather_results`] |
//! | `consumeErrors=True` | not needed: an error is a plain value that nobody reports as unhandled |
//! | `d.cancel()` | dropping the future |
//! | a loop of `sem.run` and a `DeferredList` over a whole backlog | [`Backlog`], which pulls items only as tokens free up |
//!
//! Behaviour differs from Twisted on purpose in these places:
//!
//! - **Cancelling running work returns the token only once the work has
//!   stopped.** Twisted's `run` frees the token as soon as a cancel reaches the
//!   work's Deferred, even if that work goes on running, so more than `limit`
//!   units can run at once. Dropping a [`Run`] drops the work's future first
//!   and gives the token back after it. Aborting a task from
//!   [`spawn`][spawn] frees its token only when the task is
//!   dropped, and a detached task keeps its token until it ends.
//! - **Over-release is impossible.** Twisted's `release()` is a public method
//!   that anyone may call: a second call raises `AssertionError`, and under
//!   `python -O` it raises `tokens` above `limit` for good. Here a token
//!   returns only when its [`Permit`] or [`OwnedPermit`] is dropped, and each
//!   permit is dropped once.
//! - **Acquiring is lazy.** Twisted's `acquire()` takes a free token before it
//!   returns. [`Acquire`] does nothing until it is polled, and dropping it,
//!   whether queued or already granted, gives up its place or its token.
//! - **An empty list cannot hang.** `DeferredList([], fireOnOneCallback=True)`
//!   never fires in Twisted. Here it resolves at once with
//!   [`FireError::Empty`], and a list whose futures all failed resolves with
//!   [`FireError::AllFailed`] instead of a list that looks like a success.
//! - **Work still running after an early fire is the caller's choice.**
//!   Twisted leaves those Deferreds running unobserved. Here [`FirstSuccess`]
//!   and [`FirstError`] carry the [`Rest`] of the list: await it to collect
//!   the other outcomes, drop it to cancel them, or (with the `tokio` feature)
//!   spawn it so they finish in the background.
//! - **Long hand-off chains run in constant stack.** Twisted's `release()`
//!   fires the next waiter inside the call, so waiters whose work finishes at
//!   once recurse through each other and hit Python's recursion limit after
//!   about 124 of them. Here a release marks the next waiter as granted and
//!   wakes its task, which runs on its own poll: a chain of a million queued
//!   units finishes on a 256 KiB thread stack.
//! - **The limit can change at run time.** Assigning to Twisted's `limit`
//!   wakes no waiter. [`set_limit`](DeferredSemaphore::set_limit) wakes
//!   waiters at once when the limit grows and, when it shrinks, retires tokens
//!   as running work returns them, never interrupting that work.
//!
//! # Examples
//!
//! ```
//! use deferred_semaphore::{Backlog, DeferredSemaphore};
//!
//! # futures::executor::block_on(async {
//! let sem = DeferredSemaphore::new(2);
//! let (outcomes, report) = Backlog::new(&sem, 1..=6u64, |n| async move { Ok::<_, ()>(n * n) })
//!     .in_input_order()
//!     .collect()
//!     .await;
//! assert_eq!(outcomes[5].result, Ok(36));
//! assert_eq!(report.succeeded, 6);
//! # });
//! ```
//!
// Without the `tokio` feature, `spawn` does not exist, so its links lead to
// the features list instead.
#![cfg_attr(feature = "tokio", doc = "[spawn]: DeferredSemaphore::spawn")]
#![cfg_attr(not(feature = "tokio"), doc = "[spawn]: #features")]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]
#![deny(unused_must_use)]

mod acquire;
mod backlog;
mod core;
mod error;
mod keyed;
mod limiter;
mod list;
mod lock;
mod permit;
#[cfg(feature = "rate")]
mod rate;
mod run;
mod semaphore;
#[cfg(feature = "tokio")]
mod spawn;
mod sync;

pub use acquire::{Acquire, AcquireOwned};
pub use backlog::{
    Backlog, FailurePolicy, ForEach, KeyOf, KeyedBacklog, KeyedForEach, Outcome, Report, StartWork,
    StopReason, Threshold, WithPermit,
};
pub use error::{AcquireError, LimitError, TryAcquireError};
pub use keyed::{KeyedAcquire, KeyedPermit, KeyedSemaphore};
pub use limiter::{KeyedLimiter, Limiter};
pub use list::{
    gather_results, DeferredList, FireError, FireOnOneCallback, FireOnOneErrback, FirstError,
    FirstSuccess, Gather, Rest,
};
pub use lock::DeferredLock;
pub use permit::{OwnedPermit, Permit};
#[cfg(feature = "rate")]
pub use rate::{KeyedRateAcquire, PerKeyRate, Rate, RateAcquire, RateLimited};
pub use run::Run;
pub use semaphore::DeferredSemaphore;
