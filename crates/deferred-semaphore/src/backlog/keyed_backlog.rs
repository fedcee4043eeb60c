//! The builder of keyed backlog processing.

use std::future::{ready, Future, Ready};
use std::num::NonZeroUsize;

use futures_core::{Stream, TryFuture};
use futures_util::stream::{self, Iter};

use super::keyed::{KeyOf, KeyedForEach, Settings};
use super::policy::{FailurePolicy, Outcome, Report, Threshold};
use super::work::{StartWork, WithPermit};
use crate::limiter::KeyedLimiter;

/// Runs a function over every item of a source, where each item has a key,
/// under a [`KeyedLimiter`] such as a
/// [`KeyedSemaphore`](crate::KeyedSemaphore): at most N at once overall and
/// at most M at once per key.
///
/// Items are pulled ahead into a window of at most
/// [`lookahead`](Self::lookahead) items (four times the global limit unless
/// set), grouped by key. Each key with items in the window has one pending
/// acquire, so an item whose key is at its limit never holds up items of
/// other keys, as long as those fit in the window. When several keys could
/// start an item, the key that started one least recently goes first
/// (round-robin), because each key asks again at the back of the queue
/// after it is served.
///
/// Memory follows the window and the [`buffer`](Self::buffer) (twice the
/// global limit unless set): at most `lookahead` items wait in the window,
/// and at most `buffer` started items are running or waiting for the
/// consumer. Each outcome keeps the item's position in the source, whatever
/// order the items start in.
///
/// # Examples
///
/// ## Fetch pages, at most two per host
///
/// ```
/// use deferred_semaphore::{KeyedBacklog, KeyedSemaphore};
///
/// # async fn fetch(url: &str) -> Result<usize, String> { Ok(url.len()) }
/// # futures::executor::block_on(async {
/// let urls = ["a.example/1", "a.example/2", "a.example/3", "b.example/1"];
/// let host = |url: &&str| url.split('/').next().unwrap_or_default().to_string();
/// let sem = KeyedSemaphore::new(8, 2);
/// let (outcomes, report) = KeyedBacklog::new(&sem, urls, host, |url| fetch(url))
///     .in_input_order()
///     .collect()
///     .await;
/// assert_eq!(report.succeeded, 4);
/// assert_eq!(outcomes[3].index, 3);
/// # });
/// ```
#[must_use = "a backlog does nothing until `for_each` or `collect` is awaited"]
#[derive(Debug)]
pub struct KeyedBacklog<L, S, KF, F> {
    limiter: L,
    source: S,
    key_of: KF,
    work: F,
    policy: FailurePolicy,
    input_order: bool,
    buffer: Option<usize>,
    lookahead: Option<usize>,
}

impl<L, I, KF, F> KeyedBacklog<L, Iter<I>, KF, F>
where
    I: Iterator,
{
    /// Creates a keyed backlog over the items of an iterator.
    ///
    /// `key_of` returns each item's key. `work` is called with an item once
    /// its key has a permit and returns a future of a `Result`; an `Err`
    /// counts as a failed item.
    pub fn new<T, K, Fut>(limiter: L, items: T, key_of: KF, work: F) -> Self
    where
        T: IntoIterator<IntoIter = I>,
        KF: FnMut(&I::Item) -> K,
        F: FnMut(I::Item) -> Fut,
        Fut: TryFuture,
    {
        KeyedBacklog::assemble(limiter, stream::iter(items), key_of, work)
    }
}

impl<L, S, KF, F> KeyedBacklog<L, S, KF, WithPermit<F>> {
    /// Creates a keyed backlog over the items of a stream whose work
    /// receives the permit acquired for its item, as
    /// [`Backlog::from_stream_with_permits`](crate::Backlog::from_stream_with_permits)
    /// does.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::{KeyedBacklog, KeyedPermit, KeyedSemaphore};
    /// use futures::stream;
    ///
    /// # futures::executor::block_on(async {
    /// let sem = KeyedSemaphore::new(2, 1);
    /// let items = stream::iter([(1u8, 'a'), (2, 'b'), (3, 'a')]);
    /// let key = |item: &(u8, char)| item.1;
    /// let work = |item: (u8, char), permit: KeyedPermit<char>| async move {
    ///     assert_eq!(permit.key(), &item.1);
    ///     Ok::<_, ()>(item.0)
    /// };
    /// let (outcomes, _) = KeyedBacklog::from_stream_with_permits(&sem, items, key, work)
    ///     .collect()
    ///     .await;
    /// assert_eq!(outcomes.len(), 3);
    /// # });
    /// ```
    pub fn from_stream_with_permits<Fut>(limiter: L, items: S, key_of: KF, work: F) -> Self
    where
        S: Stream,
        KF: KeyOf<S::Item>,
        L: KeyedLimiter<KF::Key>,
        F: FnMut(S::Item, L::Permit) -> Fut,
        Fut: TryFuture,
    {
        KeyedBacklog::assemble(limiter, items, key_of, WithPermit(work))
    }
}

impl<L, S, KF, F> KeyedBacklog<L, S, KF, F> {
    /// Creates a keyed backlog over the items of a stream.
    pub fn from_stream<Fut>(limiter: L, items: S, key_of: KF, work: F) -> Self
    where
        S: Stream,
        KF: KeyOf<S::Item>,
        F: FnMut(S::Item) -> Fut,
        Fut: TryFuture,
    {
        KeyedBacklog::assemble(limiter, items, key_of, work)
    }

    fn assemble(limiter: L, source: S, key_of: KF, work: F) -> Self {
        KeyedBacklog {
            limiter,
            source,
            key_of,
            work,
            policy: FailurePolicy::KeepGoing,
            input_order: false,
            buffer: None,
            lookahead: None,
        }
    }

    /// Sets the most items pulled from the source and not started yet; four
    /// times the limiter's global limit by default.
    ///
    /// A larger window lets more keys run while others are at their limit,
    /// at the cost of pulling items sooner.
    pub fn lookahead(mut self, items: NonZeroUsize) -> Self {
        self.lookahead = Some(items.get());
        self
    }

    /// Hands out outcomes in the order of the items rather than as they
    /// finish. Items pulled into the window count in the reorder span too,
    /// so at most `buffer + lookahead` outcomes are held.
    pub fn in_input_order(mut self) -> Self {
        self.input_order = true;
        self
    }

    /// Sets when failures stop the backlog early. Items still in the window
    /// then never start and are listed in [`Report::not_started`].
    ///
    /// # Panics
    ///
    /// Panics if the policy has a [`Threshold::Percent`] whose `percent` is
    /// not above 0 and at most 100 (NaN included).
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

    /// Sets the most started items that may be running or waiting for the
    /// consumer at once; twice the limiter's global limit by default.
    pub fn buffer(mut self, size: NonZeroUsize) -> Self {
        self.buffer = Some(size.get());
        self
    }

    /// Processes the backlog, awaiting `consumer` on each outcome in turn.
    ///
    /// # Cancel safety
    ///
    /// See [`KeyedForEach`].
    pub fn for_each<C, Fut, CFut>(self, consumer: C) -> KeyedForEach<L, S, KF, F, C, Fut, CFut>
    where
        S: Stream,
        KF: KeyOf<S::Item>,
        L: KeyedLimiter<KF::Key>,
        F: StartWork<S::Item, L::Permit, Future = Fut>,
        Fut: TryFuture,
        C: FnMut(Outcome<Fut::Ok, Fut::Error>) -> CFut,
        CFut: Future<Output = ()>,
    {
        let settings = Settings {
            policy: self.policy,
            input_order: self.input_order,
            buffer: self.buffer,
            lookahead: self.lookahead,
        };
        let parts = (self.limiter, self.source, self.key_of, self.work, consumer);
        KeyedForEach::new(parts, settings)
    }

    /// Processes the backlog and collects every outcome.
    pub async fn collect<Fut>(self) -> (Vec<Outcome<Fut::Ok, Fut::Error>>, Report)
    where
        S: Stream,
        KF: KeyOf<S::Item>,
        L: KeyedLimiter<KF::Key>,
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
