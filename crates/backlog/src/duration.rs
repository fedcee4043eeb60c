//! Durations on the command line: a number and a unit, as in `500ms`, `2s`,
//! `1.5s` or `1m`.

use std::time::Duration;

/// The units a duration accepts, with their length in milliseconds.
const UNITS: [(&str, f64); 4] = [
    ("ms", 1.0),
    ("s", 1_000.0),
    ("m", 60_000.0),
    ("h", 3_600_000.0),
];

/// The maximum duration accepted, 100 days, so that adding it to a clock
/// cannot overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 24 * 3600);

/// Parses a duration such as `500ms`, `2s`, `1.5s`, `1m` or `1h`.
///
/// # Errors
///
/// Returns a message that names the accepted forms when `text` is not a
/// non-negative number followed by one of the units, or is over 100 days.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!("expected a number followed by ms, s, m or h, as in 500ms, 2s or 1m (got '{text}')")
    };
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(invalid)?;
    let (number, unit) = text.split_at(split);
    let millis_per_unit = UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, millis)| *millis)
        .ok_or_else(invalid)?;
    let is_decimal = |c: char| c.is_ascii_digit() || c == '.';
    if number.is_empty() || !number.chars().all(is_decimal) {
        return Err(invalid());
    }
    let value: f64 = number.parse().map_err(|_| invalid())?;
    let millis = value * millis_per_unit;
    if millis > MAX_DURATION.as_millis() as f64 {
        return Err(format!("must be at most 100 days (got '{text}')"));
    }
    Ok(Duration::from_secs_f64(millis / 1_000.0))
}

/// Parses a duration like [`parse_duration`] and rejects zero.
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!("must be greater than zero (got '{text}')"));
    }
    Ok(duration)
}

/// Formats a duration for messages: milliseconds below one second, else
/// seconds with up to three decimals, as in `250ms`, `2s` or `1.5s`.
pub fn format_duration(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        return format!("{}ms", duration.as_millis());
    }
    let seconds = format!("{:.3}", duration.as_secs_f64());
    let seconds = seconds.trim_end_matches('0').trim_end_matches('.');
    format!("{seconds}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_each_unit() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("2s", Duration::from_secs(2)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m", Duration::from_secs(60)),
            ("2h", Duration::from_secs(7200)),
            ("0s", Duration::ZERO),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn parse_rejects_bad_forms() {
        for text in ["", "5", "s", "-1s", "1x", "1 s", "1.2.3s", "5sec", "1e3s"] {
            let error = parse_duration(text).unwrap_err();
            assert!(
                error.contains("expected a number followed by ms, s, m or h"),
                "{text}: {error}"
            );
            assert!(error.contains(&format!("'{text}'")), "{text}: {error}");
        }
        let error = parse_duration("101d").unwrap_err();
        assert!(error.contains("expected a number"), "{error}");
        let error = parse_duration("2401h").unwrap_err();
        assert!(error.contains("at most 100 days"), "{error}");
    }

    #[test]
    fn parse_positive_rejects_zero() {
        let error = parse_positive_duration("0ms").unwrap_err();
        assert_eq!(error, "must be greater than zero (got '0ms')");
        assert_eq!(parse_positive_duration("1ms"), Ok(Duration::from_millis(1)));
    }

    #[test]
    fn format_picks_unit() {
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    }
}
