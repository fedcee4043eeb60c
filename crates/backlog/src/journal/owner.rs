//! The identity of the process that owns a journal, and whether a recorded
//! owner is still alive.
//!
//! A run records its pid, host, boot id and process start time in the
//! journal. A later run treats that owner as gone when the machine was
//! rebooted (another boot id), when the pid no longer exists or is a zombie,
//! or when the pid now belongs to another process (another start time).
//! This reads `/proc`, so the check is exact on Linux only.

use std::fs;

/// The identity of one process, as stored in the journal's `runs` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The process id.
    pub pid: u32,
    /// The host name of the machine the process runs on.
    pub host: String,
    /// The Linux boot id, which changes at every boot.
    pub boot_id: String,
    /// The process start time, in clock ticks since boot.
    pub start_ticks: u64,
}

/// Whether a recorded owner still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The process still runs on this machine.
    Alive,
    /// The process has ended, or the machine has rebooted since.
    Gone,
    /// The process runs on another host, where this one cannot check it.
    OtherHost,
}

impl Owner {
    /// Returns the identity of the current process.
    pub fn current() -> Self {
        let pid = std::process::id();
        Owner {
            pid,
            host: read_trimmed("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown".to_owned()),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id").unwrap_or_default(),
            start_ticks: process_start(pid).map_or(0, |(start, _)| start),
        }
    }

    /// Checks, from the current process, whether this owner still runs.
    pub fn liveness(&self) -> Liveness {
        let here = Owner::current();
        if self.host != here.host {
            return Liveness::OtherHost;
        }
        if self.boot_id != here.boot_id {
            return Liveness::Gone;
        }
        match process_start(self.pid) {
            Some((start, state)) if start == self.start_ticks && !matches!(state, 'Z' | 'X') => {
                Liveness::Alive
            }
            _ => Liveness::Gone,
        }
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    Some(text.trim().to_owned())
}

/// Returns the start time and the state letter of process `pid`, read from
/// `/proc/PID/stat`, or `None` when no such process exists.
fn process_start(pid: u32) -> Option<(u64, char)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may contain spaces, so fields are
    // counted from the last closing parenthesis: the state is field 3 and
    // the start time field 22 of proc(5).
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_alive() {
        let owner = Owner::current();
        assert_eq!(owner.pid, std::process::id());
        assert!(owner.start_ticks > 0);
        assert_eq!(owner.liveness(), Liveness::Alive);
    }

    #[test]
    fn reused_pid_is_gone() {
        let owner = Owner {
            start_ticks: Owner::current().start_ticks + 1,
            ..Owner::current()
        };
        assert_eq!(owner.liveness(), Liveness::Gone);
    }

    #[test]
    fn ended_process_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let owner = Owner {
            pid,
            ..Owner::current()
        };
        assert_eq!(owner.liveness(), Liveness::Gone);
    }

    #[test]
    fn other_boot_or_host_is_not_alive() {
        let rebooted = Owner {
            boot_id: "another boot".to_owned(),
            ..Owner::current()
        };
        assert_eq!(rebooted.liveness(), Liveness::Gone);
        let elsewhere = Owner {
            host: "another-host.invalid".to_owned(),
            ..Owner::current()
        };
        assert_eq!(elsewhere.liveness(), Liveness::OtherHost);
    }
}
