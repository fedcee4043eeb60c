//! The future returned by `DeferredSemaphore::run`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use crate::acquire::Acquire;
use crate::error::AcquireError;
use crate::permit::Permit;

pin_project! {
    /// A future that waits for a token, then runs the work and gives the
    /// token back, returned by [`DeferredSemaphore::run`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while it waits leaves the queue and never calls
    /// the closure. Dropping it while the work runs drops the work's future
    /// first and gives the token back after it, so the token only returns once
    /// the work has stopped.
    ///
    /// [`DeferredSemaphore::run`]: crate::DeferredSemaphore::run
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct Run<'a, F, Fut> {
        #[pin]
        state: State<'a, F, Fut>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<'a, F, Fut> {
        Waiting { acquire: Acquire<'a>, work: Option<F> },
        Running { #[pin] future: Fut, permit: Permit<'a> },
        Done,
    }
}

impl<F, Fut> fmt::Debug for Run<'_, F, Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Waiting { .. } => "waiting",
            State::Running { .. } => "running",
            State::Done => "done",
        };
        f.debug_struct("Run").field("state", &state).finish()
    }
}

impl<'a, F, Fut> Run<'a, F, Fut> {
    pub(crate) fn new(acquire: Acquire<'a>, work: F) -> Self {
        Run {
            state: State::Waiting {
                acquire,
                work: Some(work),
            },
        }
    }
}

impl<'a, F, Fut> Future for Run<'a, F, Fut>
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    type Output = Result<Fut::Output, AcquireError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Waiting { acquire, work } => {
                    let permit = ready!(Pin::new(acquire).poll(cx))?;
                    let work = work.take().expect("work is present until it starts");
                    let future = work();
                    state.set(State::Running { future, permit });
                }
                StateProj::Running { future, .. } => {
                    let output = ready!(future.poll(cx));
                    // Dropping the state gives the token back before the
                    // caller sees the output, as Twisted's `run` does.
                    state.set(State::Done);
                    return Poll::Ready(Ok(output));
                }
                StateProj::Done => panic!("`Run` polled after it completed"),
            }
        }
    }
}
