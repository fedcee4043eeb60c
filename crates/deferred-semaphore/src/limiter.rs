//! The seam between backlog processing and whatever hands out permits.

use std::future::Future;

use crate::acquire::AcquireOwned;
use crate::error::AcquireError;
use crate::keyed::{KeyedAcquire, KeyedPermit, KeyedSemaphore};
use crate::permit::OwnedPermit;
use crate::semaphore::DeferredSemaphore;

/// Hands out permits that bound how much work runs at once.
///
/// [`Backlog`](crate::Backlog) asks its limiter for a permit before it pulls
/// each item, and drops the permit when that item's work ends. A
/// [`DeferredSemaphore`] is a limiter; so is anything else that can grant and
/// take back permits (a count per key, a rate, a count shared through a
/// server), and all of them plug into the same backlog processing.
///
/// # Examples
///
/// ```
/// use deferred_semaphore::{DeferredSemaphore, Limiter};
///
/// # futures::executor::block_on(async {
/// let sem = DeferredSemaphore::new(2);
/// let permit = Limiter::acquire(&sem).await.unwrap();
/// assert_eq!(Limiter::limit(&sem), 2);
/// # drop(permit);
/// # });
/// ```
pub trait Limiter {
    /// A grant of one unit of work; dropping it gives the grant back.
    type Permit;

    /// The error returned when a permit cannot be granted.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The future returned by [`acquire`](Limiter::acquire).
    type Acquire: Future<Output = Result<Self::Permit, Self::Error>>;

    /// Waits for a permit for one unit of work.
    ///
    /// # Cancel safety
    ///
    /// Implementations must be cancel safe: dropping the future must lose no
    /// permit.
    fn acquire(&self) -> Self::Acquire;

    /// Takes a permit at once if one is free, without waiting.
    ///
    /// Backlog processing tries this before [`acquire`](Limiter::acquire), so
    /// that an uncontended permit costs no acquire future. The default
    /// returns `None`, which sends every request through `acquire`.
    ///
    /// Implementations must not take a permit ahead of a queued `acquire`,
    /// or the order in which `acquire` serves waiters would no longer hold.
    fn try_acquire(&self) -> Option<Self::Permit> {
        None
    }

    /// Passes a permit whose work has ended on to the next unit of work, if
    /// giving it back and acquiring again at once would grant it anyway.
    ///
    /// Backlog processing offers each finished item's permit here before it
    /// drops it, which saves a release and an acquire per item. Returns the
    /// permit to reuse, or `None` after dropping it. The default always drops
    /// it.
    ///
    /// Implementations must drop the permit whenever it would go to someone
    /// else on release: a queued `acquire`, a pending reduction of the limit,
    /// or a closed limiter.
    fn reuse(&self, permit: Self::Permit) -> Option<Self::Permit> {
        drop(permit);
        None
    }

    /// Returns the most units of work the limiter lets run at once now.
    ///
    /// Backlog processing sizes its buffers from it, so memory follows the
    /// limit and not the length of the backlog.
    fn limit(&self) -> usize;
}

impl Limiter for DeferredSemaphore {
    type Permit = OwnedPermit;
    type Error = AcquireError;
    type Acquire = AcquireOwned;

    fn acquire(&self) -> AcquireOwned {
        self.acquire_owned()
    }

    fn try_acquire(&self) -> Option<OwnedPermit> {
        self.try_acquire_owned().ok()
    }

    fn reuse(&self, permit: OwnedPermit) -> Option<OwnedPermit> {
        self.reuse_permit(permit)
    }

    fn limit(&self) -> usize {
        DeferredSemaphore::limit(self)
    }
}

impl<L: Limiter + ?Sized> Limiter for &L {
    type Permit = L::Permit;
    type Error = L::Error;
    type Acquire = L::Acquire;

    fn acquire(&self) -> L::Acquire {
        (**self).acquire()
    }

    fn try_acquire(&self) -> Option<L::Permit> {
        (**self).try_acquire()
    }

    fn reuse(&self, permit: L::Permit) -> Option<L::Permit> {
        (**self).reuse(permit)
    }

    fn limit(&self) -> usize {
        (**self).limit()
    }
}

impl<L: Limiter + ?Sized> Limiter for std::sync::Arc<L> {
    type Permit = L::Permit;
    type Error = L::Error;
    type Acquire = L::Acquire;

    fn acquire(&self) -> L::Acquire {
        (**self).acquire()
    }

    fn try_acquire(&self) -> Option<L::Permit> {
        (**self).try_acquire()
    }

    fn reuse(&self, permit: L::Permit) -> Option<L::Permit> {
        (**self).reuse(permit)
    }

    fn limit(&self) -> usize {
        (**self).limit()
    }
}

/// Hands out permits for units of work that each belong to a key, such as
/// the domain of a URL, under a limit per key and a global one.
///
/// [`KeyedBacklog`](crate::KeyedBacklog) asks for a permit for an item's
/// key before it starts the item. [`KeyedSemaphore`] is a keyed limiter;
/// `RateLimited` and `PerKeyRate` (feature `rate`) add a rate to one.
///
/// # Examples
///
/// ```
/// use deferred_semaphore::{KeyedLimiter, KeyedSemaphore};
///
/// # futures::executor::block_on(async {
/// let sem = KeyedSemaphore::new(4, 1);
/// let permit = KeyedLimiter::acquire(&sem, &"example.com").await.unwrap();
/// assert_eq!(KeyedLimiter::<&str>::limit(&sem), 4);
/// # drop(permit);
/// # });
/// ```
pub trait KeyedLimiter<K> {
    /// A grant of one unit of work of one key; dropping it gives the grant
    /// back.
    type Permit;

    /// The error returned when a permit cannot be granted.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The future returned by [`acquire`](KeyedLimiter::acquire).
    type Acquire: Future<Output = Result<Self::Permit, Self::Error>>;

    /// Waits for a permit for one unit of work of `key`.
    ///
    /// # Cancel safety
    ///
    /// Implementations must be cancel safe: dropping the future must lose no
    /// permit.
    fn acquire(&self, key: &K) -> Self::Acquire;

    /// Returns the most units of work the limiter lets run at once over all
    /// keys now. Backlog processing sizes its buffers from it.
    fn limit(&self) -> usize;
}

impl<K: std::hash::Hash + Eq + Clone> KeyedLimiter<K> for KeyedSemaphore<K> {
    type Permit = KeyedPermit<K>;
    type Error = AcquireError;
    type Acquire = KeyedAcquire<K>;

    fn acquire(&self, key: &K) -> KeyedAcquire<K> {
        KeyedSemaphore::acquire(self, key.clone())
    }

    fn limit(&self) -> usize {
        KeyedSemaphore::limit(self)
    }
}

impl<K, L: KeyedLimiter<K> + ?Sized> KeyedLimiter<K> for &L {
    type Permit = L::Permit;
    type Error = L::Error;
    type Acquire = L::Acquire;

    fn acquire(&self, key: &K) -> L::Acquire {
        (**self).acquire(key)
    }

    fn limit(&self) -> usize {
        (**self).limit()
    }
}

impl<K, L: KeyedLimiter<K> + ?Sized> KeyedLimiter<K> for std::sync::Arc<L> {
    type Permit = L::Permit;
    type Error = L::Error;
    type Acquire = L::Acquire;

    fn acquire(&self, key: &K) -> L::Acquire {
        (**self).acquire(key)
    }

    fn limit(&self) -> usize {
        (**self).limit()
    }
}
