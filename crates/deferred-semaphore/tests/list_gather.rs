#![cfg(not(loom))]
use std::error::Error;
use std::future::{ready, Future, Ready};
use std::io;
use std::marker::PhantomPinned;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use deferred_semaphore::{gather_results, DeferredList, FireError, FirstSuccess};
use futures::channel::oneshot;
use futures::FutureExt;
use tokio::time::{sleep, Instant};
use tokio_test::task;
use tokio_test::{assert_pending, assert_ready, assert_ready_eq};

type Outcome = Result<u32, &'static str>;

/// Resolves with `outcome` after `ms` milliseconds of tokio time.
async fn after(ms: u64, outcome: Outcome) -> Outcome {
    sleep(Duration::from_millis(ms)).await;
    outcome
}

/// Sets its flag when dropped, to show that a future holding it was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Returns a flag and a guard that sets it when dropped.
fn drop_flag() -> (Arc<AtomicBool>, DropFlag) {
    let flag = Arc::new(AtomicBool::new(false));
    (flag.clone(), DropFlag(flag))
}

/// Like `after`, but keeps `guard` until it resolves or is dropped.
async fn guarded(ms: u64, outcome: Outcome, guard: DropFlag) -> Outcome {
    let _guard = guard;
    after(ms, outcome).await
}

/// A oneshot receiver that counts how often it is polled.
struct Counted {
    receiver: oneshot::Receiver<u32>,
    polls: Arc<AtomicUsize>,
}

impl Future for Counted {
    type Output = Result<u32, oneshot::Canceled>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.receiver.poll_unpin(cx)
    }
}

fn elapsed_ms(start: Instant) -> u128 {
    start.elapsed().as_millis()
}

#[tokio::test(start_paused = true)]
async fn list_preserves_input_order() {
    let delays = [30, 10, 20, 0];
    let futures = delays.iter().enumerate().map(|(index, &ms)| match index {
        2 => after(ms, Err("index 2 failed")),
        _ => after(ms, Ok(index as u32)),
    });

    let outcomes = DeferredList::new(futures).await;

    assert_eq!(outcomes, [Ok(0), Ok(1), Err("index 2 failed"), Ok(3)]);
}

#[tokio::test(start_paused = true)]
async fn list_waits_for_slowest_future() {
    let start = Instant::now();

    DeferredList::new([after(5, Ok(0)), after(40, Ok(1)), after(20, Ok(2))]).await;

    assert_eq!(elapsed_ms(start), 40);
}

#[test]
fn list_empty_resolves_at_once() {
    let mut list = task::spawn(DeferredList::<Ready<Outcome>>::new([]));

    assert_ready_eq!(list.poll(), Vec::new());
}

#[test]
fn list_pending_until_last_future_completes() {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..3).map(|_| oneshot::channel()).unzip();
    let mut senders = senders.into_iter().map(Some).collect::<Vec<_>>();
    let mut list = task::spawn(DeferredList::new(receivers));
    assert_pending!(list.poll());

    for index in [2, 0] {
        senders[index].take().unwrap().send(index as u32).unwrap();
        assert!(list.is_woken());
        assert_pending!(list.poll());
    }
    senders[1].take().unwrap().send(1).unwrap();

    assert!(list.is_woken());
    assert_ready_eq!(list.poll(), vec![Ok(0), Ok(1), Ok(2)]);
}

#[test]
fn list_repolls_only_woken_futures() {
    let polls = Arc::new(AtomicUsize::new(0));
    let (senders, futures): (Vec<_>, Vec<_>) = (0..10_000)
        .map(|_| {
            let (sender, receiver) = oneshot::channel();
            (
                sender,
                Counted {
                    receiver,
                    polls: polls.clone(),
                },
            )
        })
        .unzip();
    let mut list = task::spawn(DeferredList::new(futures));
    assert_pending!(list.poll());
    assert_eq!(polls.load(Ordering::SeqCst), 10_000);

    let mut senders = senders.into_iter();
    senders.next().unwrap().send(7).unwrap();
    assert_pending!(list.poll());

    assert_eq!(polls.load(Ordering::SeqCst), 10_001);
}

#[test]
fn list_large_resolves_on_small_stack() {
    const LEN: u32 = 100_000;

    // A small stack shows that ready futures are not handled by recursion.
    let worker = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let list = DeferredList::new((0..LEN).map(|value| ready(Ok::<_, ()>(value))));
            futures::executor::block_on(list)
        });
    let outcomes = worker.unwrap().join().unwrap();

    assert_eq!(outcomes.len(), LEN as usize);
    assert!(outcomes
        .iter()
        .zip(0..)
        .all(|(outcome, value)| *outcome == Ok(value)));
}

#[tokio::test(start_paused = true)]
async fn list_dropped_drops_every_future() {
    let (flags, guards): (Vec<_>, Vec<_>) = (0..3).map(|_| drop_flag()).unzip();
    let futures = guards.into_iter().map(|guard| guarded(10, Ok(0), guard));
    let mut list = task::spawn(DeferredList::new(futures));
    assert_pending!(list.poll());

    drop(list);

    assert!(flags.iter().all(|flag| flag.load(Ordering::SeqCst)));
}

#[test]
#[should_panic(expected = "`DeferredList` polled after it resolved")]
fn list_polled_after_resolving_panics() {
    let mut list = task::spawn(DeferredList::new([ready(Ok::<u8, ()>(1))]));
    assert_ready!(list.poll());

    let _ = list.poll();
}

#[tokio::test(start_paused = true)]
async fn fire_on_one_callback_picks_earliest_success() {
    let start = Instant::now();
    let list = DeferredList::new([after(30, Ok(0)), after(5, Err("refused")), after(10, Ok(2))]);

    let first = list.fire_on_one_callback().await.unwrap();

    assert_eq!(first.index, 2);
    assert_eq!(first.value, 2);
    assert_eq!(elapsed_ms(start), 10);
}

#[tokio::test(start_paused = true)]
async fn fire_on_one_callback_all_failed_lists_errors() {
    let list = DeferredList::new([after(30, Err("a")), after(5, Err("b")), after(10, Err("c"))]);

    let error = list.fire_on_one_callback().await.unwrap_err();

    assert_eq!(
        error,
        FireError::AllFailed(vec![(0, "a"), (1, "b"), (2, "c")])
    );
}

#[test]
fn fire_on_one_callback_empty_fails() {
    let list = DeferredList::<Ready<Outcome>>::new([]);
    let mut first = task::spawn(list.fire_on_one_callback());

    let error = assert_ready!(first.poll()).unwrap_err();

    assert_eq!(error, FireError::Empty);
}

#[test]
fn fire_on_one_callback_uses_success_stored_before() {
    let (sender_0, receiver_0) = oneshot::channel::<u32>();
    let (sender_1, receiver_1) = oneshot::channel();
    let mut list = task::spawn(DeferredList::new([receiver_0, receiver_1]));
    sender_1.send(11).unwrap();
    assert_pending!(list.poll());

    let mut first = task::spawn(list.into_inner().fire_on_one_callback());
    let FirstSuccess { index, value, rest } = assert_ready!(first.poll()).unwrap();

    assert_eq!((index, value), (1, 11));
    assert_eq!(rest.running(), 1);
    drop(sender_0);
}

#[tokio::test(start_paused = true)]
async fn fire_on_one_errback_picks_earliest_failure() {
    let start = Instant::now();
    let list = DeferredList::new([after(30, Err("a")), after(5, Ok(1)), after(10, Err("c"))]);

    let error = list.fire_on_one_errback().await.unwrap_err();

    assert_eq!(error.index, 2);
    assert_eq!(error.error, "c");
    assert_eq!(elapsed_ms(start), 10);
}

#[tokio::test(start_paused = true)]
async fn fire_on_one_errback_returns_values_in_order() {
    let list = DeferredList::new([after(30, Ok(0)), after(5, Ok(1)), after(10, Ok(2))]);

    let values = list.fire_on_one_errback().await.unwrap();

    assert_eq!(values, [0, 1, 2]);
}

#[test]
fn fire_on_one_errback_empty_returns_empty() {
    let list = DeferredList::<Ready<Outcome>>::new([]);
    let mut values = task::spawn(list.fire_on_one_errback());

    let values = assert_ready!(values.poll()).unwrap();

    assert!(values.is_empty());
}

#[test]
fn fire_on_one_errback_uses_error_stored_before() {
    let (sender_0, receiver_0) = oneshot::channel::<u32>();
    let (sender_1, receiver_1) = oneshot::channel::<u32>();
    let mut list = task::spawn(DeferredList::new([receiver_0, receiver_1]));
    drop(sender_1);
    assert_pending!(list.poll());

    let mut values = task::spawn(list.into_inner().fire_on_one_errback());
    let error = assert_ready!(values.poll()).unwrap_err();

    assert_eq!(error.index, 1);
    assert_eq!(error.error, oneshot::Canceled);
    drop(sender_0);
}

#[tokio::test(start_paused = true)]
async fn rest_dropped_cancels_running_futures() {
    let (_, first_guard) = drop_flag();
    let (slow_flag, slow_guard) = drop_flag();
    let (failed_flag, failed_guard) = drop_flag();
    let list = DeferredList::new([
        guarded(10, Ok(0), first_guard),
        guarded(50, Ok(1), slow_guard),
        guarded(50, Err("late"), failed_guard),
    ]);

    let first = list.fire_on_one_callback().await.unwrap();
    assert!(!slow_flag.load(Ordering::SeqCst));
    assert!(!failed_flag.load(Ordering::SeqCst));
    assert_eq!(first.rest.running(), 2);
    drop(first.rest);

    assert!(slow_flag.load(Ordering::SeqCst));
    assert!(failed_flag.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn rest_awaited_finishes_running_futures() {
    let start = Instant::now();
    let list = DeferredList::new([after(30, Err("a")), after(5, Ok(1)), after(10, Err("c"))]);

    let error = list.fire_on_one_errback().await.unwrap_err();
    let others = error.rest.await;

    assert_eq!(error.index, 2);
    assert_eq!(others, [(0, Err("a")), (1, Ok(1))]);
    assert_eq!(elapsed_ms(start), 30);
}

#[cfg(feature = "tokio")]
#[tokio::test(start_paused = true)]
async fn rest_spawn_finishes_in_background() {
    let (flag, guard) = drop_flag();
    let list = DeferredList::new([
        guarded(5, Err("a"), drop_flag().1),
        guarded(10, Ok(1), guard),
    ]);
    let error = list.fire_on_one_errback().await.unwrap_err();

    let handle = error.rest.spawn();
    sleep(Duration::from_millis(20)).await;
    assert!(flag.load(Ordering::SeqCst));

    assert!(handle.is_finished());
    assert_eq!(handle.await.unwrap(), [(1, Ok(1))]);
}

#[tokio::test(start_paused = true)]
async fn gather_results_returns_values_in_order() {
    let values = gather_results([after(30, Ok(0)), after(5, Ok(1)), after(10, Ok(2))]).await;

    assert_eq!(values.unwrap(), [0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn gather_results_returns_original_error_with_index() {
    let fail_after = |ms, kind| async move {
        sleep(Duration::from_millis(ms)).await;
        Err::<(), _>(io::Error::from(kind))
    };
    let futures = [
        fail_after(30, io::ErrorKind::TimedOut),
        fail_after(10, io::ErrorKind::NotFound),
    ];

    let error = gather_results(futures).await.unwrap_err();

    assert_eq!(error.index, 1);
    assert_eq!(error.error.kind(), io::ErrorKind::NotFound);
    assert_eq!(error.rest.running(), 1);
}

#[test]
fn gather_results_empty_returns_empty() {
    let mut gather = task::spawn(gather_results(Vec::<Ready<Outcome>>::new()));

    let values = assert_ready!(gather.poll()).unwrap();

    assert!(values.is_empty());
}

#[test]
fn first_error_sources_original_error() {
    let error = io::Error::new(io::ErrorKind::PermissionDenied, "mailbox locked");
    let futures = [ready(Ok(())), ready(Err(error))];

    let first = futures::executor::block_on(gather_results(futures)).unwrap_err();

    assert_eq!(first.to_string(), "future at index 1 failed");
    assert_eq!(first.source().unwrap().to_string(), "mailbox locked");
    assert_eq!(first.into_inner().kind(), io::ErrorKind::PermissionDenied);
}

#[test]
fn fire_error_sources_lowest_index_error() {
    let errors = vec![
        (0, io::Error::other("connection refused")),
        (1, io::Error::other("timed out")),
    ];
    let all_failed = FireError::AllFailed(errors);
    let empty = FireError::<io::Error>::Empty;

    assert_eq!(all_failed.to_string(), "all 2 futures in the list failed");
    assert_eq!(
        all_failed.source().unwrap().to_string(),
        "connection refused"
    );
    assert_eq!(empty.to_string(), "list is empty, so no future can succeed");
    assert!(empty.source().is_none());
}

#[test]
fn debug_prints_counts_not_futures() {
    let list = DeferredList::new([ready(Ok::<u8, u8>(1))]);

    assert_eq!(
        format!("{list:?}"),
        "DeferredList { running: 1, finished: 0 }"
    );
}

#[test]
fn futures_are_send_and_unpin() {
    fn assert_send_unpin<T: Send + Unpin>(_: &T) {}
    // Neither the async block nor its value is `Unpin`, the hardest case.
    let make = |succeed: bool| async move { succeed.then_some(PhantomPinned).ok_or(()) };
    let rest = futures::executor::block_on(gather_results([make(false), make(true)]))
        .unwrap_err()
        .rest;

    assert_send_unpin(&DeferredList::new([make(true)]));
    assert_send_unpin(&DeferredList::new([make(true)]).fire_on_one_callback());
    assert_send_unpin(&DeferredList::new([make(true)]).fire_on_one_errback());
    assert_send_unpin(&gather_results([make(true)]));
    assert_send_unpin(&rest);
}
