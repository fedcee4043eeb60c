//! `--limiter`: limits shared by every backlog process that names the same
//! Redis URL, on one machine or many, through `deferred-semaphore-redis`.
//!
//! The engine uses the shared limiter through [`SharedLimiter`] and its
//! permits through [`Lease`], so that its handling of lost leases can be
//! tested with an in-process fake.

use std::fmt;
use std::time::Duration;

use deferred_semaphore_redis::{Error as RedisError, Options, RedisLimiter, RedisPermit};
use futures_util::future::{BoxFuture, LocalBoxFuture};
use url::Url;

use crate::cli::LimiterArgs;
use crate::duration::format_duration;
use crate::journal::Owner;

/// The environment variable that contains the Redis password.
pub const PASSWORD_VAR: &str = "BACKLOG_REDIS_PASSWORD";

/// The environment variable that contains the Redis user name, when the URL
/// names none.
pub const USERNAME_VAR: &str = "BACKLOG_REDIS_USERNAME";

/// The port of a URL that names none: Redis's standard port.
const DEFAULT_PORT: u16 = 6379;

/// The maximum time a waiting grant sleeps between two tries when no wake-up
/// arrives from Redis.
const POLL_MAX: Duration = Duration::from_secs(1);

/// A checked `--limiter` URL, `redis://[USER@]HOST:PORT/NAME`, with the
/// credentials taken from the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct LimiterUrl {
    host: String,
    port: u16,
    /// The user name, percent-encoded as in a URL.
    user: Option<String>,
    password: Option<String>,
    /// The namespace of the limits in Redis.
    pub name: String,
}

/// The `--limiter` settings of a run.
#[derive(Debug, Clone)]
pub struct LimiterSettings {
    /// The limiter's URL.
    pub url: LimiterUrl,
    /// How long a grant may wait while Redis cannot be reached before the
    /// run fails closed (`--limiter-timeout`).
    pub timeout: Duration,
}

/// A permit of the shared limiter, held while one attempt runs.
pub trait Lease: Send {
    /// Returns the fencing token of the grant, larger than every token
    /// granted before it under the same name.
    fn fence(&self) -> u64;

    /// Returns whether the lease is known lost or past its deadline.
    fn is_lost(&self) -> bool;

    /// Returns a future that resolves once the lease is lost.
    fn lost(&self) -> BoxFuture<'static, ()>;
}

/// The future of [`SharedLimiter::acquire`]: a lease, or the message to
/// report.
pub type Acquire<'a> = LocalBoxFuture<'a, Result<Box<dyn Lease>, String>>;

/// The limiter shared by a fleet of backlog processes.
pub trait SharedLimiter {
    /// Waits for a permit under the shared limit of `key`, or under the
    /// global limit alone for `None`.
    ///
    /// # Errors
    ///
    /// Returns the message to report when no permit can be granted, such
    /// as when Redis cannot be reached: the run then starts nothing new.
    fn acquire<'a>(&'a self, key: Option<&'a str>) -> Acquire<'a>;

    /// Returns the limiter's URL without its password, for messages.
    fn url(&self) -> String;

    /// Returns how long the shared limits still grant nothing after their
    /// state was created or lost, when that is known; `None` otherwise.
    fn grace_left(&self) -> LocalBoxFuture<'_, Option<Duration>> {
        Box::pin(async { None })
    }
}

/// The shared limiter of `--limiter`, connected to Redis.
#[derive(Debug)]
pub struct RedisFleet {
    limiter: RedisLimiter,
    url: LimiterUrl,
}

impl fmt::Debug for LimiterUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password stays out of debug output.
        write!(f, "LimiterUrl({self})")
    }
}

impl fmt::Display for LimiterUrl {
    /// Writes the URL as given, without the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("redis://")?;
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        write!(f, "{}:{}/{}", self.host, self.port, self.name)
    }
}

impl LimiterUrl {
    /// Returns the URL the Redis client connects to, with the user name
    /// and the password, and without the namespace.
    fn connect_url(&self) -> String {
        let mut url = Url::parse(&format!("redis://{}:{}", self.host, self.port))
            .expect("a parsed host and port make a valid URL");
        // `set_username` and `set_password` fail only for a URL without a
        // host, and this URL was built with one.
        if let Some(user) = &self.user {
            let _ = url.set_username(user);
        }
        if let Some(password) = &self.password {
            let _ = url.set_password(Some(password));
        }
        url.to_string()
    }
}

/// Parses `--limiter`: `redis://[USER@]HOST[:PORT]/NAME`, where the port
/// defaults to 6379. The password comes from `BACKLOG_REDIS_PASSWORD` and
/// the user name, when the URL names none, from `BACKLOG_REDIS_USERNAME`,
/// both read through `env`.
///
/// # Errors
///
/// Rejects another scheme (`rediss://` included), a password in the URL,
/// a missing host, and a NAME that is empty or has characters other than
/// letters, digits, `.`, `_` and `-`.
pub fn parse_limiter_url(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<LimiterUrl, String> {
    let form = "expected redis://[USER@]HOST:PORT/NAME, as in redis://127.0.0.1:6379/jobs";
    let url =
        Url::parse(text).map_err(|error| format!("'{text}' is not a URL ({error}); {form}"))?;
    match url.scheme() {
        "redis" => {}
        // NOTE: TLS to Redis is not supported, so a fleet must reach Redis
        // over a trusted network or a tunnel.
        "rediss" => {
            return Err(format!(
                "'{text}': TLS to Redis (rediss://) is not supported. Use redis:// over a \
                 trusted network, or a TLS tunnel to Redis"
            ))
        }
        other => return Err(format!("'{text}' has the scheme '{other}:'; {form}")),
    }
    if url.password().is_some() {
        let mut hidden = url.clone();
        let _ = hidden.set_password(Some("***"));
        return Err(format!(
            "'{hidden}' contains a password. Remove it from the URL and set {PASSWORD_VAR} \
             instead, so that it does not show in process lists"
        ));
    }
    let host = match url.host_str() {
        Some(host) if !host.is_empty() => host.to_owned(),
        _ => return Err(format!("'{text}' has no host; {form}")),
    };
    // The URL keeps a host of a redis:// URL percent-encoded, which no
    // resolver would find.
    if host.contains('%') {
        return Err(format!(
            "'{text}': the host must be ASCII; write a name with other letters in its \
             punycode form (xn--...), or use an IP address"
        ));
    }
    if url.port() == Some(0) {
        return Err(format!("'{text}' has port 0; {form}"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("'{text}' has a query or fragment; {form}"));
    }
    // The NAME as typed: the parsed path is percent-encoded, and an error
    // must show what the user wrote.
    let after_scheme = text.split_once("://").map_or(text, |(_, rest)| rest);
    let name = after_scheme
        .split_once('/')
        .map_or("", |(_, path)| path)
        .to_owned();
    check_name(&name).map_err(|reason| format!("'{text}': {reason}; {form}"))?;
    let user = match url.username() {
        "" => env(USERNAME_VAR).filter(|user| !user.is_empty()),
        user => Some(user.to_owned()),
    };
    Ok(LimiterUrl {
        host,
        port: url.port().unwrap_or(DEFAULT_PORT),
        user,
        password: env(PASSWORD_VAR).filter(|password| !password.is_empty()),
        name,
    })
}

impl LimiterArgs {
    /// Returns the checked `--limiter` settings, or `None` without
    /// `--limiter`.
    ///
    /// # Errors
    ///
    /// Fails on an invalid URL, with the reason from [`parse_limiter_url`].
    pub fn settings(&self) -> anyhow::Result<Option<LimiterSettings>> {
        let Some(text) = &self.limiter else {
            return Ok(None);
        };
        let url = parse_limiter_url(text, |name| std::env::var(name).ok())
            .map_err(|reason| anyhow::anyhow!("invalid --limiter {reason}"))?;
        Ok(Some(LimiterSettings {
            url,
            timeout: self.limiter_timeout,
        }))
    }
}

/// Checks the NAME of a limiter URL: the namespace of its limits.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the NAME after the port is missing".to_owned());
    }
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if let Some(bad) = name.chars().find(|&c| !valid(c)) {
        return Err(format!(
            "the NAME '{name}' contains '{bad}', but only letters, digits, '.', '_' and '-' \
             are allowed"
        ));
    }
    Ok(())
}

/// Connects to the limiter of `url`, whose grants fail once Redis has been
/// unreachable for `timeout`.
///
/// # Errors
///
/// Returns the message to report when the connection fails.
pub async fn connect(url: &LimiterUrl, timeout: Duration) -> Result<RedisFleet, String> {
    let owner = Owner::current();
    let options = Options {
        poll_max: POLL_MAX,
        unavailable_after: timeout,
        holder: format!("{}:{}", owner.host, owner.pid),
    };
    match RedisLimiter::connect(&url.connect_url(), &url.name, options).await {
        Ok(limiter) => Ok(RedisFleet {
            limiter,
            url: url.clone(),
        }),
        Err(error) => Err(describe_error(url, &error)),
    }
}

impl RedisFleet {
    /// Returns the connected limiter, for `backlog limits`.
    pub fn limiter(&self) -> &RedisLimiter {
        &self.limiter
    }
}

/// Returns the message for a failure of the limiter at `url`, with what to
/// do about it.
pub fn describe_error(url: &LimiterUrl, error: &RedisError) -> String {
    match error {
        RedisError::Unavailable {
            waited, last_error, ..
        } => format!(
            "Redis at {url} could not be reached for {} ({last_error}). Check that Redis is \
             running and reachable from this machine, or raise --limiter-timeout",
            format_duration(*waited)
        ),
        RedisError::NoLimit { .. } => {
            format!("{url} has no global limit. Set one with: backlog limits {url} --global N")
        }
        RedisError::Config(reason) => format!("invalid limiter {url}: {reason}"),
        RedisError::Redis(reason) => format!("Redis at {url} returned an error: {reason}"),
        other => format!("the limiter at {url} failed: {other}"),
    }
}

/// Returns the message for a failure of the limiter during a run, which
/// then starts nothing new.
fn describe_run_error(url: &LimiterUrl, error: &RedisError) -> String {
    format!(
        "{}; backlog started nothing new",
        describe_error(url, error)
    )
}

impl Lease for RedisPermit {
    fn fence(&self) -> u64 {
        RedisPermit::fence(self)
    }

    fn is_lost(&self) -> bool {
        RedisPermit::is_lost(self)
    }

    fn lost(&self) -> BoxFuture<'static, ()> {
        RedisPermit::lost(self)
    }
}

impl SharedLimiter for RedisFleet {
    fn grace_left(&self) -> LocalBoxFuture<'_, Option<Duration>> {
        // Only a message depends on it, so an error reads as no grace.
        Box::pin(async { self.limiter.grace_left().await.ok().flatten() })
    }

    fn acquire<'a>(&'a self, key: Option<&'a str>) -> Acquire<'a> {
        Box::pin(async move {
            let granted = match key {
                Some(key) => self.limiter.acquire_key(key).await,
                None => self.limiter.acquire_global().await,
            };
            match granted {
                Ok(permit) => Ok(Box::new(permit) as Box<dyn Lease>),
                Err(error) => Err(describe_run_error(&self.url, &error)),
            }
        })
    }

    fn url(&self) -> String {
        self.url.to_string()
    }
}

#[cfg(test)]
pub mod fake {
    //! An in-process shared limiter whose leases a test can take away.

    use std::cell::RefCell;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    use futures_util::future::BoxFuture;
    use tokio::sync::Notify;

    use super::{Acquire, Lease, SharedLimiter};

    /// A lease whose loss the test controls.
    #[derive(Debug, Clone, Default)]
    pub struct LeaseHandle {
        lost: Arc<AtomicBool>,
        notify: Arc<Notify>,
    }

    impl LeaseHandle {
        /// Marks the lease lost and wakes its holder.
        pub fn lose(&self) {
            self.lost.store(true, Ordering::SeqCst);
            self.notify.notify_waiters();
        }

        /// Marks the lease lost without waking its holder, as a deadline
        /// that passed between two checks.
        pub fn lose_unnoticed(&self) {
            self.lost.store(true, Ordering::SeqCst);
        }
    }

    /// One lease the fake granted.
    #[derive(Debug, Clone)]
    pub struct Grant {
        /// The key it was granted under, `None` for the global limit.
        pub key: Option<String>,
        /// The fence it carries.
        pub fence: u64,
        /// The handle that takes it away.
        pub handle: LeaseHandle,
    }

    struct FakeLease {
        fence: u64,
        handle: LeaseHandle,
    }

    impl Lease for FakeLease {
        fn fence(&self) -> u64 {
            self.fence
        }

        fn is_lost(&self) -> bool {
            self.handle.lost.load(Ordering::SeqCst)
        }

        fn lost(&self) -> BoxFuture<'static, ()> {
            let handle = self.handle.clone();
            Box::pin(async move {
                loop {
                    let notified = handle.notify.notified();
                    if handle.lost.load(Ordering::SeqCst) {
                        return;
                    }
                    notified.await;
                }
            })
        }
    }

    /// Grants every request at once with rising fences, keeps a handle on
    /// each lease, and fails every grant once `fail_with` is set.
    #[derive(Debug, Default)]
    pub struct FakeLimiter {
        next_fence: AtomicU64,
        /// Every lease granted, in order.
        pub granted: RefCell<Vec<Grant>>,
        /// The error every grant returns, once set.
        pub fail_with: RefCell<Option<String>>,
    }

    impl SharedLimiter for FakeLimiter {
        fn acquire<'a>(&'a self, key: Option<&'a str>) -> Acquire<'a> {
            Box::pin(async move {
                if let Some(error) = self.fail_with.borrow().clone() {
                    return Err(error);
                }
                let fence = self.next_fence.fetch_add(1, Ordering::SeqCst) + 1;
                let handle = LeaseHandle::default();
                let key = key.map(str::to_owned);
                let grant = Grant {
                    key,
                    fence,
                    handle: handle.clone(),
                };
                self.granted.borrow_mut().push(grant);
                Ok(Box::new(FakeLease { fence, handle }) as Box<dyn Lease>)
            })
        }

        fn url(&self) -> String {
            "redis://fake:1/test".to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn url_parses_host_port_and_name() {
        let url = parse_limiter_url("redis://127.0.0.1:7000/jobs.eu-1_a", no_env).unwrap();
        assert_eq!(url.to_string(), "redis://127.0.0.1:7000/jobs.eu-1_a");
        assert_eq!(url.name, "jobs.eu-1_a");
        assert_eq!(url.connect_url(), "redis://127.0.0.1:7000");
        let url = parse_limiter_url("redis://cache.internal/jobs", no_env).unwrap();
        assert_eq!(url.to_string(), "redis://cache.internal:6379/jobs");
    }

    #[test]
    fn url_takes_credentials_from_env() {
        let env = |name: &str| match name {
            PASSWORD_VAR => Some("p@ss word".to_owned()),
            USERNAME_VAR => Some("envuser".to_owned()),
            _ => None,
        };
        let url = parse_limiter_url("redis://alice@127.0.0.1:7000/jobs", env).unwrap();
        assert_eq!(url.to_string(), "redis://alice@127.0.0.1:7000/jobs");
        assert_eq!(
            url.connect_url(),
            "redis://alice:p%40ss%20word@127.0.0.1:7000"
        );
        let url = parse_limiter_url("redis://127.0.0.1:7000/jobs", env).unwrap();
        assert_eq!(
            url.connect_url(),
            "redis://envuser:p%40ss%20word@127.0.0.1:7000"
        );
        // Neither the display nor the debug output shows the password.
        assert!(!format!("{url} {url:?}").contains("word"));
    }

    #[test]
    fn url_with_password_is_rejected_hidden() {
        let error =
            parse_limiter_url("redis://alice:secret@127.0.0.1:7000/jobs", no_env).unwrap_err();
        assert!(error.contains(PASSWORD_VAR), "{error}");
        assert!(
            error.contains("redis://alice:***@127.0.0.1:7000/jobs"),
            "{error}"
        );
        assert!(!error.contains("secret"), "{error}");
    }

    #[test]
    fn url_rejects_tls_and_other_schemes() {
        let error = parse_limiter_url("rediss://127.0.0.1:7000/jobs", no_env).unwrap_err();
        assert!(
            error.contains("TLS to Redis (rediss://) is not supported"),
            "{error}"
        );
        let error = parse_limiter_url("http://127.0.0.1:7000/jobs", no_env).unwrap_err();
        assert!(error.contains("expected redis://"), "{error}");
        let error = parse_limiter_url("127.0.0.1:7000/jobs", no_env).unwrap_err();
        assert!(error.contains("expected redis://"), "{error}");
    }

    #[test]
    fn url_checks_name() {
        let cases = [
            (
                "redis://127.0.0.1:7000",
                "the NAME after the port is missing",
            ),
            (
                "redis://127.0.0.1:7000/",
                "the NAME after the port is missing",
            ),
            ("redis://127.0.0.1:7000/a/b", "contains '/'"),
            ("redis://127.0.0.1:7000/a%20b", "contains '%'"),
            (
                "redis://127.0.0.1:7000/a{b}",
                "the NAME 'a{b}' contains '{'",
            ),
            ("redis://127.0.0.1:7000/a b", "the NAME 'a b' contains ' '"),
            (
                "redis://127.0.0.1:7000/café",
                "the NAME 'café' contains 'é'",
            ),
            ("redis://127.0.0.1:0/jobs", "has port 0"),
            ("redis://bücher.example:7000/jobs", "punycode"),
            (
                "redis://127.0.0.1:7000/jobs?db=1",
                "has a query or fragment",
            ),
        ];
        for (text, expected) in cases {
            let error = parse_limiter_url(text, no_env).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
