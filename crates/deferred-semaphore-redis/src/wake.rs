//! Wake-ups: one pub/sub subscription per limiter dispatches the wake
//! channel to local waiters, and a local FIFO gate per key lets one task
//! per process and key poll Redis.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};

use crate::permit::RedisPermit;

/// Wake-up signals for local waiters: one per gate (the global acquire or
/// one key) with a waiter, and one for "any capacity grew".
#[derive(Debug)]
pub(crate) struct Wakes {
    /// The limiter's token, as it appears in the waiter queues.
    token: String,
    any: watch::Sender<u64>,
    gates: Mutex<HashMap<Option<String>, watch::Sender<u64>>>,
}

impl Wakes {
    pub(crate) fn new(token: String) -> Self {
        Self {
            token,
            any: watch::Sender::new(0),
            gates: Mutex::new(HashMap::new()),
        }
    }

    /// Dispatches one message of the wake channel (see
    /// [`Namespace::wake_channel`](crate::scripts::Namespace::wake_channel)).
    /// A message that names this limiter wakes the waiter of the named
    /// gate, and one that names another limiter wakes no waiter. An empty
    /// message wakes every waiter. Any other message is a key name from a
    /// release of an earlier version: it wakes that key's waiter and every
    /// waiter blocked by the global count.
    pub(crate) fn dispatch(&self, payload: &str) {
        if let Some((token, key)) = payload.strip_prefix('@').and_then(|m| m.split_once(':')) {
            if token == self.token {
                let gate = (!key.is_empty()).then(|| key.to_owned());
                let gates = self.gates.lock().expect("wake map lock");
                if let Some(sender) = gates.get(&gate) {
                    sender.send_modify(|n| *n += 1);
                }
            }
            return;
        }
        let gates = self.gates.lock().expect("wake map lock");
        if payload.is_empty() {
            for sender in gates.values() {
                sender.send_modify(|n| *n += 1);
            }
        } else if let Some(sender) = gates.get(&Some(payload.to_owned())) {
            sender.send_modify(|n| *n += 1);
        }
        drop(gates);
        self.any.send_modify(|n| *n += 1);
    }

    /// Starts watching before a try, so that a wake-up sent while the try
    /// is on its way is not missed.
    pub(crate) fn watch(self: &Arc<Self>, key: Option<&str>) -> WakeWatch {
        let gate = key.map(str::to_owned);
        let gate_receiver = {
            let mut gates = self.gates.lock().expect("wake map lock");
            gates
                .entry(gate.clone())
                .or_insert_with(|| watch::Sender::new(0))
                .subscribe()
        };
        WakeWatch {
            wakes: self.clone(),
            gate,
            any: self.any.subscribe(),
            gate_receiver: Some(gate_receiver),
        }
    }
}

/// The wake-ups one waiter listens to during one wait.
#[derive(Debug)]
pub(crate) struct WakeWatch {
    wakes: Arc<Wakes>,
    gate: Option<String>,
    any: watch::Receiver<u64>,
    gate_receiver: Option<watch::Receiver<u64>>,
}

impl WakeWatch {
    /// Waits for a wake-up or `timeout`, whichever comes first. A waiter
    /// listens to the messages for its gate. One blocked by the global
    /// count also listens to the messages of earlier versions, which name
    /// no waiter.
    pub(crate) async fn wait(&mut self, global_full: bool, timeout: Duration) {
        let sleep = tokio::time::sleep(timeout);
        let Some(gate) = &mut self.gate_receiver else {
            return;
        };
        if global_full {
            tokio::select! {
                _ = gate.changed() => {}
                _ = self.any.changed() => {}
                _ = sleep => {}
            }
        } else {
            tokio::select! {
                _ = gate.changed() => {}
                _ = sleep => {}
            }
        }
    }
}

impl Drop for WakeWatch {
    fn drop(&mut self) {
        let mut gates = self.wakes.gates.lock().expect("wake map lock");
        self.gate_receiver = None;
        if gates
            .get(&self.gate)
            .is_some_and(|s| s.receiver_count() == 0)
        {
            gates.remove(&self.gate);
        }
    }
}

/// The time limit of one connection or subscription try, and the maximum
/// wait between tries.
pub(crate) const SUBSCRIBE_STEP: Duration = Duration::from_secs(2);

/// Keeps one subscription to `channel` and dispatches its messages. After
/// each (re)subscription every waiter retries once, because messages sent
/// while the subscription was down are lost.
///
/// `subscribed` is sent once the first subscription holds, so that
/// `connect` can return only when wake-ups reach this process.
pub(crate) async fn run_subscriber(
    client: redis::Client,
    channel: String,
    wakes: Arc<Wakes>,
    subscribed: tokio::sync::oneshot::Sender<()>,
) {
    let mut subscribed = Some(subscribed);
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Ok(Ok(mut pubsub)) =
            tokio::time::timeout(SUBSCRIBE_STEP, client.get_async_pubsub()).await
        {
            if let Ok(Ok(())) =
                tokio::time::timeout(SUBSCRIBE_STEP, pubsub.subscribe(&channel)).await
            {
                backoff = Duration::from_millis(100);
                if let Some(subscribed) = subscribed.take() {
                    let _ = subscribed.send(());
                }
                wakes.dispatch("");
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let payload: String = message.get_payload().unwrap_or_default();
                    wakes.dispatch(&payload);
                }
            }
        }
        // NOTE: a half-open connection (no RST) keeps the stream silent
        // until the kernel gives up. Waiters still poll every poll_max.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(SUBSCRIBE_STEP);
    }
}

/// Local FIFO gates: one task per process and key tries Redis while the
/// others queue here in arrival order.
#[derive(Debug, Default)]
pub(crate) struct Gates {
    map: Mutex<HashMap<Option<String>, GateState>>,
}

/// The state of a gate whose turn a task holds. A gate whose turn is free
/// has no entry in the map.
#[derive(Debug, Default)]
struct GateState {
    /// The tasks waiting at the gate, oldest first. A sender whose
    /// receiver is closed belongs to a task that gave up.
    waiters: VecDeque<oneshot::Sender<Handoff>>,
    /// The wait left by a grant that queued the gate in Redis as the next
    /// waiter of a full count: the next task at the gate waits for its name
    /// before its first try.
    queued: Option<QueuedWait>,
}

/// The message a waiting task receives when it leaves the queue of a gate.
#[derive(Debug)]
enum Handoff {
    /// The turn to try Redis.
    Turn,
    /// A permit granted in one batch with an earlier task's permit.
    Grant(RedisPermit),
}

/// A wait for a named wake-up, handed from one task at a gate to the next.
#[derive(Debug)]
pub(crate) struct QueuedWait {
    pub(crate) wake: WakeWatch,
    pub(crate) global_full: bool,
}

/// The result of entering a gate.
#[derive(Debug)]
pub(crate) enum Entry {
    /// The task has the turn and tries Redis.
    Turn(Gate),
    /// An earlier task's batch granted this permit for the task.
    Granted(RedisPermit),
}

impl Gates {
    /// Waits for the turn at the gate of `key` or for a permit from an
    /// earlier task's batch, in order of arrival.
    pub(crate) async fn enter(self: &Arc<Self>, key: Option<&str>) -> Entry {
        let gate_key = key.map(str::to_owned);
        let receiver = {
            let mut map = self.map.lock().expect("gate map lock");
            let Some(state) = map.get_mut(&gate_key) else {
                map.insert(gate_key.clone(), GateState::default());
                return Entry::Turn(self.gate(gate_key));
            };
            let (sender, receiver) = oneshot::channel();
            state.waiters.push_back(sender);
            receiver
        };
        let mut waiting = Waiting {
            gates: self.clone(),
            key: gate_key.clone(),
            receiver,
        };
        match (&mut waiting.receiver).await {
            Ok(Handoff::Grant(permit)) => Entry::Granted(permit),
            // A sender is only dropped unsent when the limiter is gone, so
            // taking the turn then is harmless.
            Ok(Handoff::Turn) | Err(_) => Entry::Turn(self.gate(gate_key)),
        }
    }

    fn gate(self: &Arc<Self>, key: Option<String>) -> Gate {
        Gate {
            gates: self.clone(),
            key,
            grants: Vec::new(),
        }
    }

    /// Hands `grants` to the oldest waiting tasks, one each, then the turn
    /// to the next one, or frees the gate when no task waits. Returns the
    /// grants that no task took.
    fn pass_on(
        &self,
        key: &Option<String>,
        grants: Vec<RedisPermit>,
        turn: bool,
    ) -> Vec<RedisPermit> {
        let mut map = self.map.lock().expect("gate map lock");
        let Some(state) = map.get_mut(key) else {
            return grants;
        };
        let mut unused = Vec::new();
        for permit in grants {
            if let Some(Handoff::Grant(permit)) =
                send_to_next(&mut state.waiters, Handoff::Grant(permit))
            {
                unused.push(permit);
            }
        }
        if turn && send_to_next(&mut state.waiters, Handoff::Turn).is_some() {
            map.remove(key);
        }
        unused
    }
}

/// Sends `handoff` to the oldest waiter that still waits, and returns it
/// when none does.
fn send_to_next(
    waiters: &mut VecDeque<oneshot::Sender<Handoff>>,
    mut handoff: Handoff,
) -> Option<Handoff> {
    while let Some(waiter) = waiters.pop_front() {
        match waiter.send(handoff) {
            Ok(()) => return None,
            Err(back) => handoff = back,
        }
    }
    Some(handoff)
}

/// A task waiting at a gate. When it gives up, a turn or grant already sent
/// to it passes on to the next task.
struct Waiting {
    gates: Arc<Gates>,
    key: Option<String>,
    receiver: oneshot::Receiver<Handoff>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.receiver.close();
        let unused = match self.receiver.try_recv() {
            Ok(Handoff::Turn) => self.gates.pass_on(&self.key, Vec::new(), true),
            Ok(Handoff::Grant(permit)) => self.gates.pass_on(&self.key, vec![permit], false),
            Err(_) => Vec::new(),
        };
        // Each permit releases its lease in the background.
        drop(unused);
    }
}

/// The turn of one task at its key's gate. The next task goes when it is
/// dropped.
#[derive(Debug)]
pub(crate) struct Gate {
    gates: Arc<Gates>,
    key: Option<String>,
    /// Permits for the next tasks at the gate, handed out on drop.
    grants: Vec<RedisPermit>,
}

impl Gate {
    /// Returns the number of other tasks waiting at this gate.
    pub(crate) fn followers(&self) -> usize {
        let map = self.gates.map.lock().expect("gate map lock");
        map.get(&self.key).map_or(0, |state| {
            state.waiters.iter().filter(|w| !w.is_closed()).count()
        })
    }

    /// Leaves `wait` for the next task at this gate.
    pub(crate) fn hand_over(&self, wait: QueuedWait) {
        let mut map = self.gates.map.lock().expect("gate map lock");
        if let Some(state) = map.get_mut(&self.key) {
            state.queued = Some(wait);
        }
    }

    /// Takes the wait left by the previous task, if any.
    pub(crate) fn take_queued(&self) -> Option<QueuedWait> {
        let mut map = self.gates.map.lock().expect("gate map lock");
        map.get_mut(&self.key).and_then(|state| state.queued.take())
    }

    /// Keeps `permits` for the next tasks at this gate, one each, handed
    /// out when this turn ends. Those that no task takes are dropped, and so
    /// released.
    pub(crate) fn pass_grants(&mut self, permits: Vec<RedisPermit>) {
        self.grants.extend(permits);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let grants = std::mem::take(&mut self.grants);
        let unused = self.gates.pass_on(&self.key, grants, true);
        // Each permit releases its lease in the background.
        drop(unused);
    }
}
