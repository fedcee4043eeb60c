//! Handing one token down a very long queue must use constant stack depth.
//!
//! A slow holder keeps the only token while a million `run` units queue
//! behind it. Each unit finishes at once, so when the holder lets go the
//! token passes straight from one waiter to the next. If a release polled the
//! next waiter itself, or woke it by polling, the stack would grow with the
//! queue and overflow the small thread stack used here. The units must also
//! run in the order they queued.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use deferred_semaphore::DeferredSemaphore;
use futures::channel::oneshot;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::noop_waker_ref;
use std::future::Future;
use std::task::Context;

/// Waiters queued behind the holder.
const WAITERS: usize = 1_000_000;

/// Stack size of the thread that drives the whole queue.
const STACK_SIZE: usize = 256 * 1024;

/// Counts of what the queued units saw, returned by `hand_token_down_queue`.
struct Handoff {
    completed: usize,
    out_of_order: usize,
}

fn hand_token_down_queue() -> Handoff {
    let sem = DeferredSemaphore::new(1);
    let completed = AtomicUsize::new(0);
    let out_of_order = AtomicUsize::new(0);
    let holder_started = AtomicBool::new(false);
    let (release_tx, release_rx) = oneshot::channel::<()>();

    let holder = sem.run(|| async {
        holder_started.store(true, Ordering::SeqCst);
        release_rx.await.unwrap();
    });
    let mut holder = Box::pin(holder);
    let mut cx = Context::from_waker(noop_waker_ref());
    assert!(holder.as_mut().poll(&mut cx).is_pending());
    assert!(holder_started.load(Ordering::SeqCst));
    assert_eq!(sem.tokens(), 0);

    let mut queue: FuturesUnordered<_> = (0..WAITERS)
        .map(|n| {
            let (completed, out_of_order) = (&completed, &out_of_order);
            sem.run(move || async move {
                // Units queued in index order, so the n-th to run must be unit n.
                if completed.fetch_add(1, Ordering::Relaxed) != n {
                    out_of_order.fetch_add(1, Ordering::Relaxed);
                }
                n
            })
        })
        .collect();

    futures::executor::block_on(async {
        // The first poll queues every waiter behind the holder.
        assert!(futures::poll!(queue.next()).is_pending());
        assert_eq!(sem.waiting(), WAITERS);

        release_tx.send(()).unwrap();
        holder.await.unwrap();

        let mut sum = 0usize;
        while let Some(output) = queue.next().await {
            sum += output.unwrap();
        }
        assert_eq!(sum, WAITERS * (WAITERS - 1) / 2);
    });

    assert_eq!(sem.tokens(), 1);
    assert_eq!(sem.waiting(), 0);
    Handoff {
        completed: completed.load(Ordering::Relaxed),
        out_of_order: out_of_order.load(Ordering::Relaxed),
    }
}

#[test]
fn run_handoff_long_queue_constant_stack() {
    let worker = std::thread::Builder::new()
        .name("handoff".into())
        .stack_size(STACK_SIZE)
        .spawn(hand_token_down_queue)
        .unwrap();
    let handoff = worker.join().expect("the handoff thread panicked");
    assert_eq!(handoff.completed, WAITERS);
    assert_eq!(handoff.out_of_order, 0, "units ran out of queue order");
}
