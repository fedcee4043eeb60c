//! The classic Twisted example, with work that really waits so that the limit
//! is exercised: limit 2, items 1 to 6, each waits 100 ms and returns its
//! input squared.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deferred_semaphore::{Backlog, DeferredSemaphore};
use tokio::time::Instant;

/// Counts running units independently of the semaphore.
#[derive(Default)]
struct Observer {
    running: AtomicUsize,
    max_running: AtomicUsize,
    starts: Mutex<Vec<(u64, Duration)>>,
}

impl Observer {
    fn start(&self, n: u64, at: Duration) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        self.starts.lock().unwrap().push((n, at));
    }

    fn end(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn classic_runs_in_three_waves_of_two() {
    let sem = DeferredSemaphore::new(2);
    let observer = Arc::new(Observer::default());
    let begin = Instant::now();
    let work = |n: u64| {
        let observer = Arc::clone(&observer);
        async move {
            observer.start(n, begin.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
            observer.end();
            Ok::<u64, String>(n * n)
        }
    };

    let (outcomes, report) = Backlog::new(&sem, 1..=6, work)
        .in_input_order()
        .collect()
        .await;

    let results: Vec<_> = outcomes.into_iter().map(|o| o.result).collect();
    assert_eq!(results, [Ok(1), Ok(4), Ok(9), Ok(16), Ok(25), Ok(36)]);
    assert_eq!(observer.max_running.load(Ordering::SeqCst), 2);
    assert_eq!(report.max_running, 2);
    assert_eq!(report.succeeded, 6);

    // Each wave of two starts when the previous one ends, 100 ms apart.
    let starts = observer.starts.lock().unwrap().clone();
    let waves: Vec<u128> = starts.iter().map(|(_, at)| at.as_millis() / 100).collect();
    assert_eq!(waves, [0, 0, 1, 1, 2, 2]);
    assert_eq!(begin.elapsed(), Duration::from_millis(300));
    assert_eq!(sem.tokens(), 2);
}

#[tokio::test]
async fn classic_with_run_on_the_real_clock() {
    let sem = DeferredSemaphore::new(2);
    let observer = Observer::default();
    let begin = Instant::now();
    let units = (1..=6u64).map(|n| {
        let (sem, observer) = (&sem, &observer);
        sem.run(move || async move {
            observer.start(n, begin.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
            observer.end();
            Ok::<u64, String>(n * n)
        })
    });

    let outcomes: Vec<_> = futures::future::join_all(units).await;

    let results: Vec<_> = outcomes.into_iter().map(Result::unwrap).collect();
    assert_eq!(results, [Ok(1), Ok(4), Ok(9), Ok(16), Ok(25), Ok(36)]);
    assert_eq!(observer.max_running.load(Ordering::SeqCst), 2);
    assert!(begin.elapsed() >= Duration::from_millis(300));
    assert_eq!(sem.tokens(), 2);
}
