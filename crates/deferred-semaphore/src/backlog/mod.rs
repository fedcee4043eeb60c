//! Lazy processing of a long or endless backlog under a limiter.

mod buffer;
mod for_each;
mod keyed;
mod keyed_backlog;
mod policy;
mod task;
mod task_set;
mod work;

use std::future::{ready, Future, Ready};
use std::num::NonZeroUsize;

use futures_core::{Stream, TryFuture};
use futures_util::stream::{self, Iter};

pub use for_each::ForEach;
pub use keyed::{KeyOf, KeyedForEach};
pub use keyed_backlog::KeyedBacklog;
pub use policy::{FailurePolicy, Outcome, Report, StopReason, Threshold};
pub use work::{StartWork, WithPermit};

use crate::limiter::Limiter;

/// Runs a function over every item of a source, at most as many at once as a
/// [`Limiter`] allows, and hands each outcome to a consumer.
///
/// Items are pulled lazily, one when a permit is free, so memory follows the
/// limit and not the length of the backlog, and an endless source is fine.
/// The work and the consumer run inside one future, without a task per item:
/// work in flight keeps running while the consumer is busy with an outcome,
/// so a slow consumer never stalls it (the stall that futures'
/// `buffer_unordered` is prone to).
///
/// Outcomes come out in completion order, or in input order after
/// [`in_input_order`](Self::in_input_order). Either way, at most
/// [`buffer`](Self::buffer) items (twice the limit unless set) are running
/// or waiting for the consumer; a full buffer pauses the start of new work,
/// never the work in flight.
///
/// # Examples
///
/// ## Send a day's emails, two at a time
///
/// ```
/// use deferred_semaphore::{Backlog, DeferredSemaphore};
///
/// # async fn send(to: String) -> Result<(), String> { Ok(()) }
/// # futures::executor::block_on(async {
/// let recipients = ["ada@example.com", "alan@example.com", "grace@example.com"];
/// let sem = DeferredSemaphore::new(2);
/// let (outcomes, report) = Backlog::new(&sem, recipients, |to: &str| send(to.to_string()))
///     .collect()
///     .await;
/// assert_eq!(outcomes.len(), 3);
/// assert_eq!(report.succeeded, 3);
/// # });
/// ```
///
/// ## Keep input order, as Twisted's `DeferredList` does
///
/// ```
/// use deferred_semaphore::{Backlog, DeferredSemaphore};
///
/// # futures::executor::block_on(async {
/// let sem = DeferredSemaphore::new(4);
/// let (outcomes, _) = Backlog::new(&sem, 1..=6u64, |n| async move { Ok::<_, ()>(n * n) })
///     .in_input_order()
///     .collect()
///     .await;
/// let squares: Vec<_> = outcomes.into_iter().map(|o| o.result.unwrap()).collect();
/// assert_eq!(squares, [1, 4, 9, 16, 25, 36]);
/// # });
/// ```
///
/// ## Stop after three failures
///
/// ```
/// use std::num::NonZeroU64;
/// use deferred_semaphore::{Backlog, DeferredSemaphore, FailurePolicy, Threshold};
///
/// # futures::executor::block_on(async {
/// let sem = DeferredSemaphore::new(1);
/// let three = Threshold::Failures(NonZeroU64::new(3).unwrap());
/// let report = Backlog::new(&sem, 0.., |n: u64| async move { Err::<(), _>(n) })
///     .on_failure(FailurePolicy::StopSoon(three))
///     .for_each(|_| async {})
///     .await;
/// assert_eq!(report.failed, 3);
/// assert!(report.stopped.is_some());
/// # });
/// ```
///
/// ## Stream outcomes to a slow writer
///
/// ```
/// use deferred_semaphore::{Backlog, DeferredSemaphore};
///
/// # futures::executor::block_on(async {
/// let sem = DeferredSemaphore::new(8);
/// let mut written = Vec::new();
/// let report = Backlog::new(&sem, 0..100u32, |n| async move { Ok::<_, ()>(n) })
///     .for_each(|outcome| {
///         written.push(outcome.index);
///         async {}
///     })
///     .await;
/// assert_eq!(report.succeeded, 100);
/// assert_eq!(written.len(), 100);
/// # });
/// ```
#[must_use = "a backlog does nothing until `for_each` or `collect` is awaited"]
#[derive(Debug)]
pub struct Backlog<L, S, F> {
    limiter: L,
    source: S,
    work: F,
    policy: FailurePolicy,
    input_order: bool,
    buffer: Option<usize>,
}

impl<L, I, F> Backlog<L, Iter<I>, F>
where
    I: Iterator,
{
    /// Creates a backlog over the items of an iterator.
    ///
    /// `work` is called with each item once a permit is free and returns a
    /// future of a `Result`; an `Err` counts as a failed item.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::{Backlog, DeferredSemaphore};
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(2);
    /// let words = ["a", "bc"].map(String::from);
    /// let (outcomes, _) = Backlog::new(&sem, words, |s| async move { Ok::<_, ()>(s.len()) })
    ///     .collect()
    ///     .await;
    /// assert_eq!(outcomes.len(), 2);
    /// # });
    /// ```
    pub fn new<T, Fut>(limiter: L, items: T, work: F) -> Self
    where
        T: IntoIterator<IntoIter = I>,
        F: FnMut(I::Item) -> Fut,
        Fut: TryFuture,
    {
        Backlog::assemble(limiter, stream::iter(items), work)
    }
}

impl<L, S, F> Backlog<L, S, WithPermit<F>> {
    /// Creates a backlog over the items of a stream whose work receives the
    /// permit acquired for its item.
    ///
    /// The work may drop the permit before it ends and acquire another one,
    /// so that an item waiting to retry does not keep others from running.
    /// The backlog still pulls an item only once it holds a permit for it,
    /// and at most [`buffer`](Self::buffer) items are in flight, whether
    /// they hold a permit or not.
    ///
    /// The permit lives inside the work's future, so cancelling the work
    /// drops it along with the rest of the future's state, in the order the
    /// future declares them, not strictly after the work has stopped.
    ///
    /// # Examples
    ///
    /// Give the permit back while waiting, and queue for a new one:
    ///
    /// ```
    /// use deferred_semaphore::{Backlog, DeferredSemaphore, OwnedPermit};
    /// use futures::stream;
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(1);
    /// let items = stream::iter([1u32, 2, 3]);
    /// let work = |n: u32, permit: OwnedPermit| {
    ///     let sem = &sem;
    ///     async move {
    ///         drop(permit);
    ///         // ...wait without holding the permit...
    ///         let _again = sem.acquire_owned().await.map_err(|_| n)?;
    ///         Ok::<_, u32>(n * 10)
    ///     }
    /// };
    /// let (outcomes, report) = Backlog::from_stream_with_permits(&sem, items, work)
    ///     .collect()
    ///     .await;
    /// assert_eq!(outcomes.len(), 3);
    /// assert_eq!(report.succeeded, 3);
    /// # });
    /// ```
    pub fn from_stream_with_permits<Fut>(limiter: L, items: S, work: F) -> Self
    where
        L: Limiter,
        S: Stream,
        F: FnMut(S::Item, L::Permit) -> Fut,
        Fut: TryFuture,
    {
        Backlog::assemble(limiter, items, WithPermit(work))
    }
}

impl<L, S, F> Backlog<L, S, F> {
    /// Creates a backlog over the items of a stream, such as lines read
    /// asynchronously from standard input.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::{Backlog, DeferredSemaphore};
    /// use futures::stream;
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(2);
    /// let lines = stream::iter(["one", "two", "three"]);
    /// let (outcomes, _) = Backlog::from_stream(&sem, lines, |line| async move { Ok::<_, ()>(line) })
    ///     .collect()
    ///     .await;
    /// assert_eq!(outcomes.len(), 3);
    /// # });
    /// ```
    pub fn from_stream<Fut>(limiter: L, items: S, work: F) -> Self
    where
        S: Stream,
        F: FnMut(S::Item) -> Fut,
        Fut: TryFuture,
    {
        Backlog::assemble(limiter, items, work)
    }

    fn assemble(limiter: L, source: S, work: F) -> Self {
        Backlog {
            limiter,
            source,
            work,
            policy: FailurePolicy::KeepGoing,
            input_order: false,
            buffer: None,
        }
    }

    /// Hands out outcomes in the order of the items rather than as they
    /// finish.
    ///
    /// A slow item holds back the outcomes after it; new work only starts
    /// while the span from the oldest outcome not handed out to the newest
    /// item started fits in the [`buffer`](Self::buffer).
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::{Backlog, DeferredSemaphore};
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(3);
    /// let (outcomes, _) = Backlog::new(&sem, 0..5u64, |n| async move { Ok::<_, ()>(n) })
    ///     .in_input_order()
    ///     .collect()
    ///     .await;
    /// let order: Vec<u64> = outcomes.iter().map(|o| o.index).collect();
    /// assert_eq!(order, [0, 1, 2, 3, 4]);
    /// # });
    /// ```
    pub fn in_input_order(mut self) -> Self {
        self.input_order = true;
        self
    }

    /// Sets when failures stop the backlog early.
    ///
    /// # Panics
    ///
    /// Panics if the policy has a [`Threshold::Percent`] whose `percent` is
    /// not above 0 and at most 100 (NaN included).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::num::NonZeroU64;
    /// use deferred_semaphore::{Backlog, DeferredSemaphore, FailurePolicy, Threshold};
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(1);
    /// let first = Threshold::Failures(NonZeroU64::MIN);
    /// let report = Backlog::new(&sem, 0..10u32, |_| async { Err::<(), _>("down") })
    ///     .on_failure(FailurePolicy::StopNow(first))
    ///     .for_each(|_| async {})
    ///     .await;
    /// assert_eq!(report.started, 1);
    /// # });
    /// ```
    pub fn on_failure(mut self, policy: FailurePolicy) -> Self {
        let threshold = match &policy {
            FailurePolicy::KeepGoing => None,
            FailurePolicy::StopSoon(threshold) | FailurePolicy::StopNow(threshold) => {
                Some(threshold)
            }
        };
        if let Some(Threshold::Percent { percent, .. }) = threshold {
            assert!(
                *percent > 0.0 && *percent <= 100.0,
                "Threshold::Percent needs a percent above 0 and at most 100, got {percent}"
            );
        }
        self.policy = policy;
        self
    }

    /// Sets the most items that may be running or waiting for the consumer
    /// at once; twice the limiter's limit by default.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::num::NonZeroUsize;
    /// use deferred_semaphore::{Backlog, DeferredSemaphore};
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(4);
    /// let report = Backlog::new(&sem, 0..10u32, |n| async move { Ok::<_, ()>(n) })
    ///     .buffer(NonZeroUsize::new(4).unwrap())
    ///     .for_each(|_| async {})
    ///     .await;
    /// assert!(report.max_running <= 4);
    /// # });
    /// ```
    pub fn buffer(mut self, size: NonZeroUsize) -> Self {
        self.buffer = Some(size.get());
        self
    }

    /// Processes the backlog, awaiting `consumer` on each outcome in turn.
    ///
    /// The consumer sees one outcome at a time; work keeps running while it
    /// is busy.
    ///
    /// # Cancel safety
    ///
    /// See [`ForEach`]: dropping the future cancels the work in flight.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::{Backlog, DeferredSemaphore};
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(2);
    /// let mut failed = 0;
    /// Backlog::new(&sem, [1, 0, 2], |n: i32| async move { 10i32.checked_div(n).ok_or("zero") })
    ///     .for_each(|outcome| {
    ///         failed += outcome.result.is_err() as u32;
    ///         async {}
    ///     })
    ///     .await;
    /// assert_eq!(failed, 1);
    /// # });
    /// ```
    pub fn for_each<C, Fut, CFut>(self, consumer: C) -> ForEach<L, S, F, C, Fut, CFut>
    where
        L: Limiter,
        S: Stream,
        F: StartWork<S::Item, L::Permit, Future = Fut>,
        Fut: TryFuture,
        C: FnMut(Outcome<Fut::Ok, Fut::Error>) -> CFut,
        CFut: Future<Output = ()>,
    {
        let parts = (self.limiter, self.source, self.work, consumer);
        ForEach::new(parts, self.policy, self.input_order, self.buffer)
    }

    /// Processes the backlog and collects every outcome.
    ///
    /// This holds every outcome in memory; use [`for_each`](Self::for_each)
    /// for a backlog too long for that.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future cancels the work in flight and loses the outcomes
    /// collected so far.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::{Backlog, DeferredSemaphore};
    ///
    /// # futures::executor::block_on(async {
    /// let sem = DeferredSemaphore::new(2);
    /// let (outcomes, report) = Backlog::new(&sem, 0..3u8, |n| async move { Ok::<_, ()>(n) })
    ///     .collect()
    ///     .await;
    /// assert_eq!((outcomes.len(), report.succeeded), (3, 3));
    /// # });
    /// ```
    pub async fn collect<Fut>(self) -> (Vec<Outcome<Fut::Ok, Fut::Error>>, Report)
    where
        L: Limiter,
        S: Stream,
        F: StartWork<S::Item, L::Permit, Future = Fut>,
        Fut: TryFuture,
    {
        let mut outcomes = Vec::new();
        let report = self
            .for_each(|outcome| -> Ready<()> {
                outcomes.push(outcome);
                ready(())
            })
            .await;
        (outcomes, report)
    }
}
