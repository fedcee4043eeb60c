//! Compile-time checks of the auto traits of every public type.
//!
//! Each positive check is a call to a generic function bounded by the trait,
//! so a type that loses `Send`, `Sync` or `Unpin` stops this file from
//! compiling. The tests only run the already-checked calls. Generic types are
//! instantiated with parameters that are `Send`, `Sync` and `Unpin`, and the
//! futures that must stay `Unpin` whatever they hold are also checked with a
//! work future that is not `Unpin`.
//!
//! A type that is not `Unpin` on purpose, because it pins a caller's future
//! in place, is checked with `assert_not_impl_any!`, which fails to compile
//! if the type implements the trait. No public type is `!Send` or `!Sync` on
//! purpose.
#![cfg(not(loom))]

use std::future::{Future, Ready};
use std::io;
use std::marker::{PhantomData, PhantomPinned};
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use deferred_semaphore::{
    gather_results, Acquire, AcquireError, AcquireOwned, Backlog, DeferredList, DeferredLock,
    DeferredSemaphore, FailurePolicy, FireError, FireOnOneCallback, FireOnOneErrback, FirstError,
    FirstSuccess, ForEach, Gather, KeyedAcquire, KeyedBacklog, KeyedForEach, KeyedPermit,
    KeyedSemaphore, LimitError, Outcome, OwnedPermit, Permit, Report, Rest, Run, StopReason,
    Threshold, TryAcquireError, WithPermit,
};
use futures::stream::Iter;
use static_assertions::assert_not_impl_any;

fn assert_send<T: Send>() {}
fn assert_sync<T: Sync>() {}
fn assert_unpin<T: Unpin>() {}
fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}

/// Checks `Send`, `Sync` and `Unpin` together.
fn assert_all<T: Send + Sync + Unpin>() {}

/// Checks the type of a value that cannot be named, such as a `run` future
/// over an async block.
fn assert_send_value<T: Send>(_: &T) {}

/// Work that is `Send`, `Sync` and `Unpin`.
type Work = Ready<Result<u8, String>>;

/// Work whose error is a standard error, for the error types.
type IoWork = Ready<Result<u8, io::Error>>;

/// A `Send` and `Sync` future that is not `Unpin`, standing in for an
/// `async` block. It never completes and is only named in type checks.
struct PinnedWork<T>(PhantomData<T>, PhantomPinned);

impl<T> Future for PinnedWork<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<T> {
        Poll::Pending
    }
}

type Items = Iter<Range<u8>>;
type WorkFn = fn(u8) -> Work;
type Consumer = fn(Outcome<u8, String>) -> Ready<()>;
type PinnedWorkFn = fn(u8) -> PinnedWork<Result<u8, String>>;

/// `ForEach` over a borrowed semaphore with work and consumer of the given
/// future types.
type ForEachOf<F, Fut, CFut> =
    ForEach<&'static DeferredSemaphore, Items, F, fn(Outcome<u8, String>) -> CFut, Fut, CFut>;

// `Run` pins the work's future in place, so it is `Unpin` only when that
// future is.
assert_not_impl_any!(
    Run<'static, fn() -> PinnedWork<u8>, PinnedWork<u8>>: Unpin
);

// `ForEach` pins the consumer's future in place, so it is `Unpin` only when
// that future is.
assert_not_impl_any!(ForEachOf<WorkFn, Work, PinnedWork<()>>: Unpin);

// `ForEach` pins its source stream, so it is `Unpin` only when the stream is.
assert_not_impl_any!(
    ForEach<
        &'static DeferredSemaphore,
        futures::stream::Then<Items, PinnedWork<u8>, fn(u8) -> PinnedWork<u8>>,
        fn(u8) -> Work,
        Consumer,
        Work,
        Ready<()>,
    >: Unpin
);

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
fn keyed_types_are_send_sync_unpin() {
    assert_all::<KeyedSemaphore<String>>();
    assert_all::<KeyedPermit<String>>();
    assert_all::<KeyedAcquire<String>>();
    type KeyFn = fn(&u8) -> u8;
    type Sem = &'static KeyedSemaphore<u8>;
    assert_all::<KeyedBacklog<Sem, Items, KeyFn, WorkFn>>();
    assert_all::<KeyedForEach<Sem, Items, KeyFn, WorkFn, Consumer, Work, Ready<()>>>();
    // Running work sits in its own allocation, as in `ForEach`.
    assert_all::<
        KeyedForEach<
            Sem,
            Items,
            KeyFn,
            PinnedWorkFn,
            Consumer,
            PinnedWork<Result<u8, String>>,
            Ready<()>,
        >,
    >();
    // The key moves into the permit and is never pinned.
    assert_unpin::<KeyedAcquire<PhantomPinned>>();
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

/// `Run` is `Sync` whenever its closure and the closure's future are.
fn run_is_sync<F: Sync, Fut: Sync>() {
    assert_sync::<Run<'static, F, Fut>>();
}

/// `Run` is `Unpin` whenever the work's future is.
fn run_is_unpin<F, Fut: Unpin>() {
    assert_unpin::<Run<'static, F, Fut>>();
}

#[test]
fn run_is_send_when_work_is() {
    run_is_send::<fn() -> Ready<u8>, Ready<u8>>();
    run_is_sync::<fn() -> Ready<u8>, Ready<u8>>();
    run_is_unpin::<fn() -> Ready<u8>, Ready<u8>>();

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
fn list_futures_are_send_sync_unpin() {
    assert_all::<DeferredList<Work>>();
    assert_all::<FireOnOneCallback<Work>>();
    assert_all::<FireOnOneErrback<Work>>();
    assert_all::<Gather<Work>>();
    assert_all::<Rest<Work>>();
}

#[test]
fn list_futures_unpin_over_pinned_work() {
    // The list keeps each future in its own allocation, so the list itself
    // can move even when the futures in it cannot.
    type Pinned = PinnedWork<Result<u8, String>>;
    assert_all::<DeferredList<Pinned>>();
    assert_all::<FireOnOneCallback<Pinned>>();
    assert_all::<FireOnOneErrback<Pinned>>();
    assert_all::<Gather<Pinned>>();
    assert_all::<Rest<Pinned>>();
    assert_all::<FirstSuccess<Pinned>>();
    assert_all::<FirstError<Pinned>>();
}

#[test]
fn list_outputs_are_send_sync_unpin() {
    assert_all::<FirstSuccess<Work>>();
    assert_all::<FirstError<Work>>();
    assert_all::<FireError<String>>();
}

#[test]
fn gather_results_future_is_send() {
    let gather = gather_results([std::future::ready(Ok::<u8, String>(1))]);
    assert_send_value(&gather);
    drop(gather);
}

#[test]
fn backlog_types_are_send_sync_unpin() {
    assert_all::<Backlog<&'static DeferredSemaphore, Items, WorkFn>>();
    assert_all::<Backlog<DeferredSemaphore, Items, WorkFn>>();
    assert_all::<ForEachOf<WorkFn, Work, Ready<()>>>();
    assert_all::<ForEach<DeferredSemaphore, Items, WorkFn, Consumer, Work, Ready<()>>>();
    assert_all::<WithPermit<fn(u8, OwnedPermit) -> Work>>();

    assert_all::<Outcome<u8, String>>();
    assert_all::<Report>();
    assert_all::<StopReason>();
    assert_all::<FailurePolicy>();
    assert_all::<Threshold>();
}

#[test]
fn for_each_unpin_over_pinned_work() {
    // Running work sits in its own allocation, so only the source, the
    // acquire and the consumer's future decide whether `ForEach` can move.
    assert_all::<ForEachOf<PinnedWorkFn, PinnedWork<Result<u8, String>>, Ready<()>>>();
}

#[test]
fn backlog_collect_future_is_send() {
    let sem = DeferredSemaphore::new(2);
    let backlog = Backlog::new(&sem, 0..4u8, |n| async move { Ok::<_, String>(n) });
    let collect = backlog.collect();
    assert_send_value(&collect);
    drop(collect);
}

#[test]
fn errors_are_send_sync_static() {
    assert_error::<AcquireError>();
    assert_error::<TryAcquireError>();
    assert_error::<LimitError>();
    assert_error::<FireError<io::Error>>();
    assert_error::<FirstError<IoWork>>();

    assert_unpin::<AcquireError>();
    assert_unpin::<TryAcquireError>();
    assert_unpin::<LimitError>();
    assert_unpin::<FireError<io::Error>>();
    assert_unpin::<FirstError<IoWork>>();
}

#[cfg(feature = "rate")]
#[test]
fn rate_types_are_send_sync_unpin() {
    use deferred_semaphore::{KeyedRateAcquire, PerKeyRate, Rate, RateAcquire, RateLimited};

    assert_all::<Rate>();
    assert_all::<RateLimited<DeferredSemaphore>>();
    assert_all::<RateAcquire<DeferredSemaphore>>();
    assert_all::<PerKeyRate<KeyedSemaphore<String>, String>>();
    assert_all::<KeyedRateAcquire<KeyedSemaphore<String>, String>>();
    assert_all::<KeyedRateAcquire<RateLimited<KeyedSemaphore<String>>, String>>();
}
