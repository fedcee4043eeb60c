//! Concurrency limits shared by many processes through Redis.
//!
//! SKELETON: the public surface below is fixed; the bodies are filled in
//! by the implementation.

use std::time::{Duration, Instant};

/// Settings of a [`RedisLimiter`].
#[derive(Debug, Clone)]
pub struct Options {
    /// The longest a waiter sleeps between two tries when no wake-up
    /// arrives. Default 1 s.
    pub poll_max: Duration,
    /// How long `acquire` keeps trying while Redis cannot be reached before
    /// it fails with [`Error::Unavailable`]. Default 30 s.
    pub unavailable_after: Duration,
    /// A label stored with each lease, shown by [`RedisLimiter::holders`],
    /// such as `host:pid`.
    pub holder: String,
}

impl Default for Options {
    fn default() -> Self {
        unimplemented!()
    }
}

/// Why a permit could not be granted or a limit could not be read or set.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Redis could not be reached for longer than
    /// [`Options::unavailable_after`].
    Unavailable {
        url: String,
        waited: Duration,
        last_error: String,
    },
    /// The namespace has no global limit stored in Redis.
    NoLimit { namespace: String },
    /// The URL or namespace is not valid.
    Config(String),
    /// Redis answered with an error.
    Redis(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, _f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        unimplemented!()
    }
}
impl std::error::Error for Error {}

/// The limits of a namespace as stored in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The limit over all keys; `None` until one is set.
    pub global: Option<u64>,
    /// The limit of a key that has none of its own; `None` means such keys
    /// are held only by the global limit.
    pub per_key_default: Option<u64>,
    /// Limits of single keys, sorted by key.
    pub per_key: Vec<(String, u64)>,
    /// How long a lease lives without renewal, on the Redis server's clock;
    /// every client of the namespace uses this one value. Default 30 s.
    pub lease: Duration,
}

/// One change to the stored limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitChange {
    Global(u64),
    PerKeyDefault(Option<u64>),
    Key(String, Option<u64>),
    Lease(Duration),
}

/// One lease as seen by [`RedisLimiter::holders`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The limited key (`None` for the global count only).
    pub key: Option<String>,
    pub lease_id: String,
    pub holder: String,
    pub fence: u64,
    /// Time since the grant, on the Redis server's clock.
    pub age: Duration,
    /// Time left before the lease expires; zero when already expired.
    pub expires_in: Duration,
}

/// A limiter whose counts live in Redis, shared by every process that uses
/// SKELETON NOTE: also implements `deferred_semaphore::Limiter` (global
/// limit only; `limit()` is the last known global limit, at least 1) and
/// `deferred_semaphore::KeyedLimiter<K: AsRef<str>>` (global + key).
/// A limiter whose counts live in Redis, shared by every process that uses
/// the same URL and namespace. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RedisLimiter {}

impl RedisLimiter {
    /// Connects to `url` (`redis://[user:password@]host:port[/db]`) and
    /// uses the limits stored under `namespace`. Starts the heartbeat and
    /// the wake-up listener on the current tokio runtime.
    pub async fn connect(_url: &str, _namespace: &str, _options: Options) -> Result<Self, Error> {
        unimplemented!()
    }

    /// Waits for a permit under the global limit only.
    pub async fn acquire_global(&self) -> Result<RedisPermit, Error> {
        unimplemented!()
    }

    /// Waits for a permit under the global limit and the limit of `key`,
    /// taken together.
    pub async fn acquire_key(&self, _key: &str) -> Result<RedisPermit, Error> {
        unimplemented!()
    }

    /// The global limit as last read from Redis.
    pub fn global_limit(&self) -> Option<u64> {
        unimplemented!()
    }

    /// Reads the stored limits.
    pub async fn limits(&self) -> Result<Limits, Error> {
        unimplemented!()
    }

    /// Stores a limit; waiters are woken when it grows. Shrinking never
    /// takes back leases already granted.
    pub async fn set_limit(&self, _change: LimitChange) -> Result<(), Error> {
        unimplemented!()
    }

    /// Lists every live lease of the namespace.
    pub async fn holders(&self) -> Result<Vec<Holder>, Error> {
        unimplemented!()
    }
}

/// A lease on one unit of work. Dropping it releases the lease in the
/// background.
#[derive(Debug)]
pub struct RedisPermit {}

impl RedisPermit {
    /// The fencing token of this grant: larger than every token granted
    /// before it in the namespace.
    pub fn fence(&self) -> u64 {
        unimplemented!()
    }

    /// The local moment after which this holder must treat the lease as
    /// lost, unless a renewal moves it later.
    pub fn deadline(&self) -> Instant {
        unimplemented!()
    }

    /// Whether the lease is known lost or past its deadline.
    pub fn is_lost(&self) -> bool {
        unimplemented!()
    }

    /// Resolves when the lease is lost: a renewal found it gone, the
    /// namespace's state was reset, or the deadline passed.
    pub fn lost(&self) -> futures_util::future::BoxFuture<'static, ()> {
        unimplemented!()
    }

    /// Releases the lease and waits for Redis to confirm.
    pub async fn release(self) -> Result<(), Error> {
        unimplemented!()
    }
}
