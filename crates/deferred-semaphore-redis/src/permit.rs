//! The permit handed to a holder: fence, deadline, loss signal, release.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{CallError, Error};
use crate::lease::LeaseState;
use crate::limiter::Inner;
use crate::scripts::LeaseRef;

/// A lease on one unit of work. Dropping it releases the lease in the
/// background; the lease also expires by itself on the server.
pub struct RedisPermit {
    pub(crate) state: Arc<LeaseState>,
    pub(crate) inner: Arc<Inner>,
    pub(crate) released: bool,
}

impl std::fmt::Debug for RedisPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPermit")
            .field("lease_id", &self.state.lease_id)
            .field("key", &self.state.key)
            .field("fence", &self.state.fence)
            .field("deadline", &self.state.deadline())
            .finish()
    }
}

impl RedisPermit {
    /// Returns the fencing token of this grant. It is larger than every
    /// token granted before it in the namespace, also across a loss of the
    /// Redis data unless the server clock moved back by more than one lease.
    pub fn fence(&self) -> u64 {
        self.state.fence
    }

    /// Returns the local instant after which this holder must treat the
    /// lease as lost, unless a renewal moves it.
    ///
    /// It is the monotonic instant at which the last successful acquire or
    /// renew request was sent, plus the lease that reply reported, minus a
    /// margin of `max(10 % of the lease, 100 ms)` (at most half the lease).
    /// A renewal after the lease shrank moves it earlier.
    pub fn deadline(&self) -> Instant {
        self.state.deadline()
    }

    /// Returns whether the lease is known lost or past its deadline.
    pub fn is_lost(&self) -> bool {
        self.state.is_lost()
    }

    /// Returns a future that resolves when the lease is lost because a
    /// renewal found it gone, the namespace's state was reset, or the
    /// deadline passed. It fires at the
    /// deadline by a local timer, also while Redis cannot be reached.
    pub fn lost(&self) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(self.state.clone().lost())
    }

    /// Returns the lease id, the member of the namespace's sorted sets.
    pub fn lease_id(&self) -> &str {
        &self.state.lease_id
    }

    /// Returns the limited key, or `None` for a permit of the global limit
    /// only.
    pub fn key(&self) -> Option<&str> {
        self.state.key.as_deref()
    }

    /// Releases the lease and waits for Redis to confirm. A lease that was
    /// already lost releases nothing and still returns `Ok`.
    pub async fn release(mut self) -> Result<(), Error> {
        self.released = true;
        self.inner.forget_lease(&self.state.lease_id);
        release_lease(&self.inner, &self.state).await?;
        Ok(())
    }
}

impl Drop for RedisPermit {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.inner.forget_lease(&self.state.lease_id);
        // Without a runtime the lease expires on the server by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let inner = self.inner.clone();
            let state = self.state.clone();
            inner.releases.start();
            runtime.spawn(async move {
                let _ = release_lease(&inner, &state).await;
                inner.releases.finish();
            });
        }
    }
}

async fn release_lease(inner: &Inner, state: &LeaseState) -> Result<u64, CallError> {
    inner.counters.release_calls.fetch_add(1, Ordering::Relaxed);
    let mut con = inner.con.clone();
    let lease = LeaseRef {
        lease_id: &state.lease_id,
        key: state.key.as_deref(),
    };
    let timeout = inner.call_timeout();
    let call = inner.scripts.release(&mut con, &inner.namespace, lease);
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(CallError::timed_out(timeout)),
    }
}
