//! A lock built on a one-token semaphore.

use std::fmt;
use std::future::Future;

use crate::acquire::{Acquire, AcquireOwned};
use crate::error::TryAcquireError;
use crate::permit::Permit;
use crate::run::Run;
use crate::semaphore::DeferredSemaphore;

/// Lets one unit of work run at a time, serving waiters first come, first
/// served.
///
/// This is Twisted's `DeferredLock`: a [`DeferredSemaphore`] with one token.
/// The classic use is to serialise work on a resource that must not be used
/// concurrently, such as a database file written from worker threads. The
/// lock guards no data; tokio's `Mutex` is the choice when it should.
///
/// # Examples
///
/// ## Serialise writes to one file
///
/// ```
/// use deferred_semaphore::DeferredLock;
///
/// # futures::executor::block_on(async {
/// let lock = DeferredLock::new();
/// let written = lock.run(|| async { "row appended" }).await.unwrap();
/// assert_eq!(written, "row appended");
/// assert!(!lock.locked());
/// # });
/// ```
#[derive(Clone)]
pub struct DeferredLock {
    sem: DeferredSemaphore,
}

impl fmt::Debug for DeferredLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferredLock")
            .field("locked", &self.locked())
            .field("waiting", &self.waiting())
            .finish()
    }
}

impl Default for DeferredLock {
    fn default() -> Self {
        Self::new()
    }
}

impl DeferredLock {
    /// Creates an unlocked lock.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredLock;
    ///
    /// assert!(!DeferredLock::new().locked());
    /// ```
    pub fn new() -> Self {
        DeferredLock {
            sem: DeferredSemaphore::new(1),
        }
    }

    /// Returns whether someone holds the lock now.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredLock;
    ///
    /// let lock = DeferredLock::new();
    /// let held = lock.try_acquire().unwrap();
    /// assert!(lock.locked());
    /// drop(held);
    /// assert!(!lock.locked());
    /// ```
    pub fn locked(&self) -> bool {
        self.sem.tokens() == 0
    }

    /// Returns the number of acquirers queued for the lock.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredLock;
    ///
    /// assert_eq!(DeferredLock::new().waiting(), 0);
    /// ```
    pub fn waiting(&self) -> usize {
        self.sem.waiting()
    }

    /// Waits for the lock and returns a permit that releases it on drop.
    ///
    /// # Cancel safety
    ///
    /// This method is cancel safe: a dropped waiter leaves the queue, and the
    /// lock goes to the next one.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredLock;
    ///
    /// # futures::executor::block_on(async {
    /// let lock = DeferredLock::new();
    /// let held = lock.acquire().await.unwrap();
    /// assert!(lock.locked());
    /// # drop(held);
    /// # });
    /// ```
    pub fn acquire(&self) -> Acquire<'_> {
        self.sem.acquire()
    }

    /// Waits for the lock and returns a permit that owns a handle to it.
    ///
    /// # Cancel safety
    ///
    /// This method is cancel safe, as [`acquire`](Self::acquire) is.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredLock;
    ///
    /// # futures::executor::block_on(async {
    /// let lock = DeferredLock::new();
    /// let held = lock.acquire_owned().await.unwrap();
    /// # drop(held);
    /// # });
    /// ```
    pub fn acquire_owned(&self) -> AcquireOwned {
        self.sem.acquire_owned()
    }

    /// Takes the lock if it is free and nobody is queued.
    ///
    /// # Errors
    ///
    /// Returns [`TryAcquireError::NoTokens`] if the lock is held or others
    /// are waiting.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredLock;
    ///
    /// let lock = DeferredLock::new();
    /// let _held = lock.try_acquire().unwrap();
    /// assert!(lock.try_acquire().is_err());
    /// ```
    pub fn try_acquire(&self) -> Result<Permit<'_>, TryAcquireError> {
        self.sem.try_acquire()
    }

    /// Calls `work` once the lock is held, awaits it, then releases the lock.
    ///
    /// # Cancel safety
    ///
    /// The same as [`DeferredSemaphore::run`]: the lock is released only once
    /// the work has stopped.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredLock;
    ///
    /// # futures::executor::block_on(async {
    /// let lock = DeferredLock::new();
    /// assert_eq!(lock.run(|| async { 1 + 1 }).await.unwrap(), 2);
    /// # });
    /// ```
    pub fn run<F, Fut>(&self, work: F) -> Run<'_, F, Fut>
    where
        F: FnOnce() -> Fut,
        Fut: Future,
    {
        self.sem.run(work)
    }
}
