//! Permits: tokens held, given back on drop.

use std::fmt;

use crate::core::Core;
use crate::sync::Arc;

/// Tokens held from a [`DeferredSemaphore`](crate::DeferredSemaphore), given
/// back when the permit is dropped.
///
/// This is tokio's `SemaphorePermit`. A permit cannot be released twice, so
/// the over-release that Twisted only guards with an `assert` cannot happen.
/// It borrows the semaphore; see [`OwnedPermit`] for one that can move into
/// a spawned task.
#[must_use = "the tokens are given back as soon as the permit is dropped"]
#[clippy::has_significant_drop]
pub struct Permit<'a> {
    core: &'a Core,
    tokens: usize,
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl<'a> Permit<'a> {
    pub(crate) fn new(core: &'a Core, tokens: usize) -> Self {
        Permit { core, tokens }
    }

    /// Returns the number of tokens this permit holds.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// let sem = DeferredSemaphore::new(3);
    /// let permit = sem.try_acquire_many(2).unwrap();
    /// assert_eq!(permit.num_tokens(), 2);
    /// ```
    pub fn num_tokens(&self) -> usize {
        self.tokens
    }
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        self.core.release(self.tokens);
    }
}

/// Tokens held from a [`DeferredSemaphore`](crate::DeferredSemaphore), owning
/// a handle to it so that it can outlive the borrow.
///
/// This is tokio's `OwnedSemaphorePermit`. It gives its tokens back when it
/// is dropped.
#[must_use = "the tokens are given back as soon as the permit is dropped"]
#[clippy::has_significant_drop]
pub struct OwnedPermit {
    core: Arc<Core>,
    tokens: usize,
}

impl fmt::Debug for OwnedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedPermit")
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl OwnedPermit {
    pub(crate) fn new(core: Arc<Core>, tokens: usize) -> Self {
        OwnedPermit { core, tokens }
    }

    /// Returns the number of tokens this permit holds.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// let sem = DeferredSemaphore::new(3);
    /// let permit = sem.try_acquire_owned().unwrap();
    /// assert_eq!(permit.num_tokens(), 1);
    /// ```
    pub fn num_tokens(&self) -> usize {
        self.tokens
    }
}

impl OwnedPermit {
    /// Returns whether the tokens of this permit belong to `core`.
    pub(crate) fn is_from(&self, core: &Arc<Core>) -> bool {
        Arc::ptr_eq(&self.core, core)
    }
}

impl Drop for OwnedPermit {
    #[inline]
    fn drop(&mut self) {
        self.core.release(self.tokens);
    }
}
