//! The future that drives a backlog: starts work, collects outcomes and feeds
//! the consumer, all from one task.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::{Stream, TryFuture};
use pin_project_lite::pin_project;

use super::buffer::OutcomeBuffer;
use super::policy::{FailurePolicy, Outcome, Report, StopReason};
use super::task::Task;
use super::task_set::TaskSet;
use super::work::StartWork;
use crate::limiter::Limiter;

/// Rounds of the poll loop before the future yields to its executor, so that
/// an endless source of instant work cannot starve other tasks.
pub(super) const ROUNDS_PER_POLL: usize = 64;

pin_project! {
    /// A future that processes a backlog and hands each outcome to a consumer,
    /// returned by [`Backlog::for_each`](crate::Backlog::for_each).
    ///
    /// It resolves with a [`Report`] once the source has run out (or the
    /// failure policy stopped it), every started item has finished and the
    /// consumer has seen every outcome.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the work still running (each item's work is
    /// dropped before its permit is given back), the outcomes not yet handed
    /// to the consumer, and the items not yet pulled, which stay in the
    /// source. Items already pulled are lost with it.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ForEach<L, S, F, C, Fut, CFut>
    where
        L: Limiter,
        Fut: TryFuture,
    {
        limiter: L,
        #[pin]
        source: S,
        work: F,
        consumer: C,
        #[pin]
        acquiring: Option<L::Acquire>,
        permit: Option<L::Permit>,
        running: TaskSet<Task<Fut, L::Permit>>,
        outcomes: OutcomeBuffer<Fut::Ok, Fut::Error>,
        #[pin]
        consuming: Option<CFut>,
        progress: Progress,
    }
}

/// The bookkeeping of a running backlog that is not tied to its types.
#[derive(Debug)]
pub(super) struct Progress {
    pub(super) policy: FailurePolicy,
    pub(super) buffer: Option<usize>,
    pub(super) next_index: u64,
    pub(super) source_done: bool,
    pub(super) stop_now: bool,
    pub(super) report: Report,
}

impl<L, S, F, C, Fut, CFut> fmt::Debug for ForEach<L, S, F, C, Fut, CFut>
where
    L: Limiter,
    Fut: TryFuture,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForEach")
            .field("running", &self.running.len())
            .field("next_index", &self.progress.next_index)
            .field("source_done", &self.progress.source_done)
            .field("report", &self.progress.report)
            .finish()
    }
}

impl<L, S, F, C, Fut, CFut> ForEach<L, S, F, C, Fut, CFut>
where
    L: Limiter,
    Fut: TryFuture,
{
    pub(crate) fn new(
        parts: (L, S, F, C),
        policy: FailurePolicy,
        input_order: bool,
        buffer: Option<usize>,
    ) -> Self {
        let (limiter, source, work, consumer) = parts;
        ForEach {
            limiter,
            source,
            work,
            consumer,
            acquiring: None,
            permit: None,
            running: TaskSet::new(),
            outcomes: OutcomeBuffer::new(input_order),
            consuming: None,
            progress: Progress::new(policy, buffer),
        }
    }
}

impl Progress {
    pub(super) fn new(policy: FailurePolicy, buffer: Option<usize>) -> Self {
        Progress {
            policy,
            buffer,
            next_index: 0,
            source_done: false,
            stop_now: false,
            report: Report::default(),
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.report.stopped.is_some()
    }

    /// Counts one finished item and applies the failure policy.
    pub(super) fn record<T, E>(&mut self, result: &Result<T, E>) {
        match result {
            Ok(_) => self.report.succeeded += 1,
            Err(_) => self.report.failed += 1,
        }
        let (threshold, now) = match self.policy {
            FailurePolicy::KeepGoing => return,
            FailurePolicy::StopSoon(threshold) => (threshold, false),
            FailurePolicy::StopNow(threshold) => (threshold, true),
        };
        let finished = self.report.succeeded + self.report.failed;
        if self.stopping() || !threshold.reached(self.report.failed, finished) {
            return;
        }
        self.report.stopped = Some(StopReason::Failures);
        self.stop_now = now;
    }
}

impl<L, S, F, C, Fut, CFut> Future for ForEach<L, S, F, C, Fut, CFut>
where
    L: Limiter,
    S: Stream,
    F: StartWork<S::Item, L::Permit, Future = Fut>,
    Fut: TryFuture,
    C: FnMut(Outcome<Fut::Ok, Fut::Error>) -> CFut,
    CFut: Future<Output = ()>,
{
    type Output = Report;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Report> {
        let mut this = self.project();
        for _ in 0..ROUNDS_PER_POLL {
            let mut progressed = false;

            // Step 1: let the consumer finish the outcome it holds.
            if let Some(consuming) = this.consuming.as_mut().as_pin_mut() {
                if consuming.poll(cx).is_ready() {
                    this.consuming.set(None);
                    progressed = true;
                }
            }

            // Step 2: collect finished work. This runs whether or not the
            // consumer is busy, so slow consumers never stall running work.
            // Each finished item makes room for one new item, started right
            // away in the slot just emptied, and under the finished item's
            // permit when the limiter lets it pass on.
            while let Poll::Ready(Some((index, result, permit))) = this.running.poll_next(cx) {
                this.progress.record(&result);
                this.outcomes.finished(Outcome { index, result });
                progressed = true;
                // Work that held its own permit has already given it back.
                if let Some(permit) = permit {
                    if this.permit.is_none()
                        && has_room(this.limiter, this.running, this.outcomes, this.progress)
                    {
                        *this.permit = this.limiter.reuse(permit);
                    } else {
                        drop(permit);
                    }
                }
                start_work(
                    this.limiter,
                    this.source.as_mut(),
                    this.work,
                    this.acquiring.as_mut(),
                    this.permit,
                    this.running,
                    this.outcomes,
                    this.progress,
                    1,
                    cx,
                );
            }

            // Step 3: cancel running work once the policy requires a stop now.
            if this.progress.stop_now && !this.running.is_empty() {
                cancel_running(this.running, this.outcomes, &mut this.progress.report);
                progressed = true;
            }

            // Step 4: start new work while permits, items and room allow.
            progressed |= start_work(
                this.limiter,
                this.source.as_mut(),
                this.work,
                this.acquiring.as_mut(),
                this.permit,
                this.running,
                this.outcomes,
                this.progress,
                usize::MAX,
                cx,
            );

            // Step 5: hand outcomes to the consumer, polling each consumer
            // future at once, so a consumer that finishes without waiting
            // takes every ready outcome in this round.
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

            // Step 6: finish once nothing is left to start, run or consume.
            let no_more_work = this.progress.source_done || this.progress.stopping();
            let drained = this.running.is_empty() && this.outcomes.is_empty();
            if no_more_work && drained && this.consuming.is_none() {
                this.acquiring.set(None);
                this.permit.take();
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

pub(super) fn cancel_running<Fut: TryFuture, P>(
    running: &mut TaskSet<Task<Fut, P>>,
    outcomes: &mut OutcomeBuffer<Fut::Ok, Fut::Error>,
    report: &mut Report,
) {
    let first = report.cancelled.len();
    report
        .cancelled
        .extend(running.iter().map(|task| task.index()));
    report.cancelled[first..].sort_unstable();
    for &index in &report.cancelled[first..] {
        outcomes.cancelled(index);
    }
    running.clear();
}

/// Pulls items and starts their work, one permit per item, at most `budget`
/// of them. Returns whether anything changed.
#[allow(clippy::too_many_arguments)] // The projected fields of one future.
fn start_work<L, S, F, Fut>(
    limiter: &L,
    mut source: Pin<&mut S>,
    work: &mut F,
    mut acquiring: Pin<&mut Option<L::Acquire>>,
    permit_slot: &mut Option<L::Permit>,
    running: &mut TaskSet<Task<Fut, L::Permit>>,
    outcomes: &mut OutcomeBuffer<Fut::Ok, Fut::Error>,
    progress: &mut Progress,
    budget: usize,
    cx: &mut Context<'_>,
) -> bool
where
    L: Limiter,
    S: Stream,
    F: StartWork<S::Item, L::Permit, Future = Fut>,
    Fut: TryFuture,
{
    let mut progressed = false;
    for _ in 0..budget {
        if progress.source_done || progress.stopping() {
            acquiring.set(None);
            permit_slot.take();
            return progressed;
        }
        if !has_room(limiter, running, outcomes, progress) {
            return progressed;
        }

        // A permit first, so that an item is only pulled once it can run.
        let permit = match permit_slot.take() {
            Some(permit) => permit,
            None => match poll_permit(limiter, acquiring.as_mut(), cx) {
                Poll::Ready(Ok(permit)) => permit,
                Poll::Ready(Err(error)) => {
                    progress.report.stopped = Some(StopReason::Limiter(Box::new(error)));
                    return true;
                }
                Poll::Pending => return progressed,
            },
        };

        match source.as_mut().poll_next(cx) {
            Poll::Ready(Some(item)) => {
                let index = progress.next_index;
                progress.next_index += 1;
                progress.report.started += 1;
                outcomes.started();
                let (future, permit) = work.start(item, permit);
                running.push(Task::new(future, permit, index));
                progress.report.max_running = progress.report.max_running.max(running.len());
            }
            Poll::Ready(None) => progress.source_done = true,
            Poll::Pending => {
                *permit_slot = Some(permit);
                return progressed;
            }
        }
        progressed = true;
    }
    progressed
}

/// Returns whether another item may start now: the source may have more, no
/// stop is under way, and the running and unconsumed outcomes leave room in
/// the buffer.
fn has_room<L: Limiter, T, O, E>(
    limiter: &L,
    running: &TaskSet<T>,
    outcomes: &OutcomeBuffer<O, E>,
    progress: &Progress,
) -> bool {
    if progress.source_done || progress.stopping() {
        return false;
    }
    let capacity = progress
        .buffer
        .unwrap_or(limiter.limit().saturating_mul(2))
        .max(1);
    outcomes.occupied(running.len()) < capacity
}

/// Takes a free permit through `try_acquire` when the limiter has one, and
/// otherwise polls the acquire future, which keeps its place in the queue
/// across polls.
fn poll_permit<L: Limiter>(
    limiter: &L,
    mut acquiring: Pin<&mut Option<L::Acquire>>,
    cx: &mut Context<'_>,
) -> Poll<Result<L::Permit, L::Error>> {
    if acquiring.is_none() {
        if let Some(permit) = limiter.try_acquire() {
            return Poll::Ready(Ok(permit));
        }
        acquiring.set(Some(limiter.acquire()));
    }
    let Some(pending) = acquiring.as_mut().as_pin_mut() else {
        unreachable!("the acquire future was set above");
    };
    let polled = pending.poll(cx);
    if polled.is_ready() {
        acquiring.set(None);
    }
    polled
}
