//! The public semaphore handle.

use std::fmt;
use std::future::Future;

use crate::acquire::{Acquire, AcquireOwned};
use crate::core::{Core, MAX_TOKENS};
use crate::error::{LimitError, TryAcquireError};
use crate::permit::{OwnedPermit, Permit};
use crate::run::Run;
use crate::sync::Arc;

/// Runs at most `limit` units of work at once and queues the rest, first come,
/// first served.
///
/// This is Twisted's `DeferredSemaphore` for async Rust, and covers what
/// tokio's `Semaphore` does. A handle is cheap to clone; clones share the same
/// tokens.
///
/// # Fairness
///
/// Waiters are served strictly in the order in which their acquire futures
/// were first polled. A newcomer never overtakes a queued waiter, not even
/// through [`try_acquire`](Self::try_acquire), which fails while anyone waits.
/// A waiter that asks for several tokens at the head of the queue collects
/// them as they come back, and those behind it wait their turn.
///
/// # Limit
///
/// The limit is at least 1 (a limit of 0 could never grant anything, so it is
/// rejected). [`set_limit`](Self::set_limit) changes it at run time: growing
/// serves waiters at once, shrinking never interrupts work that holds tokens
/// and retires the excess tokens as they come back.
///
/// # Memory ordering
///
/// Everything a task did before dropping its permit happens before everything
/// the next holder of those tokens does after its acquire completes.
///
/// # Closing
///
/// [`close`](Self::close) fails every waiter and every later acquire with
/// [`AcquireError::Closed`](crate::AcquireError::Closed). Permits already
/// held stay valid and still give their tokens back.
///
/// # Examples
///
/// ## Send a backlog of emails, two at a time
///
/// ```
/// use deferred_semaphore::DeferredSemaphore;
/// use futures::future::join_all;
///
/// # async fn send(to: &str) -> Result<(), String> { Ok(()) }
/// # futures::executor::block_on(async {
/// let sem = DeferredSemaphore::new(2);
/// let recipients = ["ada@example.com", "alan@example.com", "grace@example.com"];
/// let sends = recipients.iter().map(|to| sem.run(move || send(to)));
/// for outcome in join_all(sends).await {
///     assert_eq!(outcome, Ok(Ok(())));
/// }
/// # });
/// ```
///
/// ## Hold a token across several steps
///
/// ```
/// use deferred_semaphore::DeferredSemaphore;
///
/// # futures::executor::block_on(async {
/// let sem = DeferredSemaphore::new(1);
/// let permit = sem.acquire().await?;
/// assert_eq!(sem.tokens(), 0);
/// drop(permit);
/// assert_eq!(sem.tokens(), 1);
/// # Ok::<(), deferred_semaphore::AcquireError>(())
/// # });
/// ```
///
/// ## Throttle harder at run time
///
/// ```
/// use deferred_semaphore::DeferredSemaphore;
///
/// let sem = DeferredSemaphore::new(10);
/// sem.set_limit(2).unwrap();
/// assert_eq!(sem.limit(), 2);
/// assert_eq!(sem.tokens(), 2);
/// ```
#[derive(Clone)]
pub struct DeferredSemaphore {
    core: Arc<Core>,
}

impl fmt::Debug for DeferredSemaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.core.fmt(f)
    }
}

impl DeferredSemaphore {
    /// Creates a semaphore that lets `limit` holders run at once.
    ///
    /// # Panics
    ///
    /// Panics if `limit` is 0 or larger than `usize::MAX >> 2`; use
    /// [`try_new`](Self::try_new) to get an error instead.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// let sem = DeferredSemaphore::new(4);
    /// assert_eq!(sem.limit(), 4);
    /// ```
    #[track_caller]
    pub fn new(limit: usize) -> Self {
        match Self::try_new(limit) {
            Ok(sem) => sem,
            Err(error) => panic!("DeferredSemaphore::new: {error}"),
        }
    }

    /// Creates a semaphore that lets `limit` holders run at once, or fails on
    /// an invalid limit.
    ///
    /// # Errors
    ///
    /// Returns a [`LimitError`] if `limit` is 0 or larger than
    /// `usize::MAX >> 2`.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// assert!(DeferredSemaphore::try_new(0).is_err());
    /// assert!(DeferredSemaphore::try_new(1).is_ok());
    /// ```
    pub fn try_new(limit: usize) -> Result<Self, LimitError> {
        check_limit(limit)?;
        Ok(DeferredSemaphore {
            core: Arc::new(Core::new(limit)),
        })
    }

    /// Returns the most tokens that can be held at once.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// assert_eq!(DeferredSemaphore::new(3).limit(), 3);
    /// ```
    pub fn limit(&self) -> usize {
        self.core.limit()
    }

    /// Returns the number of tokens free now (tokio's `available_permits`).
    ///
    /// While anyone waits, this is 0: a returned token goes straight to the
    /// first waiter.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// let sem = DeferredSemaphore::new(3);
    /// let _permit = sem.try_acquire().unwrap();
    /// assert_eq!(sem.tokens(), 2);
    /// ```
    pub fn tokens(&self) -> usize {
        self.core.tokens()
    }

    /// Returns the number of acquirers queued for tokens.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// assert_eq!(DeferredSemaphore::new(1).waiting(), 0);
    /// ```
    pub fn waiting(&self) -> usize {
        self.core.waiting()
    }

    /// Waits for one token and returns a permit that holds it.
    ///
    /// The future fails with [`AcquireError::Closed`](crate::AcquireError)
    /// if the semaphore is closed before the token is granted.
    ///
    /// # Cancel safety
    ///
    /// This method is cancel safe: dropping the future gives up its place in
    /// the queue and loses no token.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(1);
    /// let permit = sem.acquire().await.unwrap();
    /// assert_eq!(permit.num_tokens(), 1);
    /// # });
    /// ```
    pub fn acquire(&self) -> Acquire<'_> {
        Acquire::new(&self.core, 1)
    }

    /// Waits for `n` tokens at once and returns a permit that holds them.
    ///
    /// A request of 0 tokens completes at once. The future fails with
    /// [`AcquireError::ExceedsLimit`](crate::AcquireError) if `n` is above the
    /// limit, now or after a later shrink, and with `Closed` if the semaphore
    /// is closed first.
    ///
    /// # Cancel safety
    ///
    /// This method is cancel safe: tokens already set aside for a dropped
    /// request go to the next waiter.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(5);
    /// let permit = sem.acquire_many(3).await.unwrap();
    /// assert_eq!(sem.tokens(), 2);
    /// # drop(permit);
    /// # });
    /// ```
    pub fn acquire_many(&self, n: usize) -> Acquire<'_> {
        Acquire::new(&self.core, n)
    }

    /// Waits for one token and returns a permit that owns a handle to the
    /// semaphore, so it can move into a spawned task.
    ///
    /// # Cancel safety
    ///
    /// This method is cancel safe, as [`acquire`](Self::acquire) is.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(1);
    /// let permit = sem.acquire_owned().await.unwrap();
    /// drop(sem);
    /// drop(permit);
    /// # });
    /// ```
    pub fn acquire_owned(&self) -> AcquireOwned {
        AcquireOwned::new(Arc::clone(&self.core), 1)
    }

    /// Waits for `n` tokens at once and returns an owned permit.
    ///
    /// # Cancel safety
    ///
    /// This method is cancel safe, as [`acquire_many`](Self::acquire_many) is.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(4);
    /// let permit = sem.acquire_many_owned(4).await.unwrap();
    /// assert_eq!(permit.num_tokens(), 4);
    /// # });
    /// ```
    pub fn acquire_many_owned(&self, n: usize) -> AcquireOwned {
        AcquireOwned::new(Arc::clone(&self.core), n)
    }

    /// Takes one token if it is free now and nobody is queued.
    ///
    /// # Errors
    ///
    /// Returns [`TryAcquireError::NoTokens`] if no token is free or others
    /// are waiting, and [`TryAcquireError::Closed`] after a close.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::{DeferredSemaphore, TryAcquireError};
    ///
    /// let sem = DeferredSemaphore::new(1);
    /// let held = sem.try_acquire().unwrap();
    /// assert_eq!(sem.try_acquire().unwrap_err(), TryAcquireError::NoTokens);
    /// # drop(held);
    /// ```
    pub fn try_acquire(&self) -> Result<Permit<'_>, TryAcquireError> {
        self.try_acquire_many(1)
    }

    /// Takes `n` tokens if they are free now and nobody is queued.
    ///
    /// # Errors
    ///
    /// Returns [`TryAcquireError::NoTokens`] if too few tokens are free,
    /// [`TryAcquireError::ExceedsLimit`] if `n` is above the limit, and
    /// [`TryAcquireError::Closed`] after a close.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// let sem = DeferredSemaphore::new(2);
    /// assert!(sem.try_acquire_many(3).is_err());
    /// assert!(sem.try_acquire_many(2).is_ok());
    /// ```
    pub fn try_acquire_many(&self, n: usize) -> Result<Permit<'_>, TryAcquireError> {
        self.core.try_acquire(n)?;
        Ok(Permit::new(&self.core, n))
    }

    /// Takes one token if it is free now and returns an owned permit.
    ///
    /// # Errors
    ///
    /// The same as [`try_acquire`](Self::try_acquire).
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// let sem = DeferredSemaphore::new(1);
    /// assert!(sem.try_acquire_owned().is_ok());
    /// ```
    pub fn try_acquire_owned(&self) -> Result<OwnedPermit, TryAcquireError> {
        self.core.try_acquire(1)?;
        Ok(OwnedPermit::new(Arc::clone(&self.core), 1))
    }

    /// Calls `work` once a token is held, awaits its future, then gives the
    /// token back.
    ///
    /// The output is the work's output, unchanged, or
    /// [`AcquireError::Closed`](crate::AcquireError) if the semaphore closed
    /// before a token was granted (then `work` is never called). The token
    /// comes back when the work's future finishes, panics or is dropped, and
    /// before the caller sees the output.
    ///
    /// Unlike Twisted's `run`, nothing starts until the returned future is
    /// polled; with the `tokio` feature, [`spawn`][spawn] starts the
    /// work eagerly.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while it waits never calls `work`. Dropping it
    /// while the work runs drops the work and only then gives the token back,
    /// so the limit holds even for cancelled work.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(2);
    /// let squared = sem.run(|| async { 7 * 7 }).await.unwrap();
    /// assert_eq!(squared, 49);
    /// # });
    /// ```
    ///
    #[cfg_attr(feature = "tokio", doc = "[spawn]: Self::spawn")]
    #[cfg_attr(not(feature = "tokio"), doc = "[spawn]: crate#features")]
    pub fn run<F, Fut>(&self, work: F) -> Run<'_, F, Fut>
    where
        F: FnOnce() -> Fut,
        Fut: Future,
    {
        Run::new(self.acquire(), work)
    }

    /// Changes the limit at run time.
    ///
    /// Growing hands the new tokens to waiters at once. Shrinking takes free
    /// tokens away now and retires the rest as holders give them back; running
    /// work is never interrupted. Waiters asking for more tokens than the new
    /// limit fail with `ExceedsLimit`.
    ///
    /// # Errors
    ///
    /// Returns a [`LimitError`] if `limit` is 0 or larger than
    /// `usize::MAX >> 2`, and leaves the limit unchanged.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// let sem = DeferredSemaphore::new(1);
    /// let held = sem.try_acquire().unwrap();
    /// sem.set_limit(3).unwrap();
    /// assert_eq!(sem.tokens(), 2);
    /// # drop(held);
    /// ```
    pub fn set_limit(&self, limit: usize) -> Result<(), LimitError> {
        check_limit(limit)?;
        self.core.set_limit(limit);
        Ok(())
    }

    /// Closes the semaphore: every waiter and every later acquire fails.
    ///
    /// Permits already held stay valid and give their tokens back as usual.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::{AcquireError, DeferredSemaphore};
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(1);
    /// sem.close();
    /// assert_eq!(sem.acquire().await.unwrap_err(), AcquireError::Closed);
    /// # });
    /// ```
    pub fn close(&self) {
        self.core.close();
    }

    /// Returns whether [`close`](Self::close) was called.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// let sem = DeferredSemaphore::new(1);
    /// sem.close();
    /// assert!(sem.is_closed());
    /// ```
    pub fn is_closed(&self) -> bool {
        self.core.is_closed()
    }
}

impl DeferredSemaphore {
    /// Returns `permit` for another unit of work when a release would hand
    /// its tokens straight back to a new acquire: no waiter is queued, no
    /// shrink of the limit is pending, the semaphore is open, and the permit
    /// is this semaphore's. Otherwise drops it, which gives its tokens back.
    pub(crate) fn reuse_permit(&self, permit: OwnedPermit) -> Option<OwnedPermit> {
        if permit.is_from(&self.core) && self.core.is_uncontended() {
            Some(permit)
        } else {
            drop(permit);
            None
        }
    }
}

fn check_limit(limit: usize) -> Result<(), LimitError> {
    if limit == 0 || limit > MAX_TOKENS {
        return Err(LimitError::new(limit));
    }
    Ok(())
}
