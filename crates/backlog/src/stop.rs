//! The shared stop request of a run: Ctrl-C, SIGTERM, `--deadline` and
//! `--halt` raise it, and every item's work watches it.

use std::fmt;
use std::time::Duration;

use tokio::sync::watch;

use crate::duration::format_duration;

/// How far a run is stopping. Each level includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopLevel {
    /// Items start and retry as usual.
    Running,
    /// Nothing new starts, retries included, and running commands finish.
    Soon,
    /// Running commands are terminated as on a timeout.
    Now,
}

/// The cause of a run stopping before its input ran out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    /// SIGINT, from Ctrl-C on a terminal.
    Interrupt,
    /// SIGTERM.
    Terminate,
    /// The `--deadline` of the whole run passed.
    Deadline(Duration),
    /// The `--halt` threshold of failed items was reached.
    Halt(String),
    /// The shared limiter (`--limiter`) could not grant a permit, so the
    /// run fails closed.
    Limiter {
        /// The limiter's URL, without its password.
        url: String,
        /// The error to report, with what to do about it.
        message: String,
    },
}

/// The stop request: the level and the first cause that raised it.
#[derive(Debug, Clone)]
struct StopState {
    level: StopLevel,
    cause: Option<StopCause>,
    signals: u32,
}

/// The sending side of the stop request, owned by the run.
#[derive(Debug)]
pub struct Stop {
    sender: watch::Sender<StopState>,
}

/// A receiver of the stop request, one per waiting party.
#[derive(Debug, Clone)]
pub struct StopWatch {
    receiver: watch::Receiver<StopState>,
}

impl Default for Stop {
    fn default() -> Self {
        let state = StopState {
            level: StopLevel::Running,
            cause: None,
            signals: 0,
        };
        Stop {
            sender: watch::Sender::new(state),
        }
    }
}

impl Stop {
    /// Raises the stop level to `level`, never lowering it. The first cause
    /// is kept, except that a signal replaces any other cause, because the
    /// exit status reports signals first.
    pub fn request(&self, level: StopLevel, cause: StopCause) {
        self.sender.send_modify(|state| {
            state.level = state.level.max(level);
            let is_signal = matches!(cause, StopCause::Interrupt | StopCause::Terminate);
            if is_signal {
                state.signals += 1;
            }
            let cause_is_signal = matches!(
                state.cause,
                Some(StopCause::Interrupt | StopCause::Terminate)
            );
            if state.cause.is_none() || (is_signal && !cause_is_signal) {
                state.cause = Some(cause);
            }
        });
    }

    /// Records a SIGINT or SIGTERM: the first stops the run soon, the
    /// second stops it now. Returns the new level.
    pub fn signal(&self, cause: StopCause) -> StopLevel {
        let level = if self.sender.borrow().signals == 0 {
            StopLevel::Soon
        } else {
            StopLevel::Now
        };
        self.request(level, cause);
        level
    }

    /// Returns a receiver for the work of items.
    pub fn watch(&self) -> StopWatch {
        StopWatch {
            receiver: self.sender.subscribe(),
        }
    }

    /// Returns the current level.
    pub fn level(&self) -> StopLevel {
        self.sender.borrow().level
    }

    /// Returns what stopped the run, if anything did.
    pub fn cause(&self) -> Option<StopCause> {
        self.sender.borrow().cause.clone()
    }
}

impl StopWatch {
    /// Returns the current level.
    pub fn level(&self) -> StopLevel {
        self.receiver.borrow().level
    }

    /// Returns what stopped the run, if anything did.
    pub fn cause(&self) -> Option<StopCause> {
        self.receiver.borrow().cause.clone()
    }

    /// Waits until the level reaches `level`. Never resolves when the run
    /// ends without reaching it.
    pub async fn reached(&mut self, level: StopLevel) {
        let reached = self.receiver.wait_for(|state| state.level >= level).await;
        if reached.is_err() {
            // The run dropped its `Stop`, so the level can no longer rise.
            std::future::pending::<()>().await;
        }
    }
}

impl fmt::Display for StopCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopCause::Interrupt => f.write_str("interrupted"),
            StopCause::Terminate => f.write_str("terminated by SIGTERM"),
            StopCause::Deadline(after) => {
                write!(f, "the deadline of {} passed", format_duration(*after))
            }
            StopCause::Halt(rule) => write!(f, "--halt {rule} was reached"),
            StopCause::Limiter { url, .. } => write!(f, "the limiter {url} failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_never_lowers_the_level() {
        let stop = Stop::default();
        stop.request(StopLevel::Now, StopCause::Halt("now,fail=1".to_owned()));
        stop.request(StopLevel::Soon, StopCause::Deadline(Duration::from_secs(1)));
        assert_eq!(stop.level(), StopLevel::Now);
        assert_eq!(stop.cause(), Some(StopCause::Halt("now,fail=1".to_owned())));
    }

    #[test]
    fn signal_twice_stops_now() {
        let stop = Stop::default();
        stop.request(StopLevel::Soon, StopCause::Halt("soon,fail=1".to_owned()));
        assert_eq!(stop.signal(StopCause::Interrupt), StopLevel::Soon);
        assert_eq!(stop.cause(), Some(StopCause::Interrupt));
        assert_eq!(stop.signal(StopCause::Terminate), StopLevel::Now);
        assert_eq!(stop.cause(), Some(StopCause::Interrupt));
    }

    #[tokio::test]
    async fn watch_wakes_on_reached_level() {
        let stop = Stop::default();
        let mut watch = stop.watch();
        stop.request(StopLevel::Soon, StopCause::Interrupt);
        watch.reached(StopLevel::Soon).await;
        assert_eq!(watch.level(), StopLevel::Soon);
        let now = tokio::time::timeout(Duration::from_millis(10), watch.reached(StopLevel::Now));
        assert!(now.await.is_err());
    }
}
