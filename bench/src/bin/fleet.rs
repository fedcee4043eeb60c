//! The fleet workload: many tasks in several processes take permits from
//! one limit, either shared through Redis or held in one process.
//!
//! ```text
//! fleet-bench setup  <url> <namespace> <global-limit> <lease-ms>
//! fleet-bench redis  <url> <namespace> <tasks> <units> <hold-us>
//! fleet-bench local  <limit> <tasks> <units> <hold-us>
//! ```
//!
//! `setup` stores the limit and waits until the first grant goes through.
//! `redis` and `local` print one JSON line: units, seconds, and the maximum
//! number of permits held at once, counted beside the limiter. `bench/fleet.py`
//! runs them and writes the table.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deferred_semaphore::{DeferredSemaphore, Limiter};
use deferred_semaphore_redis::{LimitChange, Options, RedisLimiter};

const USAGE: &str = "usage:
  fleet-bench setup <url> <namespace> <global-limit> <lease-ms>
  fleet-bench redis <url> <namespace> <tasks> <units> <hold-us>
  fleet-bench local <limit> <tasks> <units> <hold-us>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["setup", url, namespace, limit, lease] => {
            runtime.block_on(setup(url, namespace, number(limit), number(lease)))
        }
        ["redis", url, namespace, tasks, units, hold] => runtime.block_on(async {
            let limiter = RedisLimiter::connect(url, namespace, Options::default())
                .await
                .map_err(|error| error.to_string())?;
            drive(limiter, number(tasks), number(units), number(hold)).await;
            Ok(())
        }),
        ["local", limit, tasks, units, hold] => {
            let limiter = DeferredSemaphore::new(usize::try_from(number(limit)).unwrap_or(1));
            runtime.block_on(drive(limiter, number(tasks), number(units), number(hold)));
            Ok(())
        }
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("fleet-bench: {message}");
            ExitCode::from(2)
        }
    }
}

fn number(text: &str) -> u64 {
    text.parse()
        .unwrap_or_else(|_| panic!("expected a whole number, got '{text}'\n{USAGE}"))
}

async fn setup(url: &str, namespace: &str, limit: u64, lease_ms: u64) -> Result<(), String> {
    let limiter = RedisLimiter::connect(url, namespace, Options::default())
        .await
        .map_err(|error| error.to_string())?;
    for change in [
        LimitChange::Lease(Duration::from_millis(lease_ms)),
        LimitChange::Global(limit),
    ] {
        limiter
            .set_limit(change)
            .await
            .map_err(|error| error.to_string())?;
    }
    // A new namespace grants nothing for one lease time, so wait it out
    // here and keep it out of the timed runs.
    let permit = limiter
        .acquire_global()
        .await
        .map_err(|error| error.to_string())?;
    permit.release().await.map_err(|error| error.to_string())
}

/// Runs `units` acquire, hold, release cycles shared by `tasks` tasks and
/// prints the result.
async fn drive<L>(limiter: L, tasks: u64, units: u64, hold_us: u64)
where
    L: Limiter + Clone + Send + 'static,
    L::Acquire: Send,
    L::Permit: Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let held = Arc::new(AtomicUsize::new(0));
    let max_held = Arc::new(AtomicUsize::new(0));
    let hold = Duration::from_micros(hold_us);
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (limiter, next, held, max_held) = (
            limiter.clone(),
            next.clone(),
            held.clone(),
            max_held.clone(),
        );
        set.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < units {
                let permit = limiter.acquire().await.expect("a permit");
                let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                max_held.fetch_max(now, Ordering::SeqCst);
                if hold.is_zero() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(hold).await;
                }
                held.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
            }
        });
    }
    while let Some(joined) = set.join_next().await {
        joined.expect("a bench task panicked");
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{{\"units\":{units},\"seconds\":{seconds:.6},\"max_held\":{}}}",
        max_held.load(Ordering::SeqCst)
    );
}
