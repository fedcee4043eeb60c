//! Backlog processing with a key per item: a bounded window of pulled
//! items, one pending acquire per key, keys served round-robin.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::{Stream, TryFuture};
use futures_util::stream::{FuturesUnordered, StreamExt};
use pin_project_lite::pin_project;

use super::buffer::OutcomeBuffer;
use super::for_each::{cancel_running, Progress, ROUNDS_PER_POLL};
use super::policy::{FailurePolicy, Outcome, Report, StopReason};
use super::task::Task;
use super::task_set::TaskSet;
use super::work::StartWork;
use crate::limiter::KeyedLimiter;

pin_project! {
    /// An acquire future tagged with the key it is for.
    struct Tagged<K, A> {
        key: Option<K>,
        #[pin]
        acquire: A,
    }
}

impl<K, A: Future> Future for Tagged<K, A> {
    type Output = (K, A::Output);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.acquire.poll(cx));
        let key = this.key.take().expect("Tagged polled after completion");
        Poll::Ready((key, output))
    }
}

/// The pulled items of one key that have not started yet.
struct Lane<I> {
    items: VecDeque<(u64, I)>,
    /// The round in which the key last started an item, or in which its
    /// lane was made. The lane with the lowest goes first.
    served: u64,
    /// Whether an acquire for the key is pending.
    acquiring: bool,
}

/// The pulled items that have not started yet, by key.
struct Window<K, I> {
    lanes: HashMap<K, Lane<I>>,
    len: usize,
    /// The number of items started so far, which orders the lanes.
    round: u64,
}

impl<K: Hash + Eq + Clone, I> Window<K, I> {
    fn new() -> Self {
        Window {
            lanes: HashMap::new(),
            len: 0,
            round: 0,
        }
    }

    fn push(&mut self, key: K, index: u64, item: I) {
        let round = self.round;
        let lane = self.lanes.entry(key).or_insert_with(|| Lane {
            items: VecDeque::new(),
            served: round,
            acquiring: false,
        });
        lane.items.push_back((index, item));
        self.len += 1;
    }

    /// Returns the keys that have items and no pending acquire, the least
    /// recently served first, and marks them as acquiring.
    fn take_idle(&mut self) -> Vec<K> {
        let mut idle: Vec<(u64, u64, K)> = self
            .lanes
            .iter_mut()
            .filter(|(_, lane)| !lane.acquiring && !lane.items.is_empty())
            .map(|(key, lane)| {
                lane.acquiring = true;
                (lane.served, lane.items[0].0, key.clone())
            })
            .collect();
        idle.sort_unstable_by_key(|&(served, first, _)| (served, first));
        idle.into_iter().map(|(_, _, key)| key).collect()
    }

    /// Takes the next item of `key`, whose acquire was granted.
    fn pop(&mut self, key: &K) -> Option<(u64, I)> {
        let lane = self.lanes.get_mut(key)?;
        lane.acquiring = false;
        let popped = lane.items.pop_front();
        if popped.is_some() {
            self.len -= 1;
            self.round += 1;
            lane.served = self.round;
        }
        if lane.items.is_empty() {
            self.lanes.remove(key);
        }
        popped
    }

    /// Marks every lane as without a pending acquire.
    fn forget_acquires(&mut self) {
        for lane in self.lanes.values_mut() {
            lane.acquiring = false;
        }
    }

    /// Drops every item and returns their indices.
    fn drain(&mut self) -> Vec<u64> {
        let mut indices: Vec<u64> = self
            .lanes
            .drain()
            .flat_map(|(_, lane)| lane.items.into_iter().map(|(index, _)| index))
            .collect();
        indices.sort_unstable();
        self.len = 0;
        indices
    }
}

pin_project! {
    /// A future that processes a keyed backlog and hands each outcome to a
    /// consumer, returned by [`KeyedBacklog::for_each`](crate::KeyedBacklog::for_each).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the work still running (each item's work is
    /// dropped before its permit is given back), the pending acquires and
    /// the outcomes not yet handed to the consumer. The items pulled into the
    /// look-ahead window are lost, and items not yet pulled stay in the
    /// source.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct KeyedForEach<L, S, KF, F, C, Fut, CFut>
    where
        L: KeyedLimiter<KF::Key>,
        S: Stream,
        KF: KeyOf<S::Item>,
        Fut: TryFuture,
    {
        limiter: L,
        #[pin]
        source: S,
        key_of: KF,
        work: F,
        consumer: C,
        window: Window<KF::Key, S::Item>,
        acquiring: FuturesUnordered<Tagged<KF::Key, L::Acquire>>,
        running: TaskSet<Task<Fut, L::Permit>>,
        outcomes: OutcomeBuffer<Fut::Ok, Fut::Error>,
        #[pin]
        consuming: Option<CFut>,
        progress: Progress,
        lookahead: Option<usize>,
    }
}

/// Returns the key of an item; implemented by every `FnMut(&Item) -> Key`.
pub trait KeyOf<I> {
    /// The key, such as a domain name.
    type Key: Hash + Eq + Clone;

    /// Returns the key of `item`.
    fn key_of(&mut self, item: &I) -> Self::Key;
}

impl<I, K: Hash + Eq + Clone, F: FnMut(&I) -> K> KeyOf<I> for F {
    type Key = K;

    fn key_of(&mut self, item: &I) -> K {
        self(item)
    }
}

impl<L, S, KF, F, C, Fut, CFut> fmt::Debug for KeyedForEach<L, S, KF, F, C, Fut, CFut>
where
    L: KeyedLimiter<KF::Key>,
    S: Stream,
    KF: KeyOf<S::Item>,
    Fut: TryFuture,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedForEach")
            .field("running", &self.running.len())
            .field("window", &self.window.len)
            .field("keys_in_window", &self.window.lanes.len())
            .field("acquiring", &self.acquiring.len())
            .field("report", &self.progress.report)
            .finish()
    }
}

/// The settings of a keyed backlog that are not its parts.
pub(super) struct Settings {
    pub(super) policy: FailurePolicy,
    pub(super) input_order: bool,
    pub(super) buffer: Option<usize>,
    pub(super) lookahead: Option<usize>,
}

impl<L, S, KF, F, C, Fut, CFut> KeyedForEach<L, S, KF, F, C, Fut, CFut>
where
    L: KeyedLimiter<KF::Key>,
    S: Stream,
    KF: KeyOf<S::Item>,
    Fut: TryFuture,
{
    pub(super) fn new(parts: (L, S, KF, F, C), settings: Settings) -> Self {
        let (limiter, source, key_of, work, consumer) = parts;
        KeyedForEach {
            limiter,
            source,
            key_of,
            work,
            consumer,
            window: Window::new(),
            acquiring: FuturesUnordered::new(),
            running: TaskSet::new(),
            outcomes: OutcomeBuffer::new(settings.input_order),
            consuming: None,
            progress: Progress::new(settings.policy, settings.buffer),
            lookahead: settings.lookahead,
        }
    }
}

/// The default look-ahead window, as a multiple of the global limit.
pub(super) const LOOKAHEAD_PER_SLOT: usize = 4;

impl<L, S, KF, F, C, Fut, CFut> Future for KeyedForEach<L, S, KF, F, C, Fut, CFut>
where
    L: KeyedLimiter<KF::Key>,
    S: Stream,
    KF: KeyOf<S::Item>,
    F: StartWork<S::Item, L::Permit, Future = Fut>,
    Fut: TryFuture,
    C: FnMut(Outcome<Fut::Ok, Fut::Error>) -> CFut,
    CFut: Future<Output = ()>,
{
    type Output = Report;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Report> {
        let mut this = self.project();
        let limit = this.limiter.limit().max(1);
        let capacity = this.progress.buffer.unwrap_or(limit.saturating_mul(2));
        let lookahead = this
            .lookahead
            .unwrap_or(limit.saturating_mul(LOOKAHEAD_PER_SLOT))
            .max(1);
        for _ in 0..ROUNDS_PER_POLL {
            let mut progressed = false;

            // Step 1: let the consumer finish the outcome it holds.
            if let Some(consuming) = this.consuming.as_mut().as_pin_mut() {
                if consuming.poll(cx).is_ready() {
                    this.consuming.set(None);
                    progressed = true;
                }
            }

            // Step 2: collect finished work; its permit is dropped with it.
            while let Poll::Ready(Some((index, result, permit))) = this.running.poll_next(cx) {
                drop(permit);
                this.progress.record(&result);
                this.outcomes.finished(Outcome { index, result });
                progressed = true;
            }

            // Step 3: on a stop, drop what has not started, and cancel
            // running work if the policy requires a stop now.
            if this.progress.stopping() && (this.window.len > 0 || !this.acquiring.is_empty()) {
                this.acquiring.clear();
                for index in this.window.drain() {
                    this.outcomes.cancelled(index);
                    this.progress.report.not_started.push(index);
                }
                progressed = true;
            }
            if this.progress.stop_now && !this.running.is_empty() {
                cancel_running(this.running, this.outcomes, &mut this.progress.report);
                progressed = true;
            }

            // Step 4: pull items into the window while it has room.
            while !this.progress.source_done
                && !this.progress.stopping()
                && this.window.len < lookahead
            {
                match this.source.as_mut().poll_next(cx) {
                    Poll::Ready(Some(item)) => {
                        let index = this.progress.next_index;
                        this.progress.next_index += 1;
                        // The slot is reserved now, so that input order
                        // holds whatever order the items start in.
                        this.outcomes.started();
                        let key = this.key_of.key_of(&item);
                        this.window.push(key, index, item);
                    }
                    Poll::Ready(None) => this.progress.source_done = true,
                    Poll::Pending => break,
                }
                progressed = true;
            }

            // Step 5: start items whose key got a permit, while the buffer
            // has room. Acquires are pending only while it has room, so a
            // granted permit never waits for the consumer.
            if !this.progress.stopping() {
                progressed |= start_granted(
                    this.limiter,
                    this.work,
                    this.window,
                    this.acquiring,
                    this.running,
                    this.outcomes,
                    this.progress,
                    capacity,
                    cx,
                );
            }

            // Step 6: hand outcomes to the consumer.
            while this.consuming.is_none() {
                let Some(outcome) = this.outcomes.pop() else {
                    break;
                };
                this.consuming.set(Some((this.consumer)(outcome)));
                progressed = true;
                if let Some(consuming) = this.consuming.as_mut().as_pin_mut() {
                    if consuming.poll(cx).is_ready() {
                        this.consuming.set(None);
                    }
                }
            }

            // Step 7: finish once nothing is left to start, run or consume.
            // A stop that came in step 5 leaves the window to step 3 of the
            // next round, which records its items as not started.
            let no_more_work =
                this.window.len == 0 && (this.progress.source_done || this.progress.stopping());
            let drained = this.running.is_empty() && this.outcomes.is_empty();
            if no_more_work && drained && this.consuming.is_none() {
                this.acquiring.clear();
                return Poll::Ready(std::mem::take(&mut this.progress.report));
            }
            if !progressed {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Returns the buffer places in use by started items: running, or finished
/// and waiting for the consumer, or (in input order) held back behind an
/// earlier item. Items still in the window are not counted.
fn in_flight<T, E>(outcomes: &OutcomeBuffer<T, E>, running: usize, window_len: usize) -> usize {
    let occupied = outcomes.occupied(running);
    if outcomes.is_input_order() {
        occupied - window_len
    } else {
        occupied
    }
}

/// Makes an acquire for every key that waits for one, then starts the item
/// of each granted key. Returns whether anything changed.
#[allow(clippy::too_many_arguments)] // The projected fields of one future.
fn start_granted<L, I, K, F, Fut>(
    limiter: &L,
    work: &mut F,
    window: &mut Window<K, I>,
    acquiring: &mut FuturesUnordered<Tagged<K, L::Acquire>>,
    running: &mut TaskSet<Task<Fut, L::Permit>>,
    outcomes: &mut OutcomeBuffer<Fut::Ok, Fut::Error>,
    progress: &mut Progress,
    capacity: usize,
    cx: &mut Context<'_>,
) -> bool
where
    L: KeyedLimiter<K>,
    K: Hash + Eq + Clone,
    F: StartWork<I, L::Permit, Future = Fut>,
    Fut: TryFuture,
{
    let mut progressed = false;
    loop {
        if in_flight(outcomes, running.len(), window.len) >= capacity {
            // A full buffer: give the pending acquires up, so that no
            // permit is held by an item that cannot start. They are made
            // again, in round-robin order, once the buffer has room.
            if !acquiring.is_empty() {
                acquiring.clear();
                window.forget_acquires();
                progressed = true;
            }
            return progressed;
        }
        for key in window.take_idle() {
            let acquire = limiter.acquire(&key);
            acquiring.push(Tagged {
                key: Some(key),
                acquire,
            });
        }
        let (key, granted) = match acquiring.poll_next_unpin(cx) {
            Poll::Ready(Some(granted)) => granted,
            Poll::Ready(None) | Poll::Pending => return progressed,
        };
        progressed = true;
        let permit = match granted {
            Ok(permit) => permit,
            Err(error) => {
                progress.report.stopped = Some(StopReason::Limiter(Box::new(error)));
                return true;
            }
        };
        let Some((index, item)) = window.pop(&key) else {
            // The lane was drained by a stop meanwhile.
            continue;
        };
        progress.report.started += 1;
        let (future, permit) = work.start(item, permit);
        running.push(Task::new(future, permit, index));
        progress.report.max_running = progress.report.max_running.max(running.len());
    }
}
