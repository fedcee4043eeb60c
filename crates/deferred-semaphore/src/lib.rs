//! A fair, cancel-safe, resizable async semaphore.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod list;
pub use list::{
    gather_results, DeferredList, FireError, FireOnOneCallback, FireOnOneErrback, FirstError,
    FirstSuccess, Gather, Rest,
};
