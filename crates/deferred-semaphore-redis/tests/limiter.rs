//! The limiter as a client: many tasks, faults of the server, cancel
//! safety. Each test starts its own redis-server.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deferred_semaphore::{KeyedLimiter, Limiter};
use deferred_semaphore_redis::scripts::Namespace;
use deferred_semaphore_redis::{Error, LimitChange, Options, RedisLimiter};
use test_redis::{Persistence, RedisServer};
use tokio::task::JoinHandle;

const NS: &str = "t";

fn namespace() -> Namespace {
    Namespace::new(NS).unwrap()
}

/// Stores `global` and `lease` for namespace `t`, with the namespace state
/// already present so that no grace applies.
fn prepare(server: &RedisServer, lease: Duration, global: u64) {
    let lease_ms = lease.as_millis().to_string();
    let global = global.to_string();
    support::prepare_namespace(
        server,
        &namespace(),
        &[("lease_ms", &lease_ms), ("global", &global)],
    );
}

fn options() -> Options {
    Options {
        poll_max: Duration::from_millis(200),
        unavailable_after: Duration::from_secs(2),
        holder: "test".into(),
    }
}

async fn connect(server: &RedisServer, options: Options) -> RedisLimiter {
    RedisLimiter::connect(&server.url(), NS, options)
        .await
        .unwrap()
}

/// Starts a server, stores `lease` and `global` as [`prepare`] does and
/// connects a limiter with [`options`]. Returns `None` when redis-server
/// is missing.
async fn start(
    persistence: Persistence,
    lease: Duration,
    global: u64,
) -> Option<(RedisServer, RedisLimiter)> {
    let server = RedisServer::start(persistence)?;
    prepare(&server, lease, global);
    let limiter = connect(&server, options()).await;
    Some((server, limiter))
}

fn count(server: &RedisServer, key: Option<&str>) -> String {
    support::holder_count(server, &namespace(), key)
}

/// Waits up to `limit` for the set of `key` to empty.
async fn wait_empty(server: &RedisServer, key: Option<&str>, limit: Duration) {
    let start = Instant::now();
    while count(server, key) != ":0" {
        assert!(
            start.elapsed() < limit,
            "set {key:?} still has {} members after {limit:?}",
            count(server, key)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Holders counted beside the limiter, with the most seen at once.
#[derive(Debug, Default)]
struct Occupancy {
    active: AtomicUsize,
    peak: AtomicUsize,
}

impl Occupancy {
    /// Counts one holder for 10 ms and records the peak.
    async fn hold(&self) {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(10)).await;
        self.active.fetch_sub(1, Ordering::SeqCst);
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Waits up to `limit` for each task and returns their outputs in order.
async fn join_within<T>(tasks: Vec<JoinHandle<T>>, limit: Duration) -> Vec<T> {
    let mut outputs = Vec::new();
    for task in tasks {
        let output = tokio::time::timeout(limit, task)
            .await
            .unwrap_or_else(|_| panic!("a task did not finish within {limit:?}"))
            .unwrap();
        outputs.push(output);
    }
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_stay_within_limit() {
    let Some((server, limiter)) = start(Persistence::None, Duration::from_secs(5), 3).await else {
        return;
    };
    assert_eq!(Limiter::limit(&limiter), 3);
    let occupancy = Arc::new(Occupancy::default());
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let limiter = limiter.clone();
        let occupancy = occupancy.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                let permit = Limiter::acquire(&limiter).await.unwrap();
                occupancy.hold().await;
                drop(permit);
            }
        }));
    }
    join_within(tasks, Duration::from_secs(30)).await;
    let peak = occupancy.peak();
    assert!(peak <= 3, "{peak} holders at once under a limit of 3");
    assert!(peak >= 1);
    assert_eq!(limiter.stats().grants, 72);
    wait_empty(&server, None, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_permits_all_come_back() {
    let Some((server, limiter)) = start(Persistence::None, Duration::from_secs(5), 4).await else {
        return;
    };
    limiter
        .set_limit(LimitChange::PerKeyDefault(Some(1)))
        .await
        .unwrap();
    let per_key: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let limiter = limiter.clone();
        let active = per_key[i % 2].clone();
        let key = format!("k{}", i % 2);
        tasks.push(tokio::spawn(async move {
            for _ in 0..2 {
                let permit = KeyedLimiter::acquire(&limiter, &key).await.unwrap();
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                assert_eq!(now, 1, "two holders of {key} under a key limit of 1");
                tokio::time::sleep(Duration::from_millis(10)).await;
                active.fetch_sub(1, Ordering::SeqCst);
                permit.release().await.unwrap();
            }
        }));
    }
    join_within(tasks, Duration::from_secs(30)).await;
    for key in [None, Some("k0"), Some("k1")] {
        assert_eq!(count(&server, key), ":0", "set {key:?}");
    }
    assert!(limiter.holders().await.unwrap().is_empty());
    let stats = limiter.stats();
    assert_eq!(stats.grants, 24);
    assert_eq!(stats.release_calls, 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_when_server_paused() {
    let Some((server, limiter)) = start(Persistence::None, Duration::from_secs(1), 2).await else {
        return;
    };
    let permit = limiter.acquire_global().await.unwrap();
    assert!(!permit.is_lost());
    // The heartbeat keeps the lease past its first deadline.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!permit.is_lost(), "renewals keep a live lease");

    server.pause();
    let lost = tokio::time::timeout(Duration::from_secs(3), permit.lost()).await;
    let fired_at = Instant::now();
    server.resume();
    assert!(lost.is_ok(), "lost() did not fire within 3 s of a pause");
    assert!(permit.is_lost());
    assert!(
        fired_at >= permit.deadline(),
        "lost() fired before the deadline"
    );
    assert!(limiter.stats().lost >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_after_server_killed() {
    let Some(mut server) = RedisServer::start(Persistence::None) else {
        return;
    };
    prepare(&server, Duration::from_secs(5), 2);
    let options = Options {
        unavailable_after: Duration::from_millis(1500),
        ..options()
    };
    let limiter = connect(&server, options).await;
    server.kill();
    let start = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(15), limiter.acquire_global())
        .await
        .expect("acquire gives up within 15 s");
    match result {
        Err(Error::Unavailable { url, waited, .. }) => {
            assert_eq!(url, server.url());
            assert!(waited >= Duration::from_millis(1500), "{waited:?}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_acquires_leak_nothing() {
    let lease = Duration::from_millis(800);
    let Some((server, limiter)) = start(Persistence::None, lease, 2).await else {
        return;
    };
    let holder = limiter.acquire_global().await.unwrap();
    for i in 0..40u64 {
        // Cut each acquire at a different point: before the call, while
        // the script runs, or after a grant.
        let cut = Duration::from_micros(i * 150);
        let _ = tokio::time::timeout(cut, limiter.acquire_key("k")).await;
    }
    // Waiters blocked on a full limit, dropped mid-wait.
    let blocker = limiter.acquire_global().await.unwrap();
    for _ in 0..5 {
        let _ = tokio::time::timeout(Duration::from_millis(50), limiter.acquire_global()).await;
    }
    drop(blocker);
    holder.release().await.unwrap();
    // Every grant is released by its dropped permit, well before a lease.
    wait_empty(&server, None, lease).await;
    assert_eq!(count(&server, Some("k")), ":0");
    tokio::time::sleep(lease).await;
    assert_eq!(count(&server, None), ":0");
    assert!(limiter.holders().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_growth_wakes_waiter() {
    let Some(server) = RedisServer::start(Persistence::None) else {
        return;
    };
    prepare(&server, Duration::from_secs(10), 1);
    // Only a wake-up can end the wait quickly: both the retry hint (the
    // holder's expiry) and poll_max are long.
    let options = Options {
        poll_max: Duration::from_secs(20),
        ..options()
    };
    let limiter = connect(&server, options).await;
    let _holder = limiter.acquire_global().await.unwrap();
    let waiter = {
        let limiter = limiter.clone();
        tokio::spawn(async move { limiter.acquire_global().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished());
    let before = limiter.stats().acquire_calls;
    limiter.set_limit(LimitChange::Global(2)).await.unwrap();
    let permit = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("waiter woken within 3 s")
        .unwrap()
        .unwrap();
    assert!(limiter.stats().acquire_calls <= before + 2);
    assert_eq!(limiter.global_limit(), Some(2));
    drop(permit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_limits_after_grace() {
    let lease = Duration::from_millis(700);
    let Some((mut server, limiter)) = start(Persistence::None, lease, 2).await else {
        return;
    };
    let before = limiter.acquire_global().await.unwrap();
    let old_fence = before.fence();

    server.kill();
    server.restart();
    let lost = tokio::time::timeout(Duration::from_secs(3), before.lost()).await;
    assert!(lost.is_ok(), "the lease of the lost state is lost");

    let permit = tokio::time::timeout(Duration::from_secs(10), limiter.acquire_global())
        .await
        .expect("a grant within 10 s of the restart")
        .unwrap();
    assert!(permit.fence() > old_fence);
    let ns = namespace();
    let global = server.command(&["HGET", &ns.limits_key(), "global"]);
    assert!(global.ends_with("2\r\n"), "limits restored: {global:?}");
    let limits = limiter.limits().await.unwrap();
    assert_eq!(limits.global, Some(2));
    assert_eq!(limits.lease, lease);
}

#[tokio::test]
async fn missing_limit_names_fix() {
    let Some(server) = RedisServer::start(Persistence::None) else {
        return;
    };
    let limiter = RedisLimiter::connect(&server.url(), "empty", options())
        .await
        .unwrap();
    assert_eq!(limiter.global_limit(), None);
    match limiter.acquire_global().await {
        Err(error @ Error::NoLimit { .. }) => {
            let text = error.to_string();
            assert!(text.contains("--global N"), "{text}");
        }
        other => panic!("expected NoLimit, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_namespace_rejected() {
    for name in ["", "a{b", "a b", "x}"] {
        let result = RedisLimiter::connect("redis://127.0.0.1:1", name, options()).await;
        match result {
            Err(Error::Config(message)) => assert!(message.contains("namespace"), "{message}"),
            other => panic!("namespace {name:?}: expected Config, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn dropped_permits_released_before_exit() {
    // A long lease: a release cut off by the exit would show as a holder.
    let Some((server, limiter)) = start(Persistence::None, Duration::from_secs(60), 8).await else {
        return;
    };
    let mut permits = Vec::new();
    for _ in 0..8 {
        permits.push(limiter.acquire_global().await.unwrap());
    }
    assert_eq!(count(&server, None), ":8");
    // Dropping spawns the releases; on a current-thread runtime none of
    // them has run yet, so only the wait can see them through.
    drop(permits);
    limiter.wait_for_releases().await;
    assert_eq!(count(&server, None), ":0");
    assert_eq!(limiter.stats().release_calls, 8);
}

#[tokio::test]
async fn grace_left_reports_new_namespace_wait() {
    let Some(server) = RedisServer::start(Persistence::None) else {
        return;
    };
    let limiter = connect(&server, options()).await;
    assert_eq!(limiter.grace_left().await.unwrap(), None);
    limiter
        .set_limit(LimitChange::Lease(Duration::from_secs(5)))
        .await
        .unwrap();
    let left = limiter.grace_left().await.unwrap().expect("a grace");
    assert!(
        left > Duration::from_secs(3) && left <= Duration::from_secs(5),
        "{left:?}"
    );
    prepare(&server, Duration::from_secs(5), 1);
    assert_eq!(limiter.grace_left().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_limiters_share_fairly() {
    let Some(server) = RedisServer::start(Persistence::None) else {
        return;
    };
    prepare(&server, Duration::from_secs(5), 3);

    const GRANTS_PER_TASK: usize = 4;
    const TASKS: usize = 3;
    let occupancy = Arc::new(Occupancy::default());
    let mut limiters = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let limiter = connect(&server, options()).await;
        for _ in 0..TASKS {
            let limiter = limiter.clone();
            let occupancy = occupancy.clone();
            tasks.push(tokio::spawn(async move {
                let mut max_wait = Duration::ZERO;
                for _ in 0..GRANTS_PER_TASK {
                    let requested = Instant::now();
                    let permit = limiter.acquire_global().await.unwrap();
                    max_wait = max_wait.max(requested.elapsed());
                    occupancy.hold().await;
                    permit.release().await.unwrap();
                }
                max_wait
            }));
        }
        limiters.push(limiter);
    }

    for max_wait in join_within(tasks, Duration::from_secs(60)).await {
        // Every task waits behind at most 11 others of 10 ms each, plus a
        // poll of 200 ms for a lost wake-up. A bound of 5 s leaves room for
        // a slow machine, while a starved task would wait far longer.
        assert!(
            max_wait < Duration::from_secs(5),
            "one wait took {max_wait:?}"
        );
    }
    let peak = occupancy.peak();
    assert!(peak <= 3, "{peak} holders at once under a limit of 3");

    for (index, limiter) in limiters.iter().enumerate() {
        let grants = limiter.stats().grants;
        assert_eq!(grants, (TASKS * GRANTS_PER_TASK) as u64, "limiter {index}");
    }
    wait_empty(&server, None, Duration::from_secs(3)).await;
}

/// Waits up to 5 s until `limiter` has sent `calls` acquire calls.
async fn wait_calls(limiter: &RedisLimiter, calls: u64) {
    let start = Instant::now();
    while limiter.stats().acquire_calls < calls {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{} acquire calls after 5 s, expected {calls}",
            limiter.stats().acquire_calls
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits up to 5 s until the global waiter queue of the namespace has
/// `count` members.
async fn wait_queued(server: &RedisServer, count: usize) {
    let queue = Namespace::new(NS).unwrap().waiter_keys(None).queue;
    let expected = format!(":{count}");
    let start = Instant::now();
    while server.command(&["ZCARD", &queue]).trim() != expected {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the waiter queue did not reach {count} members in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits up to `limit` until the limiter has sent `calls` renew calls.
async fn wait_renewals(limiter: &RedisLimiter, calls: u64, limit: Duration) {
    let start = Instant::now();
    while limiter.stats().renew_calls < calls {
        assert!(
            start.elapsed() < limit,
            "{} renew calls after {limit:?}, expected {calls}",
            limiter.stats().renew_calls
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to `limit` for the namespace to be in a grace. Returns the
/// time left in it, or `None` when no grace started in time.
async fn wait_grace(limiter: &RedisLimiter, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if let Some(left) = limiter.grace_left().await.unwrap() {
            return Some(left);
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_for_other_limiter_ignored() {
    let Some(server) = RedisServer::start(Persistence::None) else {
        return;
    };
    prepare(&server, Duration::from_secs(30), 1);
    let slow = Options {
        poll_max: Duration::from_secs(30),
        ..options()
    };
    let holder = connect(&server, options()).await;
    let first = connect(&server, slow.clone()).await;
    let second = connect(&server, slow).await;
    let held = holder.acquire_global().await.unwrap();
    let first_wait = tokio::spawn({
        let first = first.clone();
        async move { first.acquire_global().await.unwrap() }
    });
    wait_calls(&first, 1).await;
    // The order of the waiters is the order their busy replies reach
    // Redis, not the order the calls were sent.
    wait_queued(&server, 1).await;
    let second_wait = tokio::spawn({
        let second = second.clone();
        async move { second.acquire_global().await.unwrap() }
    });
    wait_calls(&second, 1).await;
    wait_queued(&server, 2).await;

    held.release().await.unwrap();
    let first_permit = tokio::time::timeout(Duration::from_secs(5), first_wait)
        .await
        .expect("the first waiter is woken by name")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(second.stats().acquire_calls, 1, "the second waiter retried");

    first_permit.release().await.unwrap();
    let second_permit = tokio::time::timeout(Duration::from_secs(5), second_wait)
        .await
        .expect("the second waiter is woken by name")
        .unwrap();
    assert_eq!(second.stats().acquire_calls, 2);
    second_permit.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_shrink_moves_deadline_earlier() {
    let Some((server, limiter)) = start(Persistence::None, Duration::from_secs(6), 2).await else {
        return;
    };
    let permit = limiter.acquire_global().await.unwrap();
    assert!(permit.deadline() > Instant::now() + Duration::from_secs(5));

    // An operator shrinks the lease; this process learns it from the
    // reply of its next renewal, two seconds (a third of 6 s) later.
    let ns = namespace();
    server.command(&["HSET", &ns.limits_key(), "lease_ms", "600"]);
    let calls = limiter.stats().renew_calls + 1;
    wait_renewals(&limiter, calls, Duration::from_secs(5)).await;

    // Redis now expires the lease 600 ms after that renewal.
    let left = permit.deadline().saturating_duration_since(Instant::now());
    assert!(left <= Duration::from_millis(600), "deadline {left:?} away");
    assert!(!permit.is_lost(), "the renewal kept the lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrunk_lease_grants_get_renewed() {
    let Some((server, limiter)) = start(Persistence::None, Duration::from_secs(6), 2).await else {
        return;
    };
    // Another process shrinks the lease while this one's heartbeat sleeps
    // for a third of the old lease (2 s).
    let operator = connect(&server, options()).await;
    operator
        .set_limit(LimitChange::Lease(Duration::from_millis(600)))
        .await
        .unwrap();

    let permit = limiter.acquire_global().await.unwrap();
    let left = permit.deadline().saturating_duration_since(Instant::now());
    assert!(left <= Duration::from_millis(600), "deadline {left:?} away");
    // Past the first deadline, well before the old heartbeat would wake.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!permit.is_lost(), "the grant with the short lease was lost");
    let ns = namespace();
    let score = server.command(&["ZSCORE", &ns.holders_key(None), permit.lease_id()]);
    assert!(
        !score.starts_with("$-1"),
        "lease gone from Redis: {score:?}"
    );
    assert!(limiter.stats().renew_calls >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_starts_grace() {
    let Some((mut server, holder)) = start(Persistence::None, Duration::from_millis(1500), 2).await
    else {
        return;
    };
    let first = holder.acquire_global().await.unwrap();
    // The first renewal stamps the namespace with the server's run id.
    wait_renewals(&holder, 1, Duration::from_secs(3)).await;
    assert!(server.command(&["SAVE"]).starts_with("+OK"));
    // Granted after the snapshot, so the restart below loses it.
    let second = holder.acquire_global().await.unwrap();

    server.kill();
    server.restart();
    let ns = namespace();
    let epoch = server.command(&["HGET", &ns.meta_key(), "epoch"]);
    assert!(epoch.ends_with("e0\r\n"), "snapshot not loaded: {epoch:?}");
    assert_eq!(count(&server, None), ":1", "only the first lease is kept");

    let other = connect(&server, options()).await;
    let grace = wait_grace(&other, Duration::from_secs(3)).await;
    assert!(grace.is_some(), "no grace after a restart from a snapshot");
    let third = tokio::time::timeout(Duration::from_millis(300), other.acquire_global()).await;
    assert!(third.is_err(), "granted beside two holders: {third:?}");
    for permit in [&first, &second] {
        let lost = tokio::time::timeout(Duration::from_secs(3), permit.lost()).await;
        assert!(lost.is_ok(), "lease {} was not lost", permit.lease_id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_lease_starts_grace() {
    let Some((server, holder)) = start(Persistence::None, Duration::from_millis(1500), 1).await
    else {
        return;
    };
    let permit = holder.acquire_global().await.unwrap();
    // Writes lost while the meta hash stayed.
    let ns = namespace();
    server.command(&["ZREM", &ns.holders_key(None), permit.lease_id()]);
    server.command(&["DEL", &ns.lease_key(permit.lease_id())]);

    let grace = wait_grace(&holder, Duration::from_secs(3)).await;
    assert!(grace.is_some(), "no grace after a lease vanished");
    assert!(permit.is_lost());
    let epoch = server.command(&["HGET", &ns.meta_key(), "epoch"]);
    assert!(!epoch.ends_with("e0\r\n"), "epoch unchanged: {epoch:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeping_data_starts_grace() {
    let Some((mut server, holder)) =
        start(Persistence::AppendAlways, Duration::from_millis(1500), 2).await
    else {
        return;
    };
    let permit = holder.acquire_global().await.unwrap();
    wait_renewals(&holder, 1, Duration::from_secs(3)).await;

    // Every lease survives, so only the changed run id shows the restart.
    server.kill();
    server.restart();
    assert_eq!(count(&server, None), ":1");
    let grace = wait_grace(&holder, Duration::from_secs(3)).await;
    assert!(grace.is_some(), "no grace after a restart");
    let lost = tokio::time::timeout(Duration::from_secs(3), permit.lost()).await;
    assert!(
        lost.is_ok(),
        "the lease from before the restart was not lost"
    );
}

#[tokio::test]
async fn set_limit_rejects_huge_limits() {
    let Some((_server, limiter)) = start(Persistence::None, Duration::from_secs(5), 2).await else {
        return;
    };
    let cases = [
        (LimitChange::Global(1 << 53), "9007199254740992"),
        (
            LimitChange::PerKeyDefault(Some(1_000_000_001)),
            "1000000001",
        ),
        (
            LimitChange::Key("k".into(), Some(u64::MAX)),
            "18446744073709551615",
        ),
    ];
    for (change, shown) in cases {
        match limiter.set_limit(change.clone()).await {
            Err(Error::Config(message)) => {
                assert!(message.contains(shown), "{change:?}: {message}");
                assert!(message.contains("1000000000"), "{change:?}: {message}");
            }
            other => panic!("{change:?}: expected Config, got {other:?}"),
        }
    }
    let limits = limiter.limits().await.unwrap();
    assert_eq!(limits.global, Some(2));
    assert_eq!(limits.per_key_default, None);
    assert!(limits.per_key.is_empty());
    limiter
        .set_limit(LimitChange::Global(1_000_000_000))
        .await
        .unwrap();
    assert_eq!(limiter.global_limit(), Some(1_000_000_000));
}

#[tokio::test]
async fn unreadable_grant_is_released() {
    let Some(server) = RedisServer::start(Persistence::None) else {
        return;
    };
    prepare(&server, Duration::from_secs(5), 2);
    // A limit stored past set_limit's range: Lua turns it into a double
    // that the reply cannot carry as an integer.
    let ns = namespace();
    server.command(&["HSET", &ns.limits_key(), "global", "18446744073709551615"]);
    let limiter = connect(&server, options()).await;
    match limiter.acquire_global().await {
        Err(Error::Redis(message)) => assert!(message.contains("acquire"), "{message}"),
        other => panic!("expected a Redis error, got {other:?}"),
    }
    assert_eq!(count(&server, None), ":0", "the grant was left held");
}

/// Returns the server's clock in milliseconds since the epoch.
fn server_now_ms(server: &RedisServer) -> u64 {
    let reply = server.command(&["TIME"]);
    let numbers: Vec<u64> = reply
        .lines()
        .filter(|line| !line.starts_with('*') && !line.starts_with('$'))
        .map(|line| line.trim().parse().unwrap())
        .collect();
    numbers[0] * 1000 + numbers[1] / 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_grants_for_gone_waiters_released() {
    let lease = Duration::from_secs(10);
    let Some((server, limiter)) = start(Persistence::None, lease, 4).await else {
        return;
    };
    // Four leases of another process fill the count and expire in 1.5 s.
    let expiry = (server_now_ms(&server) + 1500).to_string();
    let set = namespace().holders_key(None);
    for id in ["x1", "x2", "x3", "x4"] {
        server.command(&["ZADD", &set, &expiry, id]);
    }
    // The first task at the gate is busy and keeps the gate's turn.
    let first = tokio::spawn({
        let limiter = limiter.clone();
        async move { limiter.acquire_global().await }
    });
    wait_calls(&limiter, 1).await;
    let next = tokio::spawn({
        let limiter = limiter.clone();
        async move { limiter.acquire_global().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let followers: Vec<JoinHandle<_>> = (0..3)
        .map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.acquire_global().await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // With the server paused, the turn passes to `next`, whose call requests
    // four leases. The three tasks behind it give up before the reply.
    server.pause();
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    wait_calls(&limiter, 2).await;
    for follower in followers {
        follower.abort();
        assert!(follower.await.unwrap_err().is_cancelled());
    }
    tokio::time::sleep(Duration::from_millis(1600)).await;
    server.resume();

    let permit = tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("the acquire ends within 10 s")
        .unwrap()
        .unwrap();
    limiter.wait_for_releases().await;
    assert_eq!(limiter.stats().grants, 4, "one call granted four leases");
    assert_eq!(count(&server, None), ":1");
    let holders = limiter.holders().await.unwrap();
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].lease_id, permit.lease_id());
    drop(permit);
    wait_empty(&server, None, Duration::from_secs(2)).await;
}
