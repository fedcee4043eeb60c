//! Tests of the rate limiters on tokio's paused clock.
#![cfg(all(feature = "rate", not(loom)))]

use std::cell::RefCell;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use deferred_semaphore::{
    Backlog, DeferredSemaphore, KeyedBacklog, KeyedSemaphore, Limiter, PerKeyRate, Rate,
    RateLimited,
};
use tokio::time::Instant;
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready_ok};

fn per_second(count: u32) -> Rate {
    Rate::per_second(NonZeroU32::new(count).unwrap())
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

#[tokio::test(start_paused = true)]
async fn starts_follow_rate_with_burst_one() {
    const ITEMS: u64 = 8;
    let sem = DeferredSemaphore::new(4);
    let limiter = RateLimited::new(&sem, per_second(10));
    let start = Instant::now();
    let starts = RefCell::new(Vec::new());
    let work = |_: u64| {
        starts.borrow_mut().push(start.elapsed());
        async { Ok::<_, ()>(()) }
    };
    let report = Backlog::new(&limiter, 0..ITEMS, work)
        .for_each(|_| async {})
        .await;

    assert_eq!(report.succeeded, ITEMS);
    let starts = starts.into_inner();
    // N items at 10/s with a burst of 1 take (N - 1) / 10 s.
    assert_eq!(*starts.last().unwrap(), millis((ITEMS - 1) * 100));
    for pair in starts.windows(2) {
        assert!(
            pair[1] - pair[0] >= millis(100),
            "starts {pair:?} too close"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn burst_starts_at_once_then_paces() {
    let sem = DeferredSemaphore::new(8);
    let rate = per_second(10).with_burst(NonZeroU32::new(3).unwrap());
    let limiter = RateLimited::new(&sem, rate);
    let start = Instant::now();
    let starts = RefCell::new(Vec::new());
    let work = |_: u32| {
        starts.borrow_mut().push(start.elapsed());
        async { Ok::<_, ()>(()) }
    };
    Backlog::new(&limiter, 0..5u32, work)
        .for_each(|_| async {})
        .await;

    let expected = [0, 0, 0, 100, 200].map(millis);
    assert_eq!(starts.into_inner(), expected);
}

#[tokio::test(start_paused = true)]
async fn waiting_for_rate_holds_no_slot() {
    let sem = DeferredSemaphore::new(1);
    let limiter = RateLimited::new(sem.clone(), per_second(1));
    let first = Limiter::acquire(&limiter).await.unwrap();
    let mut second = spawn(Limiter::acquire(&limiter));
    assert_pending!(second.poll());
    drop(first);

    // The second acquire got the slot, found no token and gave it back.
    assert_pending!(second.poll());
    assert_eq!(sem.tokens(), 1, "a slot is held while waiting for the rate");

    tokio::time::advance(millis(1000)).await;
    assert!(second.is_woken());
    let permit = assert_ready_ok!(second.poll());
    assert_eq!(sem.tokens(), 0);
    drop(permit);
}

#[tokio::test(start_paused = true)]
async fn per_key_rates_are_independent() {
    let sem = KeyedSemaphore::new(8, 8);
    let limiter = PerKeyRate::new(&sem, per_second(10));
    let start = Instant::now();
    let starts: RefCell<HashMap<char, Vec<Duration>>> = RefCell::default();
    let work = |(key, _): (char, u32)| {
        starts
            .borrow_mut()
            .entry(key)
            .or_default()
            .push(start.elapsed());
        async { Ok::<_, ()>(()) }
    };
    let items: Vec<(char, u32)> = (0..5).flat_map(|n| [('a', n), ('b', n)]).collect();
    KeyedBacklog::new(&limiter, items, |item: &(char, u32)| item.0, work)
        .for_each(|_| async {})
        .await;

    let expected: Vec<Duration> = (0..5).map(|n| millis(n * 100)).collect();
    let starts = starts.into_inner();
    assert_eq!(starts[&'a'], expected);
    assert_eq!(starts[&'b'], expected, "key `b` waited for key `a`'s rate");
    assert_eq!(start.elapsed(), millis(400));
}

#[tokio::test(start_paused = true)]
async fn global_rate_over_keyed_limits() {
    let sem = KeyedSemaphore::new(8, 8);
    let limiter = RateLimited::new(&sem, per_second(10));
    let start = Instant::now();
    let items: Vec<(char, u32)> = (0..3).flat_map(|n| [('a', n), ('b', n)]).collect();
    let (outcomes, _) = KeyedBacklog::new(
        &limiter,
        items,
        |item: &(char, u32)| item.0,
        |_| async { Ok::<_, ()>(()) },
    )
    .collect()
    .await;

    assert_eq!(outcomes.len(), 6);
    // One rate for both keys: six starts take 500 ms.
    assert_eq!(start.elapsed(), millis(500));
}

#[test]
fn rate_rejects_zero_period() {
    assert!(Rate::new(NonZeroU32::MIN, Duration::ZERO).is_none());
    let per_minute = Rate::per_minute(NonZeroU32::new(30).unwrap());
    assert_eq!(per_minute.interval(), Duration::from_secs(2));
    let per_hour = Rate::per_hour(NonZeroU32::new(3600).unwrap());
    assert_eq!(per_hour.interval(), Duration::from_secs(1));
}
