//! Human-readable durations in config files ("30s", "250ms", "2m", "1h").

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

/// Parses a duration such as `"250ms"`, `"30s"`, `"5m"`, `"1h"` or `"1d"`.
///
/// A bare number without a unit is rejected, because "30" could mean seconds
/// or milliseconds depending on which pooler the operator used before.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("invalid duration {text:?}: missing unit (ms, s, m, h or d)"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: {number:?} is not a number"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h or d)"
            ))
        }
    };
    // Ten years: far above any timeout or lifetime, and far below where
    // adding it to the current time would overflow.
    if seconds > MAX_SECONDS {
        return Err(format!(
            "invalid duration {text:?}: longer than the limit of 3650d"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

const MAX_SECONDS: f64 = 3650.0 * 86400.0;

/// Serde adapter: `#[serde(with = "crate::config::duration")]`.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration string such as \"30s\" or \"250ms\"")
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<Duration, E> {
            parse_duration(value).map_err(E::custom)
        }
    }

    deserializer.deserialize_str(DurationVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    }

    #[test]
    fn rejects_durations_past_the_limit() {
        assert_eq!(
            parse_duration("3650d").unwrap(),
            Duration::from_secs(3650 * 86400)
        );
        for text in ["3651d", "99999999999999999999s", "10000000000000000000000d"] {
            let error = parse_duration(text).unwrap_err();
            assert!(error.contains("limit of 3650d"), "{text}: {error}");
        }
    }

    #[test]
    fn rejects_missing_or_unknown_unit() {
        assert!(parse_duration("30").unwrap_err().contains("missing unit"));
        assert!(parse_duration("30x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").unwrap_err().contains("not a number"));
    }
}
