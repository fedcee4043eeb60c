//! A fair, cancel-safe, resizable async semaphore.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
