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
    // The head had no token yet, so its cancellation has nothing to pass on.
    assert!(!second.is_woken());
    assert!(!third.is_woken());

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

#[test]
fn acquire_order_survives_tail_cancel() {
    let sem = DeferredSemaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut first = task::spawn(sem.acquire());
    let mut second = task::spawn(sem.acquire());
    let mut tail = task::spawn(sem.acquire());
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    assert_pending!(tail.poll());

    drop(tail);
    assert_eq!(sem.waiting(), 2);
    assert!(!first.is_woken());
    assert!(!second.is_woken());

    // A waiter that joins after the cancel must queue behind `second`.
    let mut newcomer = task::spawn(sem.acquire());
    assert_pending!(newcomer.poll());
    assert_eq!(sem.waiting(), 3);

    drop(held);
    assert!(first.is_woken());
    assert!(!second.is_woken());
    assert!(!newcomer.is_woken());
    let permit = assert_ready_ok!(first.poll());

    drop(permit);
    assert!(second.is_woken());
    assert!(!newcomer.is_woken());
    assert_pending!(newcomer.poll());
    let permit = assert_ready_ok!(second.poll());

    drop(permit);
    assert!(newcomer.is_woken());
    let permit = assert_ready_ok!(newcomer.poll());
    drop(permit);
    assert_eq!(sem.tokens(), 1);
    assert_eq!(sem.waiting(), 0);
}

#[test]
fn acquire_order_holds_across_acquire_kinds() {
    let sem = DeferredSemaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut owned = task::spawn(sem.acquire_owned());
    let run_started = std::cell::Cell::new(false);
    let mut run = task::spawn(sem.run(|| {
        run_started.set(true);
        async {}
    }));
    let mut borrowed = task::spawn(sem.acquire());
    assert_pending!(owned.poll());
    assert_pending!(run.poll());
    assert_pending!(borrowed.poll());
    assert_eq!(sem.waiting(), 3);

    drop(held);
    assert!(owned.is_woken());
    assert_pending!(borrowed.poll());
    assert_pending!(run.poll());
    assert!(
        !run_started.get(),
        "run started before the waiter ahead of it"
    );
    let permit = assert_ready_ok!(owned.poll());

    // The run finishes its work in the poll that grants it, so its token goes
    // straight on to the waiter behind it.
    drop(permit);
    assert!(run.is_woken());
    assert!(!borrowed.is_woken());
    assert_ready_ok!(run.poll());
    assert!(run_started.get());
    assert!(borrowed.is_woken());
    let permit = assert_ready_ok!(borrowed.poll());
    drop(permit);
    assert_eq!(sem.tokens(), 1);
}

#[test]
fn try_acquire_fails_while_granted_waiter_unpolled() {
    let sem = DeferredSemaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut waiter = task::spawn(sem.acquire());
    assert_pending!(waiter.poll());

    // The token goes to the waiter at once, before it is polled again, so
    // neither `try_acquire` nor a new `acquire` can take it.
    drop(held);
    assert!(waiter.is_woken());
    assert_eq!(sem.tokens(), 0);
    assert_eq!(sem.try_acquire().unwrap_err(), TryAcquireError::NoTokens);
    assert!(sem.try_acquire_owned().is_err());
    let mut newcomer = task::spawn(sem.acquire());
    assert_pending!(newcomer.poll());

    let permit = assert_ready_ok!(waiter.poll());
    assert!(!newcomer.is_woken());
    drop(permit);
    assert!(newcomer.is_woken());
    let permit = assert_ready_ok!(newcomer.poll());
    assert_eq!(permit.num_tokens(), 1);
}

#[test]
fn try_acquire_succeeds_once_queue_cancelled() {
    let sem = DeferredSemaphore::new(2);
    let held = hold_all(&sem);
    let mut waiters: Vec<_> = (0..3).map(|_| task::spawn(sem.acquire())).collect();
    for waiter in &mut waiters {
        assert_pending!(waiter.poll());
    }
    assert_eq!(sem.try_acquire().unwrap_err(), TryAcquireError::NoTokens);

    // Once nobody is queued, returned tokens are free to take again.
    drop(waiters);
    assert_eq!(sem.waiting(), 0);
    drop(held);
    assert_eq!(sem.tokens(), 2);
    let both = sem.try_acquire_many(2).unwrap();
    assert_eq!(both.num_tokens(), 2);
}

#[test]
fn release_of_many_wakes_queue_prefix() {
    let sem = DeferredSemaphore::new(3);
    let held = sem.try_acquire_many(3).unwrap();
    let mut waiters: Vec<_> = [1, 1, 2, 1]
        .into_iter()
        .map(|n| task::spawn(sem.acquire_many(n)))
        .collect();
    for waiter in &mut waiters {
        assert_pending!(waiter.poll());
    }

    // Three tokens serve the two single waiters and one of the two tokens
    // the third needs. The fourth may not take the one left over.
    drop(held);
    assert!(waiters[0].is_woken());
    assert!(waiters[1].is_woken());
    assert!(!waiters[2].is_woken(), "woken with one of two tokens");
    assert!(!waiters[3].is_woken(), "overtook the request for 2 tokens");
    assert_eq!(sem.tokens(), 0);
    assert_eq!(sem.waiting(), 2);
    let first = assert_ready_ok!(waiters[0].poll());
    let second = assert_ready_ok!(waiters[1].poll());
    assert_pending!(waiters[3].poll());
    assert_pending!(waiters[2].poll());

    drop(first);
    assert!(waiters[2].is_woken());
    assert!(!waiters[3].is_woken());
    let pair = assert_ready_ok!(waiters[2].poll());
    assert_eq!(pair.num_tokens(), 2);

    drop(second);
    assert!(waiters[3].is_woken());
    let last = assert_ready_ok!(waiters[3].poll());
    drop((pair, last));
    assert_eq!(sem.tokens(), 3);
    assert_eq!(sem.waiting(), 0);
}

#[test]
fn close_keeps_grant_made_before_it() {
    let sem = DeferredSemaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut granted = task::spawn(sem.acquire());
    let mut queued = task::spawn(sem.acquire());
    assert_pending!(granted.poll());
    assert_pending!(queued.poll());

    drop(held);
    assert!(granted.is_woken());
    assert!(!queued.is_woken());

    // Close fails the waiter still queued. The token granted before the
    // close stays granted, as a held permit would.
    sem.close();
    assert!(queued.is_woken());
    assert_eq!(assert_ready_err!(queued.poll()), AcquireError::Closed);
    let permit = assert_ready_ok!(granted.poll());
    assert_eq!(sem.tokens(), 0);
    drop(permit);
    assert_eq!(sem.tokens(), 1);
    assert_eq!(sem.waiting(), 0);
}

#[test]
fn set_limit_grow_wakes_in_queue_order() {
    let sem = DeferredSemaphore::new(2);
    let held = hold_all(&sem);
    let mut pair = task::spawn(sem.acquire_many(2));
    let mut single = task::spawn(sem.acquire());
    assert_pending!(pair.poll());
    assert_pending!(single.poll());

    // One new token goes to the head, which still lacks one, and the single
    // waiter behind it may not take it.
    sem.set_limit(3).unwrap();
    assert!(!pair.is_woken(), "woken with one of two tokens");
    assert!(!single.is_woken(), "overtook the request for 2 tokens");
    assert_eq!(sem.tokens(), 0);
    assert_eq!(sem.waiting(), 2);

    // Two more serve the head and then the single waiter.
    sem.set_limit(5).unwrap();
    assert!(pair.is_woken());
    assert!(single.is_woken());
    assert_eq!(sem.waiting(), 0);
    let pair_permit = assert_ready_ok!(pair.poll());
    let single_permit = assert_ready_ok!(single.poll());
    assert_eq!(pair_permit.num_tokens(), 2);
    assert_eq!(sem.tokens(), 0);

    drop((held, pair_permit, single_permit));
    assert_eq!(sem.tokens(), 5);
}

#[test]
fn set_limit_grow_pays_debt_before_waking() {
    let sem = DeferredSemaphore::new(3);
    let held = hold_all(&sem);
    sem.set_limit(1).unwrap();
    let mut waiter = task::spawn(sem.acquire());
    assert_pending!(waiter.poll());

    // Two tokens are owed for the shrink. Growing by one cancels one of them,
    // so no token is left to grant.
    sem.set_limit(2).unwrap();
    assert!(
        !waiter.is_woken(),
        "woken while 3 tokens are held at limit 2"
    );

    let mut held = held.into_iter();
    drop(held.next());
    assert!(
        !waiter.is_woken(),
        "woken while 2 tokens are held at limit 2"
    );
    assert_eq!(sem.tokens(), 0);

    drop(held.next());
    assert!(waiter.is_woken());
    let permit = assert_ready_ok!(waiter.poll());
    drop(permit);
    drop(held);
    assert_eq!(sem.tokens(), 2);
    assert_eq!(sem.limit(), 2);
}

#[test]
fn set_limit_shrink_wakes_nobody() {
    let sem = DeferredSemaphore::new(3);
    let held = hold_all(&sem);
    let mut waiters: Vec<_> = [1, 2]
        .into_iter()
        .map(|n| task::spawn(sem.acquire_many(n)))
        .collect();
    for waiter in &mut waiters {
        assert_pending!(waiter.poll());
    }

    // Both requests still fit the new limit, so nobody fails, and no token
    // came back, so nobody is granted.
    sem.set_limit(2).unwrap();
    for (index, waiter) in waiters.iter().enumerate() {
        assert!(!waiter.is_woken(), "waiter {index} was woken by a shrink");
    }
    assert_eq!(sem.waiting(), 2);

    // The first returned token pays the retired one, and the next serves
    // the head.
    let mut held = held.into_iter();
    drop(held.next());
    assert!(!waiters[0].is_woken());
    drop(held.next());
    assert!(waiters[0].is_woken());
    assert!(!waiters[1].is_woken());
    let single = assert_ready_ok!(waiters[0].poll());

    drop(held);
    drop(single);
    assert!(waiters[1].is_woken());
    let pair = assert_ready_ok!(waiters[1].poll());
    assert_eq!(pair.num_tokens(), 2);
    drop(pair);
    assert_eq!(sem.tokens(), 2);
}
