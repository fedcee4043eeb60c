//! W3 to W6: a backlog of items run under a limit by `Backlog` and by the
//! usual alternatives.

use std::convert::Infallible;
use std::future::{ready, Future};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deferred_semaphore::{Backlog, DeferredSemaphore};
use futures::{stream, StreamExt};
use tokio::task::{yield_now, JoinSet};

/// The limit of W3, W4 and W6.
const LIMIT: usize = 64;
/// The limit of W5.
const SLEEPERS_LIMIT: usize = 100;
/// How long each W5 item sleeps.
const SLEEP: Duration = Duration::from_millis(10);
/// Sequential sleeps that make up the timer floor of W5.
const FLOOR_SLEEPS: u32 = 100;
/// How long the W6 consumer sleeps per outcome.
const CONSUMER_SLEEP: Duration = Duration::from_millis(1);
/// The maximum time a W6 item may take from its start to its finish.
const DEADLINE: Duration = Duration::from_millis(50);

/// The way a backlog is run under a limit.
#[derive(Debug, Clone, Copy)]
pub enum Flow {
    /// `Backlog` with a `DeferredSemaphore`: `in_input_order().collect()` for
    /// W3, `for_each` otherwise.
    Backlog,
    /// `StreamExt::buffered`.
    Buffered,
    /// `StreamExt::buffer_unordered`.
    BufferUnordered,
    /// `StreamExt::for_each_concurrent`, with the consumer inside each item.
    ForEachConcurrent,
    /// A task per item, spawned once an owned tokio permit is held, with
    /// finished tasks drained from a `JoinSet`.
    SpawnJoinSet,
}

impl FromStr for Flow {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "backlog" => Ok(Flow::Backlog),
            "buffered" => Ok(Flow::Buffered),
            "buffer-unordered" => Ok(Flow::BufferUnordered),
            "for-each-concurrent" => Ok(Flow::ForEachConcurrent),
            "spawn-joinset" => Ok(Flow::SpawnJoinSet),
            _ => Err(format!("unknown implementation {name:?} for W3 to W6")),
        }
    }
}

/// The work of W3, W4 and W6: yields to the runtime once and returns its input.
async fn yield_once(item: u64) -> u64 {
    yield_now().await;
    item
}

/// A consumer of outcomes. It is shared by reference so that
/// `for_each_concurrent`, which runs the consumer inside each item, can use it
/// too.
trait Sink: Send + Sync + 'static {
    fn take(&self, index: u64, value: u64) -> impl Future<Output = ()> + Send + '_;
}

/// W3's sink: every outcome in its input slot.
struct Slots(Vec<AtomicU64>);

impl Sink for Slots {
    fn take(&self, index: u64, value: u64) -> impl Future<Output = ()> + Send + '_ {
        self.0[index as usize].store(value, Ordering::Relaxed);
        ready(())
    }
}

/// W4's and W5's sink: a count and a sum, checked at the end so that no
/// outcome is lost.
#[derive(Default)]
struct Tally {
    count: AtomicU64,
    sum: AtomicU64,
}

impl Sink for Tally {
    fn take(&self, _index: u64, value: u64) -> impl Future<Output = ()> + Send + '_ {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
        ready(())
    }
}

impl Tally {
    fn check(&self, items: u64) {
        assert_eq!(self.count.load(Ordering::Relaxed), items, "outcomes lost");
        let expected = items * (items - 1) / 2;
        assert_eq!(self.sum.load(Ordering::Relaxed), expected, "wrong outcomes");
    }
}

/// W6's sink: a consumer that sleeps on every outcome.
#[derive(Default)]
struct SlowConsumer {
    count: AtomicU64,
}

impl Sink for SlowConsumer {
    async fn take(&self, _index: u64, _value: u64) {
        tokio::time::sleep(CONSUMER_SLEEP).await;
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `work` over `0..items` with at most `limit` at once the way `flow`
/// does it, and hands every outcome to `sink`.
async fn drive<W, Fut, S>(flow: Flow, items: u64, limit: usize, work: W, sink: &S)
where
    W: Fn(u64) -> Fut + Send + 'static,
    Fut: Future<Output = u64> + Send + 'static,
    S: Sink,
{
    match flow {
        Flow::Backlog => {
            let sem = DeferredSemaphore::new(limit);
            let work = |item| {
                let running = work(item);
                async move { Ok::<_, Infallible>(running.await) }
            };
            let report = Backlog::new(sem, 0..items, work)
                .for_each(|outcome| match outcome.result {
                    Ok(value) => sink.take(outcome.index, value),
                    Err(never) => match never {},
                })
                .await;
            assert_eq!(report.succeeded, items, "outcomes lost");
        }
        Flow::Buffered => {
            stream::iter(0..items)
                .map(|item| {
                    let running = work(item);
                    async move { (item, running.await) }
                })
                .buffered(limit)
                .for_each(|(index, value)| sink.take(index, value))
                .await;
        }
        Flow::BufferUnordered => {
            stream::iter(0..items)
                .map(|item| {
                    let running = work(item);
                    async move { (item, running.await) }
                })
                .buffer_unordered(limit)
                .for_each(|(index, value)| sink.take(index, value))
                .await;
        }
        Flow::ForEachConcurrent => {
            stream::iter(0..items)
                .for_each_concurrent(limit, |item| {
                    let running = work(item);
                    async move { sink.take(item, running.await).await }
                })
                .await;
        }
        Flow::SpawnJoinSet => {
            let sem = Arc::new(tokio::sync::Semaphore::new(limit));
            let mut tasks = JoinSet::new();
            for item in 0..items {
                let permit = Arc::clone(&sem).acquire_owned().await;
                let permit = permit.expect("the semaphore is never closed");
                let running = work(item);
                tasks.spawn(async move {
                    let value = running.await;
                    drop(permit);
                    (item, value)
                });
                while let Some(finished) = tasks.try_join_next() {
                    let (index, value) = finished.expect("an item's task panicked");
                    sink.take(index, value).await;
                }
            }
            while let Some(finished) = tasks.join_next().await {
                let (index, value) = finished.expect("an item's task panicked");
                sink.take(index, value).await;
            }
        }
    }
}

/// W3: runs `items` items that yield once, limit 64, and keeps every outcome
/// in input order. `Backlog` collects with `in_input_order().collect()`; the
/// others write each outcome to its input slot.
pub async fn ordered(flow: Flow, items: u64) {
    if let Flow::Backlog = flow {
        let sem = DeferredSemaphore::new(LIMIT);
        let work = |item| async move { Ok::<_, Infallible>(yield_once(item).await) };
        let (outcomes, _report) = Backlog::new(sem, 0..items, work)
            .in_input_order()
            .collect()
            .await;
        assert_eq!(outcomes.len() as u64, items, "outcomes lost");
        for (position, outcome) in outcomes.iter().enumerate() {
            assert_eq!(outcome.index, position as u64, "outcome out of order");
            assert_eq!(outcome.result, Ok(position as u64), "wrong outcome");
        }
        return;
    }
    let slots = Slots((0..items).map(|_| AtomicU64::new(u64::MAX)).collect());
    drive(flow, items, LIMIT, yield_once, &slots).await;
    for (position, slot) in slots.0.iter().enumerate() {
        assert_eq!(
            slot.load(Ordering::Relaxed),
            position as u64,
            "wrong outcome"
        );
    }
}

/// W4: runs `items` items that yield once, limit 64, and discards the
/// outcomes after counting them.
pub async fn discarded(flow: Flow, items: u64) {
    let tally = Tally::default();
    drive(flow, items, LIMIT, yield_once, &tally).await;
    tally.check(items);
}

/// Returns the seconds that `FLOOR_SLEEPS` sequential sleeps of `SLEEP`
/// take on this runtime, which is the minimum time W5 can take at 100 items
/// per wave.
pub async fn timer_floor() -> f64 {
    let start = Instant::now();
    for _ in 0..FLOOR_SLEEPS {
        tokio::time::sleep(SLEEP).await;
    }
    start.elapsed().as_secs_f64()
}

/// W5: runs `items` items that sleep 10 ms each, limit 100.
pub async fn sleepers(flow: Flow, items: u64) {
    let tally = Tally::default();
    let work = |item| async move {
        tokio::time::sleep(SLEEP).await;
        item
    };
    drive(flow, items, SLEEPERS_LIMIT, work, &tally).await;
    tally.check(items);
}

/// W6: runs `items` items that yield once, limit 64, under a consumer that
/// sleeps 1 ms per outcome. Returns how many items took longer than 50 ms
/// from the call that created their work to their finish.
pub async fn deadlines(flow: Flow, items: u64) -> u64 {
    // One process runs one case, so a static counter is not shared between
    // cases, and the work needs no handle to it.
    static MISSES: AtomicU64 = AtomicU64::new(0);
    let work = |item| {
        let start = Instant::now();
        async move {
            yield_now().await;
            if start.elapsed() > DEADLINE {
                MISSES.fetch_add(1, Ordering::Relaxed);
            }
            item
        }
    };
    let consumer = SlowConsumer::default();
    drive(flow, items, LIMIT, work, &consumer).await;
    assert_eq!(
        consumer.count.load(Ordering::Relaxed),
        items,
        "outcomes lost"
    );
    MISSES.load(Ordering::Relaxed)
}
