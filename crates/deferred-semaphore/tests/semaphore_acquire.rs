//! Integration tests of the semaphore's public operations: construction,
//! acquiring, closing, `run`, `set_limit`, `DeferredLock` and `spawn`.
//!
//! Steps that must happen in a set order are driven by hand with
//! `tokio_test::task::spawn`, so that no test depends on a scheduler.
#![cfg(not(loom))]

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use deferred_semaphore::{AcquireError, DeferredLock, DeferredSemaphore, Permit, TryAcquireError};
use futures::FutureExt;
use tokio_test::task;
use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};

/// Records the semaphore's free tokens at the moment it is dropped, so a test
/// can tell whether the token came back before or after the work stopped.
struct DropProbe {
    sem: DeferredSemaphore,
    tokens_at_drop: Arc<Mutex<Option<usize>>>,
}

impl Drop for DropProbe {
    fn drop(&mut self) {
        *self.tokens_at_drop.lock().unwrap() = Some(self.sem.tokens());
    }
}

/// Builds work that never finishes and keeps a `DropProbe` alive while it runs.
fn pending_work_with_probe(
    sem: &DeferredSemaphore,
    tokens_at_drop: &Arc<Mutex<Option<usize>>>,
) -> impl Future<Output = ()> + Send + 'static {
    let probe = DropProbe {
        sem: sem.clone(),
        tokens_at_drop: Arc::clone(tokens_at_drop),
    };
    async move {
        let _probe = probe;
        std::future::pending::<()>().await;
    }
}

// Construction

#[test]
#[should_panic(expected = "invalid limit 0: a limit must be between 1 and")]
fn new_zero_panics() {
    let _ = DeferredSemaphore::new(0);
}

#[test]
fn try_new_zero_errors() {
    let error = DeferredSemaphore::try_new(0).unwrap_err();
    assert_eq!(error.limit(), 0);
    assert!(
        error.to_string().contains("invalid limit 0"),
        "message does not name the limit: {error}"
    );
}

#[test]
fn try_new_above_max_errors() {
    let error = DeferredSemaphore::try_new(usize::MAX).unwrap_err();
    assert_eq!(error.limit(), usize::MAX);
}

#[test]
fn try_new_one_succeeds() {
    let sem = DeferredSemaphore::try_new(1).unwrap();
    assert_eq!(sem.limit(), 1);
    assert_eq!(sem.tokens(), 1);
    assert_eq!(sem.waiting(), 0);
}

// Counters

#[test]
fn counters_track_permits() {
    let sem = DeferredSemaphore::new(3);
    assert_eq!(sem.limit(), 3);
    assert_eq!(sem.tokens(), 3);
    assert_eq!(sem.waiting(), 0);

    let one = sem.try_acquire().unwrap();
    assert_eq!(one.num_tokens(), 1);
    assert_eq!(sem.tokens(), 2);

    let two = sem.try_acquire_many(2).unwrap();
    assert_eq!(two.num_tokens(), 2);
    assert_eq!(sem.tokens(), 0);

    let mut waiter = task::spawn(sem.acquire());
    assert_pending!(waiter.poll());
    assert_eq!(sem.waiting(), 1);
    assert_eq!(sem.tokens(), 0);

    drop(one);
    assert_eq!(sem.waiting(), 0, "the released token went to the waiter");
    assert_eq!(sem.tokens(), 0);
    let granted = assert_ready_ok!(waiter.poll());

    drop(two);
    assert_eq!(sem.tokens(), 2);
    drop(granted);
    assert_eq!(sem.tokens(), 3);
    assert_eq!(sem.limit(), 3);
}

#[tokio::test]
async fn acquire_owned_outlives_handle() {
    let sem = DeferredSemaphore::new(2);
    let observer = sem.clone();
    let permit = sem.acquire_many_owned(2).await.unwrap();
    drop(sem);
    assert_eq!(permit.num_tokens(), 2);
    assert_eq!(observer.tokens(), 0);
    drop(permit);
    assert_eq!(observer.tokens(), 2);
}

// acquire_many and try_acquire_many

#[tokio::test]
async fn acquire_many_takes_several_tokens() {
    let sem = DeferredSemaphore::new(5);
    let permit = sem.acquire_many(3).await.unwrap();
    assert_eq!(permit.num_tokens(), 3);
    assert_eq!(sem.tokens(), 2);
    drop(permit);
    assert_eq!(sem.tokens(), 5);
}

#[test]
fn acquire_many_waits_for_enough_tokens() {
    let sem = DeferredSemaphore::new(3);
    let first = sem.try_acquire().unwrap();
    let second = sem.try_acquire_many(2).unwrap();

    let mut many = task::spawn(sem.acquire_many(2));
    assert_pending!(many.poll());

    drop(first);
    assert!(!many.is_woken(), "woken with only one of two tokens");
    assert_pending!(many.poll());

    drop(second);
    assert!(many.is_woken());
    let permit = assert_ready_ok!(many.poll());
    assert_eq!(permit.num_tokens(), 2);
    assert_eq!(sem.tokens(), 1);
}

#[test]
fn try_acquire_many_too_few_fails() {
    let sem = DeferredSemaphore::new(3);
    let held = sem.try_acquire_many(2).unwrap();
    assert_eq!(
        sem.try_acquire_many(2).unwrap_err(),
        TryAcquireError::NoTokens
    );
    assert_eq!(sem.tokens(), 1, "a failed try took a token");
    drop(held);
    assert_eq!(sem.try_acquire_many(3).unwrap().num_tokens(), 3);
}

#[test]
fn try_acquire_many_above_limit_fails() {
    let sem = DeferredSemaphore::new(3);
    assert_eq!(
        sem.try_acquire_many(4).unwrap_err(),
        TryAcquireError::ExceedsLimit {
            requested: 4,
            limit: 3
        }
    );
    assert_eq!(sem.tokens(), 3);
}

#[tokio::test]
async fn acquire_many_above_limit_fails() {
    let sem = DeferredSemaphore::new(3);
    let error = sem.acquire_many(4).await.unwrap_err();
    assert_eq!(
        error,
        AcquireError::ExceedsLimit {
            requested: 4,
            limit: 3
        }
    );
    assert_eq!(sem.waiting(), 0, "an impossible request was queued");
    assert_eq!(sem.tokens(), 3);
}

#[test]
fn acquire_many_zero_completes_at_once() {
    let sem = DeferredSemaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut queued = task::spawn(sem.acquire());
    assert_pending!(queued.poll());

    // Zero tokens are always free, even with every token held and a waiter
    // queued.
    let mut empty = task::spawn(sem.acquire_many(0));
    let permit = assert_ready_ok!(empty.poll());
    assert_eq!(permit.num_tokens(), 0);
    drop(permit);
    assert_eq!(sem.tokens(), 0);
    assert_eq!(sem.waiting(), 1);
    assert!(!queued.is_woken(), "an empty permit woke a waiter");

    drop(held);
    let permit = assert_ready_ok!(queued.poll());
    assert_eq!(permit.num_tokens(), 1);
}

// close

#[test]
fn close_fails_waiters_and_later_acquires() {
    let sem = DeferredSemaphore::new(2);
    let held = sem.try_acquire_many(2).unwrap();
    let mut waiter = task::spawn(sem.acquire());
    let mut many = task::spawn(sem.acquire_many(2));
    assert_pending!(waiter.poll());
    assert_pending!(many.poll());

    sem.close();
    assert!(sem.is_closed());
    assert_eq!(assert_ready_err!(waiter.poll()), AcquireError::Closed);
    assert_eq!(assert_ready_err!(many.poll()), AcquireError::Closed);
    assert_eq!(sem.waiting(), 0);

    let mut later = task::spawn(sem.acquire());
    assert_eq!(assert_ready_err!(later.poll()), AcquireError::Closed);
    assert_eq!(sem.try_acquire().unwrap_err(), TryAcquireError::Closed);

    // The permit taken before the close still holds its tokens and gives them
    // back.
    assert_eq!(held.num_tokens(), 2);
    assert_eq!(sem.tokens(), 0);
    drop(held);
    assert_eq!(sem.tokens(), 2);
    assert_eq!(sem.try_acquire().unwrap_err(), TryAcquireError::Closed);
}

#[test]
fn close_returns_tokens_of_partial_waiter() {
    let sem = DeferredSemaphore::new(3);
    let first = sem.try_acquire().unwrap();
    let rest = sem.try_acquire_many(2).unwrap();
    let mut many = task::spawn(sem.acquire_many(3));
    assert_pending!(many.poll());
    drop(rest);
    assert_eq!(
        sem.tokens(),
        0,
        "the two returned tokens went to the waiter"
    );

    sem.close();
    assert_eq!(assert_ready_err!(many.poll()), AcquireError::Closed);
    assert_eq!(sem.tokens(), 2);
    drop(first);
    assert_eq!(sem.tokens(), 3);
}

// run

#[tokio::test]
async fn run_returns_output_unchanged() {
    let sem = DeferredSemaphore::new(2);
    let numbers = sem.run(|| async { vec![1, 2, 3] }).await.unwrap();
    assert_eq!(numbers, [1, 2, 3]);

    let failed: Result<u8, String> = sem
        .run(|| async { Err("disk full".to_string()) })
        .await
        .unwrap();
    assert_eq!(failed, Err("disk full".to_string()));

    assert_eq!(sem.tokens(), 2);
}

#[tokio::test]
async fn run_holds_token_while_work_runs() {
    let sem = DeferredSemaphore::new(2);
    let seen = sem.run(|| async { sem.tokens() }).await.unwrap();
    assert_eq!(seen, 1);
    assert_eq!(sem.tokens(), 2, "the token was not given back");
}

#[tokio::test]
async fn run_after_close_never_calls_closure() {
    let sem = DeferredSemaphore::new(1);
    let called = AtomicBool::new(false);
    sem.close();
    let result = sem
        .run(|| async {
            called.store(true, Ordering::SeqCst);
        })
        .await;
    assert_eq!(result, Err(AcquireError::Closed));
    assert!(!called.load(Ordering::SeqCst));
}

#[test]
fn run_closed_while_queued_skips_closure() {
    let sem = DeferredSemaphore::new(1);
    let called = Arc::new(AtomicBool::new(false));
    let held = sem.try_acquire().unwrap();
    let flag = Arc::clone(&called);
    let mut queued = task::spawn(sem.run(move || async move {
        flag.store(true, Ordering::SeqCst);
    }));
    assert_pending!(queued.poll());

    sem.close();
    assert_eq!(assert_ready_err!(queued.poll()), AcquireError::Closed);
    assert!(!called.load(Ordering::SeqCst));
    drop(held);
    assert_eq!(sem.tokens(), 1);
}

#[test]
fn run_dropped_while_queued_skips_closure() {
    let sem = DeferredSemaphore::new(1);
    let called = Arc::new(AtomicBool::new(false));
    let held = sem.try_acquire().unwrap();
    let flag = Arc::clone(&called);
    let mut queued = task::spawn(sem.run(move || async move {
        flag.store(true, Ordering::SeqCst);
    }));
    assert_pending!(queued.poll());
    drop(queued);
    assert_eq!(sem.waiting(), 0);
    drop(held);
    assert!(!called.load(Ordering::SeqCst));
    assert_eq!(sem.tokens(), 1);
}

#[tokio::test]
async fn run_work_panics_returns_token() {
    let sem = DeferredSemaphore::new(1);
    let outcome = AssertUnwindSafe(sem.run(|| async {
        panic!("work failed on purpose");
    }))
    .catch_unwind()
    .await;

    let payload = outcome.unwrap_err();
    assert_eq!(
        payload.downcast_ref::<&str>(),
        Some(&"work failed on purpose")
    );
    assert_eq!(sem.tokens(), 1);
    assert_eq!(sem.run(|| async { 5 }).await, Ok(5));
}

#[test]
fn run_closure_panics_returns_token() {
    let sem = DeferredSemaphore::new(1);
    let outcome = AssertUnwindSafe(sem.run(|| -> std::future::Ready<()> {
        panic!("closure failed on purpose");
    }))
    .catch_unwind()
    .now_or_never()
    .expect("a free token makes run ready at once");
    assert!(outcome.is_err());
    assert_eq!(sem.tokens(), 1);
}

#[test]
fn run_dropped_mid_work_returns_token_last() {
    let sem = DeferredSemaphore::new(1);
    let tokens_at_drop = Arc::new(Mutex::new(None));
    let work = pending_work_with_probe(&sem, &tokens_at_drop);
    let mut running = task::spawn(sem.run(move || work));
    assert_pending!(running.poll());
    assert_eq!(sem.tokens(), 0);

    drop(running);
    assert_eq!(
        *tokens_at_drop.lock().unwrap(),
        Some(0),
        "the token came back before the work's future was dropped"
    );
    assert_eq!(sem.tokens(), 1);
}

// set_limit

#[test]
fn set_limit_grow_wakes_waiters_at_once() {
    let sem = DeferredSemaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut first = task::spawn(sem.acquire());
    let mut second = task::spawn(sem.acquire());
    let mut third = task::spawn(sem.acquire());
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    assert_pending!(third.poll());

    sem.set_limit(3).unwrap();
    assert_eq!(sem.limit(), 3);
    assert!(first.is_woken());
    assert!(second.is_woken());
    assert!(!third.is_woken(), "woken with no token left for it");
    let first_permit = assert_ready_ok!(first.poll());
    let second_permit = assert_ready_ok!(second.poll());
    assert_pending!(third.poll());
    assert_eq!(sem.tokens(), 0);
    assert_eq!(sem.waiting(), 1);

    drop((held, first_permit, second_permit));
    let permit = assert_ready_ok!(third.poll());
    assert_eq!(permit.num_tokens(), 1);
}

#[test]
fn set_limit_grow_adds_free_tokens() {
    let sem = DeferredSemaphore::new(2);
    let held = sem.try_acquire().unwrap();
    sem.set_limit(5).unwrap();
    assert_eq!(sem.tokens(), 4);
    drop(held);
    assert_eq!(sem.tokens(), 5);
}

#[test]
fn set_limit_shrink_retires_returned_tokens() {
    let sem = DeferredSemaphore::new(3);
    let held: Vec<Permit<'_>> = (0..3).map(|_| sem.try_acquire().unwrap()).collect();
    sem.set_limit(1).unwrap();
    assert_eq!(sem.limit(), 1);
    assert_eq!(sem.tokens(), 0);

    let mut first = task::spawn(sem.acquire());
    let mut second = task::spawn(sem.acquire());
    assert_pending!(first.poll());
    assert_pending!(second.poll());

    let mut held = held.into_iter();
    for still_held in [2, 1] {
        drop(held.next());
        assert!(
            !first.is_woken(),
            "granted a token while {still_held} holders remain at limit 1"
        );
        assert_pending!(first.poll());
        assert_eq!(sem.tokens(), 0);
    }

    drop(held.next());
    assert!(first.is_woken());
    let permit = assert_ready_ok!(first.poll());
    assert!(!second.is_woken(), "a second holder was granted at limit 1");
    assert_pending!(second.poll());

    drop(permit);
    let permit = assert_ready_ok!(second.poll());
    drop(permit);
    assert_eq!(sem.tokens(), 1);
    assert_eq!(sem.limit(), 1);
}

#[test]
fn set_limit_shrink_ends_at_new_limit() {
    let sem = DeferredSemaphore::new(3);
    let held: Vec<Permit<'_>> = (0..3).map(|_| sem.try_acquire().unwrap()).collect();
    sem.set_limit(1).unwrap();
    for permit in held {
        drop(permit);
        assert!(sem.tokens() <= 1, "tokens() is {}", sem.tokens());
    }
    assert_eq!(sem.tokens(), 1);
    let _only = sem.try_acquire().unwrap();
    assert_eq!(sem.try_acquire().unwrap_err(), TryAcquireError::NoTokens);
}

#[test]
fn set_limit_shrink_takes_free_tokens_now() {
    let sem = DeferredSemaphore::new(4);
    let held = sem.try_acquire().unwrap();
    sem.set_limit(2).unwrap();
    assert_eq!(sem.tokens(), 1);
    drop(held);
    assert_eq!(sem.tokens(), 2);
}

#[test]
fn set_limit_regrow_cancels_pending_retirement() {
    let sem = DeferredSemaphore::new(3);
    let held: Vec<Permit<'_>> = (0..3).map(|_| sem.try_acquire().unwrap()).collect();
    sem.set_limit(1).unwrap();
    sem.set_limit(2).unwrap();
    assert_eq!(sem.tokens(), 0);
    drop(held);
    assert_eq!(sem.tokens(), 2);
    assert_eq!(sem.limit(), 2);
}

#[test]
fn set_limit_zero_errors_and_keeps_limit() {
    let sem = DeferredSemaphore::new(3);
    let error = sem.set_limit(0).unwrap_err();
    assert_eq!(error.limit(), 0);
    assert_eq!(sem.limit(), 3);
    assert_eq!(sem.tokens(), 3);

    assert!(sem.set_limit(usize::MAX).is_err());
    assert_eq!(sem.limit(), 3);
    assert_eq!(sem.tokens(), 3);
}

#[test]
fn set_limit_below_queued_request_fails_it() {
    let sem = DeferredSemaphore::new(3);
    let first = sem.try_acquire().unwrap();
    let rest = sem.try_acquire_many(2).unwrap();
    let mut many = task::spawn(sem.acquire_many(3));
    let mut single = task::spawn(sem.acquire());
    assert_pending!(many.poll());
    assert_pending!(single.poll());

    // The request for 3 now holds 2 returned tokens and waits for the third.
    drop(rest);
    assert_pending!(many.poll());
    assert_pending!(single.poll());

    sem.set_limit(2).unwrap();
    assert!(many.is_woken());
    assert_eq!(
        assert_ready_err!(many.poll()),
        AcquireError::ExceedsLimit {
            requested: 3,
            limit: 2
        }
    );

    // The failed request's 2 tokens paid the 1 retired token and served the
    // waiter behind it.
    assert!(single.is_woken());
    let permit = assert_ready_ok!(single.poll());
    assert_eq!(sem.tokens(), 0);
    drop(permit);
    drop(first);
    assert_eq!(sem.tokens(), 2);
    assert_eq!(sem.waiting(), 0);
}

// DeferredLock

#[test]
fn lock_locked_tracks_holder() {
    let lock = DeferredLock::new();
    assert!(!lock.locked());
    let held = lock.try_acquire().unwrap();
    assert!(lock.locked());
    assert!(lock.try_acquire().is_err());
    drop(held);
    assert!(!lock.locked());
}

#[test]
fn lock_locked_while_granted_waiter_unpolled() {
    let lock = DeferredLock::new();
    let held = lock.try_acquire().unwrap();
    let mut waiter = task::spawn(lock.acquire());
    assert_pending!(waiter.poll());
    drop(held);
    assert!(
        lock.locked(),
        "the lock looks free while handed to a waiter"
    );
    let permit = assert_ready_ok!(waiter.poll());
    assert!(lock.locked());
    drop(permit);
    assert!(!lock.locked());
}

#[test]
fn lock_serves_waiters_in_order() {
    let lock = DeferredLock::new();
    let order = Arc::new(Mutex::new(Vec::new()));
    let held = lock.try_acquire().unwrap();

    let mut runs: Vec<_> = (0..3)
        .map(|n| {
            let order = Arc::clone(&order);
            task::spawn(lock.run(move || async move { order.lock().unwrap().push(n) }))
        })
        .collect();
    for run in &mut runs {
        assert_pending!(run.poll());
    }
    assert_eq!(lock.waiting(), 3);

    drop(held);
    // Each round polls the later runs first, which must not let them
    // overtake the earlier ones. A finished run leaves the list, since a
    // `Run` must not be polled again after it completes.
    let mut pending: Vec<_> = runs.into_iter().rev().collect();
    for expected in [vec![0], vec![0, 1], vec![0, 1, 2]] {
        pending.retain_mut(|run| run.poll().is_pending());
        assert_eq!(*order.lock().unwrap(), expected);
    }
    assert!(pending.is_empty());
    assert!(!lock.locked());
}

#[tokio::test]
async fn lock_run_returns_output() {
    let lock = DeferredLock::default();
    assert_eq!(lock.run(|| async { "written" }).await, Ok("written"));
    assert!(!lock.locked());
}

// spawn, with the tokio feature

#[cfg(feature = "tokio")]
mod spawn {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    /// Yields until `condition` returns true, failing the test after 5 s.
    async fn wait_until(what: &str, condition: impl Fn() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            while !condition() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(waited.is_ok(), "timed out waiting until {what}");
    }

    #[tokio::test]
    async fn spawn_runs_without_awaiting_handle() {
        let sem = DeferredSemaphore::new(1);
        let (started_tx, started_rx) = oneshot::channel();
        let handle = sem.spawn(move || async move {
            started_tx.send(()).unwrap();
            7
        });

        // Only the work's own signal is awaited, never the handle.
        tokio::time::timeout(Duration::from_secs(5), started_rx)
            .await
            .expect("spawned work did not start")
            .unwrap();
        assert_eq!(handle.await.unwrap(), Ok(7));
    }

    #[tokio::test]
    async fn spawn_dropped_handle_keeps_permit() {
        let sem = DeferredSemaphore::new(1);
        let finished = Arc::new(AtomicUsize::new(0));
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let done = Arc::clone(&finished);
        let handle = sem.spawn(move || async move {
            release_rx.await.unwrap();
            done.fetch_add(1, Ordering::SeqCst);
        });
        drop(handle);

        wait_until("the spawned work holds the token", || sem.tokens() == 0).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(sem.tokens(), 0, "the token came back while the work ran");
        assert_eq!(sem.try_acquire().unwrap_err(), TryAcquireError::NoTokens);

        release_tx.send(()).unwrap();
        wait_until("the spawned work gives the token back", || {
            sem.tokens() == 1
        })
        .await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn spawn_aborted_handle_frees_token() {
        let sem = DeferredSemaphore::new(1);
        let tokens_at_drop = Arc::new(Mutex::new(None));
        let work = pending_work_with_probe(&sem, &tokens_at_drop);
        let handle = sem.spawn(move || work);
        wait_until("the spawned work holds the token", || sem.tokens() == 0).await;

        handle.abort();
        let error = handle.await.unwrap_err();
        assert!(error.is_cancelled());
        assert_eq!(
            *tokens_at_drop.lock().unwrap(),
            Some(0),
            "the token came back before the aborted work was dropped"
        );
        assert_eq!(sem.tokens(), 1);
    }

    #[tokio::test]
    async fn spawn_respects_limit() {
        let sem = DeferredSemaphore::new(2);
        let running = Arc::new(AtomicUsize::new(0));
        let max_running = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let running = Arc::clone(&running);
                let max_running = Arc::clone(&max_running);
                sem.spawn(move || async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    max_running.fetch_max(now, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for handle in handles {
            handle.await.unwrap().unwrap();
        }
        assert_eq!(max_running.load(Ordering::SeqCst), 2);
        assert_eq!(sem.tokens(), 2);
    }
}
