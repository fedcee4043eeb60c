//! The semaphore's state machine: a token count and a first-in, first-out
//! queue of waiters.
//!
//! # Design
//!
//! The free tokens live in one atomic word, so that an uncontended acquire or
//! release is a single compare-and-swap. Everything else (the waiter queue, the
//! limit, the tokens still to retire after a shrink) sits behind a mutex.
//!
//! Two flags in the same word keep the fast paths honest:
//!
//! - `SLOW` is set while waiters are queued or retired tokens are owed. A
//!   release that sees it takes the mutex and hands its tokens to the queue
//!   instead of adding them to the free count, so a token never lands in the
//!   free count while someone waits for it.
//! - `CLOSED` makes every later acquire fail.
//!
//! Invariant: while `SLOW` is set, the free count is 0. Waiters only queue when
//! too few tokens are free, and they take what is free when they queue; debt is
//! only recorded once every free token has been retired. So the acquire fast
//! path (which needs free tokens) can never overtake a queued waiter, and
//! `try_acquire` never barges.
//!
//! Waiters are kept in a slab and linked into a queue by index, so joining,
//! leaving from the middle (cancellation) and leaving from the head are all
//! O(1) and need no `unsafe`. Handing tokens down the queue wakes tasks and
//! returns; it never polls anyone, so the stack depth is constant however
//! long the queue.

use std::fmt;
use std::task::{Context, Poll, Waker};

use slab::Slab;

use crate::error::{AcquireError, TryAcquireError};
use crate::sync::{AtomicUsize, Mutex, MutexGuard, Ordering};

const CLOSED: usize = 0b01;
const SLOW: usize = 0b10;
const SHIFT: u32 = 2;

/// The largest limit the state word can count.
pub(crate) const MAX_TOKENS: usize = usize::MAX >> SHIFT;

pub(crate) struct Core {
    /// Free tokens shifted left by `SHIFT`, plus the `CLOSED` and `SLOW` flags.
    state: AtomicUsize,
    /// A copy of `Queue::limit`, readable without the lock.
    limit: AtomicUsize,
    /// A copy of `Queue::len`, readable without the lock.
    waiting: AtomicUsize,
    queue: Mutex<Queue>,
}

struct Queue {
    limit: usize,
    /// Tokens to retire as they come back, after the limit shrank below the
    /// tokens held.
    debt: usize,
    waiters: Slab<Waiter>,
    head: Option<usize>,
    tail: Option<usize>,
    len: usize,
}

struct Waiter {
    needed: usize,
    /// Tokens already handed to this waiter. They stay with it until it is
    /// granted, cancelled or rejected.
    assigned: usize,
    waker: Option<Waker>,
    status: Status,
    prev: Option<usize>,
    next: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Queued,
    Granted,
    Failed(AcquireError),
}

/// The progress of an acquire future: not yet queued, queued under a key, or done.
#[derive(Debug, Default)]
pub(crate) enum Acquiring {
    #[default]
    Idle,
    Queued(usize),
    Done,
}

impl Core {
    pub(crate) fn new(limit: usize) -> Core {
        Core {
            state: AtomicUsize::new(limit << SHIFT),
            limit: AtomicUsize::new(limit),
            waiting: AtomicUsize::new(0),
            queue: Mutex::new(Queue {
                limit,
                debt: 0,
                waiters: Slab::new(),
                head: None,
                tail: None,
                len: 0,
            }),
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    pub(crate) fn tokens(&self) -> usize {
        self.state.load(Ordering::Relaxed) >> SHIFT
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Ordering::Relaxed) & CLOSED != 0
    }

    /// Returns whether tokens given back now would go to the free count: no
    /// waiter is queued, no debt is owed, and the semaphore is open.
    pub(crate) fn is_uncontended(&self) -> bool {
        self.state.load(Ordering::Acquire) & (SLOW | CLOSED) == 0
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // No code panics while holding the lock, so a poisoned lock still
        // holds a consistent queue.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes `n` free tokens without waiting.
    #[inline]
    pub(crate) fn try_acquire(&self, n: usize) -> Result<(), TryAcquireError> {
        let limit = self.limit();
        if n > limit {
            return Err(TryAcquireError::ExceedsLimit {
                requested: n,
                limit,
            });
        }
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            if current & CLOSED != 0 {
                return Err(TryAcquireError::Closed);
            }
            if current >> SHIFT < n {
                return Err(TryAcquireError::NoTokens);
            }
            let next = current - (n << SHIFT);
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives `n` tokens back: to the queue first, then to the free count.
    ///
    /// The lock-free path is inlined into callers; the path through the
    /// lock is kept out of line.
    #[inline]
    pub(crate) fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut current = self.state.load(Ordering::Relaxed);
        while current & SLOW == 0 {
            match self.state.compare_exchange_weak(
                current,
                current + (n << SHIFT),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
        self.release_locked(n);
    }

    #[cold]
    #[inline(never)]
    fn release_locked(&self, n: usize) {
        let mut wakers = Vec::new();
        let mut queue = self.lock();
        self.give_locked(&mut queue, n, &mut wakers);
        drop(queue);
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Polls for `n` tokens on behalf of one acquire future.
    #[inline]
    pub(crate) fn poll_acquire(
        &self,
        n: usize,
        acquiring: &mut Acquiring,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), AcquireError>> {
        let result = match *acquiring {
            Acquiring::Idle => self.start_acquire(n, acquiring, cx),
            Acquiring::Queued(key) => self.poll_queued(key, acquiring, cx),
            Acquiring::Done => panic!("acquire future polled after it completed"),
        };
        if result.is_ready() {
            *acquiring = Acquiring::Done;
        }
        result
    }

    #[inline]
    fn start_acquire(
        &self,
        n: usize,
        acquiring: &mut Acquiring,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), AcquireError>> {
        match self.try_acquire(n) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(TryAcquireError::Closed) => Poll::Ready(Err(AcquireError::Closed)),
            Err(TryAcquireError::ExceedsLimit { requested, limit }) => {
                Poll::Ready(Err(AcquireError::ExceedsLimit { requested, limit }))
            }
            Err(TryAcquireError::NoTokens) => self.enqueue(n, acquiring, cx),
        }
    }

    /// Takes the lock to queue a waiter for `n` tokens, unless they came
    /// free in the meantime.
    #[cold]
    #[inline(never)]
    fn enqueue(
        &self,
        n: usize,
        acquiring: &mut Acquiring,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), AcquireError>> {
        let mut queue = self.lock();
        // Close and set_limit change these under the lock, so checking them
        // again here leaves no window for a waiter to queue after a close.
        if self.is_closed() {
            return Poll::Ready(Err(AcquireError::Closed));
        }
        if n > queue.limit {
            let limit = queue.limit;
            return Poll::Ready(Err(AcquireError::ExceedsLimit {
                requested: n,
                limit,
            }));
        }
        match self.take_or_enqueue(&mut queue, n, cx.waker()) {
            Some(key) => {
                *acquiring = Acquiring::Queued(key);
                Poll::Pending
            }
            None => Poll::Ready(Ok(())),
        }
    }

    /// Under the lock, takes `n` tokens if free, or queues a waiter holding
    /// whatever is free. Returns the waiter's key when it queued.
    fn take_or_enqueue(&self, queue: &mut Queue, n: usize, waker: &Waker) -> Option<usize> {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let free = current >> SHIFT;
            let (taken, next) = if free >= n && current & SLOW == 0 {
                (n, current - (n << SHIFT))
            } else {
                // Take every free token into the new waiter so that the free
                // count is 0 while it waits; that keeps later acquirers behind it.
                (free, (current & CLOSED) | SLOW)
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) if taken == n => return None,
                Ok(_) => return Some(self.push_waiter(queue, n, taken, waker)),
                Err(actual) => current = actual,
            }
        }
    }

    fn push_waiter(
        &self,
        queue: &mut Queue,
        needed: usize,
        assigned: usize,
        waker: &Waker,
    ) -> usize {
        let key = queue.waiters.insert(Waiter {
            needed,
            assigned,
            waker: Some(waker.clone()),
            status: Status::Queued,
            prev: queue.tail,
            next: None,
        });
        match queue.tail {
            Some(tail) => queue.waiters[tail].next = Some(key),
            None => queue.head = Some(key),
        }
        queue.tail = Some(key);
        queue.len += 1;
        self.waiting.store(queue.len, Ordering::Relaxed);
        key
    }

    fn poll_queued(
        &self,
        key: usize,
        acquiring: &mut Acquiring,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), AcquireError>> {
        let mut queue = self.lock();
        let waiter = &mut queue.waiters[key];
        match waiter.status {
            Status::Queued => {
                match &waiter.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => waiter.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Status::Granted => {
                queue.waiters.remove(key);
                *acquiring = Acquiring::Done;
                Poll::Ready(Ok(()))
            }
            Status::Failed(error) => {
                // A failed waiter was unlinked and its tokens given back when
                // it failed, so only the slot is left to free.
                queue.waiters.remove(key);
                *acquiring = Acquiring::Done;
                Poll::Ready(Err(error))
            }
        }
    }

    /// Gives back whatever a dropped acquire future held or was owed.
    #[inline]
    pub(crate) fn cancel(&self, acquiring: &mut Acquiring) {
        if let Acquiring::Queued(key) = std::mem::take(acquiring) {
            self.cancel_queued(key);
        }
    }

    #[cold]
    #[inline(never)]
    fn cancel_queued(&self, key: usize) {
        let mut wakers = Vec::new();
        let mut queue = self.lock();
        let waiter = queue.waiters.remove(key);
        let returned = match waiter.status {
            Status::Queued => {
                self.unlink(&mut queue, waiter.prev, waiter.next);
                waiter.assigned
            }
            Status::Granted => waiter.needed,
            Status::Failed(_) => 0,
        };
        self.give_locked(&mut queue, returned, &mut wakers);
        drop(queue);
        wakers.into_iter().for_each(Waker::wake);
    }

    fn unlink(&self, queue: &mut Queue, prev: Option<usize>, next: Option<usize>) {
        match prev {
            Some(prev) => queue.waiters[prev].next = next,
            None => queue.head = next,
        }
        match next {
            Some(next) => queue.waiters[next].prev = prev,
            None => queue.tail = prev,
        }
        queue.len -= 1;
        self.waiting.store(queue.len, Ordering::Relaxed);
    }

    /// Under the lock, pays debt first, then serves the queue from its head, then
    /// adds what is left to the free count.
    fn give_locked(&self, queue: &mut Queue, mut n: usize, wakers: &mut Vec<Waker>) {
        let paid = n.min(queue.debt);
        queue.debt -= paid;
        n -= paid;
        while n > 0 {
            let Some(key) = queue.head else { break };
            let waiter = &mut queue.waiters[key];
            let given = n.min(waiter.needed - waiter.assigned);
            waiter.assigned += given;
            n -= given;
            if waiter.assigned == waiter.needed {
                self.finish_waiter(queue, key, Status::Granted, wakers);
            }
        }
        self.add_free(queue, n);
    }

    /// Unlinks a waiter from the queue with its final status and collects its
    /// waker.
    fn finish_waiter(
        &self,
        queue: &mut Queue,
        key: usize,
        status: Status,
        wakers: &mut Vec<Waker>,
    ) {
        let waiter = &mut queue.waiters[key];
        waiter.status = status;
        wakers.extend(waiter.waker.take());
        let (prev, next) = (waiter.prev, waiter.next);
        self.unlink(queue, prev, next);
    }

    /// Adds `n` free tokens and recomputes `SLOW`, under the lock.
    fn add_free(&self, queue: &Queue, n: usize) {
        let slow = if queue.len > 0 || queue.debt > 0 {
            SLOW
        } else {
            0
        };
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            let next = ((current & !SLOW) + (n << SHIFT)) | slow;
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// Changes the limit: growing hands tokens out at once, shrinking retires
    /// free tokens now and the rest as they come back.
    pub(crate) fn set_limit(&self, limit: usize) {
        let mut wakers = Vec::new();
        let mut queue = self.lock();
        let old = queue.limit;
        queue.limit = limit;
        self.limit.store(limit, Ordering::Relaxed);
        if limit > old {
            let grow = limit - old;
            let cancelled = grow.min(queue.debt);
            queue.debt -= cancelled;
            self.give_locked(&mut queue, grow - cancelled, &mut wakers);
        } else if limit < old {
            let retired = self.retire_free(old - limit);
            queue.debt += old - limit - retired;
            self.reject_oversized(&mut queue, &mut wakers);
        }
        drop(queue);
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Removes up to `n` free tokens and returns how many it removed.
    fn retire_free(&self, n: usize) -> usize {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let retired = n.min(current >> SHIFT);
            // Setting `SLOW` in the same step sends every release made before
            // the debt is recorded through the lock, where it pays the debt.
            match self.state.compare_exchange_weak(
                current,
                (current - (retired << SHIFT)) | SLOW,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return retired,
                Err(actual) => current = actual,
            }
        }
    }

    /// Fails every queued waiter that requests more than the new limit, since
    /// it could never be served and would block everyone behind it.
    fn reject_oversized(&self, queue: &mut Queue, wakers: &mut Vec<Waker>) {
        let limit = queue.limit;
        let mut cursor = queue.head;
        let mut returned = 0;
        while let Some(key) = cursor {
            let waiter = &queue.waiters[key];
            cursor = waiter.next;
            if waiter.needed > limit {
                returned += waiter.assigned;
                let requested = waiter.needed;
                queue.waiters[key].assigned = 0;
                let error = AcquireError::ExceedsLimit { requested, limit };
                self.finish_waiter(queue, key, Status::Failed(error), wakers);
            }
        }
        self.give_locked(queue, returned, wakers);
    }

    /// Closes the semaphore and fails every queued waiter.
    pub(crate) fn close(&self) {
        let mut wakers = Vec::new();
        let mut queue = self.lock();
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
        let mut returned = 0;
        while let Some(key) = queue.head {
            returned += std::mem::take(&mut queue.waiters[key].assigned);
            self.finish_waiter(
                &mut queue,
                key,
                Status::Failed(AcquireError::Closed),
                &mut wakers,
            );
        }
        self.give_locked(&mut queue, returned, &mut wakers);
        drop(queue);
        wakers.into_iter().for_each(Waker::wake);
    }
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferredSemaphore")
            .field("limit", &self.limit())
            .field("tokens", &self.tokens())
            .field("waiting", &self.waiting())
            .field("closed", &self.is_closed())
            .finish()
    }
}
