//! `--halt`: when failed items stop the run, in GNU parallel's notation.

use std::fmt;
use std::num::NonZeroU64;

use deferred_semaphore::{FailurePolicy, Threshold};

use crate::stop::StopLevel;

/// The finished items needed before a percentage threshold counts, so that
/// one early failure does not stop a large backlog.
pub const PERCENT_MIN_FINISHED: u64 = 3;

/// The forms `--halt` accepts, for error messages.
const ACCEPTED: &str = "never, soon,fail=N, soon,fail=P%, now,fail=N or now,fail=P%";

/// When failed items stop the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Halt {
    /// Failures never stop the run.
    Never,
    /// Once the threshold is reached, nothing new starts and running
    /// commands finish.
    Soon(Threshold),
    /// Once the threshold is reached, running commands are terminated.
    Now(Threshold),
}

/// Counts finished items and reports the moment `--halt` triggers.
#[derive(Debug)]
pub struct HaltCounter {
    halt: Halt,
    failed: u64,
    finished: u64,
    triggered: bool,
}

/// Parses `--halt`: `never`, or `soon` or `now`, a comma, then `fail=N` (a
/// count of failed items) or `fail=P%` (a share of finished items).
///
/// # Errors
///
/// Returns a message naming the accepted forms.
pub fn parse_halt(text: &str) -> Result<Halt, String> {
    let invalid = || format!("expected {ACCEPTED}");
    if text == "never" {
        return Ok(Halt::Never);
    }
    let (when, condition) = text.split_once(',').ok_or_else(invalid)?;
    let limit = condition.strip_prefix("fail=").ok_or_else(invalid)?;
    let threshold = match limit.strip_suffix('%') {
        Some(percent) => {
            let percent: f64 = percent.parse().map_err(|_| invalid())?;
            if !(percent > 0.0 && percent <= 100.0) {
                return Err(format!(
                    "the percentage must be above 0 and at most 100; {}",
                    invalid()
                ));
            }
            Threshold::Percent {
                percent,
                min_finished: PERCENT_MIN_FINISHED,
            }
        }
        None => {
            let count: u64 = limit.parse().map_err(|_| invalid())?;
            let count = NonZeroU64::new(count)
                .ok_or_else(|| format!("the count must be at least 1; {}", invalid()))?;
            Threshold::Failures(count)
        }
    };
    match when {
        "soon" => Ok(Halt::Soon(threshold)),
        "now" => Ok(Halt::Now(threshold)),
        _ => Err(invalid()),
    }
}

impl Halt {
    /// Returns the library's failure policy. Both modes stop the start of
    /// new items there. `now` leaves the killing of running commands to the
    /// run, because the library's `StopNow` drops the work without a chance
    /// to terminate process groups gracefully or to record the items.
    pub fn failure_policy(&self) -> FailurePolicy {
        match *self {
            Halt::Never => FailurePolicy::KeepGoing,
            Halt::Soon(threshold) | Halt::Now(threshold) => FailurePolicy::StopSoon(threshold),
        }
    }

    fn threshold(&self) -> Option<(Threshold, StopLevel)> {
        match *self {
            Halt::Never => None,
            Halt::Soon(threshold) => Some((threshold, StopLevel::Soon)),
            Halt::Now(threshold) => Some((threshold, StopLevel::Now)),
        }
    }
}

impl fmt::Display for Halt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some((threshold, level)) = self.threshold() else {
            return f.write_str("never");
        };
        let when = if level == StopLevel::Now {
            "now"
        } else {
            "soon"
        };
        match threshold {
            Threshold::Failures(count) => write!(f, "{when},fail={count}"),
            Threshold::Percent { percent, .. } => write!(f, "{when},fail={percent}%"),
        }
    }
}

impl HaltCounter {
    /// Creates a counter for `halt` with no item finished.
    pub fn new(halt: Halt) -> Self {
        HaltCounter {
            halt,
            failed: 0,
            finished: 0,
            triggered: false,
        }
    }

    /// Returns the rule this counter applies.
    pub fn halt(&self) -> Halt {
        self.halt
    }

    /// Counts one finished item. Returns the stop level to request when
    /// this item makes the threshold reached for the first time.
    pub fn record(&mut self, failed: bool) -> Option<StopLevel> {
        self.finished += 1;
        self.failed += u64::from(failed);
        let (threshold, level) = self.halt.threshold()?;
        if self.triggered || !threshold.reached(self.failed, self.finished) {
            return None;
        }
        self.triggered = true;
        Some(level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failures(count: u64) -> Threshold {
        Threshold::Failures(NonZeroU64::new(count).unwrap())
    }

    #[test]
    fn parse_accepts_each_form() {
        let percent = |percent| Threshold::Percent {
            percent,
            min_finished: PERCENT_MIN_FINISHED,
        };
        let cases = [
            ("never", Halt::Never),
            ("soon,fail=1", Halt::Soon(failures(1))),
            ("now,fail=3", Halt::Now(failures(3))),
            ("soon,fail=20%", Halt::Soon(percent(20.0))),
            ("now,fail=12.5%", Halt::Now(percent(12.5))),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_halt(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn parse_rejects_bad_forms() {
        let bad = [
            "",
            "always",
            "soon",
            "soon,",
            "later,fail=1",
            "soon,done=1",
            "soon,fail=x",
            "now,fail=-1",
            "now,fail=%",
        ];
        for text in bad {
            let error = parse_halt(text).unwrap_err();
            assert!(error.contains(ACCEPTED), "{text}: {error}");
        }
        let zero = parse_halt("soon,fail=0").unwrap_err();
        assert!(zero.starts_with("the count must be at least 1"), "{zero}");
        let too_much = parse_halt("now,fail=101%").unwrap_err();
        assert!(
            too_much.starts_with("the percentage must be above 0"),
            "{too_much}"
        );
    }

    #[test]
    fn display_round_trips() {
        for text in ["never", "soon,fail=2", "now,fail=50%"] {
            assert_eq!(parse_halt(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn counter_triggers_once() {
        let mut counter = HaltCounter::new(Halt::Now(failures(2)));
        assert_eq!(counter.record(true), None);
        assert_eq!(counter.record(false), None);
        assert_eq!(counter.record(true), Some(StopLevel::Now));
        assert_eq!(counter.record(true), None);
    }

    #[test]
    fn counter_percent_waits_for_enough_items() {
        let mut counter = HaltCounter::new(parse_halt("soon,fail=50%").unwrap());
        assert_eq!(counter.record(true), None);
        assert_eq!(counter.record(true), None);
        assert_eq!(counter.record(false), Some(StopLevel::Soon));
    }

    #[test]
    fn never_never_triggers() {
        let mut counter = HaltCounter::new(Halt::Never);
        assert_eq!(counter.record(true), None);
        assert_eq!(Halt::Never.failure_policy(), FailurePolicy::KeepGoing);
    }
}
