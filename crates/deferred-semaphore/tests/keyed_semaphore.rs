//! Tests of `KeyedSemaphore`: who is served and when, cancellation, idle
//! keys, and a randomized stress checked by counters kept apart from the
//! semaphore.
#![cfg(not(loom))]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deferred_semaphore::{AcquireError, KeyedSemaphore, TryAcquireError};
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready_ok};

#[test]
fn busy_key_does_not_block_others() {
    let sem = KeyedSemaphore::new(2, 1);
    let a1 = sem.try_acquire("a").unwrap();
    let mut a2 = spawn(sem.acquire("a"));
    assert_pending!(a2.poll());

    // The waiter for `a` holds no global slot, so `b` gets the second one.
    let b1 = assert_ready_ok!(spawn(sem.acquire("b")).poll());
    assert_eq!(sem.held(), 2);

    let mut c1 = spawn(sem.acquire("c"));
    assert_pending!(c1.poll());
    drop(b1);
    // The free slot goes to `c`, because `a` is still at its limit.
    assert!(c1.is_woken());
    let c1 = assert_ready_ok!(c1.poll());
    assert_pending!(a2.poll());

    drop(c1);
    assert!(!a2.is_woken(), "key `a` is still at its limit");
    drop(a1);
    assert!(a2.is_woken());
    let a2 = assert_ready_ok!(a2.poll());
    assert_eq!(a2.key(), &"a");
}

#[test]
fn waiters_of_a_key_served_in_order() {
    let sem = KeyedSemaphore::new(8, 1);
    let held = sem.try_acquire(1u8).unwrap();
    let mut waiters: Vec<_> = (0..3).map(|_| spawn(sem.acquire(1u8))).collect();
    for waiter in &mut waiters {
        assert_pending!(waiter.poll());
    }
    // A newcomer never overtakes the queue of its key.
    assert_eq!(sem.try_acquire(1u8).unwrap_err(), TryAcquireError::NoTokens);

    drop(held);
    let mut order = Vec::new();
    let mut permits = Vec::new();
    for _ in 0..3 {
        for (position, waiter) in waiters.iter_mut().enumerate() {
            if order.contains(&position) {
                continue;
            }
            if let std::task::Poll::Ready(permit) = waiter.poll() {
                order.push(position);
                permits.push(permit.unwrap());
                permits.clear();
            }
        }
    }
    assert_eq!(order, [0, 1, 2]);
}

#[test]
fn oldest_eligible_waiter_gets_global_slot() {
    let sem = KeyedSemaphore::new(1, 1);
    let held = sem.try_acquire('x').unwrap();
    let mut b = spawn(sem.acquire('b'));
    let mut a = spawn(sem.acquire('a'));
    assert_pending!(b.poll());
    assert_pending!(a.poll());
    drop(held);
    assert!(b.is_woken());
    assert!(!a.is_woken());
    let b_permit = assert_ready_ok!(b.poll());
    assert_pending!(a.poll());
    drop(b_permit);
    let _a_permit = assert_ready_ok!(a.poll());
}

#[test]
fn idle_keys_are_forgotten() {
    let sem = KeyedSemaphore::new(4, 1);
    let a = sem.try_acquire("a".to_string()).unwrap();
    let b = sem.try_acquire("b".to_string()).unwrap();
    let mut waiter = spawn(sem.acquire("c".to_string()));
    drop(assert_ready_ok!(waiter.poll()));
    assert_eq!(sem.keys(), 2, "a permit already dropped frees its key");

    let mut queued = spawn(sem.acquire("a".to_string()));
    assert_pending!(queued.poll());
    assert_eq!(sem.keys(), 2);
    drop(b);
    assert_eq!(sem.keys(), 1);
    drop(queued);
    assert_eq!(sem.keys(), 1, "the holder of `a` keeps the key");
    drop(a);
    assert_eq!(sem.keys(), 0);
    assert_eq!(sem.held(), 0);
    assert_eq!(sem.waiting(), 0);
}

#[test]
fn cancelled_waiter_loses_no_slot() {
    let sem = KeyedSemaphore::new(1, 1);
    let held = sem.try_acquire(0u32).unwrap();
    let mut first = spawn(sem.acquire(1));
    let mut second = spawn(sem.acquire(2));
    assert_pending!(first.poll());
    assert_pending!(second.poll());

    // Granted but never polled again: dropping it hands the slot on.
    drop(held);
    assert!(first.is_woken());
    drop(first);
    assert!(second.is_woken());
    let permit = assert_ready_ok!(second.poll());
    assert_eq!(sem.held(), 1);
    drop(permit);
    assert_eq!(sem.held(), 0);
    assert_eq!(sem.keys(), 0);
}

#[test]
fn cancelled_eligible_waiter_promotes_next() {
    let sem = KeyedSemaphore::new(1, 1);
    let other = sem.try_acquire('z').unwrap();
    let mut first = spawn(sem.acquire('k'));
    let mut second = spawn(sem.acquire('k'));
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    drop(first);
    drop(other);
    assert!(second.is_woken());
    let _second_permit = assert_ready_ok!(second.poll());
}

#[test]
fn close_fails_waiters_and_keeps_permits() {
    let sem = KeyedSemaphore::new(1, 1);
    let held = sem.try_acquire(1u8).unwrap();
    let mut waiter = spawn(sem.acquire(2u8));
    assert_pending!(waiter.poll());
    sem.close();
    assert!(waiter.is_woken());
    match waiter.poll() {
        std::task::Poll::Ready(Err(error)) => assert_eq!(error, AcquireError::Closed),
        other => panic!("expected Closed, got {other:?}"),
    }
    assert_eq!(sem.try_acquire(3u8).unwrap_err(), TryAcquireError::Closed);
    drop(held);
    assert_eq!(sem.held(), 0);
    assert_eq!(sem.keys(), 0);
}

#[test]
fn zero_limits_are_rejected() {
    assert_eq!(KeyedSemaphore::<u8>::try_new(0, 1).unwrap_err().limit(), 0);
    assert_eq!(KeyedSemaphore::<u8>::try_new(1, 0).unwrap_err().limit(), 0);
}

/// Counts of slots held, per key and overall, kept by the tasks themselves.
#[derive(Default)]
struct Counters {
    global: AtomicUsize,
    global_max: AtomicUsize,
    per_key: Mutex<HashMap<u32, (usize, usize)>>,
}

impl Counters {
    fn enter(&self, key: u32, limit: usize, per_key: usize) {
        let now = self.global.fetch_add(1, Ordering::SeqCst) + 1;
        self.global_max.fetch_max(now, Ordering::SeqCst);
        assert!(now <= limit, "{now} holders over the global limit {limit}");
        let mut keys = self.per_key.lock().unwrap();
        let entry = keys.entry(key).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(entry.0);
        assert!(
            entry.0 <= per_key,
            "{} holders of key {key} over its limit {per_key}",
            entry.0
        );
    }

    fn leave(&self, key: u32) {
        self.per_key.lock().unwrap().get_mut(&key).unwrap().0 -= 1;
        self.global.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
fn stress_limits_hold() {
    const LIMIT: usize = 4;
    const PER_KEY: usize = 2;
    const TASKS: u64 = 16;
    const ROUNDS: u64 = 400;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let sem = KeyedSemaphore::new(LIMIT, PER_KEY);
    let counters = Arc::new(Counters::default());
    let cancelled = Arc::new(AtomicUsize::new(0));
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let (sem, counters, cancelled) = (sem.clone(), counters.clone(), cancelled.clone());
            tasks.push(tokio::spawn(async move {
                // A small linear congruential generator per task.
                let mut state = task.wrapping_mul(6364136223846793005).wrapping_add(1);
                let mut next = move || {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 33) as u32
                };
                for _ in 0..ROUNDS {
                    let key = next() % 6;
                    let acquire = sem.acquire(key);
                    let permit = if next() % 4 == 0 {
                        // Some acquires give up after a moment.
                        match tokio::time::timeout(Duration::from_micros(50), acquire).await {
                            Ok(permit) => permit.unwrap(),
                            Err(_) => {
                                cancelled.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    } else {
                        acquire.await.unwrap()
                    };
                    counters.enter(key, LIMIT, PER_KEY);
                    for _ in 0..next() % 3 {
                        tokio::task::yield_now().await;
                    }
                    counters.leave(key);
                    drop(permit);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
    assert_eq!(sem.held(), 0);
    assert_eq!(sem.waiting(), 0);
    assert_eq!(sem.keys(), 0, "every key is idle at the end");
    assert_eq!(counters.global.load(Ordering::SeqCst), 0);
    let max = counters.global_max.load(Ordering::SeqCst);
    assert!(max <= LIMIT);
    assert!(max >= 2, "the stress never ran two holders at once");
    let keys = counters.per_key.lock().unwrap();
    assert!(keys.values().all(|&(now, max)| now == 0 && max <= PER_KEY));
}
