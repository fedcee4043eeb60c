//! Lease state on the client, the self-fencing deadline and the heartbeat
//! that renews every lease of a limiter in one script call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::limiter::Inner;
use crate::scripts::LeaseRef;
use crate::stats::Counters;

/// The safety margin taken off a lease for the local deadline:
/// `max(10 % of the lease, 100 ms)`, at most half the lease. It covers a
/// client clock that runs slower than the server's and scheduling delays.
pub(crate) fn margin(lease: Duration) -> Duration {
    (lease / 10).max(Duration::from_millis(100)).min(lease / 2)
}

/// The local deadline of a lease renewed or granted by a request sent at
/// `sent`.
pub(crate) fn deadline_after(sent: Instant, lease: Duration) -> Instant {
    sent + lease - margin(lease)
}

/// How long one renew call may take before it counts as not renewed: well
/// under the heartbeat period of a third of the lease.
pub(crate) fn renew_timeout(lease: Duration) -> Duration {
    (lease / 5).max(Duration::from_millis(50))
}

/// One lease held by this process.
#[derive(Debug)]
pub(crate) struct LeaseState {
    pub(crate) lease_id: String,
    pub(crate) key: Option<String>,
    pub(crate) fence: u64,
    pub(crate) epoch: String,
    deadline: Mutex<Instant>,
    lost: watch::Sender<bool>,
    counters: Arc<Counters>,
}

impl LeaseState {
    pub(crate) fn new(
        lease_id: String,
        key: Option<String>,
        fence: u64,
        epoch: String,
        deadline: Instant,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            lease_id,
            key,
            fence,
            epoch,
            deadline: Mutex::new(deadline),
            lost: watch::Sender::new(false),
            counters,
        }
    }

    pub(crate) fn deadline(&self) -> Instant {
        *self.deadline.lock().expect("deadline lock")
    }

    /// Moves the deadline later after a successful renewal. A lease already
    /// lost stays lost.
    fn extend(&self, deadline: Instant) {
        let mut current = self.deadline.lock().expect("deadline lock");
        if deadline > *current && !*self.lost.borrow() {
            *current = deadline;
        }
    }

    pub(crate) fn is_lost(&self) -> bool {
        if *self.lost.borrow() {
            return true;
        }
        if Instant::now() >= self.deadline() {
            self.mark_lost();
            return true;
        }
        false
    }

    pub(crate) fn mark_lost(&self) {
        let first = self
            .lost
            .send_if_modified(|lost| !std::mem::replace(lost, true));
        if first {
            self.counters.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Resolves when the lease is marked lost or its deadline passes,
    /// whichever comes first; needs no heartbeat to fire.
    pub(crate) async fn lost(self: Arc<Self>) {
        let mut receiver = self.lost.subscribe();
        loop {
            if *receiver.borrow_and_update() {
                return;
            }
            let deadline = self.deadline();
            if Instant::now() >= deadline {
                self.mark_lost();
                return;
            }
            tokio::select! {
                // The sender lives in `self`, so this never fails.
                _ = receiver.changed() => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }
}

/// Renews every lease of the limiter each third of a lease until the
/// limiter and all its permits are gone.
pub(crate) async fn run_heartbeat(inner: Weak<Inner>, lease_ms: Arc<AtomicU64>) {
    loop {
        let lease = Duration::from_millis(lease_ms.load(Ordering::Relaxed));
        tokio::time::sleep(lease / 3).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        renew_all(&inner).await;
    }
}

async fn renew_all(inner: &Inner) {
    let leases: Vec<Arc<LeaseState>> = inner.live_leases();
    if leases.is_empty() {
        return;
    }
    let refs: Vec<LeaseRef<'_>> = leases
        .iter()
        .map(|lease| LeaseRef {
            lease_id: &lease.lease_id,
            key: lease.key.as_deref(),
        })
        .collect();
    let lease = inner.lease();
    let sent = Instant::now();
    inner.counters.renew_calls.fetch_add(1, Ordering::Relaxed);
    let mut con = inner.con.clone();
    let call = inner.scripts.renew(
        &mut con,
        &inner.namespace,
        &refs,
        &inner.token,
        inner.fallback_lease(),
    );
    // A renewal that times out or fails counts as not renewed: each
    // deadline keeps running from the last success.
    let Ok(Ok(reply)) = tokio::time::timeout(renew_timeout(lease), call).await else {
        return;
    };
    inner.set_lease(reply.lease);
    let deadline = deadline_after(sent, reply.lease);
    for (state, renewed) in leases.iter().zip(&reply.renewed) {
        if *renewed && state.epoch == reply.epoch {
            state.extend(deadline);
        } else if !inner.holds_lease(&state.lease_id) {
            // Released while the renewal was on its way: gone, not lost.
        } else {
            state.mark_lost();
            inner.forget_lease(&state.lease_id);
        }
    }
}
