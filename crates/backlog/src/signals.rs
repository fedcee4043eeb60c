//! SIGINT, SIGTERM and the deadline of the whole run, turned into stop
//! requests.
//!
//! Commands run in process groups of their own, so Ctrl-C on a terminal
//! reaches `backlog` alone. The first SIGINT or SIGTERM stops the run soon
//! (nothing new starts and running commands finish), the second stops it
//! now (running commands are terminated). SIGTERM is treated like Ctrl-C
//! so that a service manager gets the same clean stop.

use std::convert::Infallible;
use std::io::{self, Write};
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::duration::format_duration;
use crate::exec::Gauge;
use crate::stop::{Stop, StopCause, StopLevel};

/// The installed signal handlers.
#[derive(Debug)]
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    /// Installs handlers for SIGINT and SIGTERM, so that they no longer end
    /// the process.
    pub fn install() -> io::Result<Self> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Turns signals and the deadline into stop requests until the run ends,
    /// and prints on stderr what each one does.
    pub async fn watch(
        mut self,
        stop: &Stop,
        deadline: Option<Duration>,
        gauge: &Gauge,
    ) -> Infallible {
        let deadline_passed = async {
            match deadline {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        let mut deadline_passed = std::pin::pin!(deadline_passed);
        let mut deadline_done = false;
        loop {
            let cause = tokio::select! {
                _ = self.interrupt.recv() => StopCause::Interrupt,
                _ = self.terminate.recv() => StopCause::Terminate,
                () = &mut deadline_passed, if !deadline_done => {
                    deadline_done = true;
                    let after = deadline.unwrap_or_default();
                    announce_deadline(after, gauge.running());
                    stop.request(StopLevel::Now, StopCause::Deadline(after));
                    continue;
                }
            };
            let level = stop.signal(cause.clone());
            announce_signal(&cause, level, gauge.running());
        }
    }
}

fn announce_signal(cause: &StopCause, level: StopLevel, running: usize) {
    let (name, again) = match cause {
        StopCause::Terminate => ("terminated (SIGTERM)", "send SIGTERM again"),
        _ => ("interrupted", "press Ctrl-C again"),
    };
    let items = plural_items(running);
    // Progress lines are best effort, as elsewhere: a closed stderr must not
    // stop the shutdown.
    let mut stderr = std::io::stderr();
    let _ = match level {
        StopLevel::Now => writeln!(stderr, "{name} again: killing {running} running {items}"),
        _ if running == 0 => writeln!(
            stderr,
            "{name}: no command is running; starting nothing new"
        ),
        _ => writeln!(
            stderr,
            "{name}: waiting for {running} running {items}; {again} to kill them"
        ),
    };
}

fn announce_deadline(after: Duration, running: usize) {
    let after = format_duration(after);
    let _ = if running == 0 {
        writeln!(
            std::io::stderr(),
            "deadline of {after} passed; no command is running"
        )
    } else {
        let items = plural_items(running);
        writeln!(
            std::io::stderr(),
            "deadline of {after} passed: killing {running} running {items}"
        )
    };
}

/// Returns "item" or "items" to follow `count`.
pub fn plural_items(count: usize) -> &'static str {
    if count == 1 {
        "item"
    } else {
        "items"
    }
}
