//! `--per-key`, `--rate`, `--burst` and `--per-key-rate`: the limits on
//! top of `--max-run`, and the keyed limiter that enforces them.

use std::future::Future;
use std::num::{NonZeroU32, NonZeroUsize};
use std::pin::Pin;
use std::time::Duration;

use deferred_semaphore::{
    AcquireError, KeyedLimiter, KeyedPermit, KeyedSemaphore, PerKeyRate, Rate, RateLimited,
};

use crate::cli::MAX_RUN_RANGE;
use crate::source::{Item, ItemKind};
use crate::stop::{StopLevel, StopWatch};
use crate::template::Template;

/// The accepted forms of a rate, for error messages.
const RATE_FORMS: &str = "N/s, N/m or N/h with N a whole number from 1, as in 10/s";

/// A `--per-key` option before its template is parsed: the key template's
/// text and the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerKeyArg {
    /// The key template, as in `{domain}`.
    pub template: String,
    /// The maximum number of commands running at once per key.
    pub limit: NonZeroUsize,
}

/// A rate as given on the command line: a count per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateArg {
    /// The number of starts per period.
    pub count: NonZeroU32,
    /// The period.
    pub period: Duration,
}

/// The limits of a run besides `--max-run`, checked.
#[derive(Debug, Clone)]
pub struct KeyLimits {
    /// The template that renders each item's key; every item has the same
    /// key without `--per-key`.
    pub key: Option<Template>,
    /// The maximum number of commands running at once per key.
    pub per_key: Option<NonZeroUsize>,
    /// The maximum rate of command starts over all keys.
    pub rate: Option<Rate>,
    /// The maximum rate of command starts per key.
    pub per_key_rate: Option<Rate>,
}

/// Parses `--per-key`: `TEMPLATE=N`, split at the last `=`.
pub fn parse_per_key(text: &str) -> Result<PerKeyArg, String> {
    let (min, max) = (MAX_RUN_RANGE.start(), MAX_RUN_RANGE.end());
    let expected = format!(
        "expected TEMPLATE=N with N a whole number from {min} to {max}, as in '{{domain}}=2' (got '{text}')"
    );
    let Some((template, limit)) = text.rsplit_once('=') else {
        return Err(expected);
    };
    let limit = match limit.trim().parse::<u64>() {
        Ok(n) if MAX_RUN_RANGE.contains(&n) => usize::try_from(n).ok().and_then(NonZeroUsize::new),
        _ => None,
    };
    match limit {
        Some(limit) if !template.is_empty() => Ok(PerKeyArg {
            template: template.to_owned(),
            limit,
        }),
        _ => Err(expected),
    }
}

/// Parses `--rate` and `--per-key-rate`: `N/s`, `N/m` or `N/h`.
pub fn parse_rate(text: &str) -> Result<RateArg, String> {
    let invalid = || format!("expected {RATE_FORMS} (got '{text}')");
    let (count, unit) = text.split_once('/').ok_or_else(invalid)?;
    let period = match unit {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(invalid()),
    };
    let count = count
        .parse::<u32>()
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(invalid)?;
    Ok(RateArg { count, period })
}

/// Parses `--burst`: a whole number from 1.
pub fn parse_burst(text: &str) -> Result<NonZeroU32, String> {
    text.parse::<u32>()
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| format!("expected a whole number from 1 (got '{text}')"))
}

impl RateArg {
    /// Returns the library's rate, with bursts of `burst`.
    pub fn to_rate(self, burst: NonZeroU32) -> Rate {
        Rate::new(self.count, self.period)
            .expect("the parsed period is not zero")
            .with_burst(burst)
    }
}

impl KeyLimits {
    /// Returns the key of `item`: the rendered `--per-key` template, or an
    /// empty key without one. An item the template cannot render (a
    /// malformed line, a missing field) gets the empty key; it fails at
    /// once without running anything.
    pub fn key_of(&self, item: &Item) -> String {
        // A mail envelope's key is its recipients' domain.
        if let ItemKind::Mail(envelope) = &item.kind {
            return envelope.domain.clone();
        }
        let Some(template) = &self.key else {
            return String::new();
        };
        if let ItemKind::Malformed { .. } = item.kind {
            return String::new();
        }
        template
            .render(&item.kind)
            .map(|argv| argv.join(" "))
            .unwrap_or_default()
    }
}

/// The keyed limiter of a run: `--max-run` and `--per-key` slots, with the
/// rates that were given on top.
#[derive(Debug, Clone)]
pub enum Gate {
    /// Slots only.
    Slots(KeyedSemaphore<String>),
    /// Slots and a rate over all keys.
    Rate(RateLimited<KeyedSemaphore<String>>),
    /// Slots and a rate per key.
    PerKeyRate(PerKeyRate<KeyedSemaphore<String>, String>),
    /// Slots, a rate per key and a rate over all keys.
    BothRates(RateLimited<PerKeyRate<KeyedSemaphore<String>, String>>),
}

/// The future of a permit from a [`Gate`].
pub type GateAcquire = Pin<Box<dyn Future<Output = Result<KeyedPermit<String>, AcquireError>>>>;

impl Gate {
    /// Builds the limiter for `max_run` commands at once under `limits`.
    pub fn new(max_run: NonZeroUsize, limits: &KeyLimits) -> Gate {
        let per_key = limits.per_key.unwrap_or(max_run).min(max_run);
        let slots = KeyedSemaphore::new(max_run.get(), per_key.get());
        match (limits.rate, limits.per_key_rate) {
            (None, None) => Gate::Slots(slots),
            (Some(rate), None) => Gate::Rate(RateLimited::new(slots, rate)),
            (None, Some(rate)) => Gate::PerKeyRate(PerKeyRate::new(slots, rate)),
            (Some(rate), Some(per_key_rate)) => {
                let per_key = PerKeyRate::new(slots, per_key_rate);
                Gate::BothRates(RateLimited::new(per_key, rate))
            }
        }
    }
}

/// A [`Gate`] whose waiting acquires stop waiting once the run starts
/// stopping, so that no item waits out a slot or a rate token (up to an
/// hour with `N/h`) after Ctrl-C or `--deadline`.
///
/// A waiting acquire then gets a permit of a semaphore with room for every
/// item in flight instead. Its item still reaches the engine, which starts
/// nothing once the run is stopping and records the item as not started in
/// the results file.
#[derive(Debug)]
pub struct StoppingGate {
    gate: Gate,
    stop: StopWatch,
    stopped: KeyedSemaphore<String>,
}

impl StoppingGate {
    /// Wraps `gate`, whose acquires give up once `stop` reaches
    /// [`StopLevel::Soon`].
    pub fn new(gate: Gate, stop: StopWatch) -> Self {
        // More than the items a run has in flight: the look-ahead window,
        // the buffer and the retries waiting for a backoff.
        const ROOM: usize = 1 << 24;
        StoppingGate {
            gate,
            stop,
            stopped: KeyedSemaphore::new(ROOM, ROOM),
        }
    }
}

impl KeyedLimiter<String> for StoppingGate {
    type Permit = KeyedPermit<String>;
    type Error = AcquireError;
    type Acquire = GateAcquire;

    fn acquire(&self, key: &String) -> GateAcquire {
        let acquire = self.gate.acquire(key);
        let stopped = KeyedLimiter::acquire(&self.stopped, key);
        let mut stop = self.stop.clone();
        Box::pin(async move {
            tokio::select! {
                permit = acquire => permit,
                () = stop.reached(StopLevel::Soon) => stopped.await,
            }
        })
    }

    fn limit(&self) -> usize {
        KeyedLimiter::<String>::limit(&self.gate)
    }
}

impl KeyedLimiter<String> for Gate {
    type Permit = KeyedPermit<String>;
    type Error = AcquireError;
    type Acquire = GateAcquire;

    fn acquire(&self, key: &String) -> GateAcquire {
        // Each variant's acquire owns what it needs, so it can be boxed as
        // 'static. The box costs little beside starting a process.
        match self {
            Gate::Slots(limiter) => Box::pin(KeyedLimiter::acquire(limiter, key)),
            Gate::Rate(limiter) => Box::pin(KeyedLimiter::acquire(limiter, key)),
            Gate::PerKeyRate(limiter) => Box::pin(KeyedLimiter::acquire(limiter, key)),
            Gate::BothRates(limiter) => Box::pin(KeyedLimiter::acquire(limiter, key)),
        }
    }

    fn limit(&self) -> usize {
        match self {
            Gate::Slots(limiter) => KeyedLimiter::<String>::limit(limiter),
            Gate::Rate(limiter) => KeyedLimiter::<String>::limit(limiter),
            Gate::PerKeyRate(limiter) => KeyedLimiter::<String>::limit(limiter),
            Gate::BothRates(limiter) => KeyedLimiter::<String>::limit(limiter),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_parses_template_and_limit() {
        let parsed = parse_per_key("{domain}=2").unwrap();
        assert_eq!(parsed.template, "{domain}");
        assert_eq!(parsed.limit.get(), 2);
        // The last `=` splits, so a template may contain one.
        let parsed = parse_per_key("a=b=3").unwrap();
        assert_eq!(parsed.template, "a=b");
    }

    #[test]
    fn per_key_rejects_bad_values() {
        for bad in ["{domain}", "{domain}=0", "{domain}=x", "=2", "{domain}=-1"] {
            let error = parse_per_key(bad).unwrap_err();
            assert!(error.contains("TEMPLATE=N"), "{bad}: {error}");
            assert!(error.contains(bad), "{bad}: {error}");
        }
    }

    #[test]
    fn rate_parses_each_unit() {
        let cases = [("10/s", 10, 1), ("30/m", 30, 60), ("1/h", 1, 3600)];
        for (text, count, seconds) in cases {
            let parsed = parse_rate(text).unwrap();
            assert_eq!(parsed.count.get(), count, "{text}");
            assert_eq!(parsed.period, Duration::from_secs(seconds), "{text}");
        }
    }

    #[test]
    fn rate_rejects_bad_values() {
        for bad in ["10", "0/s", "10/d", "x/s", "/s", "10/", "1.5/s"] {
            let error = parse_rate(bad).unwrap_err();
            assert!(error.contains("N/s, N/m or N/h"), "{bad}: {error}");
            assert!(error.contains(bad), "{bad}: {error}");
        }
    }

    #[test]
    fn burst_rejects_zero() {
        assert_eq!(parse_burst("3").unwrap().get(), 3);
        assert!(parse_burst("0").unwrap_err().contains("'0'"));
    }
}
