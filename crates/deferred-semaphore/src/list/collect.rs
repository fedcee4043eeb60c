//! The state shared by every future in `list`: the futures still running and
//! the outcomes collected so far, each kept at its input index.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_core::TryFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use pin_project_lite::pin_project;

/// The outcome of one future in a list.
pub(crate) type Outcome<Fut> = Result<<Fut as TryFuture>::Ok, <Fut as TryFuture>::Error>;

pin_project! {
    /// A future tagged with its position in the input.
    struct Indexed<Fut> {
        index: usize,
        #[pin]
        future: Fut,
    }
}

impl<Fut: TryFuture> Future for Indexed<Fut> {
    type Output = (usize, Outcome<Fut>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.future
            .try_poll(cx)
            .map(|outcome| (*this.index, outcome))
    }
}

/// Futures still running and the outcomes stored so far, by input index.
///
/// `FuturesUnordered` polls only the futures whose waker was called, so one
/// wake-up costs the same in a list of ten futures as in a list of a million.
pub(crate) struct Collect<Fut: TryFuture> {
    running: FuturesUnordered<Indexed<Fut>>,
    slots: Vec<Option<Outcome<Fut>>>,
    stored: usize,
}

// Outcomes are moved in and out, never pinned, and `FuturesUnordered` pins
// each future in its own allocation, so nothing here needs a fixed address.
impl<Fut: TryFuture> Unpin for Collect<Fut> {}

impl<Fut: TryFuture> Collect<Fut> {
    /// Takes every future out of `futures` now, without polling any of them.
    pub(crate) fn new(futures: impl IntoIterator<Item = Fut>) -> Self {
        let running: FuturesUnordered<_> = futures
            .into_iter()
            .enumerate()
            .map(|(index, future)| Indexed { index, future })
            .collect();
        let slots = std::iter::repeat_with(|| None)
            .take(running.len())
            .collect();
        Self {
            running,
            slots,
            stored: 0,
        }
    }

    /// Returns the number of futures that have not finished yet.
    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }

    /// Returns the number of outcomes stored so far.
    pub(crate) fn stored(&self) -> usize {
        self.stored
    }

    /// Polls the running futures and stores each outcome until `decide`
    /// returns `Break` for one, which is then returned with its index.
    ///
    /// Returns `Ready(None)` once every future has finished without a break.
    pub(crate) fn poll_until<B>(
        &mut self,
        cx: &mut Context<'_>,
        mut decide: impl FnMut(Outcome<Fut>) -> ControlFlow<B, Outcome<Fut>>,
    ) -> Poll<Option<(usize, B)>> {
        while let Some((index, outcome)) = ready!(self.running.poll_next_unpin(cx)) {
            match decide(outcome) {
                ControlFlow::Break(decided) => return Poll::Ready(Some((index, decided))),
                ControlFlow::Continue(outcome) => self.store(index, outcome),
            }
        }
        Poll::Ready(None)
    }

    /// Polls the running futures and stores each outcome until all finished.
    pub(crate) fn poll_all(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some((_, never)) =
            ready!(self.poll_until(cx, ControlFlow::<Infallible, _>::Continue))
        {
            match never {}
        }
        Poll::Ready(())
    }

    /// Removes and returns the stored outcome with the lowest index that
    /// `pick` accepts.
    ///
    /// This scans every slot, so callers use it once, not on every poll.
    pub(crate) fn take_stored(
        &mut self,
        mut pick: impl FnMut(&Outcome<Fut>) -> bool,
    ) -> Option<(usize, Outcome<Fut>)> {
        if self.stored == 0 {
            return None;
        }
        let index = self
            .slots
            .iter()
            .position(|slot| slot.as_ref().is_some_and(&mut pick))?;
        self.stored -= 1;
        self.slots[index].take().map(|outcome| (index, outcome))
    }

    /// Returns the stored outcomes with their indices, in input order.
    pub(crate) fn into_stored(self) -> Vec<(usize, Outcome<Fut>)> {
        let slots = self.slots.into_iter().enumerate();
        slots
            .filter_map(|(index, slot)| slot.map(|outcome| (index, outcome)))
            .collect()
    }

    fn store(&mut self, index: usize, outcome: Outcome<Fut>) {
        self.slots[index] = Some(outcome);
        self.stored += 1;
    }
}

/// Returns the state of a future that has not resolved yet.
///
/// # Panics
///
/// Panics, naming the future type, when it is polled after it resolved.
pub(crate) fn unresolved<'a, Fut: TryFuture>(
    state: &'a mut Option<Collect<Fut>>,
    type_name: &str,
) -> &'a mut Collect<Fut> {
    match state {
        Some(collect) => collect,
        None => panic!("`{type_name}` polled after it resolved"),
    }
}

/// Writes the `Debug` summary of a list future: counts, never the futures.
pub(crate) fn debug_state<Fut: TryFuture>(
    f: &mut fmt::Formatter<'_>,
    type_name: &str,
    state: &Option<Collect<Fut>>,
) -> fmt::Result {
    let mut debug = f.debug_struct(type_name);
    match state {
        Some(collect) => debug
            .field("running", &collect.running())
            .field("finished", &collect.stored()),
        None => debug.field("resolved", &true),
    };
    debug.finish()
}
