//! Randomized stress of the Redis limiter: several limiters, as several
//! processes would hold, with many tasks that take global and keyed
//! permits, give up waiting at random, and release by drop or by
//! `release`. Counters outside the limiter check every grant against the
//! limits, and at the end every lease must be gone from Redis.
//!
//! Set `REDIS_STRESS_SEED` to replay a run. Each run prints its seed.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deferred_semaphore_redis::scripts::Namespace;
use deferred_semaphore_redis::{Options, RedisLimiter, RedisPermit};
use test_redis::{Persistence, RedisServer};

const NS: &str = "stress";
const GLOBAL: usize = 4;
/// Keys and their limits; `None` takes the global limit alone.
const KEYS: [(Option<&str>, usize); 4] = [
    (None, GLOBAL),
    (Some("a"), 2),
    (Some("b"), 2),
    (Some("hot"), 1),
];
const LIMITERS: usize = 3;
const TASKS: usize = 6;
const OPERATIONS: usize = 40;

/// A small xorshift generator, so that a seed replays a run's choices.
struct Choices(u64);

impl Choices {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Permits held now, counted beside the limiter to check every grant
/// against the limits.
struct Held {
    global: AtomicUsize,
    keys: HashMap<&'static str, AtomicUsize>,
    violations: AtomicUsize,
    grants: AtomicU64,
}

impl Held {
    fn take(&self, key: Option<&str>) {
        let global = self.global.fetch_add(1, Ordering::SeqCst) + 1;
        if global > GLOBAL {
            self.violations.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(key) = key {
            let limit = KEYS.iter().find(|(k, _)| *k == Some(key)).unwrap().1;
            if self.keys[key].fetch_add(1, Ordering::SeqCst) + 1 > limit {
                self.violations.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.grants.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts a permit as given back. Call it before the permit goes back
    /// to Redis, so that this count never exceeds the one in Redis.
    fn give(&self, key: Option<&str>) {
        self.global.fetch_sub(1, Ordering::SeqCst);
        if let Some(key) = key {
            self.keys[key].fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Stores a lease of 3 s, [`GLOBAL`] and the key limits of [`KEYS`], with
/// the namespace state already present so that no grace applies.
fn prepare(server: &RedisServer) {
    let global = GLOBAL.to_string();
    let key_limits: Vec<(String, String)> = KEYS
        .iter()
        .filter_map(|(key, limit)| Some((format!("k:{}", (*key)?), limit.to_string())))
        .collect();
    let mut limits = vec![("lease_ms", "3000"), ("global", global.as_str())];
    for (field, value) in &key_limits {
        limits.push((field, value));
    }
    support::prepare_namespace(server, &Namespace::new(NS).unwrap(), &limits);
}

async fn acquire(limiter: &RedisLimiter, key: Option<&str>) -> RedisPermit {
    match key {
        Some(key) => limiter.acquire_key(key).await.unwrap(),
        None => limiter.acquire_global().await.unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_keep_limits_and_leases() {
    let Some(server) = RedisServer::start(Persistence::None) else {
        return;
    };
    prepare(&server);
    let seed = std::env::var("REDIS_STRESS_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("REDIS_STRESS_SEED={seed}");
    let held = Arc::new(Held {
        global: AtomicUsize::new(0),
        keys: KEYS
            .iter()
            .filter_map(|(k, _)| *k)
            .map(|k| (k, AtomicUsize::new(0)))
            .collect(),
        violations: AtomicUsize::new(0),
        grants: AtomicU64::new(0),
    });
    let options = Options {
        poll_max: Duration::from_millis(100),
        unavailable_after: Duration::from_secs(10),
        holder: "stress".into(),
    };
    let mut limiters = Vec::new();
    for _ in 0..LIMITERS {
        limiters.push(
            RedisLimiter::connect(&server.url(), NS, options.clone())
                .await
                .unwrap(),
        );
    }
    let cancelled = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (n, limiter) in limiters.iter().enumerate() {
        for t in 0..TASKS {
            let limiter = limiter.clone();
            let held = held.clone();
            let cancelled = cancelled.clone();
            let mut choices =
                Choices(seed ^ ((n * TASKS + t + 1) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            tasks.spawn(async move {
                for _ in 0..OPERATIONS {
                    let (key, _) = KEYS[choices.below(KEYS.len() as u64) as usize];
                    // A third of the waits give up after a short time.
                    let permit = if choices.below(3) == 0 {
                        let patience = Duration::from_millis(choices.below(30));
                        match tokio::time::timeout(patience, acquire(&limiter, key)).await {
                            Ok(permit) => permit,
                            Err(_) => {
                                cancelled.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    } else {
                        acquire(&limiter, key).await
                    };
                    assert!(!permit.is_lost(), "a fresh permit is not lost");
                    held.take(key);
                    tokio::time::sleep(Duration::from_millis(choices.below(8))).await;
                    held.give(key);
                    if choices.below(2) == 0 {
                        permit.release().await.unwrap();
                    } else {
                        drop(permit);
                    }
                }
            });
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    for limiter in &limiters {
        limiter.wait_for_releases().await;
    }
    let grants = held.grants.load(Ordering::SeqCst);
    println!(
        "grants {grants}, cancelled waits {}, violations {}",
        cancelled.load(Ordering::SeqCst),
        held.violations.load(Ordering::SeqCst)
    );
    assert_eq!(held.violations.load(Ordering::SeqCst), 0, "seed {seed}");
    assert!(grants > 0);
    let lost: u64 = limiters.iter().map(|l| l.stats().lost).sum();
    assert_eq!(
        lost, 0,
        "no lease may be lost in a healthy run (seed {seed})"
    );
    let ns = Namespace::new(NS).unwrap();
    for (key, _) in KEYS {
        let left = support::holder_count(&server, &ns, key);
        assert_eq!(left, ":0", "key {key:?} still held (seed {seed})");
    }
}
