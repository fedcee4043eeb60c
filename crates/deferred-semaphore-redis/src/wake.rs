//! Wake-ups: one pub/sub subscription per limiter dispatches the wake
//! channel to local waiters, and a local FIFO gate per key lets one task
//! per process and key poll Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{watch, Semaphore};

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

/// The longest one connection or subscription try may take, and the
/// longest wait between tries.
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
    map: Mutex<HashMap<Option<String>, Arc<GateState>>>,
}

#[derive(Debug)]
struct GateState {
    turn: Semaphore,
    /// The wait left by a grant that queued the gate in Redis as the next
    /// waiter of a full count: the next task at the gate waits for its name
    /// before its first try.
    queued: Mutex<Option<QueuedWait>>,
}

/// A wait for a named wake-up, handed from one task at a gate to the next.
#[derive(Debug)]
pub(crate) struct QueuedWait {
    pub(crate) wake: WakeWatch,
    pub(crate) global_full: bool,
}

impl Gates {
    pub(crate) async fn enter(self: &Arc<Self>, key: Option<&str>) -> Gate {
        let state = {
            let mut map = self.map.lock().expect("gate map lock");
            map.entry(key.map(str::to_owned))
                .or_insert_with(|| {
                    Arc::new(GateState {
                        turn: Semaphore::new(1),
                        queued: Mutex::new(None),
                    })
                })
                .clone()
        };
        let mut gate = Gate {
            gates: self.clone(),
            key: key.map(str::to_owned),
            state,
            permit: None,
        };
        // The semaphore is never closed.
        gate.permit = gate.state.turn.acquire().await.ok().map(|permit| {
            permit.forget();
            TurnPermit
        });
        gate
    }
}

/// Marker of the gate's single turn, which [`Gate`] gives back on drop.
#[derive(Debug)]
struct TurnPermit;

/// The turn of one waiter at its key's gate. The next waiter goes when it
/// is dropped.
#[derive(Debug)]
pub(crate) struct Gate {
    gates: Arc<Gates>,
    key: Option<String>,
    state: Arc<GateState>,
    permit: Option<TurnPermit>,
}

impl Gate {
    /// Returns whether other tasks wait at this gate. Only they, the map and
    /// this turn own its state, so a count above 2 means followers.
    pub(crate) fn has_followers(&self) -> bool {
        Arc::strong_count(&self.state) > 2
    }

    /// Leaves `wait` for the next task at this gate.
    pub(crate) fn hand_over(&self, wait: QueuedWait) {
        *self.state.queued.lock().expect("gate wait lock") = Some(wait);
    }

    /// Takes the wait left by the previous task, if any.
    pub(crate) fn take_queued(&self) -> Option<QueuedWait> {
        self.state.queued.lock().expect("gate wait lock").take()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let mut map = self.gates.map.lock().expect("gate map lock");
        if self.permit.take().is_some() {
            self.state.turn.add_permits(1);
        }
        // Only the map and this turn own the state, so no task waits at this
        // gate.
        if Arc::strong_count(&self.state) == 2 {
            map.remove(&self.key);
        }
    }
}
