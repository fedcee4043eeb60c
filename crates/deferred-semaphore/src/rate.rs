//! Rate limits on the limiter seam, global and per key, with the GCRA of
//! the `governor` crate.
//!
//! # Design
//!
//! A rate-limited acquire first waits for the inner limiter's permit, then
//! takes a rate token. When no token is free, it drops the permit, sleeps
//! until the rate allows one, and starts over. The permit is held only
//! within one poll, so waiting for the rate holds no concurrency slot, and
//! a token is only taken by an acquire that starts at once, so starts never
//! come faster than the rate. Taking the token first instead would let
//! tokens pile up while their acquires wait for a slot, and then start
//! together.
//!
//! The limiters read time from a clock built on `tokio::time::Instant` and
//! sleep with `tokio::time::sleep`, so tokio's paused test clock drives
//! them. governor's own `until_ready` reads its default clock and sleeps
//! with `futures-timer`, both on real time, which a paused clock does not
//! move.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::{Instant, Sleep};

use crate::limiter::{KeyedLimiter, Limiter};

/// A rate: at most `count` starts per `period` on average, and at most
/// `burst` at once after a pause.
///
/// # Examples
///
/// ```
/// use std::num::NonZeroU32;
/// use std::time::Duration;
/// use deferred_semaphore::Rate;
///
/// let ten = NonZeroU32::new(10).unwrap();
/// let rate = Rate::per_second(ten).with_burst(NonZeroU32::new(3).unwrap());
/// assert_eq!(rate.interval(), Duration::from_millis(100));
/// assert_eq!(rate.burst().get(), 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    interval: Duration,
    burst: NonZeroU32,
}

impl Rate {
    /// Returns a rate of `count` per `period`, with bursts of 1, or `None`
    /// if `period` is zero.
    pub fn new(count: NonZeroU32, period: Duration) -> Option<Rate> {
        if period.is_zero() {
            return None;
        }
        // A period shorter than `count` nanoseconds still leaves 1 ns.
        let interval = (period / count.get()).max(Duration::from_nanos(1));
        Some(Rate {
            interval,
            burst: NonZeroU32::MIN,
        })
    }

    /// Returns a rate of `count` per second, with bursts of 1.
    pub fn per_second(count: NonZeroU32) -> Rate {
        Rate::new(count, Duration::from_secs(1)).expect("the period is not zero")
    }

    /// Returns a rate of `count` per minute, with bursts of 1.
    pub fn per_minute(count: NonZeroU32) -> Rate {
        Rate::new(count, Duration::from_secs(60)).expect("the period is not zero")
    }

    /// Returns a rate of `count` per hour, with bursts of 1.
    pub fn per_hour(count: NonZeroU32) -> Rate {
        Rate::new(count, Duration::from_secs(3600)).expect("the period is not zero")
    }

    /// Returns this rate with bursts of up to `burst` starts at once.
    pub fn with_burst(self, burst: NonZeroU32) -> Rate {
        Rate { burst, ..self }
    }

    /// Returns the time between two starts at the steady rate.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Returns the most starts at once after a pause.
    pub fn burst(&self) -> NonZeroU32 {
        self.burst
    }

    fn quota(&self) -> Quota {
        Quota::with_period(self.interval)
            .expect("the interval is at least 1 ns")
            .allow_burst(self.burst)
    }
}

/// governor's clock on tokio's time, which a paused test runtime controls.
/// An instant is the time since the clock was made.
#[derive(Debug, Clone)]
struct TokioClock {
    origin: Instant,
}

impl TokioClock {
    fn new() -> Self {
        TokioClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

type Direct = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;
type Keyed<K> = RateLimiter<K, HashMapStateStore<K>, TokioClock, NoOpMiddleware<Duration>>;

/// One global rate.
struct GlobalGate {
    limiter: Direct,
    clock: TokioClock,
    rate: Rate,
}

impl GlobalGate {
    fn new(rate: Rate) -> Self {
        let clock = TokioClock::new();
        GlobalGate {
            limiter: RateLimiter::direct_with_clock(rate.quota(), clock.clone()),
            clock,
            rate,
        }
    }

    /// Takes a token, or returns how long until one is free.
    fn check(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// One rate per key.
struct KeyedGate<K: Hash + Eq + Clone> {
    limiter: Keyed<K>,
    clock: TokioClock,
    rate: Rate,
    /// The number of keys above which the next check forgets idle keys.
    cleanup_at: AtomicUsize,
}

/// Keys tracked before the first cleanup of idle keys.
const FIRST_CLEANUP: usize = 64;

impl<K: Hash + Eq + Clone> KeyedGate<K> {
    fn new(rate: Rate) -> Self {
        let clock = TokioClock::new();
        KeyedGate {
            limiter: RateLimiter::hashmap_with_clock(rate.quota(), clock.clone()),
            clock,
            rate,
            cleanup_at: AtomicUsize::new(FIRST_CLEANUP),
        }
    }

    /// Takes a token of `key`, or returns how long until one is free.
    fn check(&self, key: &K) -> Result<(), Duration> {
        let checked = self
            .limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()));
        // A key whose tokens are all back is the same as an unseen key, so
        // forgetting it changes nothing. Cleaning up when the map doubles
        // keeps its size within twice the keys in use.
        let len = self.limiter.len();
        if len > self.cleanup_at.load(Ordering::Relaxed) {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            let kept = self.limiter.len();
            self.cleanup_at
                .store((kept * 2).max(FIRST_CLEANUP), Ordering::Relaxed);
        }
        checked
    }

    /// Returns the number of keys tracked now.
    fn len(&self) -> usize {
        self.limiter.len()
    }
}

/// The part of a rate-limited acquire that waits: the inner acquire, then
/// the rate's sleep when no token was free.
struct Pacer<A> {
    acquiring: Option<Pin<Box<A>>>,
    sleeping: Option<Pin<Box<Sleep>>>,
}

impl<A> Pacer<A> {
    fn new() -> Self {
        Pacer {
            acquiring: None,
            sleeping: None,
        }
    }
}

impl<A, P, E> Pacer<A>
where
    A: Future<Output = Result<P, E>>,
{
    /// Acquires through `make` and takes a token through `check`; on no
    /// token, drops the permit and sleeps before trying again.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        mut make: impl FnMut() -> A,
        check: impl Fn() -> Result<(), Duration>,
    ) -> Poll<Result<P, E>> {
        loop {
            if let Some(sleeping) = &mut self.sleeping {
                ready!(sleeping.as_mut().poll(cx));
                self.sleeping = None;
            }
            let acquiring = self.acquiring.get_or_insert_with(|| Box::pin(make()));
            let permit = ready!(acquiring.as_mut().poll(cx));
            self.acquiring = None;
            let permit = permit?;
            match check() {
                Ok(()) => return Poll::Ready(Ok(permit)),
                Err(wait) => {
                    drop(permit);
                    self.sleeping = Some(Box::pin(tokio::time::sleep(wait)));
                }
            }
        }
    }
}

/// A limiter with a rate on top: a permit is granted only when the inner
/// limiter grants one and the rate has a token.
///
/// It wraps a [`Limiter`] (such as a
/// [`DeferredSemaphore`](crate::DeferredSemaphore)) or a [`KeyedLimiter`]
/// (such as a [`KeyedSemaphore`](crate::KeyedSemaphore) or a
/// [`PerKeyRate`]); the rate is one for all keys. Waiting for the rate
/// holds no permit of the inner limiter. The inner limiter is cloned into
/// each acquire, so it should be a handle or a reference.
///
/// Time comes from tokio (`tokio::time`), so acquires must run on a tokio
/// runtime with the time driver enabled; a paused test clock drives them.
///
/// # Examples
///
/// ```
/// use std::num::NonZeroU32;
/// use deferred_semaphore::{Backlog, DeferredSemaphore, Rate, RateLimited};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
/// let sem = DeferredSemaphore::new(4);
/// let rate = Rate::per_second(NonZeroU32::new(10).unwrap());
/// let limiter = RateLimited::new(&sem, rate);
/// let start = tokio::time::Instant::now();
/// let (outcomes, _) = Backlog::new(&limiter, 0..5u32, |_| async move { Ok::<_, ()>(start.elapsed()) })
///     .in_input_order()
///     .collect()
///     .await;
/// // The first start is free, then one every 100 ms.
/// assert_eq!(outcomes[4].result.unwrap().as_millis(), 400);
/// # });
/// ```
///
/// NOTE: [`Backlog`](crate::Backlog) takes a permit before it pulls the
/// item, so with a source that is slow to yield, a token may be taken
/// before the item arrives, and two starts may then come closer than the
/// interval. [`KeyedBacklog`](crate::KeyedBacklog) pulls first and has no
/// such gap.
pub struct RateLimited<L> {
    inner: L,
    gate: Arc<GlobalGate>,
}

impl<L: Clone> Clone for RateLimited<L> {
    fn clone(&self) -> Self {
        RateLimited {
            inner: self.inner.clone(),
            gate: Arc::clone(&self.gate),
        }
    }
}

impl<L: fmt::Debug> fmt::Debug for RateLimited<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimited")
            .field("inner", &self.inner)
            .field("rate", &self.gate.rate)
            .finish()
    }
}

impl<L> RateLimited<L> {
    /// Puts `rate` on top of `inner`.
    pub fn new(inner: L, rate: Rate) -> Self {
        RateLimited {
            inner,
            gate: Arc::new(GlobalGate::new(rate)),
        }
    }

    /// Returns the inner limiter.
    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// Returns the rate.
    pub fn rate(&self) -> Rate {
        self.gate.rate
    }
}

/// A future of a rate-limited permit, returned by [`RateLimited`]'s
/// [`Limiter::acquire`].
///
/// # Cancel safety
///
/// Dropping it drops the inner acquire, which must be cancel safe, and
/// takes no token.
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct RateAcquire<L: Limiter> {
    inner: L,
    gate: Arc<GlobalGate>,
    pacer: Pacer<L::Acquire>,
}

impl<L: Limiter> fmt::Debug for RateAcquire<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateAcquire")
            .field("sleeping", &self.pacer.sleeping.is_some())
            .finish()
    }
}

// Every pinned part sits in a box of its own.
impl<L: Limiter> Unpin for RateAcquire<L> {}

impl<L: Limiter> Future for RateAcquire<L> {
    type Output = Result<L::Permit, L::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let (inner, gate) = (&this.inner, &this.gate);
        this.pacer.poll(cx, || inner.acquire(), || gate.check())
    }
}

impl<L: Limiter + Clone> Limiter for RateLimited<L> {
    type Permit = L::Permit;
    type Error = L::Error;
    type Acquire = RateAcquire<L>;

    fn acquire(&self) -> RateAcquire<L> {
        RateAcquire {
            inner: self.inner.clone(),
            gate: Arc::clone(&self.gate),
            pacer: Pacer::new(),
        }
    }

    fn try_acquire(&self) -> Option<L::Permit> {
        let permit = self.inner.try_acquire()?;
        self.gate.check().ok().map(|()| permit)
    }

    fn reuse(&self, permit: L::Permit) -> Option<L::Permit> {
        let permit = self.inner.reuse(permit)?;
        self.gate.check().ok().map(|()| permit)
    }

    fn limit(&self) -> usize {
        self.inner.limit()
    }
}

/// The rate a keyed acquire checks: one for all keys, or one per key.
enum KeyedCheck<K: Hash + Eq + Clone> {
    Global(Arc<GlobalGate>),
    PerKey(Arc<KeyedGate<K>>),
}

impl<K: Hash + Eq + Clone> KeyedCheck<K> {
    fn check(&self, key: &K) -> Result<(), Duration> {
        match self {
            KeyedCheck::Global(gate) => gate.check(),
            KeyedCheck::PerKey(gate) => gate.check(key),
        }
    }
}

/// A future of a rate-limited permit of one key, returned by the
/// [`KeyedLimiter::acquire`] of [`RateLimited`] and [`PerKeyRate`].
///
/// # Cancel safety
///
/// Dropping it drops the inner acquire, which must be cancel safe, and
/// takes no token.
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct KeyedRateAcquire<L: KeyedLimiter<K>, K: Hash + Eq + Clone> {
    inner: L,
    key: K,
    check: KeyedCheck<K>,
    pacer: Pacer<L::Acquire>,
}

impl<L: KeyedLimiter<K>, K: Hash + Eq + Clone> fmt::Debug for KeyedRateAcquire<L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateAcquire")
            .field("sleeping", &self.pacer.sleeping.is_some())
            .finish()
    }
}

// Every pinned part sits in a box of its own, and the key is never pinned.
impl<L: KeyedLimiter<K>, K: Hash + Eq + Clone> Unpin for KeyedRateAcquire<L, K> {}

impl<L: KeyedLimiter<K>, K: Hash + Eq + Clone> Future for KeyedRateAcquire<L, K> {
    type Output = Result<L::Permit, L::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let (inner, key, check) = (&this.inner, &this.key, &this.check);
        this.pacer
            .poll(cx, || inner.acquire(key), || check.check(key))
    }
}

impl<K, L> KeyedLimiter<K> for RateLimited<L>
where
    K: Hash + Eq + Clone,
    L: KeyedLimiter<K> + Clone,
{
    type Permit = L::Permit;
    type Error = L::Error;
    type Acquire = KeyedRateAcquire<L, K>;

    fn acquire(&self, key: &K) -> KeyedRateAcquire<L, K> {
        KeyedRateAcquire {
            inner: self.inner.clone(),
            key: key.clone(),
            check: KeyedCheck::Global(Arc::clone(&self.gate)),
            pacer: Pacer::new(),
        }
    }

    fn limit(&self) -> usize {
        self.inner.limit()
    }
}

/// A keyed limiter with a rate per key on top: a permit of a key is
/// granted only when the inner limiter grants one and the key's rate has a
/// token. Rates of different keys are independent.
///
/// Waiting for a key's rate holds no permit of the inner limiter. A key is
/// forgotten once all its tokens are back, checked each time the number of
/// tracked keys doubles. For a global rate as well, wrap this in
/// [`RateLimited`]:
///
/// ```
/// use std::num::NonZeroU32;
/// use deferred_semaphore::{KeyedSemaphore, PerKeyRate, Rate, RateLimited};
///
/// let per_key = Rate::per_second(NonZeroU32::new(2).unwrap());
/// let global = Rate::per_second(NonZeroU32::new(10).unwrap());
/// let sem = KeyedSemaphore::new(8, 2);
/// let limiter: RateLimited<PerKeyRate<KeyedSemaphore<String>, String>> =
///     RateLimited::new(PerKeyRate::new(sem, per_key), global);
/// # drop(limiter);
/// ```
///
/// NOTE: with both, a start takes the key's token before the global one.
/// When the global rate then has none, the key's token is spent anyway.
/// That key's next start waits one interval more than its rate requires,
/// but neither rate is ever exceeded.
pub struct PerKeyRate<L, K: Hash + Eq + Clone> {
    inner: L,
    gate: Arc<KeyedGate<K>>,
}

impl<L: Clone, K: Hash + Eq + Clone> Clone for PerKeyRate<L, K> {
    fn clone(&self) -> Self {
        PerKeyRate {
            inner: self.inner.clone(),
            gate: Arc::clone(&self.gate),
        }
    }
}

impl<L: fmt::Debug, K: Hash + Eq + Clone> fmt::Debug for PerKeyRate<L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerKeyRate")
            .field("inner", &self.inner)
            .field("rate", &self.gate.rate)
            .field("keys", &self.gate.len())
            .finish()
    }
}

impl<L, K: Hash + Eq + Clone> PerKeyRate<L, K> {
    /// Puts `rate` on each key of `inner`.
    pub fn new(inner: L, rate: Rate) -> Self {
        PerKeyRate {
            inner,
            gate: Arc::new(KeyedGate::new(rate)),
        }
    }

    /// Returns the inner limiter.
    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// Returns the rate of each key.
    pub fn rate(&self) -> Rate {
        self.gate.rate
    }

    /// Returns the number of keys whose rate state is kept now.
    pub fn keys(&self) -> usize {
        self.gate.len()
    }
}

impl<K, L> KeyedLimiter<K> for PerKeyRate<L, K>
where
    K: Hash + Eq + Clone,
    L: KeyedLimiter<K> + Clone,
{
    type Permit = L::Permit;
    type Error = L::Error;
    type Acquire = KeyedRateAcquire<L, K>;

    fn acquire(&self, key: &K) -> KeyedRateAcquire<L, K> {
        KeyedRateAcquire {
            inner: self.inner.clone(),
            key: key.clone(),
            check: KeyedCheck::PerKey(Arc::clone(&self.gate)),
            pacer: Pacer::new(),
        }
    }

    fn limit(&self) -> usize {
        self.inner.limit()
    }
}
