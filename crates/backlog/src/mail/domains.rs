//! `--per-domain`: at most N SMTP sessions at once per recipient domain,
//! with one `DeferredSemaphore` per domain, made on first use.
//!
//! The run's keyed limiter already holds each domain to `--per-domain`
//! sessions, without head-of-line blocking. This module adds the slowdown:
//! every session also takes its domain's permit here, inside the item's
//! work, which waits only after a 421 or a refused connection has halved
//! the domain's limit for a while.
//!
//! NOTE: while a domain is slowed down, an envelope waiting here holds its
//! `--max-run` slot, so other domains may wait behind it until the
//! slowdown ends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use deferred_semaphore::{DeferredSemaphore, OwnedPermit};
use tokio::time::Instant;

/// The per-domain limits of one run.
#[derive(Debug)]
pub struct DomainLimits {
    per_domain: usize,
    cooldown: Duration,
    domains: Mutex<HashMap<String, Domain>>,
}

#[derive(Debug)]
struct Domain {
    semaphore: DeferredSemaphore,
    /// When the limit goes back to `per_domain`, after a slow-down.
    slowed_until: Option<Instant>,
}

impl DomainLimits {
    /// Allows `per_domain` sessions at once per domain. A slowed-down
    /// domain gets its full limit back `cooldown` after its last slow-down.
    pub fn new(per_domain: usize, cooldown: Duration) -> Self {
        DomainLimits {
            per_domain: per_domain.max(1),
            cooldown,
            domains: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a session permit of `domain`.
    pub async fn acquire(&self, domain: &str) -> OwnedPermit {
        let semaphore = {
            let mut domains = self.lock();
            let domain = domains.entry(domain.to_owned()).or_insert_with(|| Domain {
                semaphore: DeferredSemaphore::new(self.per_domain),
                slowed_until: None,
            });
            if domain
                .slowed_until
                .is_some_and(|until| Instant::now() >= until)
            {
                domain.slowed_until = None;
                // A limit from 1 up to `per_domain` is always valid.
                let _ = domain.semaphore.set_limit(self.per_domain);
            }
            domain.semaphore.clone()
        };
        semaphore
            .acquire_owned()
            .await
            .expect("a domain's semaphore is never closed")
    }

    /// Halves the session limit of `domain` (down to 1) for the cooldown,
    /// after a 421 reply or a refused connection.
    pub fn slow_down(&self, domain: &str) {
        let mut domains = self.lock();
        let Some(domain) = domains.get_mut(domain) else {
            return;
        };
        let halved = (domain.semaphore.limit() / 2).max(1);
        // Shrinking retires tokens as sessions end. The new limit is at
        // least 1, which `set_limit` accepts.
        let _ = domain.semaphore.set_limit(halved);
        domain.slowed_until = Some(Instant::now() + self.cooldown);
    }

    /// Returns the current session limit of `domain`.
    #[cfg(test)]
    pub fn limit(&self, domain: &str) -> Option<usize> {
        self.lock().get(domain).map(|d| d.semaphore.limit())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Domain>> {
        self.domains
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limits_each_domain_apart() {
        let limits = DomainLimits::new(2, Duration::from_secs(10));
        let a1 = limits.acquire("a.test").await;
        let _a2 = limits.acquire("a.test").await;
        // Another domain is not held back by a full one.
        let _b1 = limits.acquire("b.test").await;
        let third = tokio::time::timeout(Duration::from_millis(10), limits.acquire("a.test"));
        assert!(third.await.is_err(), "a third session of a.test started");
        drop(a1);
        let third = tokio::time::timeout(Duration::from_millis(10), limits.acquire("a.test"));
        assert!(third.await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn slow_down_halves_then_restores() {
        let limits = DomainLimits::new(5, Duration::from_secs(10));
        drop(limits.acquire("a.test").await);
        limits.slow_down("a.test");
        assert_eq!(limits.limit("a.test"), Some(2));
        limits.slow_down("a.test");
        limits.slow_down("a.test");
        assert_eq!(limits.limit("a.test"), Some(1));
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(limits.acquire("a.test").await);
        assert_eq!(limits.limit("a.test"), Some(1));
        tokio::time::sleep(Duration::from_secs(6)).await;
        drop(limits.acquire("a.test").await);
        assert_eq!(limits.limit("a.test"), Some(5));
    }
}
