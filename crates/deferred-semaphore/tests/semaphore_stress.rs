//! Randomized stress tests of the semaphore on a multi-thread runtime.
//!
//! Eight tasks on two worker threads each run a random mix of operations:
//! `acquire`, `acquire_many`, `try_acquire`, `run` and `run` that panics,
//! timeouts around acquires and around `run`, and acquires cancelled after a
//! few polls. In one test, `set_limit` calls also grow and shrink the limit.
//!
//! A counter kept apart from the semaphore tracks the tokens held by live
//! permits. It goes up just after a grant and down just before the permit is
//! dropped, so it never counts more than is really held. At every grant it
//! must stay within the largest limit that could have been in effect since
//! the acquire began. At the end every token must be back and no waiter left.
//!
//! `SEMAPHORE_STRESS_OPERATIONS` sets the number of operations of each
//! randomized test, split across the tasks. The default is small so that a
//! debug `cargo test` stays fast, and CI runs 1,000,000 in release mode.
//!
//! The seed is printed; set `SEMAPHORE_STRESS_SEED` to replay a seed's choices
//! (the thread interleaving still varies from run to run).
#![cfg(not(loom))]

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deferred_semaphore::{AcquireError, DeferredSemaphore, TryAcquireError};
use futures::FutureExt;

/// More tasks than tokens, so that waiters queue behind holders.
const TASKS: usize = 8;
const WORKER_THREADS: usize = 2;
/// Operations of each randomized test when `SEMAPHORE_STRESS_OPERATIONS` is
/// unset.
const DEFAULT_OPERATIONS: usize = 20_000;
const FIXED_LIMIT: usize = 4;
const MAX_RANDOM_LIMIT: usize = 6;
/// A test fails as hung once no operation has finished for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
const PANIC_MESSAGE: &str = "stress work panicked on purpose";

/// A xorshift64* generator, small and fast, which is enough to pick operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // xorshift never leaves the all-zero state, so avoid it.
        Rng(seed | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Returns a number in `0..bound`.
    fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }
}

/// Reads the seed from `SEMAPHORE_STRESS_SEED`, or derives one from the clock.
fn seed_for(test: &str) -> u64 {
    let seed = match std::env::var("SEMAPHORE_STRESS_SEED") {
        Ok(text) => text
            .parse()
            .expect("SEMAPHORE_STRESS_SEED must be an unsigned 64-bit integer"),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    println!("{test}: seed {seed} (replay with SEMAPHORE_STRESS_SEED={seed})");
    seed
}

/// Reads the number of operations from `SEMAPHORE_STRESS_OPERATIONS`, or
/// returns `DEFAULT_OPERATIONS`.
fn operations_for(test: &str) -> usize {
    let operations = match std::env::var("SEMAPHORE_STRESS_OPERATIONS") {
        Ok(text) => match text.parse::<usize>() {
            Ok(operations) if operations >= TASKS => operations,
            _ => panic!(
                "SEMAPHORE_STRESS_OPERATIONS must be an integer of at least {TASKS}, got {text:?}"
            ),
        },
        Err(_) => DEFAULT_OPERATIONS,
    };
    println!("{test}: {operations} operations across {TASKS} tasks");
    operations
}

/// Hides the panic message of the work that panics on purpose, and reports
/// every other panic as usual.
fn silence_expected_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
            if message != Some(PANIC_MESSAGE) {
                previous(info);
            }
        }));
    });
}

/// Every limit the semaphore has been given, in order.
///
/// Limit changes go through `set_limit` below, one at a time, so `history`
/// lists them in the order they took effect. `applied` counts the entries
/// whose `set_limit` call has returned.
struct LimitLog {
    changing: Mutex<()>,
    history: Mutex<Vec<usize>>,
    applied: AtomicUsize,
    grown: AtomicUsize,
    shrunk: AtomicUsize,
}

impl LimitLog {
    fn new(limit: usize) -> Self {
        LimitLog {
            changing: Mutex::new(()),
            history: Mutex::new(vec![limit]),
            applied: AtomicUsize::new(1),
            grown: AtomicUsize::new(0),
            shrunk: AtomicUsize::new(0),
        }
    }

    fn set_limit(&self, sem: &DeferredSemaphore, limit: usize) {
        let _one_at_a_time = self.changing.lock().unwrap();
        let (previous, entries) = {
            let mut history = self.history.lock().unwrap();
            let previous = *history.last().unwrap();
            history.push(limit);
            (previous, history.len())
        };
        // The history lock is not held here, so holders checking a grant
        // are not held up and can release their tokens during the change.
        sem.set_limit(limit).unwrap();
        self.applied.store(entries, Ordering::SeqCst);
        if limit > previous {
            self.grown.fetch_add(1, Ordering::Relaxed);
        } else if limit < previous {
            self.shrunk.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Marks the start of an acquire. Read this before the acquire begins.
    fn mark(&self) -> usize {
        self.applied.load(Ordering::SeqCst)
    }

    /// Returns the largest limit in effect at any moment since `mark`.
    ///
    /// At the mark, the limit in effect was the last applied entry,
    /// `history[mark - 1]`, or the entry after it if a `set_limit` call was
    /// under way, so the range starts at `mark - 1`.
    fn ceiling_since(&self, mark: usize) -> usize {
        let history = self.history.lock().unwrap();
        history[mark - 1..].iter().copied().max().unwrap()
    }
}

/// Tokens held by live permits, counted apart from the semaphore, and counts
/// of what the operations did.
#[derive(Default)]
struct Tracker {
    held: AtomicUsize,
    peak: AtomicUsize,
    grants: AtomicUsize,
    /// Acquires and runs dropped before they completed.
    cancelled: AtomicUsize,
    panicked: AtomicUsize,
    /// Operations finished, for the stall check and the final count.
    finished: AtomicUsize,
    violations: Mutex<Vec<String>>,
}

impl Tracker {
    fn violation(&self, message: String) {
        self.violations.lock().unwrap().push(message);
    }
}

struct Shared {
    sem: DeferredSemaphore,
    limits: LimitLog,
    tracker: Tracker,
    change_limit: bool,
}

/// Counts tokens as held until it is dropped.
struct HeldTokens<'a> {
    tracker: &'a Tracker,
    tokens: usize,
}

impl Drop for HeldTokens<'_> {
    fn drop(&mut self) {
        self.tracker.held.fetch_sub(self.tokens, Ordering::SeqCst);
    }
}

impl Shared {
    /// Records a grant of `tokens` for an acquire that began at `mark`, and
    /// checks the tokens held against the limit.
    ///
    /// The semaphore grants tokens only while no retired tokens are owed, so
    /// right after any grant the tokens held are within the limit of that
    /// moment, and they only grow at grants. The counter never exceeds the
    /// tokens really held, and the last grant before the check happened after
    /// `mark`, so the counter must be within the largest limit since `mark`.
    /// With a fixed limit, that is the limit itself.
    fn grant(&self, tokens: usize, mark: usize, operation: &str) -> HeldTokens<'_> {
        let tracker = &self.tracker;
        let held_now = tracker.held.fetch_add(tokens, Ordering::SeqCst) + tokens;
        tracker.peak.fetch_max(held_now, Ordering::SeqCst);
        tracker.grants.fetch_add(1, Ordering::SeqCst);
        // A zero-token permit is granted even when every token is held, so
        // only grants of real tokens are checked.
        let ceiling = self.limits.ceiling_since(mark);
        if tokens > 0 && held_now > ceiling {
            tracker.violation(format!(
                "{operation} granted {tokens} tokens: {held_now} held, limit at most {ceiling}"
            ));
        }
        HeldTokens { tracker, tokens }
    }

    /// Checks an acquire error. Only a concurrent shrink may reject a request.
    fn check_error(&self, error: AcquireError, operation: &str) {
        let allowed = self.change_limit && matches!(error, AcquireError::ExceedsLimit { .. });
        if !allowed {
            self.tracker
                .violation(format!("{operation} failed unexpectedly: {error}"));
        }
    }

    /// Checks a `try_acquire` error. Only a concurrent shrink may make a
    /// request exceed the limit.
    fn check_try_error(&self, error: TryAcquireError, operation: &str) {
        let allowed = match error {
            TryAcquireError::NoTokens => true,
            TryAcquireError::ExceedsLimit { .. } => self.change_limit,
            TryAcquireError::Closed => false,
        };
        if !allowed {
            self.tracker
                .violation(format!("{operation} failed unexpectedly: {error}"));
        }
    }

    fn cancelled(&self) {
        self.tracker.cancelled.fetch_add(1, Ordering::Relaxed);
    }
}

/// Stands in for work done while holding tokens. It yields a few times and
/// sometimes sleeps briefly, so that holders overlap on both worker threads.
async fn work(yields: usize, sleep: bool) {
    for _ in 0..yields {
        tokio::task::yield_now().await;
    }
    if sleep {
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

/// Picks a short timeout. Zero polls the future once, which queues it, and
/// then cancels it. Up to 200 µs is rounded up by tokio's timer, which has
/// millisecond granularity.
fn tiny_timeout(rng: &mut Rng) -> Duration {
    if rng.below(2) == 0 {
        Duration::ZERO
    } else {
        Duration::from_micros(rng.below(200) as u64)
    }
}

async fn random_operation(shared: &Shared, rng: &mut Rng) {
    let sem = &shared.sem;
    let yields = rng.below(4);
    let sleep = rng.below(16) == 0;
    let mark = shared.limits.mark();

    match rng.below(13) {
        0 | 1 => match sem.acquire().await {
            Ok(permit) => {
                let held = shared.grant(1, mark, "acquire");
                work(yields, sleep).await;
                drop(held);
                drop(permit);
            }
            Err(error) => shared.check_error(error, "acquire"),
        },
        2 => {
            let tokens = rng.below(sem.limit() + 1);
            match sem.acquire_many(tokens).await {
                Ok(permit) => {
                    let held = shared.grant(tokens, mark, "acquire_many");
                    work(yields, sleep).await;
                    drop(held);
                    drop(permit);
                }
                Err(error) => shared.check_error(error, "acquire_many"),
            }
        }
        3 => {
            let tokens = 1 + rng.below(2);
            match sem.try_acquire_many(tokens) {
                Ok(permit) => {
                    let held = shared.grant(tokens, mark, "try_acquire_many");
                    work(yields, sleep).await;
                    drop(held);
                    drop(permit);
                }
                Err(error) => shared.check_try_error(error, "try_acquire_many"),
            }
        }
        4 => {
            let output = sem
                .run(|| {
                    let held = shared.grant(1, mark, "run");
                    async move {
                        work(yields, sleep).await;
                        drop(held);
                        yields
                    }
                })
                .await;
            match output {
                Ok(returned) if returned == yields => {}
                Ok(returned) => shared
                    .tracker
                    .violation(format!("run returned {returned}, expected {yields}")),
                Err(error) => shared.check_error(error, "run"),
            }
        }
        5 => {
            let outcome = AssertUnwindSafe(sem.run(|| {
                let held = shared.grant(1, mark, "run that panics");
                async move {
                    work(yields, false).await;
                    let _held = held;
                    std::panic::panic_any(PANIC_MESSAGE);
                }
            }))
            .catch_unwind()
            .await;
            match outcome {
                Err(_) => {
                    shared.tracker.panicked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(error)) => shared.check_error(error, "run that panics"),
                Ok(Ok(())) => shared
                    .tracker
                    .violation("run that panics returned normally".to_string()),
            }
        }
        6 => {
            let duration = tiny_timeout(rng);
            match tokio::time::timeout(duration, sem.acquire()).await {
                Ok(Ok(permit)) => {
                    let held = shared.grant(1, mark, "acquire with timeout");
                    work(yields, sleep).await;
                    drop(held);
                    drop(permit);
                }
                Ok(Err(error)) => shared.check_error(error, "acquire with timeout"),
                Err(_) => shared.cancelled(),
            }
        }
        7 => {
            // The timeout may cancel the run while it waits or while it works.
            let duration = tiny_timeout(rng);
            let run = sem.run(move || {
                let held = shared.grant(1, mark, "run with timeout");
                async move {
                    work(yields, true).await;
                    drop(held);
                }
            });
            match tokio::time::timeout(duration, run).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => shared.check_error(error, "run with timeout"),
                Err(_) => shared.cancelled(),
            }
        }
        8 => {
            let duration = tiny_timeout(rng);
            let tokens = 1 + rng.below(2);
            let acquire = sem.acquire_many_owned(tokens);
            match tokio::time::timeout(duration, acquire).await {
                Ok(Ok(permit)) => {
                    let held = shared.grant(tokens, mark, "acquire_many_owned");
                    work(yields, sleep).await;
                    drop(held);
                    drop(permit);
                }
                Ok(Err(error)) => shared.check_error(error, "acquire_many_owned"),
                Err(_) => shared.cancelled(),
            }
        }
        9 => {
            // Polls a request a few times, yielding in between, and drops it
            // if it is still queued: a cancellation anywhere in the queue that
            // does not depend on the timer.
            let tokens = 1 + rng.below(2);
            let polls = 1 + rng.below(4);
            let mut acquire = std::pin::pin!(sem.acquire_many(tokens));
            let mut completed = false;
            for _ in 0..polls {
                if let Poll::Ready(acquired) = futures::poll!(acquire.as_mut()) {
                    completed = true;
                    match acquired {
                        Ok(permit) => {
                            let held = shared.grant(tokens, mark, "acquire_many then cancel");
                            work(yields, sleep).await;
                            drop(held);
                            drop(permit);
                        }
                        Err(error) => shared.check_error(error, "acquire_many then cancel"),
                    }
                    break;
                }
                tokio::task::yield_now().await;
            }
            if !completed {
                shared.cancelled();
            }
        }
        _ => {
            if shared.change_limit {
                let limit = 1 + rng.below(MAX_RANDOM_LIMIT);
                shared.limits.set_limit(sem, limit);
            } else {
                match sem.try_acquire() {
                    Ok(permit) => {
                        let held = shared.grant(1, mark, "try_acquire");
                        drop(held);
                        drop(permit);
                    }
                    Err(error) => shared.check_try_error(error, "try_acquire"),
                }
            }
        }
    }
}

/// Returns the operations that `task` runs: an equal share of `operations`,
/// plus the remainder for task 0.
fn share_of(operations: usize, task: usize) -> usize {
    let share = operations / TASKS;
    if task == 0 {
        share + operations % TASKS
    } else {
        share
    }
}

/// Waits for the tasks, and fails if none of them finishes an operation for
/// `STALL_TIMEOUT`, which means the semaphore lost a wake-up or a token.
async fn join_or_fail_on_stall(
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shared: &Shared,
    seed: u64,
) {
    let mut all = std::pin::pin!(futures::future::join_all(tasks));
    let mut last_finished = 0;
    let mut last_progress = Instant::now();
    let results = loop {
        match tokio::time::timeout(Duration::from_secs(1), all.as_mut()).await {
            Ok(results) => break results,
            Err(_) => {
                let finished = shared.tracker.finished.load(Ordering::SeqCst);
                if finished != last_finished {
                    last_finished = finished;
                    last_progress = Instant::now();
                } else if last_progress.elapsed() > STALL_TIMEOUT {
                    panic!(
                        "seed {seed}: timed out: no operation finished in {STALL_TIMEOUT:?} \
                         ({finished} finished, {} waiting, {} tokens free, limit {})",
                        shared.sem.waiting(),
                        shared.sem.tokens(),
                        shared.sem.limit()
                    );
                }
            }
        }
    };
    for result in results {
        result.unwrap_or_else(|error| panic!("seed {seed}: a task failed: {error}"));
    }
}

/// Runs the random mix and checks that every token came back.
fn stress(test: &str, change_limit: bool) {
    silence_expected_panics();
    let seed = seed_for(test);
    let operations = operations_for(test);
    let shared = Arc::new(Shared {
        sem: DeferredSemaphore::new(FIXED_LIMIT),
        limits: LimitLog::new(FIXED_LIMIT),
        tracker: Tracker::default(),
        change_limit,
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_time()
        .build()
        .unwrap();
    let started = Instant::now();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let shared = Arc::clone(&shared);
                let stream = (task as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let mut rng = Rng::new(seed ^ stream);
                let count = share_of(operations, task);
                tokio::spawn(async move {
                    for _ in 0..count {
                        random_operation(&shared, &mut rng).await;
                        shared.tracker.finished.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        join_or_fail_on_stall(tasks, &shared, seed).await;
    });
    let elapsed = started.elapsed();

    let tracker = &shared.tracker;
    let sem = &shared.sem;
    let grants = tracker.grants.load(Ordering::SeqCst);
    println!(
        "{test}: {} operations in {elapsed:.1?}: {grants} grants, {} cancelled, {} panicked, \
         {} grown and {} shrunk limits, at most {} tokens held at once, final limit {}",
        tracker.finished.load(Ordering::SeqCst),
        tracker.cancelled.load(Ordering::SeqCst),
        tracker.panicked.load(Ordering::SeqCst),
        shared.limits.grown.load(Ordering::SeqCst),
        shared.limits.shrunk.load(Ordering::SeqCst),
        tracker.peak.load(Ordering::SeqCst),
        sem.limit()
    );
    let violations = tracker.violations.lock().unwrap();
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violations, the first: {}",
        violations.len(),
        violations[0]
    );
    assert_eq!(
        tracker.finished.load(Ordering::SeqCst),
        operations,
        "seed {seed}"
    );
    assert!(
        grants >= operations / 4,
        "seed {seed}: {grants} grants in {operations} operations are too few to exercise the semaphore"
    );
    assert!(
        tracker.cancelled.load(Ordering::SeqCst) > 0,
        "seed {seed}: no acquire or run was cancelled"
    );
    assert!(
        tracker.panicked.load(Ordering::SeqCst) > 0,
        "seed {seed}: no run panicked"
    );
    if change_limit {
        assert!(
            shared.limits.grown.load(Ordering::SeqCst) > 0,
            "seed {seed}: the limit never grew"
        );
        assert!(
            shared.limits.shrunk.load(Ordering::SeqCst) > 0,
            "seed {seed}: the limit never shrank"
        );
    }
    assert_eq!(tracker.held.load(Ordering::SeqCst), 0, "seed {seed}");
    assert_eq!(sem.tokens(), sem.limit(), "seed {seed}: tokens were lost");
    assert_eq!(sem.waiting(), 0, "seed {seed}: waiters were left queued");
}

#[test]
fn random_operations_keep_fixed_limit() {
    stress("random_operations_keep_fixed_limit", false);
}

#[test]
fn random_operations_keep_changing_limit() {
    stress("random_operations_keep_changing_limit", true);
}

/// Spins for a moment so that the other thread makes progress.
fn spin(iterations: usize) {
    for _ in 0..iterations {
        std::hint::spin_loop();
    }
}

/// Races a shrink against a token coming back through the release fast path.
///
/// One token is held throughout. The main thread switches the limit between
/// 2 and 1 while a second thread takes and releases the other token as fast
/// as it can. Once `set_limit(1)` has returned, the held token fills the
/// limit, so every `try_acquire` must fail until the limit grows again.
/// `phase` is odd exactly while the limit is 1, and a grant counts as a
/// violation only if `phase` stayed odd and unchanged across the whole
/// `try_acquire` call.
///
/// NOTE: the race window is a few instructions wide, so on a machine that
/// cannot run both threads at the same time this test may pass even though
/// the race is there.
#[test]
fn set_limit_shrink_racing_release_keeps_limit() {
    const MAX_CYCLES: usize = 300_000;
    const TIME_BUDGET: Duration = Duration::from_secs(5);

    let sem = DeferredSemaphore::new(2);
    let held_throughout = sem.try_acquire().unwrap();
    let phase = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let violations = AtomicUsize::new(0);
    let mut cycles = 0;

    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let before = phase.load(Ordering::SeqCst);
                if let Ok(permit) = sem.try_acquire() {
                    let after = phase.load(Ordering::SeqCst);
                    if before == after && before % 2 == 1 {
                        violations.fetch_add(1, Ordering::SeqCst);
                    }
                    drop(permit);
                }
            }
        });

        let started = std::time::Instant::now();
        while cycles < MAX_CYCLES
            && started.elapsed() < TIME_BUDGET
            && violations.load(Ordering::SeqCst) == 0
        {
            sem.set_limit(1).unwrap();
            phase.fetch_add(1, Ordering::SeqCst);
            spin(200);
            phase.fetch_add(1, Ordering::SeqCst);
            sem.set_limit(2).unwrap();
            spin(200);
            cycles += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });

    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "after {cycles} shrink cycles, try_acquire was granted a token at limit 1 \
         while another token was held"
    );
    drop(held_throughout);
    assert_eq!(sem.tokens(), 2);
    assert_eq!(sem.limit(), 2);
}
