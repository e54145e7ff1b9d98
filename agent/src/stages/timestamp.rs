//! Timestamp formats of the `timestamp` stage. A value that does not parse leaves the
//! entry's timestamp as it was; nothing here fails on input.

use chrono::{DateTime, NaiveDate, NaiveDateTime};

use crate::cri::parse_rfc3339_nanos;

pub(super) use logpipe_api::timeformat::TimeFormat;

/// Parsing a [`TimeFormat`] (the format itself is the contract's, checked there).
pub(super) trait ParseTime {
    /// Nanoseconds since the epoch, `None` when `text` is not in this format.
    fn parse(&self, text: &str) -> Option<i64>;
}

impl ParseTime for TimeFormat {
    fn parse(&self, text: &str) -> Option<i64> {
        let text = text.trim();
        match self {
            Self::Rfc3339 => parse_rfc3339_nanos(text.as_bytes()),
            Self::Unix => parse_unix_seconds(text),
            Self::UnixMs => text.parse::<i64>().ok()?.checked_mul(1_000_000),
            Self::UnixUs => text.parse::<i64>().ok()?.checked_mul(1_000),
            Self::UnixNs => text.parse::<i64>().ok(),
            Self::Strftime(format) => parse_strftime(text, format),
        }
    }
}

fn parse_unix_seconds(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds: i64 = whole.parse().ok()?;
    let mut nanos = 0i64;
    for (i, b) in fraction.bytes().take(9).enumerate() {
        nanos += i64::from(b - b'0') * 10i64.pow(8 - i as u32);
    }
    let total = seconds.checked_mul(1_000_000_000)?.checked_add(nanos)?;
    Some(if negative { -total } else { total })
}

/// With a zone in the format the zone is used; without one the time is taken as UTC; a
/// date-only format gives midnight UTC.
fn parse_strftime(text: &str, format: &str) -> Option<i64> {
    if let Ok(time) = DateTime::parse_from_str(text, format) {
        return time.timestamp_nanos_opt();
    }
    if let Ok(time) = NaiveDateTime::parse_from_str(text, format) {
        return time.and_utc().timestamp_nanos_opt();
    }
    NaiveDate::parse_from_str(text, format)
        .ok()?
        .and_hms_opt(0, 0, 0)?
        .and_utc()
        .timestamp_nanos_opt()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_705_314_030_000_000_000;

    #[test]
    fn every_format_parses() {
        let cases: &[(&str, &str, Option<i64>)] = &[
            ("RFC3339", "2024-01-15T10:20:30Z", Some(T0)),
            (
                "RFC3339",
                "2024-01-15T10:20:30.25+00:00",
                Some(T0 + 250_000_000),
            ),
            (
                "RFC3339Nano",
                "2024-01-15T10:20:30.000000007Z",
                Some(T0 + 7),
            ),
            ("Unix", "1705314030", Some(T0)),
            ("Unix", "1705314030.5", Some(T0 + 500_000_000)),
            ("Unix", "1705314030.1234567891", Some(T0 + 123_456_789)),
            ("Unix", "17053x", None),
            ("Unix", ".5", None),
            ("UnixMs", "1705314030001", Some(T0 + 1_000_000)),
            ("UnixUs", "1705314030000001", Some(T0 + 1_000)),
            ("UnixNs", "1705314030000000001", Some(T0 + 1)),
            ("UnixNs", "99999999999999999999", None),
            ("%Y-%m-%d %H:%M:%S", "2024-01-15 10:20:30", Some(T0)),
            (
                "%Y-%m-%d %H:%M:%S %z",
                "2024-01-15 12:20:30 +0200",
                Some(T0),
            ),
            (
                "%d/%b/%Y:%H:%M:%S %z",
                "15/Jan/2024:10:20:30 +0000",
                Some(T0),
            ),
            ("%Y-%m-%d", "2024-01-15", Some(T0 - 37_230_000_000_000)),
            ("%Y-%m-%d %H:%M:%S", "yesterday", None),
        ];
        for (format, text, expected) in cases {
            let format = TimeFormat::new(format).unwrap();
            assert_eq!(format.parse(text), *expected, "{format:?} {text}");
        }
    }

    #[test]
    fn bad_strftime_is_refused() {
        assert!(TimeFormat::new("%Q%").is_err());
        assert!(TimeFormat::new("").is_err());
    }
}
