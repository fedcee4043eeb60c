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
//! | anything that hands out permits | the [`Limiter`] trait |
//!
//! # Features
//!
//! - `tokio`: adds [`DeferredSemaphore::spawn`], which starts work eagerly on
//!   the tokio runtime, as Twisted's `run` does.
//!
//! Nothing else depends on a runtime: every future here works under any
//! executor.
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
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]
#![deny(unused_must_use)]

mod acquire;
mod backlog;
mod core;
mod error;
mod limiter;
mod list;
mod lock;
mod permit;
mod run;
mod semaphore;
#[cfg(feature = "tokio")]
mod spawn;
mod sync;

pub use acquire::{Acquire, AcquireOwned};
pub use backlog::{
    Backlog, FailurePolicy, ForEach, Outcome, Report, StartWork, StopReason, Threshold, WithPermit,
};
pub use error::{AcquireError, LimitError, TryAcquireError};
pub use limiter::Limiter;
pub use list::{
    gather_results, DeferredList, FireError, FireOnOneCallback, FireOnOneErrback, FirstError,
    FirstSuccess, Gather, Rest,
};
pub use lock::DeferredLock;
pub use permit::{OwnedPermit, Permit};
pub use run::Run;
pub use semaphore::DeferredSemaphore;
