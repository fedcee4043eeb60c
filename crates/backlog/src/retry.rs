//! Retries with exponential backoff and jitter, and the attempts of one
//! item.
//!
//! An item's work owns the permit the backlog acquired for it. Before it
//! waits for a retry, it drops the permit, so another item can run during
//! the backoff. Afterwards it queues for a new permit like any other item,
//! through the item's own `reacquire` (the same key, with --per-key).

use std::future::Future;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::duration::format_duration;
use crate::exec::{ItemResult, Runner};
use crate::fleet::{Lease, SharedLimiter};
use crate::group::Termination;
use crate::outcome::ItemOutcome;
use crate::stop::{Stop, StopCause, StopLevel, StopWatch};

/// The maximum wait before a retry, however many attempts failed.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// The failed attempts that may be retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOn {
    /// Attempts that exited with one of these statuses.
    ExitCodes(Vec<i32>),
    /// Every failed attempt: any non-zero status, a signal or a timeout.
    Any,
}

/// When and how soon a failed attempt is tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The maximum number of retries per item, after its first attempt.
    pub retries: u32,
    /// The wait before the first retry; each later retry waits twice as
    /// long as the one before, up to [`MAX_RETRY_DELAY`].
    pub delay: Duration,
    /// The failures that may be retried.
    pub retry_on: RetryOn,
}

/// Everything each attempt of an item needs besides the item itself.
#[derive(Debug)]
pub struct Attempts<'a, R> {
    /// Runs each attempt's command.
    pub runner: &'a R,
    /// When to retry.
    pub policy: &'a RetryPolicy,
    /// The time limit of each attempt.
    pub timeout: Option<Duration>,
    /// The limiter shared with other processes (`--limiter`), if any.
    pub fleet: Option<Fleet<'a>>,
}

/// The shared limiter of a run, and the stop request it raises when it
/// fails.
#[derive(Clone, Copy)]
pub struct Fleet<'a> {
    /// Grants a lease for each attempt.
    pub limiter: &'a dyn SharedLimiter,
    /// Stops the run when the limiter fails.
    pub stop: &'a Stop,
}

/// How long a wait for a shared lease lasts before it is reported.
pub const LONG_LEASE_WAIT: Duration = Duration::from_secs(5);

/// A step of an item's retries, reported to the caller of [`Attempts::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryEvent {
    /// A failed attempt will be retried after a backoff, without a permit.
    Waiting(RetryNotice),
    /// The backoff is over and the permit (and the shared lease, if any)
    /// is held again: attempt number `attempt` (from 2) starts now.
    Starting {
        /// The number of the attempt, from 2.
        attempt: u32,
        /// The fence of the shared lease the attempt holds.
        fence: Option<u64>,
    },
    /// The first attempt holds a shared lease with this fence.
    Leased(u64),
    /// The wait for a shared lease has lasted this long and goes on.
    LeaseWait(Duration),
    /// The attempt lost its shared lease and its item is given back, so it
    /// waits for a new grant without using up a retry.
    GivenBack {
        /// Whether the command was stopped, rather than having ended
        /// already.
        stopped: bool,
    },
}

/// A retry about to wait for its backoff, for the progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryNotice {
    /// The failure reason of the attempt before.
    pub failure: String,
    /// The number of the attempt to come, from 2.
    pub attempt: u32,
    /// The maximum number of attempts of the item.
    pub max_attempts: u32,
    /// The wait before the attempt.
    pub delay: Duration,
}

/// Parses `--retry-on-exit`: `any`, or exit statuses from 1 to 255
/// separated by commas, as in `75` or `75,111`.
pub fn parse_retry_on(text: &str) -> Result<RetryOn, String> {
    if text == "any" {
        return Ok(RetryOn::Any);
    }
    let parse_code = |code: &str| {
        match code.trim().parse::<i32>() {
        Ok(code) if (1..=255).contains(&code) => Ok(code),
        _ => Err(format!(
            "expected `any` or exit statuses from 1 to 255 separated by commas, as in 75,111 (got '{code}')"
        )),
    }
    };
    let codes = text.split(',').map(parse_code).collect::<Result<_, _>>()?;
    Ok(RetryOn::ExitCodes(codes))
}

/// Parses `--retry-delay`: a duration of at most [`MAX_RETRY_DELAY`].
pub fn parse_retry_delay(text: &str) -> Result<Duration, String> {
    let delay = crate::duration::parse_duration(text)?;
    if delay > MAX_RETRY_DELAY {
        let max = format_duration(MAX_RETRY_DELAY);
        return Err(format!(
            "must be at most {max}, the maximum backoff (got '{text}')"
        ));
    }
    Ok(delay)
}

impl std::fmt::Debug for Fleet<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fleet({})", self.limiter.url())
    }
}

impl RetryPolicy {
    /// Returns whether the failed attempt that produced `result` may be
    /// retried. Commands that could not start and commands the run killed
    /// are never retried.
    pub fn is_retryable(&self, result: &ItemResult) -> bool {
        if result.temporary && !result.is_ok() {
            return result.terminated != Some(Termination::Stopped);
        }
        if result.is_ok() || result.error.is_some() {
            return false;
        }
        match (&self.retry_on, result.terminated) {
            (_, Some(Termination::Stopped | Termination::LeaseLost)) => false,
            (RetryOn::Any, _) => true,
            (RetryOn::ExitCodes(_), Some(Termination::TimedOut(_))) => false,
            (RetryOn::ExitCodes(codes), None) => {
                result.exit_code.is_some_and(|code| codes.contains(&code))
            }
        }
    }

    /// Returns the wait before retry number `retry` (1 for the first):
    /// `delay * 2^(retry - 1)`, capped at [`MAX_RETRY_DELAY`], then scaled by
    /// a factor between 0.5 and 1 from `jitter` (in `0.0..1.0`), so that
    /// items that failed together do not retry together.
    pub fn backoff(&self, retry: u32, jitter: f64) -> Duration {
        let exponent = retry.saturating_sub(1).min(20);
        let full = self
            .delay
            .saturating_mul(1 << exponent)
            .min(MAX_RETRY_DELAY);
        full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

impl<R: Runner> Attempts<'_, R> {
    /// Runs `job` under `permit`, retrying as the policy allows, and returns
    /// the last attempt's result with the item's outcome.
    ///
    /// With a shared limiter, each attempt also holds a lease of it, taken
    /// after the local permit under `shared_key` (the global limit alone
    /// for `None`). An attempt whose lease is lost is stopped and its item
    /// given back. The item then waits for a new grant without using up
    /// one of the retries.
    ///
    /// The permit and the lease are dropped before each backoff, and
    /// `reacquire` gets a new permit after it (`None` when the limiter is
    /// closed). `notify` receives every step. Once the run is stopping, no
    /// attempt starts: a retry that is still waiting ends as not started.
    pub async fn run<P, A, AF, N, NF>(
        &self,
        job: R::Job,
        (permit, reacquire): (P, A),
        shared_key: Option<&str>,
        stop: StopWatch,
        notify: N,
    ) -> (ItemResult, ItemOutcome)
    where
        A: Fn() -> AF,
        AF: Future<Output = Option<P>>,
        N: Fn(RetryEvent) -> NF,
        NF: Future<Output = ()>,
    {
        if stop.level() >= StopLevel::Soon {
            let cause = stop.cause();
            let outcome = ItemOutcome::NotStarted { attempts: 0, cause };
            return (ItemResult::default(), outcome);
        }
        let max_attempts = self.policy.retries.saturating_add(1);
        let mut permit = Some(permit);
        let mut lease = match self.take_lease(shared_key, &stop, &notify).await {
            Ok(lease) => lease,
            Err(cause) => {
                let outcome = ItemOutcome::NotStarted { attempts: 0, cause };
                return (ItemResult::default(), outcome);
            }
        };
        if let Some(lease) = &lease {
            notify(RetryEvent::Leased(lease.fence())).await;
        }
        // Attempts given back after a lost lease do not count as retries.
        let (mut attempts, mut given_back) = (0, 0);
        loop {
            attempts += 1;
            let lost = lease.as_ref().map(|lease| lease.lost());
            let terminate = terminate_on(self.timeout, stop.clone(), lost);
            let mut result = self.runner.run(job.clone(), terminate).await;
            result.fence = lease.as_ref().map(|lease| lease.fence());
            // A command that exited with a status of its own had ended
            // before the kill reached it. Its exit was not yet seen when the
            // lease was found lost.
            let stopped =
                result.terminated == Some(Termination::LeaseLost) && result.exit_code.is_none();
            // A lease lost as the command ended must not let the item be
            // recorded done: another process may hold the item by now.
            let lost = result.terminated == Some(Termination::LeaseLost)
                || lease.as_ref().is_some_and(|lease| lease.is_lost());
            let delay = if lost {
                result.terminated = Some(Termination::LeaseLost);
                // Dropping the lease releases it, in the background.
                drop(lease.take());
                drop(permit.take());
                if stop.level() >= StopLevel::Soon {
                    let outcome = ItemOutcome::from_last_attempt(&result, attempts, None);
                    return (result, outcome);
                }
                given_back += 1;
                notify(RetryEvent::GivenBack { stopped }).await;
                Duration::ZERO
            } else {
                let retries_used = attempts - given_back;
                let retry = retries_used < max_attempts
                    && self.policy.is_retryable(&result)
                    && stop.level() == StopLevel::Running;
                if !retry {
                    let outcome = ItemOutcome::from_last_attempt(&result, attempts, stop.cause());
                    return (result, outcome);
                }
                // Give the permit and the lease back for the backoff, so
                // that others can run.
                drop(lease.take());
                drop(permit.take());
                let delay = self.policy.backoff(retries_used, fastrand::f64());
                let failure = result.failure_reason().unwrap_or_default();
                notify(RetryEvent::Waiting(RetryNotice {
                    failure,
                    attempt: attempts + 1,
                    max_attempts: max_attempts.saturating_add(given_back),
                    delay,
                }))
                .await;
                delay
            };
            permit = wait_and_acquire(delay, &reacquire, stop.clone()).await;
            // A permit granted as the run starts stopping starts nothing.
            if permit.is_none() || stop.level() >= StopLevel::Soon {
                let cause = stop.cause();
                return (result, ItemOutcome::NotStarted { attempts, cause });
            }
            lease = match self.take_lease(shared_key, &stop, &notify).await {
                Ok(lease) => lease,
                Err(cause) => return (result, ItemOutcome::NotStarted { attempts, cause }),
            };
            let fence = lease.as_ref().map(|lease| lease.fence());
            notify(RetryEvent::Starting {
                attempt: attempts + 1,
                fence,
            })
            .await;
        }
    }

    /// Waits for a lease of the shared limiter, if there is one. Fails with
    /// the cause of the stop when the run starts stopping first, or when
    /// the limiter fails, which stops the run so that nothing new starts.
    ///
    /// A wait longer than [`LONG_LEASE_WAIT`] is reported once through
    /// `notify`, so that a run waiting on a full limit reports why.
    async fn take_lease<N, NF>(
        &self,
        key: Option<&str>,
        stop: &StopWatch,
        notify: &N,
    ) -> Result<Option<Box<dyn Lease>>, Option<StopCause>>
    where
        N: Fn(RetryEvent) -> NF,
        NF: Future<Output = ()>,
    {
        let Some(fleet) = self.fleet else {
            return Ok(None);
        };
        let mut stopping = stop.clone();
        let acquire = fleet.limiter.acquire(key);
        let granted = async {
            tokio::pin!(acquire);
            tokio::select! {
                granted = &mut acquire => return granted,
                () = tokio::time::sleep(LONG_LEASE_WAIT) => {}
            }
            notify(RetryEvent::LeaseWait(LONG_LEASE_WAIT)).await;
            acquire.await
        };
        tokio::select! {
            granted = granted => match granted {
                Ok(lease) => Ok(Some(lease)),
                Err(message) => {
                    let url = fleet.limiter.url();
                    fleet.stop.request(StopLevel::Soon, StopCause::Limiter { url, message });
                    Err(stop.cause())
                }
            },
            () = stopping.reached(StopLevel::Soon) => Err(stop.cause()),
        }
    }
}

/// Waits for `delay`, then for a permit. Returns `None` when the run starts
/// stopping first or the limiter is closed.
async fn wait_and_acquire<P, A, AF>(
    delay: Duration,
    reacquire: &A,
    mut stop: StopWatch,
) -> Option<P>
where
    A: Fn() -> AF,
    AF: Future<Output = Option<P>>,
{
    let wait = async {
        tokio::time::sleep(delay).await;
        reacquire().await
    };
    tokio::select! {
        permit = wait => permit,
        () = stop.reached(StopLevel::Soon) => None,
    }
}

/// Resolves when an attempt must be terminated: after `timeout`, when the
/// run stops now, or when `lease_lost` resolves.
async fn terminate_on(
    timeout: Option<Duration>,
    mut stop: StopWatch,
    lease_lost: Option<BoxFuture<'static, ()>>,
) -> Termination {
    let lease_lost = async {
        match lease_lost {
            Some(lost) => lost.await,
            None => std::future::pending().await,
        }
    };
    let timed_out = async {
        match timeout {
            Some(after) => {
                tokio::time::sleep(after).await;
                after
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        after = timed_out => Termination::TimedOut(after),
        () = stop.reached(StopLevel::Now) => Termination::Stopped,
        () = lease_lost => Termination::LeaseLost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(retry_on: RetryOn) -> RetryPolicy {
        RetryPolicy {
            retries: 3,
            delay: Duration::from_secs(1),
            retry_on,
        }
    }

    fn exit(code: i32) -> ItemResult {
        ItemResult {
            exit_code: Some(code),
            ..ItemResult::default()
        }
    }

    #[test]
    fn parse_retry_on_forms() {
        assert_eq!(parse_retry_on("any"), Ok(RetryOn::Any));
        assert_eq!(parse_retry_on("75"), Ok(RetryOn::ExitCodes(vec![75])));
        assert_eq!(
            parse_retry_on("75,111"),
            Ok(RetryOn::ExitCodes(vec![75, 111]))
        );
        for bad in ["", "0", "256", "75,", "x", "-1"] {
            let error = parse_retry_on(bad).unwrap_err();
            assert!(
                error.starts_with("expected `any` or exit statuses"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn parse_retry_delay_caps() {
        assert_eq!(parse_retry_delay("5m"), Ok(MAX_RETRY_DELAY));
        let error = parse_retry_delay("6m").unwrap_err();
        assert_eq!(
            error,
            "must be at most 300s, the maximum backoff (got '6m')"
        );
    }

    #[test]
    fn retryable_exit_codes_only() {
        let policy = policy(RetryOn::ExitCodes(vec![75]));
        assert!(policy.is_retryable(&exit(75)));
        assert!(!policy.is_retryable(&exit(1)));
        assert!(!policy.is_retryable(&exit(0)));
        let timed_out = ItemResult {
            terminated: Some(Termination::TimedOut(Duration::from_secs(1))),
            ..ItemResult::default()
        };
        assert!(!policy.is_retryable(&timed_out));
        assert!(!policy.is_retryable(&ItemResult::failed("not found".to_owned())));
    }

    #[test]
    fn retryable_any_except_stopped() {
        let policy = policy(RetryOn::Any);
        assert!(policy.is_retryable(&exit(1)));
        let timed_out = ItemResult {
            terminated: Some(Termination::TimedOut(Duration::from_secs(1))),
            ..ItemResult::default()
        };
        assert!(policy.is_retryable(&timed_out));
        let stopped = ItemResult {
            terminated: Some(Termination::Stopped),
            ..ItemResult::default()
        };
        assert!(!policy.is_retryable(&stopped));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_cap() {
        let policy = policy(RetryOn::Any);
        assert_eq!(policy.backoff(1, 1.0), Duration::from_secs(1));
        assert_eq!(policy.backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(policy.backoff(3, 1.0), Duration::from_secs(4));
        assert_eq!(policy.backoff(3, 0.5), Duration::from_secs(3));
        assert_eq!(policy.backoff(12, 1.0), MAX_RETRY_DELAY);
        assert_eq!(policy.backoff(u32::MAX, 1.0), MAX_RETRY_DELAY);
    }
}
