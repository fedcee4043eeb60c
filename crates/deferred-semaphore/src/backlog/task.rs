//! One item's work, with the permit it runs under.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_core::TryFuture;
use pin_project_lite::pin_project;

pin_project! {
    /// Polls one item's work and hands its permit back with the result the
    /// moment the work ends.
    ///
    /// The permit is declared after the work, so when a running task is
    /// cancelled the work is dropped first and the permit only after it.
    pub(crate) struct Task<Fut, P> {
        #[pin]
        work: Fut,
        permit: Option<P>,
        index: u64,
    }
}

impl<Fut, P> Task<Fut, P> {
    /// Creates the task of item `index`. A `permit` of `None` means that
    /// the work holds its own permit.
    pub(crate) fn new(work: Fut, permit: Option<P>, index: u64) -> Self {
        Task {
            work,
            permit,
            index,
        }
    }

    pub(crate) fn index(&self) -> u64 {
        self.index
    }
}

impl<Fut: TryFuture, P> Future for Task<Fut, P> {
    /// The item's index, its result, and its permit unless the work held
    /// the permit itself.
    type Output = (u64, Result<Fut::Ok, Fut::Error>, Option<P>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.work.try_poll(cx));
        Poll::Ready((*this.index, result, this.permit.take()))
    }
}
