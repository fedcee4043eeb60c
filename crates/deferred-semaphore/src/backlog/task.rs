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
    pub(crate) fn new(work: Fut, permit: P, index: u64) -> Self {
        Task {
            work,
            permit: Some(permit),
            index,
        }
    }

    pub(crate) fn index(&self) -> u64 {
        self.index
    }
}

impl<Fut: TryFuture, P> Future for Task<Fut, P> {
    type Output = (u64, Result<Fut::Ok, Fut::Error>, P);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.work.try_poll(cx));
        let permit = this.permit.take().expect("task polled after it finished");
        Poll::Ready((*this.index, result, permit))
    }
}
