//! Backlog processing: lazy pulls, bounded memory, slow consumers, ordering
//! and the failure policy.

use std::cell::{Cell, RefCell};
use std::num::{NonZeroU64, NonZeroUsize};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deferred_semaphore::{
    AcquireError, AcquireOwned, Backlog, DeferredSemaphore, FailurePolicy, Limiter, OwnedPermit,
    StopReason, Threshold,
};
use futures::{future, StreamExt};
use tokio::time::Instant;

fn failures(n: u64) -> Threshold {
    Threshold::Failures(NonZeroU64::new(n).unwrap())
}

/// Sets a flag when dropped, to prove that cancelled work was dropped.
struct DropFlag(Arc<AtomicUsize>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn backlog_pulls_items_only_when_a_permit_is_free() {
    let sem = DeferredSemaphore::new(4);
    let pulled = Cell::new(0u64);
    let consumed = Cell::new(0u64);
    let max_ahead = Cell::new(0u64);
    let items = (0..1_000u64).inspect(|_| pulled.set(pulled.get() + 1));

    let report = Backlog::new(&sem, items, |n| async move {
        tokio::time::sleep(Duration::from_millis(1 + n % 7)).await;
        Ok::<_, ()>(n)
    })
    .for_each(|_| {
        consumed.set(consumed.get() + 1);
        max_ahead.set(max_ahead.get().max(pulled.get() - consumed.get()));
        async {}
    })
    .await;

    assert_eq!(report.succeeded, 1_000);
    // At most the limit runs, plus at most the limit waits for the consumer.
    assert!(
        max_ahead.get() <= 8,
        "{} items pulled ahead",
        max_ahead.get()
    );
    assert_eq!(report.max_running, 4);
    assert_eq!(sem.tokens(), 4);
}

#[tokio::test(start_paused = true)]
async fn backlog_handles_an_endless_source() {
    let sem = DeferredSemaphore::new(3);
    let report = Backlog::new(&sem, 0u64.., |n| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if n >= 500 {
            Err(n)
        } else {
            Ok(n)
        }
    })
    .on_failure(FailurePolicy::StopSoon(failures(1)))
    .for_each(|_| async {})
    .await;

    assert!(matches!(report.stopped, Some(StopReason::Failures)));
    assert!(report.succeeded >= 500);
    assert!(report.started <= 503, "started {}", report.started);
    assert_eq!(sem.tokens(), 3);
}

/// Each unit must finish within 50 ms of starting while the consumer sleeps
/// 1 ms per outcome; work in flight has to keep running while the consumer is
/// busy for that to hold.
#[tokio::test(start_paused = true)]
async fn backlog_keeps_work_running_while_the_consumer_sleeps() {
    let sem = DeferredSemaphore::new(64);
    let missed = Cell::new(0u32);
    let work = |n: u64| async move {
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(5 + n % 10)).await;
        Ok::<_, ()>(started.elapsed())
    };

    let report = Backlog::new(&sem, 0..2_000u64, work)
        .for_each(|outcome| {
            if outcome.result.unwrap() > Duration::from_millis(50) {
                missed.set(missed.get() + 1);
            }
            tokio::time::sleep(Duration::from_millis(1))
        })
        .await;

    assert_eq!(report.succeeded, 2_000);
    assert_eq!(missed.get(), 0);
}

/// The same workload through `buffer_unordered` misses deadlines, which shows
/// that the test above can fail.
#[tokio::test(start_paused = true)]
async fn buffer_unordered_misses_deadlines_under_a_sleeping_consumer() {
    let mut missed = 0;
    let work = |n: u64| async move {
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(5 + n % 10)).await;
        started.elapsed()
    };
    let mut outcomes = futures::stream::iter(0..2_000u64)
        .map(work)
        .buffer_unordered(64);
    while let Some(elapsed) = outcomes.next().await {
        missed += u32::from(elapsed > Duration::from_millis(50));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(missed > 0);
}

#[tokio::test(start_paused = true)]
async fn backlog_in_input_order_reorders_outcomes() {
    let sem = DeferredSemaphore::new(5);
    let (outcomes, _) = Backlog::new(&sem, 0..200u64, |n| async move {
        tokio::time::sleep(Duration::from_millis(50 - n % 50)).await;
        Ok::<_, ()>(n * 2)
    })
    .in_input_order()
    .collect()
    .await;

    let indices: Vec<u64> = outcomes.iter().map(|o| o.index).collect();
    assert_eq!(indices, (0..200).collect::<Vec<_>>());
    assert!(outcomes.iter().all(|o| o.result == Ok(o.index * 2)));
}

#[tokio::test(start_paused = true)]
async fn backlog_completion_order_follows_finish_times() {
    let sem = DeferredSemaphore::new(3);
    let (outcomes, _) = Backlog::new(&sem, [30u64, 10, 20], |ms| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, ()>(ms)
    })
    .collect()
    .await;

    let order: Vec<u64> = outcomes.iter().map(|o| o.index).collect();
    assert_eq!(order, [1, 2, 0]);
}

#[tokio::test(start_paused = true)]
async fn stop_soon_lets_running_work_finish() {
    let sem = DeferredSemaphore::new(4);
    let report = Backlog::new(&sem, 0..100u64, |n| async move {
        tokio::time::sleep(Duration::from_millis(10 + n)).await;
        if n == 0 {
            Err("first item failed")
        } else {
            Ok(n)
        }
    })
    .on_failure(FailurePolicy::StopSoon(failures(1)))
    .for_each(|_| async {})
    .await;

    // Items 0 to 3 start at once; item 0 fails first, the other three finish.
    assert_eq!(report.started, 4);
    assert_eq!(report.failed, 1);
    assert_eq!(report.succeeded, 3);
    assert!(report.cancelled.is_empty());
    assert_eq!(sem.tokens(), 4);
}

#[tokio::test(start_paused = true)]
async fn stop_now_drops_running_work_and_reports_it() {
    let sem = DeferredSemaphore::new(4);
    let dropped = Arc::new(AtomicUsize::new(0));
    let report = Backlog::new(&sem, 0..100u64, |n| {
        let flag = DropFlag(Arc::clone(&dropped));
        async move {
            let _flag = flag;
            tokio::time::sleep(Duration::from_millis(10 + 100 * n)).await;
            if n == 0 {
                Err("first item failed")
            } else {
                Ok(n)
            }
        }
    })
    .on_failure(FailurePolicy::StopNow(failures(1)))
    .for_each(|_| async {})
    .await;

    assert_eq!(report.started, 4);
    assert_eq!(report.failed, 1);
    assert_eq!(report.cancelled, [1, 2, 3]);
    assert_eq!(dropped.load(Ordering::SeqCst), 4);
    assert_eq!(sem.tokens(), 4);
}

#[tokio::test(start_paused = true)]
async fn stop_now_in_input_order_skips_cancelled_items() {
    let sem = DeferredSemaphore::new(3);
    let (outcomes, report) = Backlog::new(&sem, 0..10u64, |n| async move {
        tokio::time::sleep(Duration::from_millis(if n == 1 { 5 } else { 50 })).await;
        if n == 1 {
            Err(n)
        } else {
            Ok(n)
        }
    })
    .in_input_order()
    .on_failure(FailurePolicy::StopNow(failures(1)))
    .collect()
    .await;

    let indices: Vec<u64> = outcomes.iter().map(|o| o.index).collect();
    assert_eq!(indices, [1]);
    assert_eq!(report.cancelled, [0, 2]);
}

#[tokio::test(start_paused = true)]
async fn percent_threshold_waits_for_enough_items() {
    let sem = DeferredSemaphore::new(1);
    let threshold = Threshold::Percent {
        percent: 50.0,
        min_finished: 10,
    };
    // Every other item fails: the share reaches 50% at once, but only counts
    // from the tenth finished item on.
    let report = Backlog::new(&sem, 0..100u64, |n| async move {
        if n % 2 == 0 {
            Err(n)
        } else {
            Ok(n)
        }
    })
    .on_failure(FailurePolicy::StopSoon(threshold))
    .for_each(|_| async {})
    .await;

    assert_eq!(report.started, 10);
    assert_eq!(report.failed, 5);
}

#[tokio::test(start_paused = true)]
async fn closed_limiter_stops_the_backlog() {
    let sem = DeferredSemaphore::new(2);
    let started = Rc::new(Cell::new(0u32));
    let report = Backlog::new(&sem, 0..100u64, |n| {
        started.set(started.get() + 1);
        let sem = sem.clone();
        async move {
            if n == 5 {
                sem.close();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok::<_, ()>(n)
        }
    })
    .for_each(|_| async {})
    .await;

    assert!(matches!(report.stopped, Some(StopReason::Limiter(_))));
    assert!(started.get() <= 8, "started {}", started.get());
    assert_eq!(report.succeeded, u64::from(started.get()));
}

#[tokio::test]
async fn stream_source_waits_for_items_without_losing_any() {
    let sem = DeferredSemaphore::new(2);
    let (sender, receiver) = futures::channel::mpsc::unbounded::<u64>();
    let feeder = async move {
        for n in 0..20 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            sender.unbounded_send(n).unwrap();
        }
    };
    let backlog = Backlog::from_stream(&sem, receiver, |n| async move { Ok::<_, ()>(n) })
        .in_input_order()
        .collect();

    let ((outcomes, report), ()) = future::join(backlog, feeder).await;

    assert_eq!(report.succeeded, 20);
    assert!(outcomes
        .iter()
        .enumerate()
        .all(|(i, o)| o.index == i as u64));
    assert_eq!(sem.tokens(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_on_two_workers_stays_under_the_limit() {
    let sem = DeferredSemaphore::new(8);
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let work = |n: u64| {
        let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
        async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            tokio::task::yield_now().await;
            running.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, ()>(n)
        }
    };
    let report = Backlog::new(&sem, 0..20_000u64, work)
        .for_each(|_| async {})
        .await;

    assert_eq!(report.succeeded, 20_000);
    assert!(peak.load(Ordering::SeqCst) <= 8);
    assert_eq!(sem.tokens(), 8);
}

#[tokio::test(start_paused = true)]
async fn backlog_never_overtakes_a_queued_waiter() {
    let sem = DeferredSemaphore::new(1);
    let events = RefCell::new(Vec::new());
    let backlog = Backlog::new(&sem, 0..2u32, |n| {
        events.borrow_mut().push(format!("item {n} starts"));
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<_, ()>(n)
        }
    })
    // A buffer of one keeps the backlog from queueing for its next permit
    // while item 0 runs, so the waiter below is first in the queue.
    .buffer(NonZeroUsize::MIN)
    .for_each(|_| async {});
    let waiter = async {
        // Item 0 holds the only token by now, so this acquire queues.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let permit = sem.acquire().await.unwrap();
        events.borrow_mut().push("waiter acquires".to_string());
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(permit);
    };

    let (report, ()) = future::join(backlog, waiter).await;

    assert_eq!(report.succeeded, 2);
    let events = events.into_inner();
    assert_eq!(
        events,
        ["item 0 starts", "waiter acquires", "item 1 starts"]
    );
}

/// A limiter that only implements the required methods, so backlog
/// processing gets every permit through `acquire`.
struct AcquireOnly(DeferredSemaphore);

impl Limiter for AcquireOnly {
    type Permit = OwnedPermit;
    type Error = AcquireError;
    type Acquire = AcquireOwned;

    fn acquire(&self) -> AcquireOwned {
        self.0.acquire_owned()
    }

    fn limit(&self) -> usize {
        self.0.limit()
    }
}

#[tokio::test]
async fn backlog_works_without_try_acquire() {
    let sem = DeferredSemaphore::new(3);
    let limiter = AcquireOnly(sem.clone());
    let work = |n: u64| async move {
        tokio::task::yield_now().await;
        Ok::<_, ()>(n)
    };

    let (outcomes, report) = Backlog::new(limiter, 0..1_000u64, work)
        .in_input_order()
        .collect()
        .await;

    assert_eq!(report.succeeded, 1_000);
    assert!(
        report.max_running <= 3,
        "max_running {}",
        report.max_running
    );
    assert!(outcomes
        .iter()
        .enumerate()
        .all(|(i, o)| o.index == i as u64));
    assert_eq!(sem.tokens(), 3);
}

#[tokio::test(start_paused = true)]
async fn backlog_follows_a_shrunk_limit() {
    let sem = DeferredSemaphore::new(4);
    let running = Cell::new(0usize);
    let shrunk = Cell::new(false);
    let peak_after_shrink = Cell::new(0usize);
    let backlog = Backlog::new(&sem, 0..20u32, |n| {
        running.set(running.get() + 1);
        if shrunk.get() {
            peak_after_shrink.set(peak_after_shrink.get().max(running.get()));
        }
        let running = &running;
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            running.set(running.get() - 1);
            Ok::<_, ()>(n)
        }
    })
    // A buffer wider than the limit leaves room to start items, so only the
    // shrink holds them back.
    .buffer(NonZeroUsize::new(64).unwrap())
    .for_each(|_| async {});
    let shrink = async {
        tokio::time::sleep(Duration::from_millis(25)).await;
        sem.set_limit(1).unwrap();
        shrunk.set(true);
    };

    let (report, ()) = future::join(backlog, shrink).await;

    assert_eq!(report.succeeded, 20);
    assert_eq!(peak_after_shrink.get(), 1);
    assert_eq!(sem.tokens(), 1);
}

#[tokio::test(start_paused = true)]
async fn backlog_passes_no_permit_past_a_waiter() {
    let sem = DeferredSemaphore::new(1);
    let holder = sem.try_acquire().unwrap();
    let events = RefCell::new(Vec::new());
    let backlog = Backlog::new(&sem, 0..2u32, |n| {
        events.borrow_mut().push(format!("item {n} starts"));
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<_, ()>(n)
        }
    })
    .for_each(|_| async {});
    let others = async {
        // The backlog queues first; the waiter queues second; then the
        // holder lets the backlog start item 0, and the backlog queues again
        // behind the waiter.
        tokio::task::yield_now().await;
        let waiting = sem.acquire();
        let release = async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            drop(holder);
        };
        let (permit, ()) = future::join(waiting, release).await;
        events.borrow_mut().push("waiter acquires".to_string());
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(permit);
    };

    let (report, ()) = future::join(backlog, others).await;

    assert_eq!(report.succeeded, 2);
    let events = events.into_inner();
    assert_eq!(
        events,
        ["item 0 starts", "waiter acquires", "item 1 starts"]
    );
}

#[tokio::test(start_paused = true)]
async fn with_permits_lets_others_run_while_one_waits() {
    let sem = DeferredSemaphore::new(1);
    let start = Instant::now();
    let items = futures::stream::iter(0..2u64);
    let work = |n: u64, permit: deferred_semaphore::OwnedPermit| {
        let sem = &sem;
        async move {
            if n == 0 {
                // Wait without the permit, then queue for a new one.
                drop(permit);
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _again = sem.acquire_owned().await.map_err(|_| n)?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            } else {
                let _held = permit;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, u64>(start.elapsed())
        }
    };
    let (outcomes, report) = Backlog::from_stream_with_permits(&sem, items, work)
        .collect()
        .await;

    assert_eq!(report.succeeded, 2);
    let order: Vec<u64> = outcomes.iter().map(|o| o.index).collect();
    assert_eq!(order, [1, 0]);
    // Item 1 ran while item 0 waited, so it ended after 10 ms, not 110 ms.
    assert_eq!(outcomes[0].result, Ok(Duration::from_millis(10)));
    assert_eq!(outcomes[1].result, Ok(Duration::from_millis(110)));
    assert_eq!(sem.tokens(), 1);
}

#[tokio::test(start_paused = true)]
async fn with_permits_held_permit_keeps_the_limit() {
    let sem = DeferredSemaphore::new(2);
    let running = Cell::new(0usize);
    let max_running = Cell::new(0usize);
    let items = futures::stream::iter(0..6u64);
    let work = |n: u64, permit| {
        let (running, max_running) = (&running, &max_running);
        async move {
            let _held = permit;
            running.set(running.get() + 1);
            max_running.set(max_running.get().max(running.get()));
            tokio::time::sleep(Duration::from_millis(10)).await;
            running.set(running.get() - 1);
            Ok::<_, ()>(n)
        }
    };
    let start = Instant::now();
    let report = Backlog::from_stream_with_permits(&sem, items, work)
        .for_each(|_| async {})
        .await;

    assert_eq!(report.succeeded, 6);
    assert_eq!(max_running.get(), 2);
    assert_eq!(start.elapsed(), Duration::from_millis(30));
    assert_eq!(sem.tokens(), 2);
}

#[tokio::test(start_paused = true)]
async fn with_permits_buffer_bounds_items_in_flight() {
    let sem = DeferredSemaphore::new(2);
    let in_flight = Cell::new(0usize);
    let max_in_flight = Cell::new(0usize);
    let items = futures::stream::iter(0..20u64);
    // Every item gives its permit back at once, so only the buffer (twice
    // the limit) bounds how many are in flight.
    let work = |n: u64, permit| {
        let (in_flight, max_in_flight) = (&in_flight, &max_in_flight);
        drop::<deferred_semaphore::OwnedPermit>(permit);
        in_flight.set(in_flight.get() + 1);
        max_in_flight.set(max_in_flight.get().max(in_flight.get()));
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            in_flight.set(in_flight.get() - 1);
            Ok::<_, ()>(n)
        }
    };
    let report = Backlog::from_stream_with_permits(&sem, items, work)
        .for_each(|_| async {})
        .await;

    assert_eq!(report.succeeded, 20);
    assert_eq!(max_in_flight.get(), 4);
    assert_eq!(sem.tokens(), 2);
}

#[test]
fn percent_threshold_rejects_invalid_percent() {
    let sem = DeferredSemaphore::new(1);
    for percent in [0.0, -5.0, 100.5, f64::NAN] {
        let threshold = Threshold::Percent {
            percent,
            min_finished: 1,
        };
        let result = std::panic::catch_unwind(|| {
            let _ = Backlog::new(&sem, 0..1u64, |n| async move { Ok::<_, ()>(n) })
                .on_failure(FailurePolicy::StopSoon(threshold));
        });
        assert!(result.is_err(), "percent {percent} was accepted");
    }
}

#[tokio::test(start_paused = true)]
async fn percent_threshold_needs_one_failure() {
    let sem = DeferredSemaphore::new(1);
    let threshold = Threshold::Percent {
        percent: f64::MIN_POSITIVE,
        min_finished: 1,
    };
    let report = Backlog::new(&sem, 0..20u64, |n| async move { Ok::<_, ()>(n) })
        .on_failure(FailurePolicy::StopSoon(threshold))
        .for_each(|_| async {})
        .await;

    assert!(report.stopped.is_none());
    assert_eq!(report.succeeded, 20);
}

/// A limiter that reports the largest possible limit and grants every
/// acquire at once.
struct Unbounded;

impl deferred_semaphore::Limiter for Unbounded {
    type Permit = ();
    type Error = std::convert::Infallible;
    type Acquire = future::Ready<Result<(), std::convert::Infallible>>;

    fn acquire(&self) -> Self::Acquire {
        future::ready(Ok(()))
    }

    fn limit(&self) -> usize {
        usize::MAX
    }
}

#[tokio::test(start_paused = true)]
async fn backlog_accepts_the_largest_limit() {
    let report = Backlog::new(Unbounded, 0..100u64, |n| async move { Ok::<_, ()>(n) })
        .for_each(|_| async {})
        .await;

    assert_eq!(report.succeeded, 100);
}
