//! Retries with exponential backoff and jitter, and the attempts of one
//! item.
//!
//! An item's work owns the permit the backlog acquired for it. Before it
//! waits for a retry, it drops the permit, so another item can run during
//! the backoff. Afterwards it queues for a new permit like any other item,
//! through the item's own `reacquire` (the same key, with --per-key).

use std::future::Future;
use std::time::Duration;

use crate::duration::format_duration;
use crate::exec::{ItemResult, Runner};
use crate::group::Termination;
use crate::outcome::ItemOutcome;
use crate::stop::{StopLevel, StopWatch};

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
}

/// A step of an item's retries, reported to the caller of [`Attempts::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryEvent {
    /// A failed attempt will be retried after a backoff, without a permit.
    Waiting(RetryNotice),
    /// The backoff is over and the permit is held again: attempt number
    /// `.0` (from 2) starts now.
    Starting(u32),
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
            (_, Some(Termination::Stopped)) => false,
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
    /// The permit is dropped before each backoff, and `reacquire` gets a
    /// new one after it (`None` when the limiter is closed); `notify` hears
    /// of both steps. Once the run is stopping, no attempt starts: a retry
    /// that is still waiting ends as not started.
    pub async fn run<P, A, AF, N, NF>(
        &self,
        job: R::Job,
        (permit, reacquire): (P, A),
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
        let mut attempts = 0;
        loop {
            attempts += 1;
            let terminate = terminate_on(self.timeout, stop.clone());
            let result = self.runner.run(job.clone(), terminate).await;
            let retry = attempts < max_attempts
                && self.policy.is_retryable(&result)
                && stop.level() == StopLevel::Running;
            if !retry {
                let outcome = ItemOutcome::from_last_attempt(&result, attempts, stop.cause());
                return (result, outcome);
            }

            // Give the permit back for the backoff, so that others can run.
            drop(permit.take());
            let delay = self.policy.backoff(attempts, fastrand::f64());
            let failure = result.failure_reason().unwrap_or_default();
            let attempt = attempts + 1;
            notify(RetryEvent::Waiting(RetryNotice {
                failure,
                attempt,
                max_attempts,
                delay,
            }))
            .await;
            permit = wait_and_acquire(delay, &reacquire, stop.clone()).await;
            // A permit granted as the run starts stopping starts nothing.
            if permit.is_none() || stop.level() >= StopLevel::Soon {
                let cause = stop.cause();
                return (result, ItemOutcome::NotStarted { attempts, cause });
            }
            notify(RetryEvent::Starting(attempt)).await;
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

/// Resolves when an attempt must be terminated: after `timeout`, or when
/// the run stops now.
async fn terminate_on(timeout: Option<Duration>, mut stop: StopWatch) -> Termination {
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
