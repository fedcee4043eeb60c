//! One script call at a time against a private redis-server.

mod support;

use std::time::Duration;

use deferred_semaphore_redis::scripts::{
    AcquireOutcome, AcquireReply, AcquireRequest, LeaseRef, Namespace, RenewReply, Scripts,
};
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use test_redis::{Persistence, RedisServer};

struct Fixture {
    server: RedisServer,
    con: ConnectionManager,
    ns: Namespace,
    scripts: Scripts,
    lease: Duration,
}

/// Starts a server and stores `global` and `lease` for namespace `t`, with
/// the namespace state already present so that no grace applies.
async fn fixture(lease: Duration, global: u64) -> Option<Fixture> {
    let server = RedisServer::start(Persistence::None)?;
    let ns = Namespace::new("t").unwrap();
    let lease_ms = lease.as_millis().to_string();
    let global = global.to_string();
    support::prepare_namespace(
        &server,
        &ns,
        &[("lease_ms", &lease_ms), ("global", &global)],
    );
    let client = redis::Client::open(server.url()).unwrap();
    let con = ConnectionManager::new(client).await.unwrap();
    Some(Fixture {
        server,
        con,
        ns,
        scripts: Scripts::new(),
        lease,
    })
}

impl Fixture {
    async fn acquire(&mut self, id: &str, key: Option<&str>) -> AcquireReply {
        self.scripts
            .acquire(&mut self.con, &self.ns, id, "test", key, "tok", self.lease)
            .await
            .unwrap()
    }

    async fn release(&mut self, id: &str, key: Option<&str>) -> u64 {
        let lease = LeaseRef { lease_id: id, key };
        self.scripts
            .release(&mut self.con, &self.ns, lease)
            .await
            .unwrap()
    }

    async fn renew(&mut self, ids: &[(&str, Option<&str>)]) -> Vec<bool> {
        let leases: Vec<LeaseRef<'_>> = ids
            .iter()
            .map(|(lease_id, key)| LeaseRef {
                lease_id,
                key: *key,
            })
            .collect();
        self.scripts
            .renew(&mut self.con, &self.ns, &leases, "tok", self.lease)
            .await
            .unwrap()
            .renewed
    }

    /// Tries an acquire as the limiter with `token`, queued for
    /// `waiter_ttl` when busy.
    async fn acquire_as(&mut self, id: &str, token: &str, waiter_ttl: Duration) -> AcquireReply {
        self.scripts
            .acquire_waiting(
                &mut self.con,
                &self.ns,
                id,
                "test",
                None,
                token,
                self.lease,
                waiter_ttl,
                false,
            )
            .await
            .unwrap()
            .reply
    }

    /// Tries an acquire as the limiter "tok" with lease `id` and one extra
    /// lease id per entry of `extra`.
    async fn acquire_batch(
        &mut self,
        id: &str,
        extra: &[&str],
        key: Option<&str>,
    ) -> AcquireOutcome {
        let extra_lease_ids: Vec<String> = extra.iter().map(|id| id.to_string()).collect();
        let request = AcquireRequest {
            lease_id: id,
            extra_lease_ids: &extra_lease_ids,
            holder: "test",
            key,
            token: "tok",
            fallback_lease: self.lease,
            waiter_ttl: Duration::from_secs(3),
            followers: extra.len(),
        };
        self.scripts
            .acquire_batch(&mut self.con, &self.ns, &request)
            .await
            .unwrap()
    }

    fn lease_field(&self, id: &str, field: &str) -> String {
        self.server
            .command(&["HGET", &self.ns.lease_key(id), field])
            .trim()
            .to_owned()
    }

    async fn renew_expecting(&mut self, id: &str, expected_expiry_ms: u64) -> RenewReply {
        let leases = [(
            LeaseRef {
                lease_id: id,
                key: None,
            },
            expected_expiry_ms,
        )];
        self.scripts
            .renew_expecting(&mut self.con, &self.ns, &leases, "tok", self.lease)
            .await
            .unwrap()
    }

    async fn set_limit(&mut self, field: &str, value: Option<u64>, fallback_lease: Duration) {
        self.scripts
            .set_limit(&mut self.con, &self.ns, field, value, "tok", fallback_lease)
            .await
            .unwrap();
    }

    async fn restore_limits(&mut self, fields: &[(String, String)]) -> bool {
        self.scripts
            .restore_limits(&mut self.con, &self.ns, fields)
            .await
            .unwrap()
    }

    fn count(&self, key: Option<&str>) -> String {
        support::holder_count(&self.server, &self.ns, key)
    }

    fn meta(&self, field: &str) -> String {
        self.server
            .command(&["HGET", &self.ns.meta_key(), field])
            .trim()
            .to_owned()
    }

    fn score(&self, id: &str) -> String {
        self.server
            .command(&["ZSCORE", &self.ns.holders_key(None), id])
            .trim()
            .to_owned()
    }
}

fn fence(reply: &AcquireReply) -> u64 {
    match reply {
        AcquireReply::Granted { fence, .. } => *fence,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn expiry(reply: &AcquireReply) -> u64 {
    match reply {
        AcquireReply::Granted { expiry_ms, .. } => *expiry_ms,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// Returns the retry hint of a busy reply and whether the global count is
/// full.
fn busy(reply: &AcquireReply) -> (Duration, bool) {
    match reply {
        AcquireReply::Busy {
            retry_in,
            global_full,
            ..
        } => (*retry_in, *global_full),
        other => panic!("expected busy, got {other:?}"),
    }
}

fn is_busy(reply: &AcquireReply) -> bool {
    matches!(reply, AcquireReply::Busy { .. })
}

/// Returns the time left in the grace of a grace reply.
fn grace_wait(reply: &AcquireReply) -> Duration {
    match reply {
        AcquireReply::Grace { wait, .. } => *wait,
        other => panic!("expected a grace, got {other:?}"),
    }
}

#[tokio::test]
async fn fill_to_limit_rejects_next() {
    let Some(mut f) = fixture(Duration::from_secs(5), 3).await else {
        return;
    };
    let mut last = 0;
    for id in ["a", "b", "c"] {
        let next = fence(&f.acquire(id, None).await);
        assert!(next > last, "fence {next} after {last}");
        last = next;
    }
    let (retry_in, global_full) = busy(&f.acquire("d", None).await);
    assert!(global_full);
    assert!(retry_in <= Duration::from_secs(5), "{retry_in:?}");
    assert_eq!(f.count(None), ":3");
    assert_eq!(f.score("d"), "$-1");
}

#[tokio::test]
async fn full_key_takes_nothing_from_global() {
    let Some(mut f) = fixture(Duration::from_secs(5), 3).await else {
        return;
    };
    let limits = f.ns.limits_key();
    f.server.command(&["HSET", &limits, "k:a", "1"]);
    fence(&f.acquire("a1", Some("a")).await);
    let (_, global_full) = busy(&f.acquire("a2", Some("a")).await);
    assert!(!global_full);
    assert_eq!(f.count(None), ":1");
    assert_eq!(f.count(Some("a")), ":1");
    assert_eq!(f.score("a2"), "$-1");

    // A full global count takes nothing from a key with room.
    fence(&f.acquire("g1", None).await);
    fence(&f.acquire("g2", None).await);
    let (_, global_full) = busy(&f.acquire("b1", Some("b")).await);
    assert!(global_full);
    assert_eq!(f.count(Some("b")), ":0");
    assert_eq!(f.count(None), ":3");
}

#[tokio::test]
async fn expired_lease_reaped_with_hint() {
    let lease = Duration::from_millis(600);
    let Some(mut f) = fixture(lease, 2).await else {
        return;
    };
    fence(&f.acquire("first", None).await);
    tokio::time::sleep(Duration::from_millis(250)).await;
    fence(&f.acquire("second", None).await);
    let (retry_in, _) = busy(&f.acquire("third", None).await);
    // The hint is the time left of "first", not of "second".
    assert!(retry_in <= Duration::from_millis(350), "{retry_in:?}");
    assert!(retry_in >= Duration::from_millis(1), "{retry_in:?}");
    tokio::time::sleep(retry_in + Duration::from_millis(30)).await;
    fence(&f.acquire("third", None).await);
    assert_eq!(f.score("first"), "$-1");
    assert_eq!(f.count(None), ":2");
}

#[tokio::test]
async fn renew_after_expiry_is_lost() {
    let lease = Duration::from_millis(300);
    let Some(mut f) = fixture(lease, 5).await else {
        return;
    };
    fence(&f.acquire("old", Some("a")).await);
    fence(&f.acquire("live", Some("a")).await);
    let before = f.score("live");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        f.renew(&[("live", Some("a"))]).await,
        vec![true],
        "a live lease renews"
    );
    assert_ne!(f.score("live"), before, "renewal moves the expiry");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // "old" expired 50 ms ago but nothing reaped it yet.
    assert_eq!(
        f.renew(&[("old", Some("a")), ("live", Some("a"))]).await,
        vec![false, true]
    );
    assert_eq!(f.score("old"), "$-1", "a lost lease is not resurrected");
    assert_eq!(f.count(Some("a")), ":1");
    assert_eq!(f.renew(&[("old", Some("a"))]).await, vec![false]);
}

#[tokio::test]
async fn release_twice_returns_zero() {
    let Some(mut f) = fixture(Duration::from_secs(5), 2).await else {
        return;
    };
    fence(&f.acquire("x", Some("a")).await);
    assert_eq!(f.release("x", Some("a")).await, 2);
    assert_eq!(f.release("x", Some("a")).await, 0);
    assert_eq!(f.count(None), ":0");
    // The lease hash stays until its expiry, marked released.
    let released = f
        .server
        .command(&["HGET", &f.ns.lease_key("x"), "released"]);
    assert!(released.ends_with("1\r\n"), "{released:?}");
    let ttl = f.server.command(&["PTTL", &f.ns.lease_key("x")]);
    assert!(
        !ttl.starts_with(":-"),
        "the lease hash keeps its expiry: {ttl:?}"
    );
}

#[tokio::test]
async fn limit_shrink_keeps_holders() {
    let Some(mut f) = fixture(Duration::from_secs(5), 3).await else {
        return;
    };
    for id in ["a", "b", "c"] {
        fence(&f.acquire(id, None).await);
    }
    let lease = f.lease;
    f.set_limit("global", Some(1), lease).await;
    assert_eq!(f.count(None), ":3", "shrinking revokes nobody");
    assert!(is_busy(&f.acquire("d", None).await));
    f.release("a", None).await;
    f.release("b", None).await;
    assert!(
        is_busy(&f.acquire("d", None).await),
        "one holder left fills a limit of one"
    );
    f.release("c", None).await;
    fence(&f.acquire("d", None).await);
}

#[tokio::test]
async fn lost_state_grace_then_larger_fence() {
    let lease = Duration::from_millis(500);
    let Some(mut f) = fixture(lease, 2).await else {
        return;
    };
    let mut before = 0;
    for id in ["a", "b"] {
        before = before.max(fence(&f.acquire(id, None).await));
    }
    assert!(f.server.command(&["FLUSHALL"]).starts_with("+OK"));

    assert_eq!(f.acquire("c", None).await, AcquireReply::NoLimit);
    let fields = vec![
        ("lease_ms".to_owned(), "500".to_owned()),
        ("global".to_owned(), "2".to_owned()),
    ];
    assert!(f.restore_limits(&fields).await);
    let wait = grace_wait(&f.acquire("c", None).await);
    assert!(wait <= lease, "{wait:?}");
    assert!(wait >= Duration::from_millis(300), "{wait:?}");
    assert_eq!(f.count(None), ":0", "nothing granted during the grace");

    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    let after = fence(&f.acquire("c", None).await);
    assert!(after > before, "fence {after} not above {before}");

    // A second restore does not overwrite limits that exist.
    assert!(!f.restore_limits(&fields).await);
}

/// Subscribes a plain connection to the wake channel.
async fn subscribe(f: &Fixture) -> redis::aio::PubSub {
    let client = redis::Client::open(f.server.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(f.ns.wake_channel()).await.unwrap();
    pubsub
}

/// Returns the next wake message, or `None` after 300 ms without one.
async fn next_wake(pubsub: &mut redis::aio::PubSub) -> Option<String> {
    let mut messages = pubsub.on_message();
    let message = tokio::time::timeout(Duration::from_millis(300), messages.next())
        .await
        .ok()??;
    Some(message.get_payload().unwrap())
}

#[tokio::test]
async fn release_names_oldest_waiter() {
    let Some(mut f) = fixture(Duration::from_secs(5), 1).await else {
        return;
    };
    let ttl = Duration::from_secs(5);
    fence(&f.acquire_as("h", "holder", ttl).await);
    assert!(is_busy(&f.acquire_as("a1", "first", ttl).await));
    assert!(is_busy(&f.acquire_as("b1", "second", ttl).await));
    // A second busy reply keeps the first waiter's place.
    assert!(is_busy(&f.acquire_as("a2", "first", ttl).await));
    let mut pubsub = subscribe(&f).await;
    assert_eq!(f.release("h", None).await, 1);
    assert_eq!(next_wake(&mut pubsub).await.as_deref(), Some("@first:"));
    assert_eq!(next_wake(&mut pubsub).await, None);
    // The named waiter's grant leaves the queue.
    fence(&f.acquire_as("a3", "first", ttl).await);
    let queue = f.ns.waiter_keys(None).queue;
    let members = f.server.command(&["ZRANGE", &queue, "0", "-1"]);
    assert!(!members.contains("first"), "queue after grant: {members}");
    assert!(members.contains("second"), "queue after grant: {members}");
}

#[tokio::test]
async fn named_waiter_not_named_twice() {
    let Some(mut f) = fixture(Duration::from_secs(5), 2).await else {
        return;
    };
    let ttl = Duration::from_secs(5);
    fence(&f.acquire_as("h1", "holder", ttl).await);
    fence(&f.acquire_as("h2", "holder", ttl).await);
    assert!(is_busy(&f.acquire_as("a1", "first", ttl).await));
    assert!(is_busy(&f.acquire_as("b1", "second", ttl).await));
    let mut pubsub = subscribe(&f).await;
    f.release("h1", None).await;
    assert_eq!(next_wake(&mut pubsub).await.as_deref(), Some("@first:"));
    f.release("h2", None).await;
    assert_eq!(next_wake(&mut pubsub).await.as_deref(), Some("@second:"));
}

#[tokio::test]
async fn expired_waiter_skipped() {
    let Some(mut f) = fixture(Duration::from_secs(5), 1).await else {
        return;
    };
    let ttl = Duration::from_secs(5);
    fence(&f.acquire_as("h", "holder", ttl).await);
    let short = Duration::from_millis(1);
    assert!(is_busy(&f.acquire_as("a1", "gone", short).await));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(is_busy(&f.acquire_as("b1", "live", ttl).await));
    let mut pubsub = subscribe(&f).await;
    f.release("h", None).await;
    assert_eq!(next_wake(&mut pubsub).await.as_deref(), Some("@live:"));
    let keys = f.ns.waiter_keys(None);
    let score = f.server.command(&["ZSCORE", &keys.queue, "gone:"]);
    assert_eq!(score.trim(), "$-1", "expired waiter still queued");
}

#[tokio::test]
async fn vanished_lease_starts_grace() {
    let Some(mut f) = fixture(Duration::from_secs(5), 3).await else {
        return;
    };
    let granted = f.acquire("a", None).await;
    let expected = expiry(&granted);
    // Lost writes, as after a restart from an older snapshot.
    f.server.command(&["ZREM", &f.ns.holders_key(None), "a"]);
    f.server.command(&["DEL", &f.ns.lease_key("a")]);

    let reply = f.renew_expecting("a", expected).await;
    assert_eq!(reply.renewed, vec![false]);
    assert_ne!(reply.epoch, "e0", "a new epoch cuts off every holder");
    let stored = f.meta("epoch");
    assert!(stored.ends_with(&reply.epoch), "{stored:?}");
    let wait = grace_wait(&f.acquire("b", None).await);
    assert!(wait > Duration::from_secs(4), "{wait:?}");
}

#[tokio::test]
async fn released_lease_renewal_keeps_grants_open() {
    let Some(mut f) = fixture(Duration::from_secs(5), 3).await else {
        return;
    };
    let expected = expiry(&f.acquire("a", None).await);
    assert_eq!(f.release("a", None).await, 1);
    // A renewal sent before the release reached Redis.
    let reply = f.renew_expecting("a", expected).await;
    assert_eq!(reply.renewed, vec![false]);
    assert_eq!(reply.epoch, "e0");
    fence(&f.acquire("b", None).await);
}

#[tokio::test]
async fn expired_lease_renewal_keeps_grants_open() {
    let lease = Duration::from_millis(300);
    let Some(mut f) = fixture(lease, 3).await else {
        return;
    };
    let expected = expiry(&f.acquire("a", None).await);
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    // Another acquire reaps the expired member before the renewal.
    fence(&f.acquire("b", None).await);
    let reply = f.renew_expecting("a", expected).await;
    assert_eq!(reply.renewed, vec![false]);
    assert_eq!(reply.epoch, "e0");
    fence(&f.acquire("c", None).await);
}

#[tokio::test]
async fn other_server_run_id_starts_grace() {
    let Some(mut f) = fixture(Duration::from_secs(5), 3).await else {
        return;
    };
    // The first renewal stamps the meta hash with this server's run id.
    let stamp = f.renew(&[]).await;
    assert!(stamp.is_empty());
    fence(&f.acquire("a", None).await);
    let run_id = f.meta("run_id");
    assert!(run_id.len() > 40, "{run_id:?}");

    // A meta hash written by another server process, as after a restart.
    f.server
        .command(&["HSET", &f.ns.meta_key(), "run_id", "0000"]);
    let reply = f.renew_expecting("a", 0).await;
    assert_eq!(reply.renewed, vec![false]);
    assert_ne!(reply.epoch, "e0");
    assert_eq!(f.meta("run_id"), run_id, "stamped again");
    assert!(matches!(
        f.acquire("b", None).await,
        AcquireReply::Grace { .. }
    ));
}

/// A namespace without limits grants nothing, so neither an acquire nor a
/// renewal starts its grace. The grace starts with the lease that the first
/// limits set, not with a client's fallback lease.
#[tokio::test]
async fn no_limits_start_no_grace() {
    let Some(mut f) = fixture(Duration::from_secs(1), 1).await else {
        return;
    };
    f.server.command(&["FLUSHALL"]);
    assert_eq!(f.acquire("a", None).await, AcquireReply::NoLimit);
    assert!(f.renew(&[("a", None)]).await.iter().all(|renewed| !renewed));
    let meta = f.server.command(&["EXISTS", &f.ns.meta_key()]);
    assert_eq!(meta.trim(), ":0", "meta created without limits");

    let fallback_lease = Duration::from_secs(30);
    f.set_limit("lease_ms", Some(600), fallback_lease).await;
    f.set_limit("global", Some(1), fallback_lease).await;
    let wait = grace_wait(&f.acquire("b", None).await);
    assert!(
        wait <= Duration::from_millis(600),
        "grace {wait:?}, lease 600 ms"
    );
}

const EXTRA_IDS: [&str; 7] = ["e1", "e2", "e3", "e4", "e5", "e6", "e7"];

#[tokio::test]
async fn batch_grants_distinct_increasing_fences() {
    let Some(mut f) = fixture(Duration::from_secs(5), 10).await else {
        return;
    };
    let outcome = f.acquire_batch("own", &EXTRA_IDS[..4], None).await;
    let first = fence(&outcome.reply);
    assert_eq!(outcome.extra_fences.len(), 4);
    assert_eq!(f.count(None), ":5");
    let mut last = first;
    for (id, next) in EXTRA_IDS[..4].iter().zip(&outcome.extra_fences) {
        assert!(*next > last, "fence {next} after {last}");
        assert_eq!(
            f.lease_field(id, "fence"),
            format!("${}\r\n{next}", next.to_string().len())
        );
        assert_ne!(f.score(id), "$-1");
        last = *next;
    }
    assert_eq!(
        f.meta("fence"),
        format!("${}\r\n{last}", last.to_string().len())
    );
    // The next single grant continues above the batch.
    let after = fence(&f.acquire("later", None).await);
    assert!(after > last, "fence {after} after {last}");
}

#[tokio::test]
async fn batch_stays_within_limits() {
    let Some(mut f) = fixture(Duration::from_secs(5), 4).await else {
        return;
    };
    let limits = f.ns.limits_key();
    f.server.command(&["HSET", &limits, "k:a", "3"]);

    // The key's limit of 3 cuts a batch of 8.
    let outcome = f.acquire_batch("a0", &EXTRA_IDS, Some("a")).await;
    fence(&outcome.reply);
    assert_eq!(outcome.extra_fences.len(), 2);
    assert_eq!(f.count(Some("a")), ":3");
    assert_eq!(f.count(None), ":3");
    assert_eq!(f.score("e3"), "$-1");

    // One global place is left.
    let outcome = f.acquire_batch("g0", &["g1", "g2"], None).await;
    fence(&outcome.reply);
    assert!(outcome.extra_fences.is_empty());
    assert_eq!(f.count(None), ":4");
    assert_eq!(f.score("g1"), "$-1");

    // A full count grants nothing at all.
    let outcome = f.acquire_batch("h0", &["h1"], None).await;
    assert!(is_busy(&outcome.reply));
    assert!(outcome.extra_fences.is_empty());
    assert_eq!(f.count(None), ":4");
}

#[tokio::test]
async fn batch_capped_by_fair_share() {
    let Some(mut f) = fixture(Duration::from_secs(5), 8).await else {
        return;
    };
    let ttl = Duration::from_secs(3);
    let held: Vec<String> = (0..8).map(|i| format!("h{i}")).collect();
    for id in &held {
        fence(&f.acquire_as(id, "holder", ttl).await);
    }
    // Another limiter waits for the full global count.
    assert!(is_busy(&f.acquire_as("o1", "other", ttl).await));
    for id in &held {
        f.release(id, None).await;
    }

    // Eight free places shared with one queued limiter: four for this batch.
    let outcome = f.acquire_batch("own", &EXTRA_IDS, None).await;
    fence(&outcome.reply);
    assert_eq!(outcome.extra_fences.len(), 3);
    assert_eq!(f.count(None), ":4");

    // The other limiter still finds room.
    fence(&f.acquire_as("o1", "other", ttl).await);
    assert_eq!(f.count(None), ":5");
}
