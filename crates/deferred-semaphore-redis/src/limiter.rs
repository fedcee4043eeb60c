//! The limiter: connection, acquire loop, limits and the trait impls.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{oneshot, Notify};

use crate::error::{redact_url, CallError, Error};
use crate::lease::{deadline_after, renew_all, run_heartbeat, LeaseState, Timing};
use crate::permit::RedisPermit;
use crate::scripts::{
    self, key_field, AcquireReply, AcquireRequest, Namespace, QueuedCount, Scripts,
    DEFAULT_LEASE_MS,
};
use crate::stats::{Counters, Stats};
use crate::wake::{run_subscriber, Entry, Gates, QueuedWait, Wakes, SUBSCRIBE_STEP};
use crate::{Holder, LimitChange, Limits, Options, MAX_LIMIT};

/// The shortest lease [`RedisLimiter::set_limit`] accepts: the deadline
/// margin is at least 100 ms, so a shorter lease leaves holders almost no
/// time.
const MIN_LEASE: Duration = Duration::from_millis(200);

/// The maximum number of leases one acquire call requests: the caller's
/// own and one for each local waiter behind it at its gate.
const MAX_BATCH: usize = 16;

/// Pauses between tries while Redis cannot be reached: from 50 ms,
/// doubling up to 1 s, until `patience` has passed since `since`.
struct Backoff {
    since: Option<Instant>,
    pause: Duration,
    patience: Duration,
}

impl Backoff {
    /// Returns a backoff whose patience runs from the first failure.
    fn new(patience: Duration) -> Self {
        Self {
            since: None,
            pause: Duration::from_millis(50),
            patience,
        }
    }

    /// Returns a backoff whose patience runs from now.
    fn started_now(patience: Duration) -> Self {
        Self {
            since: Some(Instant::now()),
            ..Self::new(patience)
        }
    }

    /// Restarts the patience at the next failure, after Redis answered.
    fn answered(&mut self) {
        self.since = None;
    }

    /// Sleeps before the next try, never past the patience. Returns the
    /// time waited instead once the patience is spent.
    async fn wait(&mut self) -> Result<(), Duration> {
        let since = *self.since.get_or_insert_with(Instant::now);
        let waited = since.elapsed();
        if waited >= self.patience {
            return Err(waited);
        }
        tokio::time::sleep(self.pause.min(self.patience - waited)).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(1));
        Ok(())
    }
}

/// The marker in `global_limit` for "no global limit known".
const NO_LIMIT: u64 = u64::MAX;

/// State shared by a limiter's clones, its permits and its background
/// tasks.
pub(crate) struct Inner {
    pub(crate) namespace: Namespace,
    pub(crate) url: String,
    pub(crate) con: ConnectionManager,
    pub(crate) scripts: Scripts,
    pub(crate) options: Options,
    /// Random id of this limiter. It names the limiter in the waiter queues
    /// and goes into the epoch when this limiter recreates the namespace
    /// state.
    pub(crate) token: String,
    lease_ms: AtomicU64,
    /// Signal that wakes the heartbeat when a reply reports a shorter lease.
    lease_shrunk: Arc<Notify>,
    /// Lock that lets one renewal run at a time, from the heartbeat or an
    /// acquire.
    pub(crate) renewing: tokio::sync::Mutex<()>,
    global_limit: AtomicU64,
    cache: Mutex<Option<Limits>>,
    leases: Mutex<HashMap<String, Weak<LeaseState>>>,
    wakes: Arc<Wakes>,
    gates: Arc<Gates>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) releases: Arc<PendingReleases>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// Counts the releases of dropped permits still on their way to Redis, so
/// that a process can wait for them before it exits.
#[derive(Debug, Default)]
pub(crate) struct PendingReleases {
    count: AtomicUsize,
    done: tokio::sync::Notify,
}

impl PendingReleases {
    pub(crate) fn start(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn finish(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.done.notify_waiters();
        }
    }

    async fn wait(&self) {
        loop {
            let done = self.done.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().expect("task list lock").drain(..) {
            task.abort();
        }
    }
}

impl Inner {
    pub(crate) fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(Ordering::Relaxed))
    }

    /// Stores the namespace's lease from a reply, and wakes the heartbeat
    /// to plan its sleep again when the lease shrank.
    pub(crate) fn set_lease(&self, lease: Duration) {
        let lease_ms = scripts::millis(lease).max(1);
        let old = self.lease_ms.swap(lease_ms, Ordering::Relaxed);
        if lease_ms < old {
            self.lease_shrunk.notify_one();
        }
    }

    /// Returns the shortest of the namespace's lease and the leases that the
    /// live leases were last granted or renewed with.
    pub(crate) fn shortest_lease(&self) -> Duration {
        self.live_leases()
            .iter()
            .map(|lease| lease.timing().lease)
            .fold(self.lease(), Duration::min)
    }

    /// Returns the last lease this limiter saw, which a script uses when the
    /// limits hash stores no lease.
    pub(crate) fn fallback_lease(&self) -> Duration {
        self.lease()
    }

    /// Returns the reply timeout of an acquire, release or admin call, which
    /// is half a lease clamped to between 200 ms and 5 s.
    pub(crate) fn call_timeout(&self) -> Duration {
        (self.lease() / 2).clamp(Duration::from_millis(200), Duration::from_secs(5))
    }

    pub(crate) fn live_leases(&self) -> Vec<Arc<LeaseState>> {
        let mut leases = self.leases.lock().expect("lease map lock");
        leases.retain(|_, lease| lease.strong_count() > 0);
        leases.values().filter_map(Weak::upgrade).collect()
    }

    pub(crate) fn forget_lease(&self, lease_id: &str) {
        self.leases.lock().expect("lease map lock").remove(lease_id);
    }

    /// Returns whether this limiter still holds the lease, that is, has not
    /// released or dropped its permit.
    pub(crate) fn holds_lease(&self, lease_id: &str) -> bool {
        self.leases
            .lock()
            .expect("lease map lock")
            .contains_key(lease_id)
    }

    fn set_global(&self, limit: Option<u64>) {
        self.global_limit
            .store(limit.unwrap_or(NO_LIMIT), Ordering::Relaxed);
    }

    fn store_limits(&self, limits: &Limits) {
        self.set_lease(limits.lease);
        self.set_global(limits.global);
        *self.cache.lock().expect("limit cache lock") = Some(limits.clone());
    }

    /// Runs `op`, and runs it again while Redis cannot be reached, for up to
    /// `unavailable_after`. Each run gets one call timeout.
    async fn retry_unreachable<T, F, Fut>(&self, mut op: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>>,
    {
        let mut backoff = Backoff::started_now(self.options.unavailable_after);
        loop {
            let timeout = self.call_timeout();
            let result = match tokio::time::timeout(timeout, op()).await {
                Ok(result) => result,
                Err(_) => Err(CallError::timed_out(timeout)),
            };
            match result {
                Ok(value) => return Ok(value),
                Err(CallError::Failed(message)) => return Err(Error::Redis(message)),
                Err(CallError::Unreachable(message)) => {
                    if let Err(waited) = backoff.wait().await {
                        return Err(self.unavailable(waited, message));
                    }
                }
            }
        }
    }

    fn unavailable(&self, waited: Duration, last_error: String) -> Error {
        Error::Unavailable {
            url: self.url.clone(),
            waited,
            last_error,
        }
    }

    async fn read_limits(&self) -> Result<Limits, CallError> {
        let mut con = self.con.clone();
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.namespace.limits_key())
            .query_async(&mut con)
            .await?;
        parse_limits(&fields)
    }

    /// Writes the cached limits back when the limits hash is gone. Returns
    /// `false` when there is no cached global limit to write.
    async fn restore_limits(&self) -> Result<bool, CallError> {
        let cached = self.cache.lock().expect("limit cache lock").clone();
        let Some(limits) = cached.filter(|limits| limits.global.is_some()) else {
            return Ok(false);
        };
        let fields = limit_fields(&limits);
        let mut con = self.con.clone();
        self.scripts
            .restore_limits(&mut con, &self.namespace, &fields)
            .await?;
        Ok(true)
    }

    /// Sends one acquire call. Runs in its own task, so that a grant for a
    /// cancelled acquire still becomes a permit, which releases itself.
    ///
    /// `followers` is the number of local waiters behind the caller at its
    /// gate. The call requests a lease for each of them too (up to
    /// [`MAX_BATCH`] in all), and a grant that leaves a count full with
    /// followers still unserved queues this limiter in Redis as that
    /// count's next waiter (see [`Scripts::acquire_batch`]).
    async fn call_acquire(
        self: Arc<Self>,
        key: Option<String>,
        followers: usize,
    ) -> Result<Attempt, CallError> {
        let lease_id = new_id();
        let extra_ids: Vec<String> = (0..followers.min(MAX_BATCH - 1))
            .map(|_| new_id())
            .collect();
        let mut con = self.con.clone();
        let sent = Instant::now();
        self.counters.acquire_calls.fetch_add(1, Ordering::Relaxed);
        let request = AcquireRequest {
            lease_id: &lease_id,
            extra_lease_ids: &extra_ids,
            holder: &self.options.holder,
            key: key.as_deref(),
            token: &self.token,
            fallback_lease: self.fallback_lease(),
            waiter_ttl: self.options.poll_max.saturating_mul(3),
            followers,
        };
        let outcome = self
            .scripts
            .acquire_batch(&mut con, &self.namespace, &request)
            .await?;
        Ok(match outcome.reply {
            AcquireReply::Granted {
                fence,
                expiry_ms,
                epoch,
                lease,
                global_limit,
            } => {
                self.set_lease(lease);
                self.set_global(Some(global_limit));
                let timing = Timing {
                    deadline: deadline_after(sent, lease),
                    lease,
                    expiry_ms,
                };
                let permit = self.new_permit(lease_id, key.clone(), fence, epoch.clone(), timing);
                let extra = extra_ids
                    .into_iter()
                    .zip(outcome.extra_fences)
                    .map(|(id, fence)| {
                        self.new_permit(id, key.clone(), fence, epoch.clone(), timing)
                    })
                    .collect();
                Attempt::Granted {
                    permit,
                    extra,
                    queued_next: outcome.queued_next,
                }
            }
            AcquireReply::Busy {
                retry_in,
                global_full,
                lease,
                global_limit,
            } => {
                self.set_lease(lease);
                self.set_global(Some(global_limit));
                Attempt::Busy {
                    retry_in,
                    global_full,
                }
            }
            AcquireReply::Grace { wait, lease } => {
                self.set_lease(lease);
                Attempt::Grace { wait }
            }
            AcquireReply::NoLimit => Attempt::NoLimit,
        })
    }

    /// Registers a granted lease for the heartbeat and wraps it in a permit.
    fn new_permit(
        self: &Arc<Self>,
        lease_id: String,
        key: Option<String>,
        fence: u64,
        epoch: String,
        timing: Timing,
    ) -> RedisPermit {
        let state = Arc::new(LeaseState::new(
            lease_id.clone(),
            key,
            fence,
            epoch,
            timing,
            self.counters.clone(),
        ));
        self.leases
            .lock()
            .expect("lease map lock")
            .insert(lease_id, Arc::downgrade(&state));
        self.counters.grants.fetch_add(1, Ordering::Relaxed);
        RedisPermit {
            state,
            inner: self.clone(),
            released: false,
        }
    }
}

enum Attempt {
    Granted {
        permit: RedisPermit,
        /// The permits granted with `permit` for the caller's followers.
        extra: Vec<RedisPermit>,
        queued_next: Option<QueuedCount>,
    },
    Busy {
        retry_in: Duration,
        global_full: bool,
    },
    Grace {
        wait: Duration,
    },
    NoLimit,
}

/// Sends one acquire call and waits for its reply for at most one call
/// timeout.
async fn try_once(
    inner: &Arc<Inner>,
    key: Option<String>,
    followers: usize,
) -> Result<Attempt, CallError> {
    let (sender, receiver) = oneshot::channel();
    let task_inner = inner.clone();
    // Counted with the releases: a grant for a waiter that gave up is
    // released by this task, and an exit must wait for it too.
    inner.releases.start();
    tokio::spawn(async move {
        // When the caller no longer waits, the permits in the reply are
        // dropped here and release their leases.
        let reply = task_inner.clone().call_acquire(key, followers).await;
        let _ = sender.send(reply);
        task_inner.releases.finish();
    });
    let timeout = inner.call_timeout();
    match tokio::time::timeout(timeout, receiver).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(CallError::Unreachable(
            "the acquire task ended without a reply".into(),
        )),
        Err(_) => Err(CallError::timed_out(timeout)),
    }
}

/// Waits for a permit: queues behind earlier local waiters of the same key,
/// then tries Redis until granted, sleeping between tries until a wake-up,
/// the script's retry hint or `poll_max`.
///
/// A task whose turn comes while an earlier task's batch left a permit at
/// the gate takes that permit without a try. Otherwise the first try goes
/// at once, unless the previous task at the gate left this process queued
/// in Redis for a full count. In that case it first waits for its name on
/// the wake channel, or `poll_max` at most.
async fn acquire(inner: Arc<Inner>, key: Option<String>) -> Result<RedisPermit, Error> {
    if let Some(key) = &key {
        validate_key(key)?;
    }
    let mut gate = match inner.gates.enter(key.as_deref()).await {
        Entry::Granted(permit) => return Ok(permit),
        Entry::Turn(gate) => gate,
    };
    let poll_max = inner.options.poll_max;
    if let Some(mut queued) = gate.take_queued() {
        queued.wake.wait(queued.global_full, jitter(poll_max)).await;
    }
    let mut backoff = Backoff::new(inner.options.unavailable_after);
    let mut restored = false;
    let mut check_server = false;
    loop {
        // A failed call may mean that Redis restarted. The renew script
        // checks that before the next try and starts a grace if Redis lost
        // writes, so that this process is not granted beside holders whose
        // leases vanished.
        if check_server && !renew_all(&inner).await {
            if let Err(waited) = backoff.wait().await {
                let message = "the renew call that checks the server failed".to_owned();
                return Err(inner.unavailable(waited, message));
            }
            continue;
        }
        check_server = false;
        let mut wake = inner.wakes.watch(key.as_deref());
        let error = match try_once(&inner, key.clone(), gate.followers()).await {
            Ok(Attempt::Granted {
                permit,
                extra,
                queued_next,
            }) => {
                gate.pass_grants(extra);
                if let Some(count) = queued_next {
                    gate.hand_over(QueuedWait {
                        wake,
                        global_full: count == QueuedCount::Global,
                    });
                }
                return Ok(permit);
            }
            Ok(Attempt::Busy {
                retry_in,
                global_full,
            }) => {
                backoff.answered();
                wake.wait(global_full, jitter(retry_in.min(poll_max))).await;
                continue;
            }
            Ok(Attempt::Grace { wait }) => {
                backoff.answered();
                tokio::time::sleep(jitter(wait.min(poll_max))).await;
                continue;
            }
            Ok(Attempt::NoLimit) if !restored => match inner.restore_limits().await {
                Ok(true) => {
                    restored = true;
                    continue;
                }
                Ok(false) => return Err(no_limit(&inner)),
                Err(error) => error,
            },
            Ok(Attempt::NoLimit) => return Err(no_limit(&inner)),
            Err(error) => error,
        };
        match error {
            CallError::Failed(message) => return Err(Error::Redis(message)),
            CallError::Unreachable(message) => {
                check_server = true;
                if let Err(waited) = backoff.wait().await {
                    return Err(inner.unavailable(waited, message));
                }
            }
        }
    }
}

fn no_limit(inner: &Inner) -> Error {
    Error::NoLimit {
        namespace: inner.namespace.name().to_owned(),
    }
}

/// A limiter whose counts live in Redis, shared by every process that uses
/// the same URL and namespace. Cheap to clone.
///
/// It also implements [`deferred_semaphore::Limiter`] (global limit only;
/// `limit()` is the last known global limit, at least 1) and
/// [`deferred_semaphore::KeyedLimiter`] for any `K: AsRef<str>` (global
/// limit and the key's limit, taken together).
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("url", &self.inner.url)
            .field("namespace", &self.inner.namespace.name())
            .field("options", &self.inner.options)
            .finish()
    }
}

impl RedisLimiter {
    /// Connects to `url` (`redis://[user[:password]@]host:port[/db]`) and
    /// uses the limits stored under `namespace`. Reads and caches the
    /// limits, then starts the heartbeat and the wake-up listener on the
    /// current tokio runtime.
    ///
    /// Retries for up to [`Options::unavailable_after`] while Redis cannot
    /// be reached. A namespace without limits connects; `acquire_*` then
    /// fails with [`Error::NoLimit`] until one is set.
    pub async fn connect(url: &str, namespace: &str, options: Options) -> Result<Self, Error> {
        let namespace = Namespace::new(namespace)?;
        let shown = redact_url(url);
        if options.poll_max.is_zero() {
            return Err(Error::Config(
                "Options::poll_max is zero; set it to a positive duration such as 1 s".into(),
            ));
        }
        let client = redis::Client::open(url).map_err(|error| {
            Error::Config(format!(
                "invalid Redis URL {shown}: {error}; expected redis://[user[:password]@]host:port"
            ))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let mut backoff = Backoff::started_now(options.unavailable_after);
        let con = loop {
            match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                Ok(con) => break con,
                Err(error) => match CallError::from(error) {
                    CallError::Failed(message) => return Err(Error::Redis(message)),
                    CallError::Unreachable(message) => {
                        if let Err(waited) = backoff.wait().await {
                            return Err(Error::Unavailable {
                                url: shown,
                                waited,
                                last_error: message,
                            });
                        }
                    }
                },
            }
        };
        let token = format!("{:016x}", random_u64());
        let inner = Arc::new(Inner {
            url: shown,
            con,
            scripts: Scripts::new(),
            options,
            wakes: Arc::new(Wakes::new(token.clone())),
            token,
            lease_ms: AtomicU64::new(DEFAULT_LEASE_MS),
            lease_shrunk: Arc::new(Notify::new()),
            renewing: tokio::sync::Mutex::new(()),
            global_limit: AtomicU64::new(NO_LIMIT),
            cache: Mutex::new(None),
            leases: Mutex::new(HashMap::new()),
            gates: Arc::new(Gates::default()),
            counters: Arc::new(Counters::default()),
            releases: Arc::new(PendingReleases::default()),
            tasks: Mutex::new(Vec::new()),
            namespace,
        });
        let limits = inner.retry_unreachable(|| inner.read_limits()).await?;
        if limits.global.is_some() {
            inner.store_limits(&limits);
        } else {
            inner.set_lease(limits.lease);
        }
        let heartbeat = tokio::spawn(run_heartbeat(
            Arc::downgrade(&inner),
            inner.lease_shrunk.clone(),
        ));
        let (subscribed, first_subscription) = tokio::sync::oneshot::channel();
        let subscriber = tokio::spawn(run_subscriber(
            client,
            inner.namespace.wake_channel(),
            inner.wakes.clone(),
            subscribed,
        ));
        inner
            .tasks
            .lock()
            .expect("task list lock")
            .extend([heartbeat.abort_handle(), subscriber.abort_handle()]);
        // A release published before the subscription holds would not wake
        // this process's first waiter until its poll. Waiting is bounded:
        // without a subscription the polls still serve every waiter.
        let _ = tokio::time::timeout(SUBSCRIBE_STEP, first_subscription).await;
        Ok(Self { inner })
    }

    /// Waits for a permit under the global limit only.
    ///
    /// Fails with [`Error::NoLimit`] when no global limit is stored (after
    /// writing back the limits this limiter cached, if the stored ones were
    /// lost) and with [`Error::Unavailable`] when Redis cannot be reached
    /// for [`Options::unavailable_after`]. Cancel safe: a grant that
    /// arrives after the future was dropped is released.
    pub async fn acquire_global(&self) -> Result<RedisPermit, Error> {
        acquire(self.inner.clone(), None).await
    }

    /// Waits for a permit under the global limit and the limit of `key`,
    /// taken together: either both count the lease or neither does. A key
    /// without a limit of its own uses the per-key default, or only the
    /// global limit when there is none. Fails as
    /// [`acquire_global`](Self::acquire_global) does, and with
    /// [`Error::Config`] for an empty key.
    pub async fn acquire_key(&self, key: &str) -> Result<RedisPermit, Error> {
        acquire(self.inner.clone(), Some(key.to_owned())).await
    }

    /// Returns the global limit as last read from Redis.
    pub fn global_limit(&self) -> Option<u64> {
        match self.inner.global_limit.load(Ordering::Relaxed) {
            NO_LIMIT => None,
            limit => Some(limit),
        }
    }

    /// Reads the stored limits, and caches them when a global limit is set.
    pub async fn limits(&self) -> Result<Limits, Error> {
        let limits = self
            .inner
            .retry_unreachable(|| self.inner.read_limits())
            .await?;
        if limits.global.is_some() {
            self.inner.store_limits(&limits);
        }
        Ok(limits)
    }

    /// Stores a limit. A new global or key limit wakes as many waiters of
    /// that count as it has free places, and any other change wakes every
    /// waiter. Shrinking never takes back leases already granted, so new
    /// grants wait until the count is below the new limit.
    ///
    /// Fails with [`Error::Config`] for a limit above [`MAX_LIMIT`], because
    /// the scripts compute in Lua numbers (doubles), and for a lease below
    /// 200 ms or an empty key.
    ///
    /// If the namespace state is missing in Redis (new, or lost), this
    /// creates it and starts a grace of one lease in which nothing is
    /// granted.
    pub async fn set_limit(&self, change: LimitChange) -> Result<(), Error> {
        let (field, value) = match &change {
            LimitChange::Global(limit) => {
                validate_limit("global limit", *limit)?;
                ("global".to_owned(), Some(*limit))
            }
            LimitChange::PerKeyDefault(limit) => {
                if let Some(limit) = limit {
                    validate_limit("per-key default limit", *limit)?;
                }
                ("default".to_owned(), *limit)
            }
            LimitChange::Key(key, limit) => {
                validate_key(key)?;
                if let Some(limit) = limit {
                    validate_limit(&format!("limit of key {key:?}"), *limit)?;
                }
                (key_field(key), *limit)
            }
            LimitChange::Lease(lease) => {
                if *lease < MIN_LEASE {
                    return Err(Error::Config(format!(
                        "lease {} ms is too short; set at least {} ms",
                        lease.as_millis(),
                        MIN_LEASE.as_millis()
                    )));
                }
                ("lease_ms".to_owned(), Some(scripts::millis(*lease)))
            }
        };
        let inner = &self.inner;
        inner
            .retry_unreachable(|| async {
                let mut con = inner.con.clone();
                inner
                    .scripts
                    .set_limit(
                        &mut con,
                        &inner.namespace,
                        &field,
                        value,
                        &inner.token,
                        inner.fallback_lease(),
                    )
                    .await?;
                Ok(())
            })
            .await?;
        self.limits().await?;
        Ok(())
    }

    /// Lists every live lease of the namespace, oldest grant first.
    pub async fn holders(&self) -> Result<Vec<Holder>, Error> {
        let inner = &self.inner;
        inner.retry_unreachable(|| read_holders(inner)).await
    }

    /// Returns the counts of script calls and outcomes since this limiter
    /// connected, shared by its clones.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// Returns the namespace this limiter uses.
    pub fn namespace(&self) -> &str {
        self.inner.namespace.name()
    }

    /// Waits until the release of every permit dropped so far has reached
    /// Redis or failed, and every acquire call still on its way (from an
    /// acquire that was given up) has ended.
    ///
    /// A dropped permit is released by a background task. Call this
    /// before the process exits, so that a release still on its way is not
    /// cut off with the runtime and its lease does not stay held until it
    /// expires. Each release gives up after its own call timeout, and each
    /// acquire call after the connection's response timeout of 10 s, so
    /// those timeouts bound this wait.
    pub async fn wait_for_releases(&self) {
        self.inner.releases.wait().await;
    }

    /// Returns how long the namespace still grants nothing after its state
    /// was created or lost, or `None` when grants are open.
    ///
    /// A new namespace, and one whose state Redis lost, waits one lease
    /// time before its first grant, so that every holder from before a
    /// loss has seen its lease lost.
    pub async fn grace_left(&self) -> Result<Option<Duration>, Error> {
        let inner = &self.inner;
        inner
            .retry_unreachable(|| async {
                let mut con = inner.con.clone();
                let (time, grace_until): ((u64, u64), Option<u64>) = redis::pipe()
                    .cmd("TIME")
                    .cmd("HGET")
                    .arg(inner.namespace.meta_key())
                    .arg("grace_until")
                    .query_async(&mut con)
                    .await?;
                let now_ms = time.0 * 1000 + time.1 / 1000;
                Ok(grace_until
                    .filter(|until| *until > now_ms)
                    .map(|until| Duration::from_millis(until - now_ms)))
            })
            .await
    }
}

async fn read_holders(inner: &Inner) -> Result<Vec<Holder>, CallError> {
    let mut con = inner.con.clone();
    let (time, members): ((u64, u64), Vec<(String, f64)>) = redis::pipe()
        .cmd("TIME")
        .cmd("ZRANGE")
        .arg(inner.namespace.holders_key(None))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut con)
        .await?;
    let now_ms = time.0 * 1000 + time.1 / 1000;
    let mut pipe = redis::pipe();
    for (lease_id, _) in &members {
        pipe.cmd("HGETALL").arg(inner.namespace.lease_key(lease_id));
    }
    let infos: Vec<HashMap<String, String>> = if members.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(&mut con).await?
    };
    let mut holders = Vec::new();
    for ((lease_id, expiry), info) in members.into_iter().zip(infos) {
        let expiry = expiry as u64;
        if expiry <= now_ms {
            continue;
        }
        let acquired_at = info
            .get("acquired_at")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(now_ms);
        holders.push(Holder {
            key: info.get("key").filter(|k| !k.is_empty()).cloned(),
            holder: info.get("holder").cloned().unwrap_or_default(),
            fence: info
                .get("fence")
                .and_then(|v| v.parse().ok())
                .unwrap_or_default(),
            age: Duration::from_millis(now_ms.saturating_sub(acquired_at)),
            expires_in: Duration::from_millis(expiry - now_ms),
            lease_id,
        });
    }
    holders.sort_by_key(|holder| holder.fence);
    Ok(holders)
}

fn parse_limits(fields: &HashMap<String, String>) -> Result<Limits, CallError> {
    let number = |name: &str, value: &String| {
        value.parse::<u64>().map_err(|_| {
            CallError::Failed(format!(
                "the limits hash contains {name} = {value:?}, which is not a whole number; \
                 set it again with RedisLimiter::set_limit"
            ))
        })
    };
    let mut limits = Limits {
        global: None,
        per_key_default: None,
        per_key: Vec::new(),
        lease: Duration::from_millis(DEFAULT_LEASE_MS),
    };
    for (name, value) in fields {
        match name.as_str() {
            "global" => limits.global = Some(number(name, value)?),
            "default" => limits.per_key_default = Some(number(name, value)?),
            "lease_ms" => limits.lease = Duration::from_millis(number(name, value)?),
            _ => {
                if let Some(key) = name.strip_prefix("k:") {
                    limits.per_key.push((key.to_owned(), number(name, value)?));
                }
            }
        }
    }
    limits.per_key.sort();
    Ok(limits)
}

fn limit_fields(limits: &Limits) -> Vec<(String, String)> {
    let mut fields = vec![(
        "lease_ms".to_owned(),
        scripts::millis(limits.lease).to_string(),
    )];
    if let Some(global) = limits.global {
        fields.push(("global".to_owned(), global.to_string()));
    }
    if let Some(default) = limits.per_key_default {
        fields.push(("default".to_owned(), default.to_string()));
    }
    for (key, limit) in &limits.per_key {
        fields.push((key_field(key), limit.to_string()));
    }
    fields
}

fn validate_limit(name: &str, limit: u64) -> Result<(), Error> {
    if limit > MAX_LIMIT {
        return Err(Error::Config(format!(
            "{name} {limit} is out of range; set a whole number from 0 to {MAX_LIMIT}"
        )));
    }
    Ok(())
}

fn validate_key(key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::Config(
            "the limited key is empty; pass a key such as a domain name".into(),
        ));
    }
    Ok(())
}

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::hash::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Returns a new lease id of 32 hex digits from two `random_u64` values.
fn new_id() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

/// Scales `duration` by a random factor between 0.8 and 1.2, so that
/// waiters of many processes do not retry in step. A duration too long to
/// scale, such as a huge `poll_max`, is returned unchanged.
fn jitter(duration: Duration) -> Duration {
    let permille = u32::try_from(800 + random_u64() % 401).unwrap_or(1000);
    duration
        .checked_mul(permille)
        .map_or(duration, |scaled| scaled / 1000)
}

impl deferred_semaphore::Limiter for RedisLimiter {
    type Permit = RedisPermit;
    type Error = Error;
    type Acquire = BoxFuture<'static, Result<RedisPermit, Error>>;

    fn acquire(&self) -> Self::Acquire {
        Box::pin(acquire(self.inner.clone(), None))
    }

    fn limit(&self) -> usize {
        let limit = self.global_limit().unwrap_or(1).max(1);
        usize::try_from(limit).unwrap_or(usize::MAX)
    }
}

impl<K: AsRef<str>> deferred_semaphore::KeyedLimiter<K> for RedisLimiter {
    type Permit = RedisPermit;
    type Error = Error;
    type Acquire = BoxFuture<'static, Result<RedisPermit, Error>>;

    fn acquire(&self, key: &K) -> Self::Acquire {
        Box::pin(acquire(self.inner.clone(), Some(key.as_ref().to_owned())))
    }

    fn limit(&self) -> usize {
        deferred_semaphore::Limiter::limit(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        let base = Duration::from_secs(1);
        for _ in 0..100 {
            let scaled = jitter(base);
            assert!(scaled >= Duration::from_millis(800), "{scaled:?}");
            assert!(scaled <= Duration::from_millis(1200), "{scaled:?}");
        }
    }

    #[test]
    fn jitter_keeps_huge_duration() {
        assert_eq!(jitter(Duration::MAX), Duration::MAX);
    }
}
