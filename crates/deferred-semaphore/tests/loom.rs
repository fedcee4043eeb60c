//! Loom models of the races in the semaphore core.
//!
//! Each model runs a few threads against one semaphore and lets loom try
//! every interleaving of their atomic and mutex operations, up to a bound on
//! preemptions. A lost wake-up shows up as a deadlock, which loom reports,
//! because `loom::future::block_on` parks its thread until the future's waker
//! fires.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 \
//!     cargo test -p deferred-semaphore --test loom --release --target-dir target/loom
//! ```
//!
//! Without `LOOM_MAX_PREEMPTIONS` the models use a bound of 2, which keeps a
//! run short; a higher bound explores more interleavings and runs longer.
#![cfg(loom)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool as StdAtomicBool, AtomicUsize as StdAtomicUsize};
use std::sync::Arc as StdArc;
use std::task::{Context, Poll};

use deferred_semaphore::{AcquireError, DeferredSemaphore, OwnedPermit, TryAcquireError};
use futures::task::noop_waker_ref;
use loom::future::block_on;
use loom::sync::atomic::AtomicUsize;
use loom::sync::atomic::Ordering::Relaxed;
use loom::sync::Arc;
use loom::thread;

/// Ordering for the `std` atomics below, which loom does not model.
const STD_SEQ_CST: std::sync::atomic::Ordering = std::sync::atomic::Ordering::SeqCst;

/// Runs `f` under loom with a preemption bound of 2 unless
/// `LOOM_MAX_PREEMPTIONS` sets another.
///
/// Prints how many interleavings loom ran (shown with `--nocapture`) and
/// fails if it ran only one, which would mean the model has no race to explore.
fn model<F>(f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    let runs = StdArc::new(StdAtomicUsize::new(0));
    builder.check({
        let runs = runs.clone();
        move || {
            runs.fetch_add(1, STD_SEQ_CST);
            f();
        }
    });
    let runs = runs.load(STD_SEQ_CST);
    eprintln!("{runs} interleavings");
    assert!(runs > 1, "loom ran a single interleaving");
}

/// Tokens held by the model's threads, counted apart from the semaphore, and
/// an upper bound on the limit in force.
///
/// A thread counts its tokens right after its acquire completes and uncounts
/// them right before it drops the permit, so `held` never exceeds the tokens
/// really held: a count above the limit is a real overgrant. `held` is a loom
/// atomic so that loom also tries switching threads just before each count
/// changes, which is where an overgrant becomes visible. Its operations are
/// `Relaxed`: a read-modify-write still sees the latest count, and the
/// ledger creates no happens-before edge that could hide a missing one in
/// the semaphore.
struct Ledger {
    held: AtomicUsize,
    /// Raised before `set_limit` grows the limit and lowered after it shrinks
    /// it, so it is never below the limit in force. One thread of a model
    /// writes it, so it is a `std` atomic, which loom does not model and
    /// which adds no interleavings.
    limit: StdAtomicUsize,
}

impl Ledger {
    fn new(limit: usize) -> Arc<Ledger> {
        Arc::new(Ledger {
            held: AtomicUsize::new(0),
            limit: StdAtomicUsize::new(limit),
        })
    }

    /// Counts `n` tokens just granted and checks the count against the larger
    /// of `limit_before`, read before the acquire started, and the bound now.
    ///
    /// A grant may come before a shrink that the ledger already records,
    /// hence the bound from before. The bound now is read after the count
    /// changes, so that a grow that another thread counted in between is
    /// taken into account.
    fn take(&self, n: usize, limit_before: usize) {
        let held = self.held.fetch_add(n, Relaxed) + n;
        let limit = limit_before.max(self.limit.load(STD_SEQ_CST));
        assert!(held <= limit, "{held} tokens held, limit {limit}");
    }

    /// Uncounts the tokens of `permit` and drops it.
    fn give(&self, permit: OwnedPermit) {
        self.held.fetch_sub(permit.num_tokens(), Relaxed);
        drop(permit);
    }

    /// Takes one free token and counts it.
    fn try_acquire(&self, sem: &DeferredSemaphore) -> OwnedPermit {
        let limit_before = self.limit.load(STD_SEQ_CST);
        let permit = sem.try_acquire_owned().unwrap();
        self.take(1, limit_before);
        permit
    }

    /// Waits for `n` tokens and counts them once granted.
    fn acquire(&self, sem: &DeferredSemaphore, n: usize) -> Result<OwnedPermit, AcquireError> {
        let limit_before = self.limit.load(STD_SEQ_CST);
        let permit = block_on(sem.acquire_many_owned(n))?;
        self.take(n, limit_before);
        Ok(permit)
    }
}

/// Polls `future` once with a waker that does nothing.
fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    let mut cx = Context::from_waker(noop_waker_ref());
    Pin::new(future).poll(&mut cx)
}

/// Checks the state a model must leave behind: every token free and no
/// waiter queued.
fn assert_settled(sem: &DeferredSemaphore, ledger: &Ledger, limit: usize) {
    assert_eq!(ledger.held.load(Relaxed), 0, "tokens still counted as held");
    assert_eq!(sem.limit(), limit, "limit");
    assert_eq!(sem.tokens(), limit, "free tokens at the end");
    assert_eq!(sem.waiting(), 0, "waiters left in the queue");
}

/// Two waiters queue while the holder releases: the token passes to each in
/// turn, every waiter is woken, and each holder sees what the holders before
/// it wrote.
#[test]
fn acquire_against_release() {
    model(|| {
        let sem = DeferredSemaphore::new(1);
        let ledger = Ledger::new(1);
        // Holders update this with separate `Relaxed` loads and stores, so only
        // the semaphore's own synchronization keeps updates from being lost.
        let data = Arc::new(AtomicUsize::new(0));
        let held = ledger.try_acquire(&sem);

        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let (sem, ledger, data) = (sem.clone(), ledger.clone(), data.clone());
                thread::spawn(move || {
                    let permit = ledger.acquire(&sem, 1).unwrap();
                    let seen = data.load(Relaxed);
                    assert!(seen >= 1, "the holder's write is not visible");
                    data.store(seen + 1, Relaxed);
                    ledger.give(permit);
                })
            })
            .collect();

        data.store(1, Relaxed);
        ledger.give(held);
        for waiter in waiters {
            waiter.join().unwrap();
        }
        assert_eq!(
            data.load(Relaxed),
            3,
            "an update made under the permit was lost"
        );
        assert_settled(&sem, &ledger, 1);
    });
}

/// A queued acquire is dropped while the holder releases, with a second
/// waiter behind it: the token reaches the second waiter whether the release
/// granted it to the cancelled waiter first or not.
#[test]
fn cancelled_acquire_against_release() {
    model(|| {
        let sem = DeferredSemaphore::new(1);
        let ledger = Ledger::new(1);
        let held = ledger.try_acquire(&sem);
        let mut cancelled = sem.acquire_owned();
        assert!(poll_once(&mut cancelled).is_pending());

        let canceller = thread::spawn(move || drop(cancelled));
        let next = thread::spawn({
            let (sem, ledger) = (sem.clone(), ledger.clone());
            move || {
                let permit = ledger.acquire(&sem, 1).unwrap();
                ledger.give(permit);
            }
        });

        ledger.give(held);
        canceller.join().unwrap();
        next.join().unwrap();
        assert_settled(&sem, &ledger, 1);
    });
}

/// A request for two tokens holds one of them when it is dropped: that
/// token goes on to the waiter behind it instead of being lost.
#[test]
fn cancelled_partial_acquire_against_release() {
    model(|| {
        let sem = DeferredSemaphore::new(2);
        let ledger = Ledger::new(2);
        let first = ledger.try_acquire(&sem);
        let second = ledger.try_acquire(&sem);
        let mut cancelled = sem.acquire_many_owned(2);
        assert!(poll_once(&mut cancelled).is_pending());

        let next = thread::spawn({
            let (sem, ledger) = (sem.clone(), ledger.clone());
            move || {
                let permit = ledger.acquire(&sem, 1).unwrap();
                ledger.give(permit);
            }
        });
        let releaser = thread::spawn({
            let ledger = ledger.clone();
            move || ledger.give(first)
        });

        drop(cancelled);
        ledger.give(second);
        releaser.join().unwrap();
        next.join().unwrap();
        assert_settled(&sem, &ledger, 2);
    });
}

/// Close races an acquire that can only queue: the acquire ends with
/// `Closed` and never hangs, whether it queued before the close or not.
#[test]
fn close_against_queued_acquire() {
    model(|| {
        let sem = DeferredSemaphore::new(1);
        let ledger = Ledger::new(1);
        let held = ledger.try_acquire(&sem);

        let waiter = thread::spawn({
            let (sem, ledger) = (sem.clone(), ledger.clone());
            move || ledger.acquire(&sem, 1).map(|permit| ledger.give(permit))
        });

        sem.close();
        assert_eq!(waiter.join().unwrap(), Err(AcquireError::Closed));
        assert_eq!(sem.try_acquire().unwrap_err(), TryAcquireError::Closed);
        ledger.give(held);
        assert_settled(&sem, &ledger, 1);
    });
}

/// Close races an acquire and a release: the acquire gets a permit or
/// `Closed`, never hangs, and the held token still comes back.
#[test]
fn close_against_acquire_and_release() {
    static GRANTED: StdAtomicBool = StdAtomicBool::new(false);
    static CLOSED: StdAtomicBool = StdAtomicBool::new(false);

    model(|| {
        let sem = DeferredSemaphore::new(1);
        let ledger = Ledger::new(1);
        let held = ledger.try_acquire(&sem);

        let waiter = thread::spawn({
            let (sem, ledger) = (sem.clone(), ledger.clone());
            move || ledger.acquire(&sem, 1).map(|permit| ledger.give(permit))
        });
        let closer = thread::spawn({
            let sem = sem.clone();
            move || sem.close()
        });

        ledger.give(held);
        match waiter.join().unwrap() {
            Ok(()) => GRANTED.store(true, STD_SEQ_CST),
            Err(AcquireError::Closed) => CLOSED.store(true, STD_SEQ_CST),
            Err(error) => panic!("unexpected acquire error: {error}"),
        }
        closer.join().unwrap();
        assert!(sem.is_closed());
        assert_settled(&sem, &ledger, 1);
    });

    assert!(
        GRANTED.load(STD_SEQ_CST),
        "no interleaving granted the acquire"
    );
    assert!(
        CLOSED.load(STD_SEQ_CST),
        "no interleaving closed before the grant"
    );
}

/// The limit grows from 1 to 2 while the holder releases and two waiters
/// queue: both waiters hold a token at the same time, so the grown token
/// reached the queue, and both tokens end up free.
#[test]
fn set_limit_grow_against_release() {
    model(|| {
        let sem = DeferredSemaphore::new(1);
        let ledger = Ledger::new(1);
        let held = ledger.try_acquire(&sem);

        // Each waiter hands its permit back through `join`, so main holds both
        // at once and a token that never reaches the queue is a deadlock.
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let (sem, ledger) = (sem.clone(), ledger.clone());
                thread::spawn(move || ledger.acquire(&sem, 1).unwrap())
            })
            .collect();
        let grower = thread::spawn({
            let (sem, ledger) = (sem.clone(), ledger.clone());
            move || {
                ledger.limit.store(2, STD_SEQ_CST);
                sem.set_limit(2).unwrap();
            }
        });

        ledger.give(held);
        let permits: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        for permit in permits {
            ledger.give(permit);
        }
        grower.join().unwrap();
        assert_settled(&sem, &ledger, 2);
    });
}

/// The limit shrinks from 2 to 1 while both tokens are held and one holder
/// releases, and an acquire starts once the shrink returned: the acquire
/// never runs beside the other holder, and one token is free at the end.
#[test]
fn set_limit_shrink_against_release() {
    model(|| {
        let sem = DeferredSemaphore::new(2);
        let ledger = Ledger::new(2);
        let first = ledger.try_acquire(&sem);
        let second = ledger.try_acquire(&sem);

        let releaser = thread::spawn({
            let ledger = ledger.clone();
            move || ledger.give(first)
        });

        sem.set_limit(1).unwrap();
        ledger.limit.store(1, STD_SEQ_CST);
        let waiter = thread::spawn({
            let (sem, ledger) = (sem.clone(), ledger.clone());
            move || {
                let permit = ledger.acquire(&sem, 1).unwrap();
                ledger.give(permit);
            }
        });

        ledger.give(second);
        releaser.join().unwrap();
        waiter.join().unwrap();
        assert_settled(&sem, &ledger, 1);
    });
}

/// The limit shrinks from 2 to 1 while a waiter queues for a token and both
/// holders release: no grant takes the held tokens above the limit in force,
/// and one token is free at the end.
#[test]
fn set_limit_shrink_against_acquire() {
    model(|| {
        let sem = DeferredSemaphore::new(2);
        let ledger = Ledger::new(2);
        let first = ledger.try_acquire(&sem);
        let second = ledger.try_acquire(&sem);

        let waiter = thread::spawn({
            let (sem, ledger) = (sem.clone(), ledger.clone());
            move || {
                let permit = ledger.acquire(&sem, 1).unwrap();
                ledger.give(permit);
            }
        });
        let releaser = thread::spawn({
            let ledger = ledger.clone();
            move || ledger.give(first)
        });

        sem.set_limit(1).unwrap();
        ledger.limit.store(1, STD_SEQ_CST);
        ledger.give(second);
        releaser.join().unwrap();
        waiter.join().unwrap();
        assert_settled(&sem, &ledger, 1);
    });
}

/// A request for both tokens queues first and collects them one release at
/// a time, while a later request for one token waits behind it: the later
/// request is granted only after the first one has run.
#[test]
fn acquire_many_partial_grants_in_order() {
    model(|| {
        let sem = DeferredSemaphore::new(2);
        let ledger = Ledger::new(2);
        let first = ledger.try_acquire(&sem);
        let second = ledger.try_acquire(&sem);
        let big_done = StdArc::new(StdAtomicBool::new(false));
        let mut big = sem.acquire_many_owned(2);
        assert!(poll_once(&mut big).is_pending());

        let small = thread::spawn({
            let (sem, ledger, big_done) = (sem.clone(), ledger.clone(), big_done.clone());
            move || {
                let permit = ledger.acquire(&sem, 1).unwrap();
                assert!(
                    big_done.load(STD_SEQ_CST),
                    "a later request overtook a queued one"
                );
                ledger.give(permit);
            }
        });
        let releaser = thread::spawn({
            let ledger = ledger.clone();
            move || ledger.give(first)
        });

        ledger.give(second);
        let permit = block_on(big).unwrap();
        ledger.take(2, 2);
        big_done.store(true, STD_SEQ_CST);
        ledger.give(permit);
        releaser.join().unwrap();
        small.join().unwrap();
        assert_settled(&sem, &ledger, 2);
    });
}
