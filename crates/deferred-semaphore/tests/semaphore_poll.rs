//! Poll-level tests of the waiter queue, driven by hand on mock tasks.
//!
//! Each waiter is its own `tokio_test` mock task, so a test can check which
//! waiter was woken by a release and poll the waiters in any order it likes.
//! A waiter joins the queue when it is first polled.
#![cfg(not(loom))]

use deferred_semaphore::{AcquireError, DeferredSemaphore, Permit, TryAcquireError};
use tokio_test::task;
use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};

/// Takes every token of `sem` as single-token permits.
fn hold_all(sem: &DeferredSemaphore) -> Vec<Permit<'_>> {
    (0..sem.limit())
        .map(|_| sem.try_acquire().unwrap())
        .collect()
}

#[test]
fn acquire_serves_waiters_in_arrival_order() {
    let sem = DeferredSemaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut first = task::spawn(sem.acquire());
    let mut second = task::spawn(sem.acquire());
    let mut third = task::spawn(sem.acquire());
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    assert_pending!(third.poll());
    assert_eq!(sem.waiting(), 3);

    drop(held);
    // Polling the later waiters first gives them nothing.
    assert_pending!(third.poll());
    assert_pending!(second.poll());
    let permit = assert_ready_ok!(first.poll());

    drop(permit);
    assert_pending!(third.poll());
    let permit = assert_ready_ok!(second.poll());

    drop(permit);
    let permit = assert_ready_ok!(third.poll());
    drop(permit);
    assert_eq!(sem.tokens(), 1);
    assert_eq!(sem.waiting(), 0);
}

#[test]
fn acquire_order_survives_middle_cancel() {
    let sem = DeferredSemaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut first = task::spawn(sem.acquire());
    let mut middle = task::spawn(sem.acquire());
    let mut last = task::spawn(sem.acquire());
    assert_pending!(first.poll());
    assert_pending!(middle.poll());
    assert_pending!(last.poll());

    drop(middle);
    assert_eq!(sem.waiting(), 2);
    assert!(!first.is_woken());
    assert!(!last.is_woken());

    drop(held);
    assert!(first.is_woken());
    assert!(!last.is_woken());
    assert_pending!(last.poll());
    let permit = assert_ready_ok!(first.poll());

    drop(permit);
    assert!(last.is_woken());
    let permit = assert_ready_ok!(last.poll());
    drop(permit);
    assert_eq!(sem.tokens(), 1);
}

#[test]
fn acquire_order_survives_head_cancel() {
    let sem = DeferredSemaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut head = task::spawn(sem.acquire());
    let mut second = task::spawn(sem.acquire());
    let mut third = task::spawn(sem.acquire());
    assert_pending!(head.poll());
    assert_pending!(second.poll());
    assert_pending!(third.poll());

    drop(head);
    assert_eq!(sem.waiting(), 2);
    assert_eq!(sem.tokens(), 0, "a cancelled waiter freed a held token");

    drop(held);
    assert!(second.is_woken());
    assert!(!third.is_woken());
    assert_pending!(third.poll());
    let permit = assert_ready_ok!(second.poll());

    drop(permit);
    let permit = assert_ready_ok!(third.poll());
    drop(permit);
    assert_eq!(sem.tokens(), 1);
}

#[test]
fn try_acquire_fails_while_waiter_queued() {
    let sem = DeferredSemaphore::new(2);
    let held = hold_all(&sem);
    let mut many = task::spawn(sem.acquire_many(2));
    assert_pending!(many.poll());

    // One token comes back, but it goes to the queued waiter, so a newcomer
    // finds none free.
    let mut held = held.into_iter();
    drop(held.next());
    assert_eq!(sem.tokens(), 0);
    assert_eq!(sem.try_acquire().unwrap_err(), TryAcquireError::NoTokens);
    let mut newcomer = task::spawn(sem.acquire());
    assert_pending!(newcomer.poll());

    drop(held.next());
    assert!(!newcomer.is_woken());
    let permit = assert_ready_ok!(many.poll());
    assert_eq!(permit.num_tokens(), 2);

    drop(permit);
    assert!(newcomer.is_woken());
    let permit = assert_ready_ok!(newcomer.poll());
    assert_eq!(permit.num_tokens(), 1);
}

#[test]
fn acquire_many_at_head_blocks_later_acquire() {
    let sem = DeferredSemaphore::new(3);
    let held = hold_all(&sem);
    let mut many = task::spawn(sem.acquire_many(3));
    let mut single = task::spawn(sem.acquire());
    assert_pending!(many.poll());
    assert_pending!(single.poll());

    let mut held = held.into_iter();
    for collected in 1..=2 {
        drop(held.next());
        assert!(
            !many.is_woken(),
            "woken while holding {collected} of 3 tokens"
        );
        assert!(
            !single.is_woken(),
            "a single token overtook the request for 3 at the head"
        );
        assert_pending!(single.poll());
        assert_pending!(many.poll());
        assert_eq!(sem.tokens(), 0);
        assert_eq!(sem.waiting(), 2);
    }

    drop(held.next());
    assert!(many.is_woken());
    assert!(!single.is_woken());
    assert_pending!(single.poll());
    let permit = assert_ready_ok!(many.poll());
    assert_eq!(permit.num_tokens(), 3);

    drop(permit);
    assert!(single.is_woken());
    let permit = assert_ready_ok!(single.poll());
    drop(permit);
    assert_eq!(sem.tokens(), 3);
}

#[test]
fn acquire_many_dropped_passes_tokens_on() {
    let sem = DeferredSemaphore::new(3);
    let held = hold_all(&sem);
    let mut many = task::spawn(sem.acquire_many(3));
    let mut single = task::spawn(sem.acquire());
    assert_pending!(many.poll());
    assert_pending!(single.poll());

    // The request for 3 collects one token, then is cancelled.
    let mut held = held.into_iter();
    drop(held.next());
    assert_pending!(many.poll());
    assert!(!single.is_woken());

    drop(many);
    assert!(single.is_woken());
    let permit = assert_ready_ok!(single.poll());
    assert_eq!(sem.tokens(), 0);
    assert_eq!(sem.waiting(), 0);

    drop(permit);
    drop(held);
    assert_eq!(sem.tokens(), 3);
}

#[test]
fn release_wakes_only_granted_waiter() {
    let sem = DeferredSemaphore::new(2);
    let held = hold_all(&sem);
    let mut waiters: Vec<_> = (0..4).map(|_| task::spawn(sem.acquire())).collect();
    for waiter in &mut waiters {
        assert_pending!(waiter.poll());
    }

    let mut held = held.into_iter();
    drop(held.next());
    assert!(waiters[0].is_woken());
    for (index, waiter) in waiters.iter().enumerate().skip(1) {
        assert!(!waiter.is_woken(), "waiter {index} was woken needlessly");
    }

    drop(held.next());
    assert!(waiters[1].is_woken());
    assert!(!waiters[2].is_woken(), "waiter 2 was woken needlessly");
    assert!(!waiters[3].is_woken(), "waiter 3 was woken needlessly");
}

#[test]
fn acquire_dropped_after_grant_returns_token() {
    let sem = DeferredSemaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut granted = task::spawn(sem.acquire());
    let mut next = task::spawn(sem.acquire());
    assert_pending!(granted.poll());
    assert_pending!(next.poll());

    drop(held);
    assert!(granted.is_woken());

    // Dropped before it is polled again, so it never receives its permit.
    drop(granted);
    assert!(next.is_woken());
    let permit = assert_ready_ok!(next.poll());
    drop(permit);
    assert_eq!(sem.tokens(), 1);
}

#[test]
fn acquire_dropped_after_grant_frees_token() {
    let sem = DeferredSemaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut granted = task::spawn(sem.acquire());
    assert_pending!(granted.poll());

    drop(held);
    assert_eq!(sem.tokens(), 0);
    drop(granted);
    assert_eq!(sem.tokens(), 1);
    assert_eq!(sem.waiting(), 0);
}

#[test]
fn close_wakes_every_waiter() {
    let sem = DeferredSemaphore::new(2);
    let held = hold_all(&sem);
    let mut waiters: Vec<_> = [1, 2, 1]
        .into_iter()
        .map(|n| task::spawn(sem.acquire_many(n)))
        .collect();
    for waiter in &mut waiters {
        assert_pending!(waiter.poll());
    }

    sem.close();
    for (index, waiter) in waiters.iter_mut().enumerate() {
        assert!(waiter.is_woken(), "waiter {index} was not woken by close");
        assert_eq!(assert_ready_err!(waiter.poll()), AcquireError::Closed);
    }
    assert_eq!(sem.waiting(), 0);
    drop(held);
    assert_eq!(sem.tokens(), 2);
}

#[test]
fn acquire_repolled_keeps_place_with_new_waker() {
    let sem = DeferredSemaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut first = task::spawn(sem.acquire());
    assert_pending!(first.poll());

    // Moving the future to another mock task changes its waker, so the
    // release must wake the new task, not the old one.
    let mut moved = task::spawn(async move {
        let permit = first.await;
        permit.map(|permit| permit.num_tokens())
    });
    assert_pending!(moved.poll());
    drop(held);
    assert!(moved.is_woken());
    assert_eq!(assert_ready_ok!(moved.poll()), 1);
}
