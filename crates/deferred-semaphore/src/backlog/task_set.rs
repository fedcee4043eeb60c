//! The running tasks of a backlog, polled only when woken, in slots that are
//! reused from one item to the next.
//!
//! This does what futures' `FuturesUnordered` does for backlog processing,
//! but keeps each slot's pinned box and waker when its task ends, so that a
//! backlog of millions of items allocates only as many tasks as ever run at
//! once.
//!
//! Slots come in groups of 64, and each group has a mask with one bit per
//! slot. A slot's waker sets its bit with one atomic `fetch_or`. Only the
//! wake that finds its group's mask empty takes the lock, because it lists
//! the group and wakes the polling task. A refill takes the listed groups and
//! clears their masks, so a wave of wakes costs one lock per group and one
//! wake of the polling task.
//!
//! A slot is polled only after its waker was called, or once after a task was
//! pushed into it. Wakers are shared by every task a slot ever holds, so a
//! late wake from an earlier task can poll the slot's current task once more
//! than needed, which the `Future` contract allows.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

/// Slots per group: the bits of one mask.
const GROUP_SLOTS: usize = 64;

pub(crate) struct TaskSet<T> {
    slots: Vec<Slot<T>>,
    groups: Vec<Arc<Group>>,
    /// Empty slots, reused before any new slot is made.
    free: Vec<usize>,
    /// Slots filled since the last refill, which need their first poll.
    fresh: Vec<usize>,
    /// Slots being polled now, found at the last refill.
    batch: Vec<usize>,
    /// The position in `batch` of the next slot to poll.
    cursor: usize,
    /// The groups listed at the last refill, kept to reuse its memory.
    listed: Vec<usize>,
    ready: Arc<ReadyList>,
    len: usize,
}

struct Slot<T> {
    task: Pin<Box<Option<T>>>,
    waker: Waker,
}

/// The groups with woken slots, and the waker of the task that polls the
/// set.
struct ReadyList {
    state: Mutex<Ready>,
}

#[derive(Default)]
struct Ready {
    groups: Vec<usize>,
    /// Taken by the first wake after a refill, so a wave of wakes wakes the
    /// polling task once.
    parent: Option<Waker>,
}

impl ReadyList {
    fn lock(&self) -> MutexGuard<'_, Ready> {
        // Nothing panics while holding the lock, so a poisoned lock still
        // holds a consistent list.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The woken slots of one group of 64.
///
/// Invariant: while the mask is not 0, the group is in the ready list or in
/// a refill under way, so no wake is lost and no group is listed twice.
struct Group {
    index: usize,
    mask: AtomicU64,
    ready: Arc<ReadyList>,
}

/// The waker of one slot.
struct Signal {
    group: Arc<Group>,
    bit: u64,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let group = &self.group;
        // The release half publishes whatever made the slot ready to the
        // refill that clears the mask.
        if group.mask.fetch_or(self.bit, Ordering::AcqRel) != 0 {
            return;
        }
        let mut ready = group.ready.lock();
        ready.groups.push(group.index);
        let parent = ready.parent.take();
        drop(ready);
        if let Some(parent) = parent {
            parent.wake();
        }
    }
}

impl<T> TaskSet<T> {
    pub(crate) fn new() -> Self {
        TaskSet {
            slots: Vec::new(),
            groups: Vec::new(),
            free: Vec::new(),
            fresh: Vec::new(),
            batch: Vec::new(),
            cursor: 0,
            listed: Vec::new(),
            ready: Arc::new(ReadyList {
                state: Mutex::new(Ready::default()),
            }),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a task, to be polled for the first time by the next `poll_next`
    /// that refills its batch.
    pub(crate) fn push(&mut self, task: T) {
        let index = match self.free.pop() {
            Some(index) => {
                self.slots[index].task.as_mut().set(Some(task));
                index
            }
            None => self.add_slot(task),
        };
        self.len += 1;
        self.fresh.push(index);
    }

    fn add_slot(&mut self, task: T) -> usize {
        let index = self.slots.len();
        let group_index = index / GROUP_SLOTS;
        if group_index == self.groups.len() {
            self.groups.push(Arc::new(Group {
                index: group_index,
                mask: AtomicU64::new(0),
                ready: Arc::clone(&self.ready),
            }));
        }
        let signal = Signal {
            group: Arc::clone(&self.groups[group_index]),
            bit: 1 << (index % GROUP_SLOTS),
        };
        self.slots.push(Slot {
            task: Box::pin(Some(task)),
            waker: Waker::from(Arc::new(signal)),
        });
        index
    }

    /// Returns the tasks still running.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().filter_map(|slot| (*slot.task).as_ref())
    }

    /// Drops every running task, in slot order.
    pub(crate) fn clear(&mut self) {
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if slot.task.is_some() {
                slot.task.as_mut().set(None);
                self.free.push(index);
            }
        }
        self.len = 0;
        // Bits set in the masks stay: they find their slots empty or give a
        // later task one extra poll.
        self.batch.clear();
        self.cursor = 0;
        self.fresh.clear();
    }

    /// Collects the woken slots and the fresh ones into `batch`, and
    /// registers `cx`'s waker for the next wake. Returns whether there is
    /// anything to poll.
    fn refill(&mut self, cx: &Context<'_>) -> bool {
        self.batch.clear();
        self.cursor = 0;
        let mut ready = self.ready.lock();
        std::mem::swap(&mut self.listed, &mut ready.groups);
        match &ready.parent {
            Some(parent) if parent.will_wake(cx.waker()) => {}
            _ => ready.parent = Some(cx.waker().clone()),
        }
        drop(ready);
        for &group_index in &self.listed {
            // The acquire half makes what each wake published visible to
            // the polls below.
            let mut mask = self.groups[group_index].mask.swap(0, Ordering::AcqRel);
            while mask != 0 {
                let bit = mask.trailing_zeros() as usize;
                mask &= mask - 1;
                self.batch.push(group_index * GROUP_SLOTS + bit);
            }
        }
        self.listed.clear();
        self.batch.append(&mut self.fresh);
        !self.batch.is_empty()
    }
}

impl<T: Future> TaskSet<T> {
    /// Polls woken tasks until one finishes and returns its output.
    ///
    /// Returns `Ready(None)` when the set is empty, and `Pending` once the
    /// current batch and at most one refill found no finished task. The
    /// single refill bounds the work of one call even when a task wakes
    /// itself on every poll.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<T::Output>> {
        if self.len == 0 {
            return Poll::Ready(None);
        }
        let mut refilled = false;
        loop {
            if self.cursor == self.batch.len() {
                if refilled || !self.refill(cx) {
                    return Poll::Pending;
                }
                refilled = true;
            }
            let index = self.batch[self.cursor];
            self.cursor += 1;
            let slot = &mut self.slots[index];
            let Some(task) = slot.task.as_mut().as_pin_mut() else {
                continue;
            };
            let mut task_cx = Context::from_waker(&slot.waker);
            if let Poll::Ready(output) = task.poll(&mut task_cx) {
                slot.task.as_mut().set(None);
                self.free.push(index);
                self.len -= 1;
                return Poll::Ready(Some(output));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::{pending, ready, Future};
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    use futures::channel::oneshot;
    use futures::executor::block_on;
    use futures::future::{poll_fn, BoxFuture, FutureExt};
    use futures::task::noop_waker;

    use super::TaskSet;

    fn poll_once<T: Future>(set: &mut TaskSet<T>) -> Poll<Option<T::Output>> {
        let waker = noop_waker();
        set.poll_next(&mut Context::from_waker(&waker))
    }

    #[test]
    fn finished_slots_are_reused() {
        let mut set = TaskSet::new();
        for round in 0..10u32 {
            for n in 0..3 {
                set.push(ready(round * 3 + n));
            }
            let mut outputs = Vec::new();
            while let Poll::Ready(Some(output)) = poll_once(&mut set) {
                outputs.push(output);
            }
            outputs.sort_unstable();
            assert_eq!(outputs, [round * 3, round * 3 + 1, round * 3 + 2]);
        }
        assert!(set.is_empty());
        assert_eq!(set.slots.len(), 3);
    }

    #[test]
    fn empty_set_is_done() {
        let mut set = TaskSet::<std::future::Ready<()>>::new();
        assert_eq!(poll_once(&mut set), Poll::Ready(None));
    }

    #[test]
    fn wake_from_another_thread_polls_again() {
        let mut set = TaskSet::new();
        let (sender, receiver) = oneshot::channel::<u32>();
        set.push(receiver);
        assert_eq!(poll_once(&mut set), Poll::Pending);

        let sending = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            sender.send(7).unwrap();
        });
        // block_on parks until the set's wake reaches its waker, so this
        // only returns if the wake from the other thread got through.
        let output = block_on(poll_fn(|cx| set.poll_next(cx)));
        sending.join().unwrap();

        assert_eq!(output, Some(Ok(7)));
        assert!(set.is_empty());
    }

    #[test]
    fn wakes_reach_every_group() {
        let mut set = TaskSet::new();
        let mut senders = Vec::new();
        for _ in 0..200 {
            let (sender, receiver) = oneshot::channel::<usize>();
            senders.push(sender);
            set.push(receiver);
        }
        assert_eq!(poll_once(&mut set), Poll::Pending);
        assert_eq!(set.groups.len(), 4);

        let sending = std::thread::spawn(move || {
            for (value, sender) in senders.into_iter().enumerate().rev() {
                sender.send(value).unwrap();
            }
        });
        let mut outputs = Vec::new();
        while let Some(output) = block_on(poll_fn(|cx| set.poll_next(cx))) {
            outputs.push(output.unwrap());
        }
        sending.join().unwrap();

        outputs.sort_unstable();
        assert_eq!(outputs, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn self_waking_task_returns_pending() {
        let mut set = TaskSet::new();
        set.push(poll_fn(|cx: &mut Context<'_>| -> Poll<()> {
            cx.waker().wake_by_ref();
            Poll::Pending
        }));
        assert_eq!(poll_once(&mut set), Poll::Pending);
        assert_eq!(poll_once(&mut set), Poll::Pending);
        assert_eq!(set.len(), 1);
    }

    /// Returns a task that stores its waker and finishes, so that the test
    /// can wake the slot late, as a timer or a channel may.
    fn finish_storing_waker(stored: Arc<Mutex<Option<Waker>>>) -> BoxFuture<'static, u32> {
        poll_fn(move |cx: &mut Context<'_>| {
            *stored.lock().unwrap() = Some(cx.waker().clone());
            Poll::Ready(1)
        })
        .boxed()
    }

    #[test]
    fn late_wake_does_not_lose_the_next_task() {
        let mut set: TaskSet<BoxFuture<'static, u32>> = TaskSet::new();
        let stored = Arc::new(Mutex::new(None));
        set.push(finish_storing_waker(Arc::clone(&stored)));
        assert_eq!(poll_once(&mut set), Poll::Ready(Some(1)));

        // The next task in the same slot waits on a channel. The late wake
        // gives it one extra poll, and the channel's own wake still works.
        let (sender, receiver) = oneshot::channel::<u32>();
        set.push(receiver.map(|value| value.unwrap()).boxed());
        assert_eq!(poll_once(&mut set), Poll::Pending);
        stored.lock().unwrap().take().unwrap().wake();
        assert_eq!(poll_once(&mut set), Poll::Pending);

        sender.send(2).unwrap();
        assert_eq!(poll_once(&mut set), Poll::Ready(Some(2)));
    }

    #[test]
    fn clear_drops_tasks_and_keeps_slots_usable() {
        let mut set: TaskSet<Pin<Box<dyn Future<Output = u32> + Send>>> = TaskSet::new();
        let (sender, receiver) = oneshot::channel::<()>();
        set.push(Box::pin(pending()));
        set.push(Box::pin(async move {
            // Dropping this task drops the receiver, which cancels the sender.
            let _ = receiver.await;
            0
        }));
        assert_eq!(poll_once(&mut set), Poll::Pending);
        // Pushed but never polled, so its slot is listed in `fresh`.
        set.push(Box::pin(pending()));

        set.clear();

        assert!(set.is_empty());
        assert!(sender.is_canceled());
        for n in 1..=3 {
            set.push(Box::pin(ready(n)));
        }
        let mut outputs = Vec::new();
        while let Poll::Ready(Some(output)) = poll_once(&mut set) {
            outputs.push(output);
        }
        outputs.sort_unstable();
        assert_eq!(outputs, [1, 2, 3]);
        assert_eq!(set.slots.len(), 3);
    }
}
