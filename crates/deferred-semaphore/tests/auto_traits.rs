//! Compile-time checks of the auto traits of every public type.
//!
//! Each check is a call to a generic function bounded by the trait, so a type
//! that loses `Send`, `Sync` or `Unpin` stops this file from compiling. The
//! tests only run the already-checked calls.
#![cfg(not(loom))]

use std::future::Future;

use deferred_semaphore::{
    Acquire, AcquireError, AcquireOwned, DeferredLock, DeferredSemaphore, LimitError, OwnedPermit,
    Permit, Run, TryAcquireError,
};

fn assert_send<T: Send>() {}
fn assert_sync<T: Sync>() {}
fn assert_unpin<T: Unpin>() {}
fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}

/// Checks the type of a value that cannot be named, such as a `run` future
/// over an async block.
fn assert_send_value<T: Send>(_: &T) {}

#[test]
fn handles_are_send_sync_unpin() {
    assert_send::<DeferredSemaphore>();
    assert_sync::<DeferredSemaphore>();
    assert_unpin::<DeferredSemaphore>();

    assert_send::<DeferredLock>();
    assert_sync::<DeferredLock>();
    assert_unpin::<DeferredLock>();
}

#[test]
fn permits_are_send_sync_unpin() {
    assert_send::<Permit<'static>>();
    assert_sync::<Permit<'static>>();
    assert_unpin::<Permit<'static>>();

    assert_send::<OwnedPermit>();
    assert_sync::<OwnedPermit>();
    assert_unpin::<OwnedPermit>();
}

#[test]
fn acquire_futures_are_send_sync_unpin() {
    assert_send::<Acquire<'static>>();
    assert_sync::<Acquire<'static>>();
    assert_unpin::<Acquire<'static>>();

    assert_send::<AcquireOwned>();
    assert_sync::<AcquireOwned>();
    assert_unpin::<AcquireOwned>();
}

/// `Run` is `Send` whenever its closure and the closure's future are.
fn run_is_send<F: Send, Fut: Send>() {
    assert_send::<Run<'static, F, Fut>>();
}

/// `Run` is `Unpin` whenever the work's future is.
fn run_is_unpin<F, Fut: Unpin>() {
    assert_unpin::<Run<'static, F, Fut>>();
}

#[test]
fn run_is_send_when_work_is() {
    run_is_send::<fn() -> std::future::Ready<u8>, std::future::Ready<u8>>();
    run_is_unpin::<fn() -> std::future::Ready<u8>, std::future::Ready<u8>>();

    let sem = DeferredSemaphore::new(1);
    let run = sem.run(|| async { tokio::task::yield_now().await });
    assert_send_value(&run);
    drop(run);
}

#[test]
fn run_future_output_matches_work() {
    fn output_of<F: Future<Output = Result<u8, AcquireError>>>(_: &F) {}
    let sem = DeferredSemaphore::new(1);
    let run = sem.run(|| std::future::ready(3u8));
    output_of(&run);
    drop(run);
}

#[test]
fn errors_are_send_sync_static() {
    assert_error::<AcquireError>();
    assert_error::<TryAcquireError>();
    assert_error::<LimitError>();
}
