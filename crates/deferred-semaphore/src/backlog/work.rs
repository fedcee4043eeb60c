//! The start of one item's work once the backlog holds a permit for it.

use futures_core::TryFuture;

/// Starts one item's work with the permit the backlog acquired for it.
///
/// A closure `FnMut(Item) -> Future` is `StartWork`: the backlog keeps the
/// permit and drops it the moment the work ends. [`WithPermit`] hands the
/// permit to the work instead, so that the work can give it back early, for
/// example while it waits to retry, and acquire it again.
pub trait StartWork<I, P> {
    /// The future of the item's work. An `Err` counts as a failed item.
    type Future: TryFuture;

    /// Starts the work on `item`.
    ///
    /// Returns the work and the permit for the backlog to hold until the
    /// work ends, or `None` when the work took the permit.
    fn start(&mut self, item: I, permit: P) -> (Self::Future, Option<P>);
}

impl<I, P, F, Fut> StartWork<I, P> for F
where
    F: FnMut(I) -> Fut,
    Fut: TryFuture,
{
    type Future = Fut;

    fn start(&mut self, item: I, permit: P) -> (Fut, Option<P>) {
        (self(item), Some(permit))
    }
}

/// Work that receives each item's permit and decides when to drop it,
/// built by [`Backlog::from_stream_with_permits`](crate::Backlog::from_stream_with_permits).
#[derive(Debug, Clone)]
pub struct WithPermit<F>(pub(crate) F);

impl<I, P, F, Fut> StartWork<I, P> for WithPermit<F>
where
    F: FnMut(I, P) -> Fut,
    Fut: TryFuture,
{
    type Future = Fut;

    fn start(&mut self, item: I, permit: P) -> (Fut, Option<P>) {
        ((self.0)(item, permit), None)
    }
}
