//! Concurrency limits shared by many processes through Redis.
//!
//! A [`RedisLimiter`] hands out [`RedisPermit`]s under a global limit and,
//! optionally, a limit per key (such as a destination domain). The counts
//! live in Redis under a namespace, so every process that connects to the
//! same server and namespace shares them. The limits themselves are stored
//! in Redis too; clients read them and never choose them.
//!
//! Each permit is a lease that expires on the Redis server's clock unless
//! its process renews it. A dead or stopped holder therefore gives its
//! capacity back after one lease, and a holder that cannot renew stops by
//! itself at a local deadline ([`RedisPermit::deadline`],
//! [`RedisPermit::lost`]). Each grant carries a fencing token
//! ([`RedisPermit::fence`]) that grows with every grant of the namespace.
//!
//! The limiter fails closed: while Redis cannot be reached no permit is
//! granted, and `acquire_*` fails with [`Error::Unavailable`] after
//! [`Options::unavailable_after`]. After Redis lost its data (a restart
//! without persistence) nothing is granted for one lease, so that every
//! holder from before the loss has stopped first.
//!
//! # Example
//!
//! ```no_run
//! use deferred_semaphore_redis::{LimitChange, Options, RedisLimiter};
//!
//! # async fn example() -> Result<(), deferred_semaphore_redis::Error> {
//! let limiter = RedisLimiter::connect("redis://127.0.0.1:6400", "smtp", Options::default()).await?;
//! // Usually set once by an operator (`backlog limits ...`), not by workers.
//! limiter.set_limit(LimitChange::Global(20)).await?;
//! limiter.set_limit(LimitChange::PerKeyDefault(Some(2))).await?;
//!
//! let permit = limiter.acquire_key("example.com").await?;
//! // Check before every step that must not run without the lease.
//! if !permit.is_lost() {
//!     println!("sending with fence {}", permit.fence());
//! }
//! permit.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Redis layout
//!
//! All keys of namespace `NAME` share the hash tag `{NAME}`; see
//! [`scripts::Namespace`] for each key. The count of a limit is the number
//! of unexpired members of its sorted set; there is no separate counter.
//! Run the server with `maxmemory-policy noeviction`: an evicted set would
//! let more holders in than the limit.

mod error;
mod lease;
mod limiter;
mod permit;
pub mod scripts;
mod stats;
mod wake;

pub use error::Error;
pub use limiter::RedisLimiter;
pub use permit::RedisPermit;
pub use stats::Stats;

use std::time::Duration;

/// The largest limit [`RedisLimiter::set_limit`] stores. The scripts
/// compute in Lua numbers, which are doubles, so limits stay far below
/// 2^53.
pub const MAX_LIMIT: u64 = 1_000_000_000;

/// Settings of a [`RedisLimiter`].
#[derive(Debug, Clone)]
pub struct Options {
    /// The maximum sleep of a waiter between two tries when no wake-up
    /// arrives. Default 1 s. A waiter stays queued in Redis for three times
    /// this after its last busy reply.
    pub poll_max: Duration,
    /// How long `acquire` keeps trying while Redis cannot be reached before
    /// it fails with [`Error::Unavailable`]. Default 30 s.
    pub unavailable_after: Duration,
    /// A label stored with each lease, shown by [`RedisLimiter::holders`],
    /// such as `host:pid`.
    pub holder: String,
}

impl Default for Options {
    /// `poll_max` 1 s, `unavailable_after` 30 s, `holder` `hostname:pid`.
    fn default() -> Self {
        Self {
            poll_max: Duration::from_secs(1),
            unavailable_after: Duration::from_secs(30),
            holder: default_holder(),
        }
    }
}

/// `hostname:pid`, with `unknown` when the host name cannot be read.
fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{host}:{}", std::process::id())
}

/// The limits of a namespace as stored in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The limit over all keys, or `None` until one is set.
    pub global: Option<u64>,
    /// The limit of a key that has none of its own. `None` means such keys
    /// are limited only by the global limit.
    pub per_key_default: Option<u64>,
    /// Limits of single keys, sorted by key.
    pub per_key: Vec<(String, u64)>,
    /// How long a lease lives without renewal, on the Redis server's clock.
    /// Every client of the namespace uses this one value. Default 30 s.
    pub lease: Duration,
}

/// One change to the stored limits, for [`RedisLimiter::set_limit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitChange {
    /// The limit over all keys. Zero grants nothing until it is raised.
    Global(u64),
    /// The limit of every key without one of its own. `None` removes it.
    PerKeyDefault(Option<u64>),
    /// The limit of one key. `None` removes it, so the default applies.
    Key(String, Option<u64>),
    /// The lease of every client of the namespace, at least 200 ms. It
    /// applies from each lease's next grant or renewal.
    Lease(Duration),
}

/// One lease as seen by [`RedisLimiter::holders`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The limited key (`None` for the global count only).
    pub key: Option<String>,
    /// The lease id, the member of the namespace's sorted sets.
    pub lease_id: String,
    /// The label from [`Options::holder`] of the process holding it.
    pub holder: String,
    /// The fencing token of the grant.
    pub fence: u64,
    /// Time since the grant, on the Redis server's clock.
    pub age: Duration,
    /// Time left before the lease expires. Only unexpired leases are
    /// listed.
    pub expires_in: Duration,
}
