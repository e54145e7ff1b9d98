use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::{Limits, MalformedLinePolicy, Stage};
use crate::cri::cases::{self, T0_NS};
use crate::entry::{Entry, LabelSet};

const NOW: i64 = T0_NS + 3_600_000_000_000;

fn stages(yaml: &str) -> Vec<Stage> {
    serde_yaml::from_str(yaml).unwrap()
}

fn pipeline(yaml: &str) -> Pipeline {
    Pipeline::new(&stages(yaml), &Limits::default()).unwrap()
}

fn pipeline_with(yaml: &str, limits: Limits) -> Pipeline {
    Pipeline::new(&stages(yaml), &limits).unwrap()
}

fn labels() -> LabelSet {
    Arc::new(BTreeMap::from([
        ("namespace".to_string(), "shop".to_string()),
        ("pod".to_string(), "web-0".to_string()),
        (
            "filename".to_string(),
            "/var/log/pods/shop_web-0_uid/main/0.log".to_string(),
        ),
    ]))
}

/// Feeds lines as if read back to back from one file, starting at offset `*offset`.
struct Feeder {
    pipeline: Pipeline,
    state: StreamState,
    labels: LabelSet,
    offset: u64,
    out: Vec<Entry>,
    stats: PipelineStats,
}

impl Feeder {
    fn new(pipeline: Pipeline) -> Self {
        let state = pipeline.stream();
        Self {
            pipeline,
            state,
            labels: labels(),
            offset: 0,
            out: Vec::new(),
            stats: PipelineStats::default(),
        }
    }

    fn push_at(&mut self, line: &[u8], now: i64) -> PushOutcome {
        let start = self.offset;
        self.offset += line.len() as u64 + 1;
        let outcome = self.pipeline.push(
            &mut self.state,
            line,
            start,
            self.offset,
            &self.labels,
            now,
            &mut self.out,
            &mut self.stats,
        );
        // Every stage test doubles as a check that no path loses a line undecided.
        assert!(
            outcome.decided,
            "line {:?} left the pipeline without a decision",
            String::from_utf8_lossy(line)
        );
        outcome
    }

    fn push(&mut self, line: &[u8]) -> PushOutcome {
        self.push_at(line, NOW)
    }

    fn flush(&mut self, now: i64, force: bool) {
        self.pipeline
            .flush(&mut self.state, now, force, &mut self.out, &mut self.stats);
    }

    fn lines(&self) -> Vec<&str> {
        self.out.iter().map(|e| e.line.as_str()).collect()
    }
}

fn cri(time_offset_ms: i64, stream: &str, flag: &str, content: &str) -> Vec<u8> {
    let time = chrono::DateTime::from_timestamp_nanos(T0_NS + time_offset_ms * 1_000_000)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    format!("{time} {stream} {flag} {content}").into_bytes()
}

const OPS: &str =
    "- cri: {}\n- timestamp: {source: time, format: RFC3339}\n- labelDrop: [filename]\n";

#[test]
fn reference_ops_pipeline_end_to_end() {
    let mut f = Feeder::new(pipeline(OPS));
    let lines = [
        cri(0, "stdout", "F", "starting"),
        cri(1, "stdout", "P", "a long line "),
        cri(2, "stderr", "F", "a warning"),
        cri(3, "stdout", "P", "in three "),
        cri(4, "stdout", "F", "pieces"),
        cri(5, "stdout", "F", ""),
    ];
    let mut ends = Vec::new();
    let mut held = Vec::new();
    for line in &lines {
        f.push(line);
        ends.push(f.offset);
        held.push(f.state.held_from());
    }
    assert_eq!(
        f.lines(),
        ["starting", "a warning", "a long line in three pieces", ""]
    );
    let expected_labels = BTreeMap::from([
        ("namespace".to_string(), "shop".to_string()),
        ("pod".to_string(), "web-0".to_string()),
        ("stream".to_string(), "stdout".to_string()),
    ]);
    assert_eq!(*f.out[0].labels, expected_labels);
    assert_eq!(f.out[1].labels["stream"], "stderr");
    assert!(!f.out[1].labels.contains_key("filename"));
    // One label set per output stream, shared, not copied per line.
    assert!(Arc::ptr_eq(&f.out[0].labels, &f.out[2].labels));
    assert!(Arc::ptr_eq(&f.out[0].labels, &f.out[3].labels));
    // The joined line has its first piece's time.
    let times: Vec<i64> = f.out.iter().map(|e| e.timestamp_ns - T0_NS).collect();
    assert_eq!(times, [0, 2_000_000, 1_000_000, 5_000_000]);
    let end_offsets: Vec<u64> = f.out.iter().map(|e| e.end_offset).collect();
    assert_eq!(end_offsets, [ends[0], ends[2], ends[4], ends[5]]);
    // The partial line holds the position at its first piece until the F arrives.
    let first_partial_start = ends[0];
    assert_eq!(
        held,
        [
            None,
            Some(first_partial_start),
            Some(first_partial_start),
            Some(first_partial_start),
            None,
            None
        ]
    );
    assert_eq!(f.stats, PipelineStats::default());
}

#[test]
fn partial_lines_of_stdout_and_stderr_are_joined_separately() {
    let mut f = Feeder::new(pipeline("- cri: {}\n"));
    f.push(&cri(0, "stdout", "P", "out-1 "));
    f.push(&cri(0, "stderr", "P", "err-1 "));
    f.push(&cri(0, "stderr", "F", "err-2"));
    assert_eq!(f.state.held_from(), Some(0));
    f.push(&cri(0, "stdout", "F", "out-2"));
    assert_eq!(f.lines(), ["err-1 err-2", "out-1 out-2"]);
    assert_eq!(f.state.held_from(), None);
}

#[test]
fn joined_line_longer_than_the_limit_is_split_at_the_limit() {
    let limits = Limits {
        max_line_bytes: 10,
        ..Limits::default()
    };
    let mut f = Feeder::new(pipeline_with("- cri: {}\n", limits));
    let parts = ["0123456", "789abcdef", "ghijklmnopqrstuvw", "xyz"];
    let mut starts = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        starts.push(f.offset);
        let flag = if i + 1 == parts.len() { "F" } else { "P" };
        f.push(&cri(0, "stdout", flag, part));
        if flag == "P" {
            let held = f.state.held_from().unwrap();
            assert!(f.out.iter().all(|e| e.end_offset <= held.max(e.end_offset)));
        }
    }
    assert_eq!(
        f.lines(),
        ["0123456789", "abcdefghij", "klmnopqrst", "uvwxyz"]
    );
    assert_eq!(f.stats.split_lines, 1);
    // A piece cut inside a raw line resumes at that line's start; the last one past
    // the final line.
    let ends: Vec<u64> = f.out.iter().map(|e| e.end_offset).collect();
    assert_eq!(ends, [starts[1], starts[2], starts[2], f.offset]);
    assert_eq!(f.state.held_from(), None);
}

#[test]
fn long_lines_are_split_at_character_boundaries() {
    let limits = Limits {
        max_line_bytes: 5,
        ..Limits::default()
    };
    let mut f = Feeder::new(pipeline_with("- cri: {}\n", limits.clone()));
    f.push(&cri(0, "stdout", "F", "ééééé"));
    assert_eq!(f.lines(), ["éé", "éé", "é"]);
    assert_eq!(f.stats.split_lines, 1);
    assert_eq!(f.stats.invalid_utf8_lines, 0);
    assert!(f.out[..2].iter().all(|e| e.end_offset == 0));
    assert_eq!(f.out[2].end_offset, f.offset);

    let mut raw = Feeder::new(pipeline_with("[]", limits));
    raw.push(b"abcdefghijkl");
    assert_eq!(raw.lines(), ["abcde", "fghij", "kl"]);
    assert_eq!(raw.stats.split_lines, 1);
}

#[test]
fn malformed_lines_pass_raw_and_are_counted() {
    let mut f = Feeder::new(pipeline(OPS));
    let bad: Vec<cases::Case> = cases::cri()
        .into_iter()
        .filter(|c| c.expected.is_err())
        .collect();
    assert!(
        bad.len() >= 10,
        "the table must keep at least 10 malformed kinds"
    );
    for case in &bad {
        f.push(&case.line);
    }
    assert_eq!(f.stats.malformed_lines, bad.len() as u64);
    assert_eq!(f.out.len(), bad.len());
    for (entry, case) in f.out.iter().zip(&bad) {
        assert_eq!(entry.timestamp_ns, NOW, "{}", case.name);
        assert_eq!(
            entry.line,
            String::from_utf8_lossy(&case.line),
            "{}",
            case.name
        );
        assert!(!entry.labels.contains_key("filename"), "{}", case.name);
        assert!(!entry.labels.contains_key("stream"), "{}", case.name);
    }
    assert_eq!(f.stats.invalid_utf8_lines, 1);
}

#[test]
fn malformed_lines_are_dropped_when_configured() {
    let limits = Limits {
        malformed_lines: MalformedLinePolicy::Drop,
        ..Limits::default()
    };
    let mut f = Feeder::new(pipeline_with("- docker: {}\n", limits));
    let mut bad = 0;
    for case in cases::docker() {
        f.push(&case.line);
        bad += u64::from(case.expected.is_err());
    }
    assert_eq!(f.stats.malformed_lines, bad);
    assert_eq!(f.stats.dropped[MALFORMED_REASON], bad);
    // Good ones: full lines go out; the partial one is held.
    assert_eq!(f.out.len(), 4);
    assert!(f.state.held_from().is_some());
}

#[test]
fn good_table_lines_match_the_parser() {
    let mut f = Feeder::new(pipeline("- cri: {}\n"));
    for case in cases::cri() {
        let Ok(expected) = case.expected else {
            continue;
        };
        let before = f.out.len();
        f.push(&case.line);
        if expected.partial {
            f.flush(NOW, true);
        }
        // A line over the default limit comes out in pieces; together they are the line.
        let joined: String = f.out[before..].iter().map(|e| e.line.as_str()).collect();
        assert_eq!(
            f.out[before].timestamp_ns, expected.timestamp_ns,
            "{}",
            case.name
        );
        assert!(
            joined == String::from_utf8_lossy(&expected.content),
            "{}",
            case.name
        );
    }
    assert_eq!(f.stats.malformed_lines, 0);
    assert_eq!(f.stats.invalid_utf8_lines, 1);
    assert_eq!(f.stats.split_lines, 1);
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A deterministic byte soup made of CRI fragments, separators and invalid UTF-8.
    let atoms: [&[u8]; 12] = [
        b"2024-01-15T10:20:30Z",
        b" ",
        b"stdout",
        b"stderr",
        b"P",
        b"F",
        b"\xff",
        b"\0",
        b"{\"log\":\"",
        b"\\n\"",
        b"\xc3",
        b"x",
    ];
    let limits = Limits {
        max_line_bytes: 7,
        ..Limits::default()
    };
    for yaml in ["- cri: {}\n", "- docker: {}\n", "[]"] {
        let mut f = Feeder::new(pipeline_with(yaml, limits.clone()));
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..3000 {
            let mut line = Vec::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            for k in 0..(seed % 9) {
                line.extend_from_slice(atoms[((seed >> (k * 4)) % 12) as usize]);
            }
            f.push(&line);
        }
        f.flush(NOW, true);
        // Each invalid byte becomes a 3-byte U+FFFD: at most 3 times the raw limit.
        assert!(f.out.iter().all(|e| e.line.len() <= 7 * 3));
        assert_eq!(f.state.held_from(), None);
    }
}

#[test]
fn timestamp_stage_formats_fallbacks_and_failures() {
    let yaml = "- json: {expressions: {ts: ''}}\n\
                - timestamp: {source: ts, format: UnixMs, fallbackFormats: ['%Y-%m-%d %H:%M:%S']}\n";
    let mut f = Feeder::new(pipeline(yaml));
    f.push(br#"{"ts": 1705314030123}"#);
    f.push(br#"{"ts": "2024-01-15 10:20:30"}"#);
    f.push(br#"{"ts": "garbage"}"#);
    f.push(b"not json");
    let times: Vec<i64> = f.out.iter().map(|e| e.timestamp_ns).collect();
    assert_eq!(times, [T0_NS + 123_000_000, T0_NS, NOW, NOW]);
}

#[test]
fn timestamp_from_cri_time_in_another_format_reparses() {
    // A json field named `time` replaces the CRI one; the cached parse must not be used.
    let yaml = "- cri: {}\n- json: {expressions: {time: t}}\n- timestamp: {source: time, format: RFC3339}\n";
    let mut f = Feeder::new(pipeline(yaml));
    f.push(&cri(0, "stdout", "F", r#"{"t": "2024-01-15T10:20:31Z"}"#));
    assert_eq!(f.out[0].timestamp_ns, T0_NS + 1_000_000_000);
}

#[test]
fn label_keep_and_static_labels() {
    let yaml =
        "- cri: {}\n- labelKeep: [namespace, stream]\n- staticLabels: {cluster: ops, empty: ''}\n";
    let mut f = Feeder::new(pipeline(yaml));
    f.push(&cri(0, "stdout", "F", "a"));
    f.push(&cri(0, "stdout", "F", "b"));
    let expected = BTreeMap::from([
        ("cluster".to_string(), "ops".to_string()),
        ("namespace".to_string(), "shop".to_string()),
        ("stream".to_string(), "stdout".to_string()),
    ]);
    assert_eq!(*f.out[0].labels, expected);
    assert!(Arc::ptr_eq(&f.out[0].labels, &f.out[1].labels));
}

#[test]
fn new_stream_labels_are_picked_up() {
    let mut f = Feeder::new(pipeline(OPS));
    f.push(&cri(0, "stdout", "F", "a"));
    let mut relabeled = (*f.labels).clone();
    relabeled.insert("app".to_string(), "web".to_string());
    f.labels = Arc::new(relabeled);
    f.push(&cri(0, "stdout", "F", "b"));
    assert!(!f.out[0].labels.contains_key("app"));
    assert_eq!(f.out[1].labels["app"], "web");
}

#[test]
fn json_extracts_nested_paths_and_non_strings() {
    let yaml = "- json: {expressions: {level: '', user: req.user.name, code: status, first: items.0, obj: req.user}}\n\
                - structuredMetadata: {user: '', code: '', first: '', obj: ''}\n- labels: {level: ''}\n";
    let mut f = Feeder::new(pipeline(yaml));
    f.push(br#"{"level":"warn","status":503,"items":[true],"req":{"user":{"name":"ada"}}}"#);
    f.push(b"{broken");
    let e = &f.out[0];
    assert_eq!(e.labels["level"], "warn");
    assert_eq!(
        e.structured_metadata,
        [
            ("code".to_string(), "503".to_string()),
            ("first".to_string(), "true".to_string()),
            ("obj".to_string(), r#"{"name":"ada"}"#.to_string()),
            ("user".to_string(), "ada".to_string()),
        ]
    );
    assert_eq!(f.out[1].line, "{broken");
    assert!(f.out[1].structured_metadata.is_empty());
    assert!(!f.out[1].labels.contains_key("level"));
}

#[test]
fn json_from_a_source_field() {
    let yaml = "- regex: {expression: '^(?P<prefix>\\w+) (?P<payload>.*)$'}\n\
                - json: {source: payload, expressions: {id: ''}}\n- structuredMetadata: {id: '', prefix: ''}\n";
    let mut f = Feeder::new(pipeline(yaml));
    f.push(br#"INFO {"id":"42"}"#);
    assert_eq!(
        f.out[0].structured_metadata,
        [
            ("id".to_string(), "42".to_string()),
            ("prefix".to_string(), "INFO".to_string())
        ]
    );
}

#[test]
fn regex_with_source_keeps_the_source_field() {
    let yaml = "- regex: {expression: '^(?P<level>[A-Z]+) (?P<msg>.*)$'}\n\
                - regex: {source: msg, expression: 'user=(?P<user>\\w+)'}\n\
                - structuredMetadata: {msg: '', user: ''}\n";
    let mut f = Feeder::new(pipeline(yaml));
    f.push(b"INFO login user=ada ok");
    f.push(b"no match here");
    assert_eq!(
        f.out[0].structured_metadata,
        [
            ("msg".to_string(), "login user=ada ok".to_string()),
            ("user".to_string(), "ada".to_string())
        ]
    );
    assert!(f.out[1].structured_metadata.is_empty());
}

#[test]
fn labels_stage_reuses_label_sets_per_value() {
    let yaml = "- cri: {}\n- regex: {expression: '^(?P<lvl>\\w+)'}\n- labels: {level: lvl}\n";
    let mut f = Feeder::new(pipeline(yaml));
    for content in ["info a", "warn b", "info c", "warn d", "-"] {
        f.push(&cri(0, "stdout", "F", content));
    }
    let levels: Vec<Option<&str>> = f
        .out
        .iter()
        .map(|e| e.labels.get("level").map(String::as_str))
        .collect();
    assert_eq!(
        levels,
        [Some("info"), Some("warn"), Some("info"), Some("warn"), None]
    );
    assert!(Arc::ptr_eq(&f.out[0].labels, &f.out[2].labels));
    assert!(Arc::ptr_eq(&f.out[1].labels, &f.out[3].labels));
    assert_eq!(f.out[4].labels["stream"], "stdout");
}

#[test]
fn drop_stage_conditions_are_anded_and_counted_by_reason() {
    let yaml = "- drop: {expression: 'health', dropCounterReason: healthchecks}\n\
                - drop: {expression: 'debug', longerThan: 10}\n\
                - drop: {olderThan: 1h}\n\
                - json: {expressions: {skip: ''}}\n\
                - drop: {source: skip}\n";
    let mut f = Feeder::new(pipeline(yaml));
    f.push(b"GET /healthz");
    f.push(b"debug");
    f.push(b"debug: a long line");
    f.push(br#"{"skip": "yes"}"#);
    f.push(br#"{"keep": "yes"}"#);
    assert_eq!(f.lines(), ["debug", r#"{"keep": "yes"}"#]);
    assert_eq!(
        f.stats.dropped,
        BTreeMap::from([
            ("healthchecks".to_string(), 1),
            (DROP_STAGE_REASON.to_string(), 2)
        ])
    );

    let mut old = Feeder::new(pipeline("- cri: {}\n- drop: {olderThan: 30m}\n"));
    old.push_at(&cri(0, "stdout", "F", "old"), T0_NS + 3_600_000_000_000);
    old.push_at(&cri(0, "stdout", "F", "fresh"), T0_NS + 60_000_000_000);
    assert_eq!(old.lines(), ["fresh"]);
}

const MULTILINE: &str =
    "- cri: {}\n- multiline: {firstLine: '^\\d{4}-', maxWait: 3s, maxLines: 4}\n";

#[test]
fn multiline_joins_until_the_next_first_line() {
    let mut f = Feeder::new(pipeline(MULTILINE));
    let mut ends = Vec::new();
    let mut held = Vec::new();
    for content in [
        "2024-01-15 panic: boom",
        "  at main.go:10",
        "  at main.go:20",
        "2024-01-15 recovered",
    ] {
        f.push(&cri(0, "stdout", "F", content));
        ends.push(f.offset);
        held.push(f.state.held_from());
    }
    assert_eq!(
        f.lines(),
        ["2024-01-15 panic: boom\n  at main.go:10\n  at main.go:20"]
    );
    assert_eq!(f.out[0].end_offset, ends[2]);
    assert_eq!(held, [Some(0), Some(0), Some(0), Some(ends[2])]);
    // Not flushed before maxWait, flushed after.
    f.flush(NOW + 2_000_000_000, false);
    assert_eq!(f.out.len(), 1);
    f.flush(NOW + 3_000_000_000, false);
    assert_eq!(f.lines()[1], "2024-01-15 recovered");
    assert_eq!(f.out[1].end_offset, ends[3]);
    assert_eq!(f.state.held_from(), None);
}

#[test]
fn multiline_stops_at_max_lines_and_keeps_a_leading_continuation() {
    let mut f = Feeder::new(pipeline(MULTILINE));
    for content in ["orphan", "a", "b", "c", "d", "e"] {
        f.push(&cri(0, "stdout", "F", content));
    }
    assert_eq!(f.lines(), ["orphan\na\nb\nc"]);
    f.flush(NOW, true);
    assert_eq!(f.lines(), ["orphan\na\nb\nc", "d\ne"]);
}

#[test]
fn multiline_with_partial_lines_holds_from_the_earliest() {
    let mut f = Feeder::new(pipeline(MULTILINE));
    f.push(&cri(0, "stdout", "F", "2024-01-15 start"));
    let continuation_start = f.offset;
    f.push(&cri(0, "stdout", "P", "  cont"));
    assert_eq!(f.state.held_from(), Some(0));
    f.push(&cri(0, "stdout", "F", "inued"));
    f.push(&cri(0, "stdout", "P", "2024-01-15 next, par"));
    assert_eq!(f.lines(), Vec::<&str>::new());
    let _ = continuation_start;
    f.push(&cri(0, "stdout", "F", "tial"));
    assert_eq!(f.lines(), ["2024-01-15 start\n  continued"]);
    f.flush(NOW, true);
    assert_eq!(f.lines()[1], "2024-01-15 next, partial");
}

#[test]
fn forced_flush_emits_an_unfinished_partial_line() {
    let mut f = Feeder::new(pipeline(OPS));
    f.push(&cri(0, "stdout", "P", "never "));
    f.push(&cri(0, "stdout", "P", "finished"));
    f.flush(NOW, false);
    assert!(f.out.is_empty());
    f.flush(NOW, true);
    assert_eq!(f.lines(), ["never finished"]);
    assert_eq!(f.out[0].end_offset, f.offset);
    assert_eq!(f.out[0].labels["stream"], "stdout");
    assert_eq!(f.state.held_from(), None);
}

#[test]
fn limit_drops_over_the_rate() {
    let mut f = Feeder::new(pipeline("- limit: {rate: 2, burst: 3, drop: true}\n"));
    for _ in 0..5 {
        f.push_at(b"x", NOW);
    }
    assert_eq!(f.out.len(), 3);
    assert_eq!(f.stats.dropped[RATE_LIMITED_REASON], 2);
    // Half a second later one token is back.
    f.push_at(b"x", NOW + 500_000_000);
    f.push_at(b"x", NOW + 500_000_000);
    assert_eq!(f.out.len(), 4);
}

#[test]
fn limit_in_wait_mode_asks_the_reader_to_pause() {
    let mut f = Feeder::new(pipeline("- limit: {rate: 10, burst: 1}\n"));
    assert_eq!(f.push(b"a").wait, None);
    let wait = f.push(b"b").wait.unwrap();
    assert_eq!(wait, Duration::from_millis(100));
    assert_eq!(f.out.len(), 2, "wait mode never drops");
    assert!(f.stats.dropped.is_empty());
    // After waiting as asked, the next line passes without a new wait only once the debt is paid.
    assert_eq!(f.push_at(b"c", NOW + 200_000_000).wait, None);
}

#[test]
fn docker_pipeline_joins_partial_lines() {
    let mut f = Feeder::new(pipeline("- docker: {}\n"));
    f.push(br#"{"log":"part one, ","stream":"stdout","time":"2024-01-15T10:20:30Z"}"#);
    assert_eq!(f.state.held_from(), Some(0));
    f.push(br#"{"log":"part \"two\"\n","stream":"stdout","time":"2024-01-15T10:20:31Z"}"#);
    assert_eq!(f.lines(), [r#"part one, part "two""#]);
    assert_eq!(f.out[0].timestamp_ns, T0_NS);
    assert_eq!(f.out[0].labels["stream"], "stdout");
}

#[test]
fn no_parser_timestamps_now() {
    let mut f = Feeder::new(pipeline("[]"));
    f.push(b"plain \xff line");
    assert_eq!(f.out[0].timestamp_ns, NOW);
    assert_eq!(f.out[0].line, "plain \u{fffd} line");
    assert_eq!(f.stats.invalid_utf8_lines, 1);
    assert!(Arc::ptr_eq(&f.out[0].labels, &f.labels));
}

#[test]
fn default_stream_state_works() {
    let p = pipeline(MULTILINE);
    let mut state = StreamState::default();
    let (mut out, mut stats) = (Vec::new(), PipelineStats::default());
    p.push(
        &mut state,
        &cri(0, "stdout", "F", "2024-x"),
        0,
        10,
        &labels(),
        NOW,
        &mut out,
        &mut stats,
    );
    assert_eq!(state.held_from(), Some(0));
    p.flush(&mut state, NOW, true, &mut out, &mut stats);
    assert_eq!(out.len(), 1);
}

#[test]
fn compile_errors_name_the_stage() {
    let cases = [
        (
            "- cri: {}\n- regex: {expression: '(?P<x>'}\n",
            "pipeline[1] (regex): invalid regex",
        ),
        (
            "- drop: {expression: '['}\n",
            "pipeline[0] (drop): invalid regex",
        ),
        (
            "- multiline: {firstLine: '(', maxWait: 1s}\n",
            "pipeline[0] (multiline): invalid regex",
        ),
        (
            "- labelDrop: [a]\n- cri: {}\n",
            "pipeline[1] (cri): a parser stage must be the first",
        ),
        (
            "- regex: {expression: 'no groups'}\n",
            "pipeline[0] (regex): regex \"no groups\" has no named",
        ),
        (
            "- labels: {'bad-name': x}\n",
            "pipeline[0] (labels): \"bad-name\" is not a valid label name",
        ),
        (
            "- staticLabels: {'1x': y}\n",
            "pipeline[0] (staticLabels): \"1x\" is not a valid",
        ),
        (
            "- timestamp: {source: t, format: '%Q'}\n",
            "pipeline[0] (timestamp): invalid strftime",
        ),
        (
            "- limit: {rate: 0, burst: 1}\n",
            "pipeline[0] (limit): rate must be above 0",
        ),
        (
            "- limit: {rate: 1, burst: 0}\n",
            "pipeline[0] (limit): burst must be at least 1",
        ),
        ("- drop: {}\n", "pipeline[0] (drop): set at least one"),
        (
            "- {}\n",
            "pipeline[0] (stage): a stage must name exactly one kind",
        ),
    ];
    for (yaml, expected) in cases {
        let err = Pipeline::new(&stages(yaml), &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(expected), "{yaml}: {err}");
    }
}

#[test]
fn cut_at_respects_characters_and_progress() {
    assert_eq!(cut_at("aé".as_bytes(), 2, true), 1);
    assert_eq!(cut_at("é".as_bytes(), 1, true), 1);
    assert_eq!(cut_at("é".as_bytes(), 1, false), 0);
    assert_eq!(cut_at(b"\x80\x80\x80\x80\x80", 4, true), 4);
    assert_eq!(cut_at(b"abc", 10, true), 3);
}

/// `tenantFrom: {field: ...}`: each entry carries the field's value (not empty) as its
/// tenant, through a multiline join too; without the field, no tenant (the default).
#[test]
fn a_tenant_field_is_carried_on_each_entry() {
    let yaml = "- cri: {}\n- regex: {expression: '^(?P<tenant>\\w*):'}\n\
                - multiline: {firstLine: '^\\w*: '}\n";
    let pipeline =
        Pipeline::with_tenant_field(&stages(yaml), &Limits::default(), Some("tenant")).unwrap();
    let mut feeder = Feeder::new(pipeline);
    for (i, content) in [
        "shop: one",
        "web: two",
        "  web continued",
        ": empty field",
        "no-colon-here",
    ]
    .into_iter()
    .enumerate()
    {
        feeder.push(&cri(i as i64, "stdout", "F", content));
    }
    feeder.flush(NOW, true);
    let tenants: Vec<(&str, Option<&str>)> = feeder
        .out
        .iter()
        .map(|e| (e.line.as_str(), e.tenant.as_deref()))
        .collect();
    assert_eq!(
        tenants,
        [
            ("shop: one", Some("shop")),
            ("web: two\n  web continued", Some("web")),
            (": empty field\nno-colon-here", None),
        ]
    );
    let plain = Feeder::new(pipeline_with(yaml, Limits::default()));
    assert!(plain.out.iter().all(|e| e.tenant.is_none()));
}
