//! A semaphore with a limit per key under a global limit.
//!
//! # Design
//!
//! One mutex guards the global count, a map of the busy keys and the
//! waiters, so a grant takes the global slot and the key's slot in one step:
//! a waiter holds both or neither. Waiting for a busy key therefore never
//! holds a global slot, and waiting for a global slot never holds a key's.
//!
//! Each key keeps its waiters in arrival order. The first `per_key - held`
//! of them are *eligible*: only the global limit stands in their way. The
//! eligible waiters of every key sit in one map ordered by arrival, and a
//! free global slot goes to the oldest of them. So a key at its limit never
//! blocks the other keys, and among keys that could run, the one that asked
//! first is served first.
//!
//! Invariants, under the lock:
//!
//! - `held <= limit`, and for each key `held + eligible <= per_key`.
//! - A key has parked waiters only when `held + eligible == per_key`.
//! - The eligible map is empty unless `held == limit`, so a newcomer that
//!   finds a free global slot and room in its key overtakes nobody.
//! - A key stays in the map only while it has holders or waiters.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use slab::Slab;

use crate::core::MAX_TOKENS;
use crate::error::{AcquireError, LimitError, TryAcquireError};

/// Runs at most `limit` units of work at once, and at most `per_key` of
/// them for any one key, queuing the rest first come, first served per key.
///
/// A key is any `Hash + Eq + Clone` value, such as a domain name. It is
/// created on its first acquire and forgotten as soon as nobody holds or
/// waits for it, so the memory follows the keys in use, not every key ever
/// seen.
///
/// A waiter holds the global slot and its key's slot together or neither,
/// so a waiter for a busy key never takes a global slot from the others.
/// A free global slot goes to the oldest waiter whose key has room.
///
/// A handle is cheap to clone; clones share the same slots.
///
/// # Examples
///
/// ```
/// use deferred_semaphore::KeyedSemaphore;
///
/// # futures::executor::block_on(async {
/// let sem = KeyedSemaphore::new(4, 1);
/// let first = sem.acquire("example.com").await.unwrap();
/// // The key is at its limit of 1, but other keys still get slots.
/// assert!(sem.try_acquire("example.com").is_err());
/// let other = sem.try_acquire("example.org").unwrap();
/// assert_eq!(sem.held(), 2);
/// drop((first, other));
/// assert_eq!(sem.keys(), 0);
/// # });
/// ```
pub struct KeyedSemaphore<K> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for KeyedSemaphore<K> {
    fn clone(&self) -> Self {
        KeyedSemaphore {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K> fmt::Debug for KeyedSemaphore<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("KeyedSemaphore")
            .field("limit", &state.limit)
            .field("per_key", &state.per_key)
            .field("held", &state.held)
            .field("keys", &state.keys.len())
            .field("waiting", &state.waiters.len())
            .finish()
    }
}

struct Shared<K> {
    state: Mutex<State<K>>,
}

struct State<K> {
    limit: usize,
    per_key: usize,
    held: usize,
    closed: bool,
    /// The arrival number of the next waiter.
    next_seq: u64,
    keys: HashMap<K, KeyState>,
    waiters: Slab<Waiter<K>>,
    /// The eligible waiters, by arrival number.
    eligible: BTreeMap<u64, usize>,
}

#[derive(Default)]
struct KeyState {
    held: usize,
    eligible: usize,
    /// Waiters that wait for room in this key, in arrival order.
    parked: VecDeque<usize>,
}

struct Waiter<K> {
    key: K,
    seq: u64,
    waker: Option<Waker>,
    status: Status,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Status {
    Parked,
    Eligible,
    Granted,
    Failed,
}

impl<K> Shared<K> {
    fn lock(&self) -> MutexGuard<'_, State<K>> {
        // No code panics while holding the lock, so a poisoned lock still
        // holds a consistent state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<K: Hash + Eq + Clone> State<K> {
    /// Returns whether a newcomer for `key` could take both slots now.
    fn has_room(&self, key: &K) -> bool {
        if self.closed || self.held >= self.limit {
            return false;
        }
        match self.keys.get(key) {
            Some(state) => state.parked.is_empty() && state.held + state.eligible < self.per_key,
            None => true,
        }
    }

    fn take(&mut self, key: &K) {
        self.held += 1;
        match self.keys.get_mut(key) {
            Some(state) => state.held += 1,
            None => {
                let state = KeyState {
                    held: 1,
                    ..KeyState::default()
                };
                self.keys.insert(key.clone(), state);
            }
        }
    }

    /// Queues a waiter for `key` and returns its slab index.
    fn enqueue(&mut self, key: K, waker: Waker) -> usize {
        let seq = self.next_seq;
        self.next_seq += 1;
        let per_key = self.per_key;
        let state = self.keys.entry(key.clone()).or_default();
        let eligible = state.parked.is_empty() && state.held + state.eligible < per_key;
        let status = if eligible {
            Status::Eligible
        } else {
            Status::Parked
        };
        let id = self.waiters.insert(Waiter {
            key,
            seq,
            waker: Some(waker),
            status,
        });
        if eligible {
            state.eligible += 1;
            self.eligible.insert(seq, id);
        } else {
            state.parked.push_back(id);
        }
        id
    }

    /// Makes the first parked waiter of `key` eligible if the key has room.
    fn promote(&mut self, key: &K) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        if state.held + state.eligible >= self.per_key {
            return;
        }
        let Some(id) = state.parked.pop_front() else {
            return;
        };
        state.eligible += 1;
        let waiter = &mut self.waiters[id];
        waiter.status = Status::Eligible;
        self.eligible.insert(waiter.seq, id);
    }

    /// Grants free global slots to the oldest eligible waiters and collects
    /// their wakers.
    fn dispatch(&mut self, wakers: &mut Vec<Waker>) {
        while self.held < self.limit {
            let Some((_, id)) = self.eligible.pop_first() else {
                return;
            };
            let waiter = &mut self.waiters[id];
            waiter.status = Status::Granted;
            wakers.extend(waiter.waker.take());
            let state = self
                .keys
                .get_mut(&waiter.key)
                .expect("a waiter's key stays in the map");
            state.eligible -= 1;
            state.held += 1;
            self.held += 1;
        }
    }

    /// Gives back one slot of `key` and hands it on.
    fn release(&mut self, key: &K, wakers: &mut Vec<Waker>) {
        self.held -= 1;
        let state = self.keys.get_mut(key).expect("a held key stays in the map");
        state.held -= 1;
        self.promote(key);
        self.dispatch(wakers);
        self.forget_if_idle(key);
    }

    fn forget_if_idle(&mut self, key: &K) {
        let idle = self
            .keys
            .get(key)
            .is_some_and(|state| state.held == 0 && state.eligible == 0 && state.parked.is_empty());
        if idle {
            self.keys.remove(key);
        }
    }

    /// Removes a waiter whose acquire future was dropped. A waiter granted
    /// meanwhile gives its slots back to the next waiters.
    fn cancel(&mut self, id: usize, wakers: &mut Vec<Waker>) {
        let waiter = self.waiters.remove(id);
        let key = &waiter.key;
        match waiter.status {
            Status::Granted => self.release(key, wakers),
            Status::Eligible => {
                self.eligible.remove(&waiter.seq);
                if let Some(state) = self.keys.get_mut(key) {
                    state.eligible -= 1;
                }
                self.promote(key);
                self.dispatch(wakers);
                self.forget_if_idle(key);
            }
            Status::Parked => {
                if let Some(state) = self.keys.get_mut(key) {
                    // NOTE: linear in the key's queue; cancelling a parked
                    // waiter of a key with a long queue costs its length.
                    state.parked.retain(|&parked| parked != id);
                }
                self.forget_if_idle(key);
            }
            Status::Failed => {}
        }
    }
}

fn wake_all(wakers: Vec<Waker>) {
    for waker in wakers {
        waker.wake();
    }
}

impl<K: Hash + Eq + Clone> KeyedSemaphore<K> {
    /// Creates a semaphore that lets `limit` holders run at once, at most
    /// `per_key` of them with the same key.
    ///
    /// # Panics
    ///
    /// Panics if either limit is 0 or larger than `usize::MAX >> 2`; use
    /// [`try_new`](Self::try_new) to get an error instead.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::KeyedSemaphore;
    ///
    /// let sem = KeyedSemaphore::<String>::new(8, 2);
    /// assert_eq!((sem.limit(), sem.per_key_limit()), (8, 2));
    /// ```
    #[track_caller]
    pub fn new(limit: usize, per_key: usize) -> Self {
        match Self::try_new(limit, per_key) {
            Ok(sem) => sem,
            Err(error) => panic!("KeyedSemaphore::new: {error}"),
        }
    }

    /// Creates a semaphore with a global and a per-key limit, or fails on
    /// an invalid limit.
    ///
    /// # Errors
    ///
    /// Returns a [`LimitError`] if either limit is 0 or larger than
    /// `usize::MAX >> 2`.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::KeyedSemaphore;
    ///
    /// assert!(KeyedSemaphore::<u32>::try_new(4, 0).is_err());
    /// assert!(KeyedSemaphore::<u32>::try_new(4, 1).is_ok());
    /// ```
    pub fn try_new(limit: usize, per_key: usize) -> Result<Self, LimitError> {
        for value in [limit, per_key] {
            if value == 0 || value > MAX_TOKENS {
                return Err(LimitError::new(value));
            }
        }
        let state = State {
            limit,
            per_key,
            held: 0,
            closed: false,
            next_seq: 0,
            keys: HashMap::new(),
            waiters: Slab::new(),
            eligible: BTreeMap::new(),
        };
        Ok(KeyedSemaphore {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
            }),
        })
    }

    /// Waits for a slot of `key` and a global slot, and returns a permit
    /// that holds both.
    ///
    /// Waiters of one key are served in the order their futures were first
    /// polled. The future fails with [`AcquireError::Closed`] if the
    /// semaphore is closed first.
    ///
    /// # Cancel safety
    ///
    /// This method is cancel safe: dropping the future gives up its place,
    /// and slots already granted to it go to the next waiters.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::KeyedSemaphore;
    ///
    /// # futures::executor::block_on(async {
    /// let sem = KeyedSemaphore::new(2, 1);
    /// let permit = sem.acquire(7u32).await.unwrap();
    /// assert_eq!(permit.key(), &7);
    /// # });
    /// ```
    pub fn acquire(&self, key: K) -> KeyedAcquire<K> {
        KeyedAcquire {
            shared: Arc::clone(&self.shared),
            key: Some(key),
            waiter: None,
        }
    }

    /// Takes a slot of `key` and a global slot if both are free now and
    /// no waiter of `key` is queued.
    ///
    /// # Errors
    ///
    /// Returns [`TryAcquireError::NoTokens`] if either limit is reached or
    /// the key has waiters, and [`TryAcquireError::Closed`] after a close.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::KeyedSemaphore;
    ///
    /// let sem = KeyedSemaphore::new(1, 1);
    /// let held = sem.try_acquire('a').unwrap();
    /// assert!(sem.try_acquire('b').is_err());
    /// # drop(held);
    /// ```
    pub fn try_acquire(&self, key: K) -> Result<KeyedPermit<K>, TryAcquireError> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(TryAcquireError::Closed);
        }
        if !state.has_room(&key) {
            return Err(TryAcquireError::NoTokens);
        }
        state.take(&key);
        drop(state);
        Ok(KeyedPermit::new(Arc::clone(&self.shared), key))
    }

    /// Returns the most slots held at once over all keys.
    pub fn limit(&self) -> usize {
        self.shared.lock().limit
    }

    /// Returns the most slots held at once for one key.
    pub fn per_key_limit(&self) -> usize {
        self.shared.lock().per_key
    }

    /// Returns the number of slots held now, over all keys.
    pub fn held(&self) -> usize {
        self.shared.lock().held
    }

    /// Returns the number of slots held now for `key`.
    pub fn held_for(&self, key: &K) -> usize {
        self.shared
            .lock()
            .keys
            .get(key)
            .map_or(0, |state| state.held)
    }

    /// Returns the number of acquirers waiting, over all keys.
    pub fn waiting(&self) -> usize {
        self.shared.lock().waiters.len()
    }

    /// Returns the number of keys tracked now: those with a holder or a
    /// waiter. Idle keys are forgotten at once.
    pub fn keys(&self) -> usize {
        self.shared.lock().keys.len()
    }

    /// Closes the semaphore: every waiter and every later acquire fails
    /// with [`AcquireError::Closed`]. Permits already held stay valid.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::{AcquireError, KeyedSemaphore};
    ///
    /// # futures::executor::block_on(async {
    /// let sem = KeyedSemaphore::new(1, 1);
    /// sem.close();
    /// assert_eq!(sem.acquire(1u8).await.unwrap_err(), AcquireError::Closed);
    /// # });
    /// ```
    pub fn close(&self) {
        let mut wakers = Vec::new();
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        state.closed = true;
        state.eligible.clear();
        for (_, waiter) in state.waiters.iter_mut() {
            if matches!(waiter.status, Status::Parked | Status::Eligible) {
                waiter.status = Status::Failed;
                wakers.extend(waiter.waker.take());
                if let Some(key_state) = state.keys.get_mut(&waiter.key) {
                    key_state.parked.clear();
                    key_state.eligible = 0;
                }
            }
        }
        state.keys.retain(|_, key_state| key_state.held > 0);
        drop(guard);
        wake_all(wakers);
    }
}

/// A future of a [`KeyedPermit`], returned by
/// [`KeyedSemaphore::acquire`].
///
/// # Cancel safety
///
/// Dropping the future before it completes leaves the queue at once, and
/// slots already granted to it go to the next waiters.
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct KeyedAcquire<K: Hash + Eq + Clone> {
    shared: Arc<Shared<K>>,
    /// The key, until the permit takes it.
    key: Option<K>,
    /// The waiter's slab index once queued.
    waiter: Option<usize>,
}

impl<K: Hash + Eq + Clone> fmt::Debug for KeyedAcquire<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedAcquire")
            .field("queued", &self.waiter.is_some())
            .field("done", &self.key.is_none())
            .finish()
    }
}

// The key is never pinned: it moves into the permit.
impl<K: Hash + Eq + Clone> Unpin for KeyedAcquire<K> {}

impl<K: Hash + Eq + Clone> Future for KeyedAcquire<K> {
    type Output = Result<KeyedPermit<K>, AcquireError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let key = this
            .key
            .as_ref()
            .expect("KeyedAcquire polled after completion");
        let mut state = this.shared.lock();
        let granted = match this.waiter {
            None => {
                if state.closed {
                    Err(AcquireError::Closed)
                } else if state.has_room(key) {
                    state.take(key);
                    Ok(())
                } else {
                    let id = state.enqueue(key.clone(), cx.waker().clone());
                    this.waiter = Some(id);
                    return Poll::Pending;
                }
            }
            Some(id) => {
                let waiter = &mut state.waiters[id];
                match waiter.status {
                    Status::Granted => {
                        state.waiters.remove(id);
                        Ok(())
                    }
                    Status::Failed => {
                        state.waiters.remove(id);
                        Err(AcquireError::Closed)
                    }
                    Status::Parked | Status::Eligible => {
                        match &waiter.waker {
                            Some(waker) if waker.will_wake(cx.waker()) => {}
                            _ => waiter.waker = Some(cx.waker().clone()),
                        }
                        return Poll::Pending;
                    }
                }
            }
        };
        drop(state);
        this.waiter = None;
        let key = this.key.take().expect("checked above");
        Poll::Ready(granted.map(|()| KeyedPermit::new(Arc::clone(&this.shared), key)))
    }
}

impl<K: Hash + Eq + Clone> Drop for KeyedAcquire<K> {
    fn drop(&mut self) {
        let Some(id) = self.waiter.take() else {
            return;
        };
        let mut wakers = Vec::new();
        self.shared.lock().cancel(id, &mut wakers);
        wake_all(wakers);
    }
}

/// A global slot and a slot of one key from a [`KeyedSemaphore`], given
/// back together when the permit is dropped.
#[must_use = "the slots are given back as soon as the permit is dropped"]
#[clippy::has_significant_drop]
pub struct KeyedPermit<K: Hash + Eq + Clone> {
    shared: Arc<Shared<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone + fmt::Debug> fmt::Debug for KeyedPermit<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedPermit")
            .field("key", &self.key)
            .finish()
    }
}

impl<K: Hash + Eq + Clone> KeyedPermit<K> {
    fn new(shared: Arc<Shared<K>>, key: K) -> Self {
        KeyedPermit { shared, key }
    }

    /// Returns the key this permit holds a slot of.
    pub fn key(&self) -> &K {
        &self.key
    }
}

impl<K: Hash + Eq + Clone> Drop for KeyedPermit<K> {
    fn drop(&mut self) {
        let mut wakers = Vec::new();
        self.shared.lock().release(&self.key, &mut wakers);
        wake_all(wakers);
    }
}
