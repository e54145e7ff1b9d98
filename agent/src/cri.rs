//! Container runtime log line parsers: CRI (`<RFC3339Nano time> <stdout|stderr> <P|F> <content>`)
//! and docker json-file (`{"log":"...\n","stream":"stdout","time":"..."}`).
//!
//! Guarantees:
//! - Total: every input, including empty, truncated, non-UTF-8 or gigabyte-long lines,
//!   yields `Ok` or a [`ParseError`]; nothing here panics, indexes out of bounds or
//!   allocates in the CRI path.
//! - Zero-copy: results borrow from the input. CRI content is returned as bytes (the
//!   caller decides how to treat invalid UTF-8); docker content is borrowed unless the
//!   JSON string had escapes.
//! - Timestamps are unix nanoseconds. The fixed RFC3339 layout kubelet writes is parsed by
//!   hand; anything else RFC3339 accepts (lowercase `t`/`z`, more than 9 fraction digits,
//!   leap seconds) goes through chrono. Instants outside what `i64` nanoseconds can hold
//!   (years before 1677 or after 2262) are errors.
//!
//! [`cases`] holds the table of good and malformed lines the tests here, the pipeline's
//! tests and the end-to-end tests share.

use std::borrow::Cow;

/// Which output stream of the container wrote the line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        match bytes {
            b"stdout" => Some(Self::Stdout),
            b"stderr" => Some(Self::Stderr),
            _ => None,
        }
    }
}

/// Why a line is not in the expected format. One variant per cause so a metric label
/// built from [`ParseError::reason`] stays bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty line")]
    Empty,
    #[error("line ends before the {0} field")]
    Truncated(&'static str),
    #[error("invalid timestamp")]
    BadTimestamp,
    #[error("stream is neither stdout nor stderr")]
    BadStream,
    #[error("CRI tag is neither P nor F")]
    BadFlag,
    #[error("not a docker json-file object")]
    BadJson,
}

impl ParseError {
    /// A short, fixed name for metric labels.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Truncated(_) => "truncated",
            Self::BadTimestamp => "bad_timestamp",
            Self::BadStream => "bad_stream",
            Self::BadFlag => "bad_flag",
            Self::BadJson => "bad_json",
        }
    }
}

/// One parsed CRI line, borrowing from the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CriLine<'a> {
    pub timestamp_ns: i64,
    /// The time field as written.
    pub time: &'a str,
    pub stream: Stream,
    /// `P`: the runtime split a long line; the rest follows in later lines up to an `F`.
    pub partial: bool,
    /// Everything after the tag and one space; may be empty, may be invalid UTF-8.
    pub content: &'a [u8],
}

/// Parse one CRI line (without its trailing newline).
pub fn parse_cri(line: &[u8]) -> Result<CriLine<'_>, ParseError> {
    if line.is_empty() {
        return Err(ParseError::Empty);
    }
    let (time, rest) = split_space(line).ok_or(ParseError::Truncated("stream"))?;
    let timestamp_ns = parse_rfc3339_nanos(time).ok_or(ParseError::BadTimestamp)?;
    let (stream, partial, content) = match stream_and_tag(rest) {
        Some(fields) => fields,
        None => {
            let (stream, rest) = split_space(rest).ok_or(ParseError::Truncated("tag"))?;
            let stream = Stream::from_bytes(stream).ok_or(ParseError::BadStream)?;
            // `... stdout F` with no space and no content is what some runtimes write for
            // an empty line; treat it as empty content rather than a truncated line.
            let (tag, content) = split_space(rest).unwrap_or((rest, &[]));
            (stream, parse_tag(tag).ok_or(ParseError::BadFlag)?, content)
        }
    };
    // The timestamp parser only accepts ASCII, so this never fails; the fallback keeps the
    // function total without an unwrap.
    let time = std::str::from_utf8(time).map_err(|_| ParseError::BadTimestamp)?;
    Ok(CriLine {
        timestamp_ns,
        time,
        stream,
        partial,
        content,
    })
}

/// `stdout F <content>` and the like, as every runtime writes them: compared in place,
/// where two searches for a space cost more than the rest of the line's parse. `None`
/// leaves any other shape (tags with `:`, no content, malformed) to the general path.
fn stream_and_tag(rest: &[u8]) -> Option<(Stream, bool, &[u8])> {
    let (stream, rest) = match rest.split_at_checked(7)? {
        (b"stdout ", rest) => (Stream::Stdout, rest),
        (b"stderr ", rest) => (Stream::Stderr, rest),
        _ => return None,
    };
    match rest {
        [b'F', b' ', content @ ..] => Some((stream, false, content)),
        [b'P', b' ', content @ ..] => Some((stream, true, content)),
        _ => None,
    }
}

fn split_space(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = memchr::memchr(b' ', bytes)?;
    Some((&bytes[..at], &bytes[at + 1..]))
}

/// CRI tags are `:`-separated; the first one is the partial/full flag.
fn parse_tag(tag: &[u8]) -> Option<bool> {
    let first = tag.split(|&b| b == b':').next()?;
    match first {
        b"P" => Some(true),
        b"F" => Some(false),
        _ => None,
    }
}

/// One parsed docker json-file line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerLine<'a> {
    pub timestamp_ns: i64,
    pub time: Cow<'a, str>,
    pub stream: Stream,
    /// The `log` value did not end with `\n`: docker split a long line, the rest follows.
    pub partial: bool,
    /// The `log` value without its trailing `\n`.
    pub content: Cow<'a, str>,
}

#[derive(serde::Deserialize)]
struct RawDocker<'a> {
    #[serde(borrow)]
    log: Cow<'a, str>,
    #[serde(borrow)]
    stream: Cow<'a, str>,
    #[serde(borrow)]
    time: Cow<'a, str>,
}

/// Parse one docker json-file line (without its trailing newline).
pub fn parse_docker(line: &[u8]) -> Result<DockerLine<'_>, ParseError> {
    if line.is_empty() {
        return Err(ParseError::Empty);
    }
    if let Some(parsed) = fast_docker(line) {
        return parsed;
    }
    let raw: RawDocker<'_> = serde_json::from_slice(line).map_err(|_| ParseError::BadJson)?;
    let stream = Stream::from_bytes(raw.stream.as_bytes()).ok_or(ParseError::BadStream)?;
    let timestamp_ns = parse_rfc3339_nanos(raw.time.as_bytes()).ok_or(ParseError::BadTimestamp)?;
    let (content, partial) = match raw.log {
        Cow::Borrowed(log) => match log.strip_suffix('\n') {
            Some(full) => (Cow::Borrowed(full), false),
            None => (Cow::Borrowed(log), true),
        },
        Cow::Owned(mut log) => {
            let full = log.ends_with('\n');
            if full {
                log.pop();
            }
            (Cow::Owned(log), !full)
        }
    };
    Ok(DockerLine {
        timestamp_ns,
        time: raw.time,
        stream,
        partial,
        content,
    })
}

/// The exact layout docker writes, `{"log":"...","stream":"...","time":"..."}`, where the
/// only escape in `log` is its final `\n`: borrowed, no JSON parser. `None` sends the line
/// to serde_json, which handles every other shape.
fn fast_docker(line: &[u8]) -> Option<Result<DockerLine<'_>, ParseError>> {
    let rest = line.strip_prefix(br#"{"log":""#)?;
    let quote = memchr::memchr2(b'"', b'\\', rest)?;
    let (content, partial, rest) = match rest.get(quote..)? {
        [b'"', after @ ..] => (&rest[..quote], true, after),
        [b'\\', b'n', b'"', after @ ..] => (&rest[..quote], false, after),
        _ => return None,
    };
    let rest = rest.strip_prefix(br#","stream":""#)?;
    let (stream, rest) = if let Some(rest) = rest.strip_prefix(br#"stdout","time":""#) {
        (Stream::Stdout, rest)
    } else {
        (Stream::Stderr, rest.strip_prefix(br#"stderr","time":""#)?)
    };
    let time = rest.strip_suffix(br#""}"#)?;
    if content.iter().any(|&b| b < 0x20) || memchr::memchr(b'"', time).is_some() {
        return None;
    }
    let content = std::str::from_utf8(content).ok()?;
    let time = std::str::from_utf8(time).ok()?;
    Some(match parse_rfc3339_nanos(time.as_bytes()) {
        Some(timestamp_ns) => Ok(DockerLine {
            timestamp_ns,
            time: Cow::Borrowed(time),
            stream,
            partial,
            content: Cow::Borrowed(content),
        }),
        None => Err(ParseError::BadTimestamp),
    })
}

/// RFC3339 (with any number of fraction digits) to unix nanoseconds.
pub fn parse_rfc3339_nanos(text: &[u8]) -> Option<i64> {
    fast_rfc3339(text).or_else(|| {
        let text = std::str::from_utf8(text).ok()?;
        chrono::DateTime::parse_from_rfc3339(text)
            .ok()?
            .timestamp_nanos_opt()
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|±HH:MM)`, exactly as kubelet and docker write it.
fn fast_rfc3339(b: &[u8]) -> Option<i64> {
    if b.len() < 20 {
        return None;
    }
    let digits = |from: usize, len: usize| decimal(b, from, len);
    if b[16] != b':' {
        return None;
    }
    let second = digits(17, 2)?;
    // Leap seconds (60) are left to chrono.
    if second > 59 {
        return None;
    }
    let minute_start = minute_start(b)?;
    let mut at = 19;
    let mut nanos = 0i64;
    if b[at] == b'.' {
        at += 1;
        let start = at;
        while at < b.len() && b[at].is_ascii_digit() {
            at += 1;
        }
        let count = at - start;
        if count == 0 || count > 9 {
            return None;
        }
        nanos = digits(start, count)? * 10i64.pow(9 - count as u32);
    }
    let offset_seconds = match b.get(at..)? {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hh = two_digits(*h1, *h2)?;
            let mm = two_digits(*m1, *m2)?;
            if hh > 23 || mm > 59 {
                return None;
            }
            let seconds = hh * 3600 + mm * 60;
            if *sign == b'-' { -seconds } else { seconds }
        }
        _ => return None,
    };
    let seconds = minute_start + second - offset_seconds;
    seconds.checked_mul(1_000_000_000)?.checked_add(nanos)
}

thread_local! {
    /// The last `YYYY-MM-DDTHH:MM` parsed (as 16 little-endian bytes) and its seconds.
    static LAST_MINUTE: std::cell::Cell<(u128, i64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Seconds since the epoch of `b`'s `YYYY-MM-DDTHH:MM` (its first 16 bytes, before any
/// zone offset). Lines come in runs of one minute: the last one is remembered per thread,
/// and comparing 16 bytes costs less than validating a date and counting its days.
fn minute_start(b: &[u8]) -> Option<i64> {
    let prefix: [u8; 16] = b.get(..16)?.try_into().ok()?;
    let key = u128::from_le_bytes(prefix);
    let (last_key, last_seconds) = LAST_MINUTE.get();
    // The key 0 (sixteen NUL bytes) is never a valid prefix, so the empty cache never hits.
    if key == last_key {
        return Some(last_seconds);
    }
    let digits = |from: usize, len: usize| decimal(&prefix, from, len);
    if prefix[4] != b'-' || prefix[7] != b'-' || prefix[10] != b'T' || prefix[13] != b':' {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    let (hour, minute) = (digits(11, 2)?, digits(14, 2)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
    {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60;
    LAST_MINUTE.set((key, seconds));
    Some(seconds)
}

/// The decimal number in `b[from..from + len]`; `None` if a byte is not a digit.
fn decimal(b: &[u8], from: usize, len: usize) -> Option<i64> {
    let mut value = 0i64;
    for &c in b.get(from..from + len)? {
        if !c.is_ascii_digit() {
            return None;
        }
        value = value * 10 + i64::from(c - b'0');
    }
    Some(value)
}

fn two_digits(a: u8, b: u8) -> Option<i64> {
    if a.is_ascii_digit() && b.is_ascii_digit() {
        Some(i64::from(a - b'0') * 10 + i64::from(b - b'0'))
    } else {
        None
    }
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Shared test fixtures: CRI and docker lines with what parsing them must give.
pub mod cases {
    use super::{ParseError, Stream};

    /// What a good line parses to.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Expected {
        pub timestamp_ns: i64,
        pub stream: Stream,
        pub partial: bool,
        pub content: Vec<u8>,
    }

    #[derive(Clone, Debug)]
    pub struct Case {
        pub name: &'static str,
        pub line: Vec<u8>,
        pub expected: Result<Expected, ParseError>,
    }

    /// 2024-01-15T10:20:30Z in unix nanoseconds.
    pub const T0_NS: i64 = 1_705_314_030_000_000_000;

    fn ok(ns: i64, stream: Stream, partial: bool, content: &[u8]) -> Result<Expected, ParseError> {
        Ok(Expected {
            timestamp_ns: ns,
            stream,
            partial,
            content: content.to_vec(),
        })
    }

    fn case(name: &'static str, line: &[u8], expected: Result<Expected, ParseError>) -> Case {
        Case {
            name,
            line: line.to_vec(),
            expected,
        }
    }

    /// CRI lines, good and malformed; every malformed kind at least once.
    pub fn cri() -> Vec<Case> {
        use ParseError::*;
        use Stream::*;
        let mut huge = b"2024-01-15T10:20:30Z stdout F ".to_vec();
        huge.resize(huge.len() + 4 * 1024 * 1024, b'x');
        let huge_content = vec![b'x'; 4 * 1024 * 1024];
        vec![
            case(
                "full line, nanoseconds",
                b"2024-01-15T10:20:30.123456789Z stdout F hello world",
                ok(T0_NS + 123_456_789, Stdout, false, b"hello world"),
            ),
            case(
                "partial line on stderr",
                b"2024-01-15T10:20:30.5Z stderr P first half",
                ok(T0_NS + 500_000_000, Stderr, true, b"first half"),
            ),
            case(
                "positive offset",
                b"2024-01-15T12:20:30.000000001+02:00 stdout F x",
                ok(T0_NS + 1, Stdout, false, b"x"),
            ),
            case(
                "negative offset",
                b"2024-01-15T05:20:30-05:00 stdout F x",
                ok(T0_NS, Stdout, false, b"x"),
            ),
            case(
                "empty content after space",
                b"2024-01-15T10:20:30Z stdout F ",
                ok(T0_NS, Stdout, false, b""),
            ),
            case(
                "empty content without space",
                b"2024-01-15T10:20:30Z stdout F",
                ok(T0_NS, Stdout, false, b""),
            ),
            case(
                "content keeps inner and trailing spaces",
                b"2024-01-15T10:20:30Z stdout F  a  b ",
                ok(T0_NS, Stdout, false, b" a  b "),
            ),
            case(
                "tag with extra fields",
                b"2024-01-15T10:20:30Z stdout F:x content",
                ok(T0_NS, Stdout, false, b"content"),
            ),
            case(
                "NUL bytes in content",
                b"2024-01-15T10:20:30Z stdout F a\0b",
                ok(T0_NS, Stdout, false, b"a\0b"),
            ),
            case(
                "invalid UTF-8 content is returned as bytes",
                b"2024-01-15T10:20:30Z stdout F \xff\xfe ok",
                ok(T0_NS, Stdout, false, b"\xff\xfe ok"),
            ),
            case(
                "lowercase t and z (chrono path)",
                b"2024-01-15t10:20:30z stdout F x",
                ok(T0_NS, Stdout, false, b"x"),
            ),
            case(
                "more than 9 fraction digits (chrono path)",
                b"2024-01-15T10:20:30.1234567891Z stdout F x",
                ok(T0_NS + 123_456_789, Stdout, false, b"x"),
            ),
            case("empty", b"", Err(Empty)),
            case(
                "only a timestamp",
                b"2024-01-15T10:20:30Z",
                Err(Truncated("stream")),
            ),
            case(
                "truncated after stream",
                b"2024-01-15T10:20:30Z stdout",
                Err(Truncated("tag")),
            ),
            case(
                "truncated timestamp",
                b"2024-01-15T10:2 stdout F x",
                Err(BadTimestamp),
            ),
            case("not a date", b"yesterday stdout F x", Err(BadTimestamp)),
            case(
                "month 13",
                b"2024-13-15T10:20:30Z stdout F x",
                Err(BadTimestamp),
            ),
            case(
                "february 30",
                b"2024-02-30T10:20:30Z stdout F x",
                Err(BadTimestamp),
            ),
            case(
                "no zone",
                b"2024-01-15T10:20:30 stdout F x",
                Err(BadTimestamp),
            ),
            case(
                "year out of i64 nanos",
                b"9999-01-15T10:20:30Z stdout F x",
                Err(BadTimestamp),
            ),
            case(
                "bad stream",
                b"2024-01-15T10:20:30Z stdin F x",
                Err(BadStream),
            ),
            case(
                "double space",
                b"2024-01-15T10:20:30Z  stdout F x",
                Err(BadStream),
            ),
            case("bad flag", b"2024-01-15T10:20:30Z stdout X x", Err(BadFlag)),
            case(
                "flag run into content",
                b"2024-01-15T10:20:30Z stdout Fx",
                Err(BadFlag),
            ),
            case(
                "missing flag",
                b"2024-01-15T10:20:30Z stdout  x",
                Err(BadFlag),
            ),
            case(
                "invalid UTF-8 timestamp",
                b"2024-01-15T10:20:30\xffZ stdout F x",
                Err(BadTimestamp),
            ),
            case(
                "NUL in timestamp",
                b"2024-01-15T10:20:30\0 stdout F x",
                Err(BadTimestamp),
            ),
            case(
                "docker line given to CRI",
                br#"{"log":"x\n","stream":"stdout","time":"2024-01-15T10:20:30Z"}"#,
                Err(Truncated("stream")),
            ),
            Case {
                name: "huge line",
                line: huge,
                expected: Ok(Expected {
                    timestamp_ns: T0_NS,
                    stream: Stdout,
                    partial: false,
                    content: huge_content,
                }),
            },
        ]
    }

    /// docker json-file lines, good and malformed.
    pub fn docker() -> Vec<Case> {
        use ParseError::*;
        use Stream::*;
        vec![
            case(
                "full line",
                br#"{"log":"hello world\n","stream":"stdout","time":"2024-01-15T10:20:30.123456789Z"}"#,
                ok(T0_NS + 123_456_789, Stdout, false, b"hello world"),
            ),
            case(
                "partial line",
                br#"{"log":"first half","stream":"stderr","time":"2024-01-15T10:20:30Z"}"#,
                ok(T0_NS, Stderr, true, b"first half"),
            ),
            case(
                "escapes",
                br#"{"log":"a \"q\" \\ \u00e9\t\n","stream":"stdout","time":"2024-01-15T10:20:30Z"}"#,
                ok(T0_NS, Stdout, false, "a \"q\" \\ \u{e9}\t".as_bytes()),
            ),
            case(
                "empty full line",
                br#"{"log":"\n","stream":"stdout","time":"2024-01-15T10:20:30Z"}"#,
                ok(T0_NS, Stdout, false, b""),
            ),
            case(
                "extra attrs field",
                br#"{"log":"x\n","stream":"stdout","attrs":{"a":"b"},"time":"2024-01-15T10:20:30Z"}"#,
                ok(T0_NS, Stdout, false, b"x"),
            ),
            case("empty", b"", Err(Empty)),
            case("truncated", br#"{"log":"x\n","stream":"std"#, Err(BadJson)),
            case("not json", b"2024-01-15T10:20:30Z stdout F x", Err(BadJson)),
            case("missing time", br#"{"log":"x\n","stream":"stdout"}"#, Err(BadJson)),
            case("bad stream", br#"{"log":"x\n","stream":"stdin","time":"2024-01-15T10:20:30Z"}"#, Err(BadStream)),
            case("bad time", br#"{"log":"x\n","stream":"stdout","time":"noon"}"#, Err(BadTimestamp)),
            case("invalid UTF-8", b"{\"log\":\"\xff\\n\",\"stream\":\"stdout\",\"time\":\"2024-01-15T10:20:30Z\"}", Err(BadJson)),
            case("log is not a string", br#"{"log":1,"stream":"stdout","time":"2024-01-15T10:20:30Z"}"#, Err(BadJson)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place stream and tag parse gives what the general one gives, or leaves
    /// the line to it.
    #[test]
    fn stream_and_tag_agrees_with_the_general_parse() {
        let general = |rest: &'static [u8]| {
            let (stream, rest) = split_space(rest)?;
            let (tag, content) = split_space(rest).unwrap_or((rest, &[]));
            Some((Stream::from_bytes(stream)?, parse_tag(tag)?, content))
        };
        for rest in [
            &b"stdout F hello"[..],
            b"stderr P half ",
            b"stdout F ",
            b"stdout F  two  spaces",
            b"stderr F:x tagged",
            b"stdout F",
            b"stdout  F x",
            b"stdoutF x",
            b"stdin F x",
            b"stdout X x",
            b"std",
            b"",
        ] {
            if let Some(fast) = stream_and_tag(rest) {
                assert_eq!(
                    Some(fast),
                    general(rest),
                    "{:?}",
                    String::from_utf8_lossy(rest)
                );
            }
        }
        assert_eq!(
            stream_and_tag(b"stderr P x"),
            Some((Stream::Stderr, true, &b"x"[..]))
        );
        assert_eq!(
            stream_and_tag(b"stderr F:x y"),
            None,
            "tags with `:` go the long way"
        );
    }

    #[test]
    fn cri_table() {
        for case in cases::cri() {
            let got = parse_cri(&case.line).map(|l| cases::Expected {
                timestamp_ns: l.timestamp_ns,
                stream: l.stream,
                partial: l.partial,
                content: l.content.to_vec(),
            });
            assert_eq!(got, case.expected, "case {:?}", case.name);
        }
    }

    #[test]
    fn docker_table() {
        for case in cases::docker() {
            let got = parse_docker(&case.line).map(|l| cases::Expected {
                timestamp_ns: l.timestamp_ns,
                stream: l.stream,
                partial: l.partial,
                content: l.content.as_bytes().to_vec(),
            });
            assert_eq!(got, case.expected, "case {:?}", case.name);
        }
    }

    #[test]
    fn unescaped_docker_content_is_borrowed() {
        let line = br#"{"log":"plain\n","stream":"stdout","time":"2024-01-15T10:20:30Z"}"#;
        let parsed = parse_docker(line).unwrap();
        assert!(matches!(parsed.content, Cow::Borrowed("plain")));
        assert!(!parsed.partial);
        // The fast path and serde_json agree on every table case.
        for case in cases::docker() {
            if let Some(fast) = fast_docker(&case.line) {
                let fast =
                    fast.map(|l| (l.timestamp_ns, l.stream, l.partial, l.content.into_owned()));
                let slow: Result<RawDocker<'_>, _> = serde_json::from_slice(&case.line);
                assert!(slow.is_ok() || fast.is_err(), "case {:?}", case.name);
            }
        }
    }

    #[test]
    fn fast_path_agrees_with_chrono() {
        let samples = [
            "1970-01-01T00:00:00Z",
            "1969-12-31T23:59:59.999999999Z",
            "2000-02-29T12:00:00.5+05:30",
            "2024-12-31T23:59:59.000001-08:00",
            "2100-03-01T00:00:00Z",
            "1677-09-22T00:12:44Z",
            "2262-04-11T23:47:16.854775807Z",
        ];
        for sample in samples {
            let fast = fast_rfc3339(sample.as_bytes());
            let slow = chrono::DateTime::parse_from_rfc3339(sample)
                .ok()
                .and_then(|t| t.timestamp_nanos_opt());
            assert_eq!(fast, slow, "{sample}");
            assert!(fast.is_some(), "{sample}");
        }
        // Past the i64 range: both refuse rather than wrap.
        assert_eq!(parse_rfc3339_nanos(b"2262-04-11T23:47:16.854775808Z"), None);
    }

    /// The remembered minute answers only for the same 16 bytes: lines of one minute,
    /// another minute, a bad date after a good one, and back.
    #[test]
    fn remembered_minute_agrees_with_chrono() {
        let samples = [
            ("2024-01-15T10:20:30.1Z", true),
            ("2024-01-15T10:20:59+01:00", true),
            ("2024-01-15T10:20:31Z", true),
            ("2024-01-15T10:21:00Z", true),
            ("2024-02-30T10:21:00Z", false),
            ("2024-01-15T10:21:0xZ", false),
            ("2024-01-15T10:20:30.1Z", true),
            ("2024-01-15T10:20:61Z", false),
        ];
        for _ in 0..2 {
            for (sample, valid) in samples {
                let fast = fast_rfc3339(sample.as_bytes());
                let slow = chrono::DateTime::parse_from_rfc3339(sample)
                    .ok()
                    .and_then(|t| t.timestamp_nanos_opt());
                assert_eq!(fast.is_some(), valid, "{sample}");
                assert_eq!(fast, slow, "{sample}");
            }
        }
    }

    #[test]
    fn leap_second_goes_through_chrono() {
        assert!(parse_rfc3339_nanos(b"2016-12-31T23:59:60Z").is_some());
    }

    #[test]
    fn every_prefix_of_a_good_line_is_handled() {
        let line = b"2024-01-15T10:20:30.123456789+02:00 stderr P some content";
        for end in 0..=line.len() {
            let _ = parse_cri(&line[..end]);
            let _ = parse_docker(&line[..end]);
        }
        let docker = br#"{"log":"x\n","stream":"stdout","time":"2024-01-15T10:20:30Z"}"#;
        for end in 0..=docker.len() {
            let _ = parse_docker(&docker[..end]);
        }
    }

    #[test]
    fn reasons_are_distinct() {
        let errors = [
            ParseError::Empty,
            ParseError::Truncated("x"),
            ParseError::BadTimestamp,
            ParseError::BadStream,
            ParseError::BadFlag,
            ParseError::BadJson,
        ];
        let reasons: std::collections::BTreeSet<_> = errors.iter().map(|e| e.reason()).collect();
        assert_eq!(reasons.len(), errors.len());
    }
}
