//! Terminating a command's whole process group: SIGTERM, then SIGKILL once
//! a grace period has passed.
//!
//! Each command leads a process group of its own, so a signal to the group
//! reaches the children it started too, and Ctrl-C on the terminal reaches
//! `backlog` alone.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use rustix::process::{kill_process_group, Pid, Signal};

use crate::duration::format_duration;
use crate::exec::ItemResult;

/// How long to wait for a command's pipes to close after SIGKILL, for the
/// rare process that left the group and still keeps them open.
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(1);

/// The maximum wait from SIGTERM to SIGKILL for a command whose lease was
/// lost. A lease's local deadline comes at least this long before Redis
/// expires it, because the limiter accepts no lease under 200 ms.
pub const LEASE_LOST_KILL_AFTER: Duration = Duration::from_millis(100);

/// The reason a command was terminated before it exited by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// Its attempt ran longer than `--timeout`.
    TimedOut(Duration),
    /// The run is stopping now: Ctrl-C twice, `--deadline` or `--halt now`.
    Stopped,
    /// The attempt's shared lease (`--limiter`) was lost, so another
    /// process may take the item.
    LeaseLost,
}

/// Awaits `collecting` (the command's output and exit status) unless
/// `terminate` resolves first. Then the process group `group` gets SIGTERM,
/// and SIGKILL after `kill_after` if the command has not ended by then.
///
/// After a lost lease, SIGKILL follows within [`LEASE_LOST_KILL_AFTER`]:
/// the lease's deadline leaves at least that much before Redis lets the
/// lease expire and grants its place to another process.
pub async fn collect_or_terminate(
    collecting: impl Future<Output = ItemResult>,
    group: Option<u32>,
    terminate: impl Future<Output = Termination>,
    kill_after: Duration,
) -> ItemResult {
    let mut collecting = pin!(collecting);
    let reason = tokio::select! {
        // A command that ended is not terminated, even when the reason to
        // terminate it came at the same moment.
        biased;
        result = &mut collecting => return result,
        reason = terminate => reason,
    };
    signal_group(group, Signal::TERM);
    let kill_after = if reason == Termination::LeaseLost {
        kill_after.min(LEASE_LOST_KILL_AFTER)
    } else {
        kill_after
    };
    let mut result = match tokio::time::timeout(kill_after, &mut collecting).await {
        Ok(result) => result,
        Err(_) => {
            signal_group(group, Signal::KILL);
            match tokio::time::timeout(DRAIN_AFTER_KILL, &mut collecting).await {
                Ok(result) => result,
                Err(_) => ItemResult::failed(format!(
                    "its output stayed open {} after SIGKILL",
                    format_duration(DRAIN_AFTER_KILL)
                )),
            }
        }
    };
    result.terminated = Some(reason);
    result
}

/// Sends `signal` to the process group `group`. A group that is already
/// gone is fine: the command ended between the decision and the signal.
fn signal_group(group: Option<u32>, signal: Signal) {
    let pid = group
        .and_then(|id| i32::try_from(id).ok())
        // Group 1 would mean every process we may signal, never a command.
        .filter(|&id| id > 1)
        .and_then(Pid::from_raw);
    if let Some(pid) = pid {
        // ESRCH (no such group) is the only expected error, and there is
        // nothing more to do about any other.
        let _ = kill_process_group(pid, signal);
    }
}
