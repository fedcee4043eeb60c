//! Lease state on the client, the self-fencing deadline and the heartbeat
//! that renews every lease of a limiter in one script call.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::limiter::Inner;
use crate::scripts::LeaseRef;
use crate::stats::Counters;

/// Returns the safety margin taken off a lease for the local deadline:
/// `max(10 % of the lease, 100 ms)`, at most half the lease. It covers a
/// client clock that runs slower than the server's and scheduling delays.
pub(crate) fn margin(lease: Duration) -> Duration {
    (lease / 10).max(Duration::from_millis(100)).min(lease / 2)
}

/// Returns the local deadline of a lease renewed or granted by a request
/// sent at `sent`.
pub(crate) fn deadline_after(sent: Instant, lease: Duration) -> Instant {
    sent + lease - margin(lease)
}

/// Returns how long one renew call may take before it counts as not
/// renewed: a fifth of the lease (at least 50 ms), under the heartbeat
/// period of a third of the lease.
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
    timing: Mutex<Timing>,
    lost: watch::Sender<bool>,
    counters: Arc<Counters>,
}

/// The timing from the last grant or renewal of a lease.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// The local self-fencing deadline.
    pub(crate) deadline: Instant,
    /// The lease the reply reported.
    pub(crate) lease: Duration,
    /// The expiry Redis stored, in server milliseconds since the epoch.
    pub(crate) expiry_ms: u64,
}

impl LeaseState {
    pub(crate) fn new(
        lease_id: String,
        key: Option<String>,
        fence: u64,
        epoch: String,
        timing: Timing,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            lease_id,
            key,
            fence,
            epoch,
            timing: Mutex::new(timing),
            lost: watch::Sender::new(false),
            counters,
        }
    }

    pub(crate) fn timing(&self) -> Timing {
        *self.timing.lock().expect("lease timing lock")
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.timing().deadline
    }

    /// Stores the timing of a successful renewal. The deadline follows the
    /// renewal, earlier as well as later, because after the lease shrank
    /// Redis expires the lease at the renewal's time plus the new lease. A
    /// lease already lost stays lost.
    fn renewed(&self, timing: Timing) {
        let mut current = self.timing.lock().expect("lease timing lock");
        if *self.lost.borrow() {
            return;
        }
        let earlier = timing.deadline < current.deadline;
        *current = timing;
        drop(current);
        if earlier {
            // Wakes each `lost()` future, which sleeps until the old
            // deadline, to read the new one.
            self.lost.send_modify(|_| {});
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
    /// whichever comes first. It fires without the heartbeat.
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
                // The sender is a field of `self`, which outlives this
                // receiver, so `changed` cannot fail.
                _ = receiver.changed() => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }
}

/// Renews every lease of the limiter each third of the shortest lease in
/// use until the limiter and all its permits are gone. `shrunk` wakes it
/// when a reply reports a shorter lease, so that it sleeps no longer than a
/// third of the new one.
pub(crate) async fn run_heartbeat(inner: Weak<Inner>, shrunk: Arc<Notify>) {
    loop {
        let period = match inner.upgrade() {
            Some(inner) => inner.shortest_lease() / 3,
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shrunk.notified() => continue,
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        renew_all(&inner).await;
    }
}

/// Renews every live lease of the limiter in one call, which also checks
/// that Redis kept its data (see [`Scripts::renew_expecting`]). It runs
/// with no leases too, for that check. Returns whether Redis replied.
///
/// [`Scripts::renew_expecting`]: crate::scripts::Scripts::renew_expecting
pub(crate) async fn renew_all(inner: &Inner) -> bool {
    let _turn = inner.renewing.lock().await;

    let leases: Vec<Arc<LeaseState>> = inner.live_leases();
    let refs: Vec<(LeaseRef<'_>, u64)> = leases
        .iter()
        .map(|lease| {
            let lease_ref = LeaseRef {
                lease_id: &lease.lease_id,
                key: lease.key.as_deref(),
            };
            (lease_ref, lease.timing().expiry_ms)
        })
        .collect();

    let lease = inner.shortest_lease();
    let sent = Instant::now();
    inner.counters.renew_calls.fetch_add(1, Ordering::Relaxed);
    let mut con = inner.con.clone();
    let call = inner.scripts.renew_expecting(
        &mut con,
        &inner.namespace,
        &refs,
        &inner.token,
        inner.fallback_lease(),
    );
    // A renewal that times out or fails counts as not renewed: each
    // deadline keeps running from the last success.
    let Ok(Ok(reply)) = tokio::time::timeout(renew_timeout(lease), call).await else {
        return false;
    };

    inner.set_lease(reply.lease);
    let timing = Timing {
        deadline: deadline_after(sent, reply.lease),
        lease: reply.lease,
        expiry_ms: reply.expiry_ms,
    };
    for (state, renewed) in leases.iter().zip(&reply.renewed) {
        if *renewed && state.epoch == reply.epoch {
            state.renewed(timing);
        } else if !inner.holds_lease(&state.lease_id) {
            // Released while the renewal was on its way: gone, not lost.
        } else {
            state.mark_lost();
            inner.forget_lease(&state.lease_id);
        }
    }
    true
}
