//! Tests of `KeyedBacklog` on tokio's paused clock: no head-of-line
//! blocking, round-robin across keys, the look-ahead bound and input order.
#![cfg(not(loom))]

use std::cell::{Cell, RefCell};
use std::num::{NonZeroU64, NonZeroUsize};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use deferred_semaphore::{FailurePolicy, KeyedBacklog, KeyedSemaphore, Threshold};
use futures::stream::Stream;
use tokio::time::Instant;

fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

#[tokio::test(start_paused = true)]
async fn slow_key_does_not_block_others() {
    // Five slow items of key `a` come first; a backlog that waited for the
    // head of the input would hold every `b` behind them.
    let items: Vec<(char, u64)> = (0..5)
        .map(|n| ('a', n))
        .chain((0..20).map(|n| ('b', n)))
        .collect();
    let sem = KeyedSemaphore::new(4, 1);
    let start = Instant::now();
    let work = |(key, _): (char, u64)| async move {
        let took = if key == 'a' { secs(10) } else { secs(1) };
        tokio::time::sleep(took).await;
        Ok::<_, ()>((key, start.elapsed()))
    };
    let (outcomes, report) = KeyedBacklog::new(&sem, items, |item: &(char, u64)| item.0, work)
        .collect()
        .await;

    assert_eq!(report.succeeded, 25);
    let finished = |key: char| -> Vec<Duration> {
        outcomes
            .iter()
            .map(|outcome| outcome.result.unwrap())
            .filter(|&(item_key, _)| item_key == key)
            .map(|(_, at)| at)
            .collect()
    };
    let b_last = finished('b').into_iter().max().unwrap();
    let a_times = finished('a');
    // `b` runs one at a time beside `a`, so its 20 items take 20 s.
    assert_eq!(b_last, secs(20), "items of `b` were held up");
    assert_eq!(a_times.iter().max().copied(), Some(secs(50)));
    assert_eq!(report.max_running, 2, "one per key, two keys");
    assert_eq!(sem.keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn keys_served_round_robin() {
    let items = ["a1", "a2", "a3", "b1", "b2", "c1"];
    let sem = KeyedSemaphore::new(1, 10);
    let started = RefCell::new(Vec::new());
    let work = |item: &'static str| {
        started.borrow_mut().push(item);
        async {
            tokio::time::sleep(secs(1)).await;
            Ok::<_, ()>(())
        }
    };
    let key = |item: &&str| item.as_bytes()[0];
    let (_, report) = KeyedBacklog::new(&sem, items, key, work)
        .lookahead(NonZeroUsize::new(6).unwrap())
        .collect()
        .await;

    assert_eq!(report.succeeded, 6);
    assert_eq!(*started.borrow(), ["a1", "b1", "c1", "a2", "b2", "a3"]);
}

/// A stream of `total` items that records, at each pull, how many items
/// were pulled and not yet started.
struct CountingSource {
    next: u64,
    total: u64,
    started: Rc<Cell<u64>>,
    max_ahead: Rc<Cell<u64>>,
}

impl Stream for CountingSource {
    type Item = u64;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<u64>> {
        if self.next == self.total {
            return Poll::Ready(None);
        }
        let item = self.next;
        self.next += 1;
        let ahead = self.next - self.started.get();
        self.max_ahead.set(self.max_ahead.get().max(ahead));
        Poll::Ready(Some(item))
    }
}

#[tokio::test(start_paused = true)]
async fn window_bounds_items_pulled_ahead() {
    let started = Rc::new(Cell::new(0));
    let max_ahead = Rc::new(Cell::new(0));
    let source = CountingSource {
        next: 0,
        total: 40,
        started: Rc::clone(&started),
        max_ahead: Rc::clone(&max_ahead),
    };
    // Every item has the same key, limited to one at a time, so the window
    // fills up and stays full.
    let sem = KeyedSemaphore::new(4, 1);
    let work = |n: u64| {
        started.set(started.get() + 1);
        async move {
            tokio::time::sleep(secs(1)).await;
            Ok::<_, ()>(n)
        }
    };
    let (outcomes, _) = KeyedBacklog::from_stream(&sem, source, |_: &u64| (), work)
        .lookahead(NonZeroUsize::new(5).unwrap())
        .collect()
        .await;

    assert_eq!(outcomes.len(), 40);
    assert_eq!(
        max_ahead.get(),
        5,
        "more items pulled than the window holds"
    );
}

#[tokio::test(start_paused = true)]
async fn input_order_keeps_indices() {
    let items: Vec<(char, u64)> = (0..12u64)
        .map(|n| (if n % 3 == 0 { 'a' } else { 'b' }, n))
        .collect();
    let sem = KeyedSemaphore::new(3, 1);
    let start = Instant::now();
    let work = |(key, n): (char, u64)| async move {
        let took = if key == 'a' { secs(5) } else { secs(1) };
        tokio::time::sleep(took).await;
        Ok::<_, ()>((n, start.elapsed()))
    };
    let (outcomes, _) = KeyedBacklog::new(&sem, items, |item: &(char, u64)| item.0, work)
        .in_input_order()
        .collect()
        .await;

    let indices: Vec<u64> = outcomes.iter().map(|outcome| outcome.index).collect();
    assert_eq!(indices, (0..12).collect::<Vec<_>>());
    for outcome in &outcomes {
        let (n, _) = outcome.result.unwrap();
        assert_eq!(n, outcome.index, "an outcome lost its item's position");
    }
    // The eight `b` items ran beside the slow `a` items, held back only by
    // the reorder span of 6 behind each slow head: the last `a` ends at
    // 20 s, and `b` items waiting for each `a` in turn would end after it.
    let b_last = outcomes
        .iter()
        .filter(|outcome| outcome.index % 3 != 0)
        .map(|outcome| outcome.result.unwrap().1)
        .max()
        .unwrap();
    assert!(b_last < secs(15), "the last `b` item ended at {b_last:?}");
}

#[tokio::test(start_paused = true)]
async fn stop_lists_items_never_started() {
    let sem = KeyedSemaphore::new(1, 1);
    let first = Threshold::Failures(NonZeroU64::MIN);
    let work = |n: u64| async move {
        tokio::time::sleep(secs(1)).await;
        Err::<(), _>(n)
    };
    let report = KeyedBacklog::new(&sem, 0..10u64, |n: &u64| n % 2, work)
        .lookahead(NonZeroUsize::new(3).unwrap())
        .on_failure(FailurePolicy::StopSoon(first))
        .for_each(|_| async {})
        .await;

    assert_eq!(report.started, 1);
    assert_eq!(report.failed, 1);
    assert_eq!(report.not_started, [1, 2, 3]);
    assert!(report.stopped.is_some());
    assert_eq!(sem.held(), 0);
    assert_eq!(sem.keys(), 0);
}
