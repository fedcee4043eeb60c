//! Switches the synchronization types between `std` and `loom`.
//!
//! Code that the loom models check imports its atomics, mutex and `Arc` from
//! here, so one code path runs both in production and under the model checker.

#[cfg(loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex, MutexGuard,
};

#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex, MutexGuard,
};
