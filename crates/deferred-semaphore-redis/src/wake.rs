//! Wake-ups: one pub/sub subscription per limiter dispatches the wake
//! channel to local waiters, and a local FIFO gate per key lets one task
//! per process and key poll Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// Wake-up signals for local waiters: one for "any capacity grew" and one
/// per key with a waiter.
#[derive(Debug)]
pub(crate) struct Wakes {
    any: watch::Sender<u64>,
    keys: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Wakes {
    pub(crate) fn new() -> Self {
        Self {
            any: watch::Sender::new(0),
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Dispatches one message of the wake channel. A key name wakes that
    /// key's waiters and every waiter on the global count. An empty message
    /// wakes every waiter.
    pub(crate) fn dispatch(&self, payload: &str) {
        let keys = self.keys.lock().expect("wake map lock");
        if payload.is_empty() {
            for sender in keys.values() {
                sender.send_modify(|n| *n += 1);
            }
        } else if let Some(sender) = keys.get(payload) {
            sender.send_modify(|n| *n += 1);
        }
        drop(keys);
        self.any.send_modify(|n| *n += 1);
    }

    /// Starts watching before a try, so that a wake-up sent while the try
    /// is on its way is not missed.
    pub(crate) fn watch(self: &Arc<Self>, key: Option<&str>) -> WakeWatch {
        let key_receiver = key.map(|key| {
            let mut keys = self.keys.lock().expect("wake map lock");
            keys.entry(key.to_owned())
                .or_insert_with(|| watch::Sender::new(0))
                .subscribe()
        });
        WakeWatch {
            wakes: self.clone(),
            key: key.map(str::to_owned),
            any: self.any.subscribe(),
            key_receiver,
        }
    }
}

/// The wake-ups one waiter listens to during one wait.
#[derive(Debug)]
pub(crate) struct WakeWatch {
    wakes: Arc<Wakes>,
    key: Option<String>,
    any: watch::Receiver<u64>,
    key_receiver: Option<watch::Receiver<u64>>,
}

impl WakeWatch {
    /// Waits for a wake-up or `timeout`, whichever comes first. A waiter
    /// blocked by its key alone listens to that key; one blocked by the
    /// global count listens to every release.
    pub(crate) async fn wait(&mut self, global_full: bool, timeout: Duration) {
        let sleep = tokio::time::sleep(timeout);
        match (&mut self.key_receiver, global_full) {
            (Some(key), false) => {
                tokio::select! {
                    _ = key.changed() => {}
                    _ = sleep => {}
                }
            }
            _ => {
                tokio::select! {
                    _ = self.any.changed() => {}
                    _ = sleep => {}
                }
            }
        }
    }
}

impl Drop for WakeWatch {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let mut keys = self.wakes.keys.lock().expect("wake map lock");
        self.key_receiver = None;
        if keys.get(&key).is_some_and(|s| s.receiver_count() == 0) {
            keys.remove(&key);
        }
    }
}

/// Keeps one subscription to `channel` and dispatches its messages. After
/// each (re)subscription every waiter retries once, because messages sent
/// while the subscription was down are lost.
pub(crate) async fn run_subscriber(client: redis::Client, channel: String, wakes: Arc<Wakes>) {
    const STEP: Duration = Duration::from_secs(2);
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Ok(Ok(mut pubsub)) = tokio::time::timeout(STEP, client.get_async_pubsub()).await {
            if let Ok(Ok(())) = tokio::time::timeout(STEP, pubsub.subscribe(&channel)).await {
                backoff = Duration::from_millis(100);
                wakes.dispatch("");
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let payload: String = message.get_payload().unwrap_or_default();
                    wakes.dispatch(&payload);
                }
            }
        }
        // NOTE: a half-open connection (no RST) keeps the stream silent
        // until the kernel gives up; waiters still poll every poll_max.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(STEP);
    }
}

/// Local FIFO gates: one task per process and key tries Redis while the
/// others queue here in arrival order.
#[derive(Debug, Default)]
pub(crate) struct Gates {
    map: Mutex<HashMap<Option<String>, Arc<Semaphore>>>,
}

impl Gates {
    pub(crate) async fn enter(self: &Arc<Self>, key: Option<&str>) -> Gate {
        let mut gate = Gate {
            gates: self.clone(),
            key: key.map(str::to_owned),
            permit: None,
        };
        let semaphore = {
            let mut map = self.map.lock().expect("gate map lock");
            map.entry(gate.key.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(1)))
                .clone()
        };
        // The semaphore is never closed.
        gate.permit = semaphore.acquire_owned().await.ok();
        gate
    }
}

/// The turn of one waiter at its key's gate; the next waiter goes when it
/// is dropped.
#[derive(Debug)]
pub(crate) struct Gate {
    gates: Arc<Gates>,
    key: Option<String>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        let mut map = self.gates.map.lock().expect("gate map lock");
        self.permit = None;
        // Only the map holds it: nobody waits at this gate.
        if map
            .get(&self.key)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            map.remove(&self.key);
        }
    }
}
