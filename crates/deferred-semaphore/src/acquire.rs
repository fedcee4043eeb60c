//! The futures returned by `acquire`, `acquire_many` and `acquire_owned`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::core::{Acquiring, Core};
use crate::error::AcquireError;
use crate::permit::{OwnedPermit, Permit};
use crate::sync::Arc;

/// A future of a [`Permit`], returned by [`acquire`] and [`acquire_many`].
///
/// The future joins the queue when it is first polled; the order of first
/// polls is the order in which waiters are served.
///
/// # Cancel safety
///
/// Dropping the future before it completes leaves the queue at once. Tokens
/// already set aside for it go to the next waiter, so none are lost, and the
/// waiters behind it keep their order.
///
/// [`acquire`]: crate::DeferredSemaphore::acquire
/// [`acquire_many`]: crate::DeferredSemaphore::acquire_many
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct Acquire<'a> {
    core: &'a Core,
    tokens: usize,
    acquiring: Acquiring,
}

impl fmt::Debug for Acquire<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire")
            .field("tokens", &self.tokens)
            .field("state", &self.acquiring)
            .finish()
    }
}

impl<'a> Acquire<'a> {
    pub(crate) fn new(core: &'a Core, tokens: usize) -> Self {
        Acquire {
            core,
            tokens,
            acquiring: Acquiring::Idle,
        }
    }
}

impl<'a> Future for Acquire<'a> {
    type Output = Result<Permit<'a>, AcquireError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let core = this.core;
        let tokens = this.tokens;
        core.poll_acquire(tokens, &mut this.acquiring, cx)
            .map_ok(|()| Permit::new(core, tokens))
    }
}

impl Drop for Acquire<'_> {
    #[inline]
    fn drop(&mut self) {
        self.core.cancel(&mut self.acquiring);
    }
}

/// A future of an [`OwnedPermit`], returned by [`acquire_owned`] and
/// [`acquire_many_owned`].
///
/// # Cancel safety
///
/// Dropping the future before it completes leaves the queue at once. Tokens
/// already set aside for it go to the next waiter, so none are lost, and the
/// waiters behind it keep their order.
///
/// [`acquire_owned`]: crate::DeferredSemaphore::acquire_owned
/// [`acquire_many_owned`]: crate::DeferredSemaphore::acquire_many_owned
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct AcquireOwned {
    core: Arc<Core>,
    tokens: usize,
    acquiring: Acquiring,
}

impl fmt::Debug for AcquireOwned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcquireOwned")
            .field("tokens", &self.tokens)
            .field("state", &self.acquiring)
            .finish()
    }
}

impl AcquireOwned {
    pub(crate) fn new(core: Arc<Core>, tokens: usize) -> Self {
        AcquireOwned {
            core,
            tokens,
            acquiring: Acquiring::Idle,
        }
    }
}

impl Future for AcquireOwned {
    type Output = Result<OwnedPermit, AcquireError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let tokens = this.tokens;
        let ready = this.core.poll_acquire(tokens, &mut this.acquiring, cx);
        ready.map_ok(|()| OwnedPermit::new(Arc::clone(&this.core), tokens))
    }
}

impl Drop for AcquireOwned {
    #[inline]
    fn drop(&mut self) {
        self.core.cancel(&mut self.acquiring);
    }
}
