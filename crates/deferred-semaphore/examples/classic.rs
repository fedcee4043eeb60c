//! The classic Twisted example with the limit at work: six units, at most two
//! at once, each waiting 100 ms and returning its input squared.
//!
//! Run it with `cargo run -p deferred-semaphore --example classic`. It prints
//! when each unit starts and ends, so the three waves of two are visible, then
//! the outcomes in input order.

use std::time::{Duration, Instant};

use deferred_semaphore::{Backlog, DeferredSemaphore};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let sem = DeferredSemaphore::new(2);
    let started = Instant::now();
    let square = |n: u64| async move {
        println!("{:>4} ms  start {n}", started.elapsed().as_millis());
        tokio::time::sleep(Duration::from_millis(100)).await;
        println!("{:>4} ms  end   {n}", started.elapsed().as_millis());
        Ok::<u64, String>(n * n)
    };

    let (outcomes, report) = Backlog::new(&sem, 1..=6, square)
        .in_input_order()
        .collect()
        .await;

    let results: Vec<_> = outcomes.into_iter().map(|outcome| outcome.result).collect();
    println!("{results:?}");
    println!(
        "{} ok, {} failed, at most {} ran at once",
        report.succeeded, report.failed, report.max_running
    );
}
