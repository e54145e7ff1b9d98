//! Tailer scenarios with a trivial handler (one entry per line; `DROP...` lines are
//! dropped; a `HOLD...` line is held until the next line; a `LOSE...` line vanishes
//! without a decision, as a bug would lose it; a pod in a namespace `t-<x>` sends its
//! entries to tenant `<x>`).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::ack::{AckToken, Lag, Ledger, Parcel};
use super::*;

#[derive(Default)]
struct Held {
    held: Option<(u64, String)>,
    tenant: Option<crate::entry::Tenant>,
}

struct Lines;

impl LineHandler for Lines {
    type Stream = Held;
    fn open(&mut self, file: &FileInfo) -> Option<Held> {
        let tenant = file
            .pod
            .as_ref()
            .and_then(|p| p.namespace.strip_prefix("t-"))
            .map(Into::into);
        Some(Held { held: None, tenant })
    }
    fn line(
        &mut self,
        stream: &mut Held,
        raw: &[u8],
        start: u64,
        end: u64,
        out: &mut Vec<Entry>,
    ) -> LineOutcome {
        let text = String::from_utf8_lossy(raw).to_string();
        let joined = match stream.held.take() {
            Some((_, first)) => format!("{first}+{text}"),
            None if text.starts_with("HOLD") => {
                stream.held = Some((start, text));
                return LineOutcome::DONE;
            }
            None if text.starts_with("LOSE") => {
                return LineOutcome {
                    wait: None,
                    decided: false,
                };
            }
            None => text,
        };
        if !joined.starts_with("DROP") {
            out.push(Entry {
                timestamp_ns: 0,
                line: joined,
                labels: Arc::new(BTreeMap::new()),
                structured_metadata: Vec::new(),
                end_offset: end,
                tenant: stream.tenant.clone(),
            });
        }
        LineOutcome::DONE
    }
    fn flush(&mut self, stream: &mut Held, force: bool, out: &mut Vec<Entry>) {
        if force && let Some((_, text)) = stream.held.take() {
            out.push(Entry {
                timestamp_ns: 0,
                line: text,
                labels: Arc::new(BTreeMap::new()),
                structured_metadata: Vec::new(),
                end_offset: 0,
                tenant: None,
            });
        }
    }
    fn held_from(&self, stream: &Held) -> Option<u64> {
        stream.held.as_ref().map(|(start, _)| *start)
    }
}

struct Bed {
    dir: tempfile::TempDir,
    ledger: Arc<Ledger>,
    tailer: Tailer<Lines>,
    rx: UnboundedReceiver<Parcel>,
}

impl Bed {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::with(dir, Ledger::default(), 1 << 20, 0)
    }

    fn with(dir: tempfile::TempDir, ledger: Ledger, max_buffered: u64, baseline_ms: i64) -> Self {
        let mut cfg = TailConfig::new(dir.path(), max_buffered, 1024);
        cfg.baseline_ms = baseline_ms;
        Self::with_config(dir, ledger, cfg)
    }

    fn with_config(dir: tempfile::TempDir, ledger: Ledger, cfg: TailConfig) -> Self {
        let ledger = Arc::new(ledger);
        let (tx, rx) = unbounded_channel();
        let tailer = Tailer::new(cfg, Lines, ledger.clone(), tx, Arc::new(Metrics::new()));
        Self {
            dir,
            ledger,
            tailer,
            rx,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn append(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    /// Scan and read until nothing more comes; return the lines and their tokens.
    fn step(&mut self) -> (Vec<String>, Vec<AckToken>) {
        let mut lines = Vec::new();
        let mut tokens = Vec::new();
        for _ in 0..4 {
            self.tailer.scan().unwrap();
            self.tailer.read_pass();
        }
        while let Ok(parcel) = self.rx.try_recv() {
            for p in parcel {
                lines.push(p.entry.line);
                tokens.push(p.token);
            }
        }
        (lines, tokens)
    }

    fn step_acked(&mut self) -> Vec<String> {
        let (lines, tokens) = self.step();
        self.ledger.ack(&tokens);
        lines
    }
}

const POD: &str = "ns_pod-a_uid-1/app";

/// A tenant whose entries are not acknowledged (Loki throttles it) fills its share of
/// the buffer: its file waits, another tenant's file is still read, and the first one
/// resumes once its entries are acknowledged.
#[test]
fn a_tenant_over_its_share_of_the_buffer_pauses_only_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TailConfig::new(dir.path(), 100_000, 1024);
    cfg.tenant_buffered_bytes = Some(2_000);
    cfg.baseline_ms = 0;
    let mut bed = Bed::with_config(dir, Ledger::default(), cfg);
    let (throttled, other) = ("t-a_pod_uid-a/app/0.log", "t-b_pod_uid-b/app/0.log");
    let lines =
        |prefix: &str, n: usize| -> String { (0..n).map(|i| format!("{prefix}{i}\n")).collect() };
    // 40 entries of about 66 bytes: tenant a holds over 2,000 bytes.
    bed.append(throttled, &lines("a", 40));
    let (got, held) = bed.step();
    assert_eq!(got.len(), 40);
    assert!(bed.ledger.tenant_bytes(Some("a")) >= 2_000);
    bed.append(throttled, &lines("late-a", 5));
    bed.append(other, &lines("b", 5));
    let got = bed.step_acked();
    assert_eq!(
        got,
        ["b0", "b1", "b2", "b3", "b4"],
        "only b's file was read"
    );
    bed.ledger.ack(&held);
    assert_eq!(bed.ledger.tenant_bytes(Some("a")), 0);
    let got = bed.step_acked();
    assert_eq!(got.len(), 5, "a's file is read again: {got:?}");
    assert!(got.iter().all(|l| l.starts_with("late-a")));
}

#[test]
fn reads_complete_lines_and_waits_for_the_rest() {
    let mut bed = Bed::new();
    bed.append(&format!("{POD}/0.log"), "one\ntwo\nthr");
    assert_eq!(bed.step_acked(), ["one", "two"]);
    bed.append(&format!("{POD}/0.log"), "ee\nfour\n");
    assert_eq!(bed.step_acked(), ["three", "four"]);
    let snap = bed.ledger.snapshot(0);
    assert_eq!(
        snap[&bed.path(&format!("{POD}/0.log")).display().to_string()].offset,
        19
    );
}

#[test]
fn held_and_unacknowledged_lines_keep_the_position_back() {
    let mut bed = Bed::new();
    let rel = format!("{POD}/0.log");
    bed.append(&rel, "a\nDROP\nHOLD\n");
    let (lines, tokens) = bed.step();
    assert_eq!(lines, ["a"]);
    let key = bed.path(&rel).display().to_string();
    assert_eq!(bed.ledger.snapshot(0)[&key].offset, 0, "a not acknowledged");
    bed.ledger.ack(&tokens);
    assert_eq!(
        bed.ledger.snapshot(0)[&key].offset,
        7,
        "DROP passes, HOLD holds"
    );
    bed.append(&rel, "tail\n");
    assert_eq!(bed.step_acked(), ["HOLD+tail"]);
    assert_eq!(bed.ledger.snapshot(0)[&key].offset, 17);
}

#[test]
fn rotation_reads_the_renamed_file_to_its_end_and_skips_its_gzip() {
    let mut bed = Bed::new();
    let active = format!("{POD}/0.log");
    let rotated = format!("{POD}/0.log.20240101-000000");
    bed.append(&active, "r1\nr2\n");
    assert_eq!(bed.step_acked(), ["r1", "r2"]);
    fs::rename(bed.path(&active), bed.path(&rotated)).unwrap();
    // Late write by the runtime before it reopens, then the new file.
    bed.append(&rotated, "r3\n");
    bed.append(&active, "n1\n");
    let mut got = bed.step_acked();
    got.sort();
    assert_eq!(got, ["n1", "r3"]);
    // Kubelet compresses the rotated file, then deletes it.
    let gz = bed.path(&format!("{rotated}.gz"));
    let mut enc = flate2::write::GzEncoder::new(
        fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    enc.write_all(&fs::read(bed.path(&rotated)).unwrap())
        .unwrap();
    enc.finish().unwrap();
    assert!(
        bed.step_acked().is_empty(),
        "the copy of an open file is not read"
    );
    fs::remove_file(bed.path(&rotated)).unwrap();
    assert!(bed.step_acked().is_empty());
    bed.append(&active, "n2\n");
    assert_eq!(bed.step_acked(), ["n2"]);
    assert_eq!(bed.tailer.open_paths(), [bed.path(&active)]);
    // After a restart the gzip is still recognised.
    let records = bed.ledger.snapshot(now_ms());
    let dir = bed.dir;
    let mut bed = Bed::with(dir, Ledger::new(records), 1 << 20, 0);
    assert!(bed.step_acked().is_empty());
}

#[test]
fn restart_resumes_at_the_committed_position_including_unacknowledged_lines() {
    let mut bed = Bed::new();
    let active = format!("{POD}/0.log");
    bed.append(&active, "a\nb\n");
    assert_eq!(bed.step_acked(), ["a", "b"]);
    bed.append(&active, "c\nd\n");
    let (lines, tokens) = bed.step();
    assert_eq!(lines, ["c", "d"]);
    bed.ledger.ack(&tokens[..1]);
    // Crash: d was sent but never acknowledged.
    let records = bed.ledger.snapshot(now_ms());
    let dir = bed.dir;
    let mut bed = Bed::with(dir, Ledger::new(records), 1 << 20, now_ms());
    bed.append(&active, "e\n");
    assert_eq!(bed.step_acked(), ["d", "e"]);
}

#[test]
fn crash_during_rotation_continues_in_the_gzip_copy() {
    let mut bed = Bed::new();
    let active = format!("{POD}/0.log");
    let rotated = format!("{POD}/0.log.20240101-000000");
    let content = "line-0000000001\nline-0000000002\nline-0000000003\n";
    bed.append(&active, content);
    let (lines, tokens) = bed.step();
    assert_eq!(lines.len(), 3);
    bed.ledger.ack(&tokens[..1]);
    let records = bed.ledger.snapshot(now_ms());
    // While the agent is down: rotated, compressed, deleted.
    fs::rename(bed.path(&active), bed.path(&rotated)).unwrap();
    let gz = bed.path(&format!("{rotated}.gz"));
    let mut enc = flate2::write::GzEncoder::new(
        fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    enc.write_all(content.as_bytes()).unwrap();
    enc.finish().unwrap();
    fs::remove_file(bed.path(&rotated)).unwrap();
    let dir = bed.dir;
    let mut bed = Bed::with(dir, Ledger::new(records), 1 << 20, now_ms() + 60_000);
    assert_eq!(bed.step_acked(), ["line-0000000002", "line-0000000003"]);
    assert!(bed.step_acked().is_empty());
}

#[test]
fn unknown_rotated_files_are_read_only_if_newer_than_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let mut bed = Bed::with(dir, Ledger::default(), 1 << 20, now_ms() + 60_000);
    bed.append(&format!("{POD}/0.log.20240101-000000"), "old\n");
    bed.append(&format!("{POD}/0.log"), "new\n");
    assert_eq!(bed.step_acked(), ["new"]);
    let mut bed = Bed::with(tempfile::tempdir().unwrap(), Ledger::default(), 1 << 20, 0);
    bed.append(&format!("{POD}/0.log.20240101-000000"), "missed\n");
    assert_eq!(bed.step_acked(), ["missed"]);
}

#[test]
fn copytruncate_starts_over() {
    let mut bed = Bed::new();
    let active = format!("{POD}/0.log");
    bed.append(&active, "first-long-line\nsecond-long-line\n");
    assert_eq!(bed.step_acked().len(), 2);
    fs::OpenOptions::new()
        .write(true)
        .open(bed.path(&active))
        .unwrap()
        .set_len(0)
        .unwrap();
    bed.append(&active, "x\n");
    assert_eq!(bed.step_acked(), ["x"]);
    let key = bed.path(&active).display().to_string();
    assert_eq!(bed.ledger.snapshot(0)[&key].offset, 2);
}

#[test]
fn a_deleted_pod_is_finished_then_forgotten() {
    let mut bed = Bed::new();
    let active = format!("{POD}/0.log");
    bed.append(&active, "a\n");
    assert_eq!(bed.step_acked(), ["a"]);
    bed.append(&active, "b\nunterminated");
    fs::remove_dir_all(bed.path("ns_pod-a_uid-1")).unwrap();
    let mut got = bed.step_acked();
    got.sort();
    assert_eq!(got, ["b", "unterminated"]);
    assert!(bed.tailer.open_paths().is_empty());
    assert_eq!(bed.ledger.open_files(), 0);
}

#[test]
fn reading_pauses_while_the_buffer_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let mut bed = Bed::with(dir, Ledger::default(), 100, 0);
    let many: String = (0..50).map(|i| format!("line {i}\n")).collect();
    bed.append(&format!("{POD}/0.log"), &many);
    bed.append("ns_pod-b_uid-2/app/0.log", &many);
    let (first, tokens) = bed.step();
    assert!(
        !first.is_empty() && first.len() < 100,
        "read {}",
        first.len()
    );
    assert_eq!(bed.step().0.len(), 0, "nothing more until acknowledged");
    bed.ledger.ack(&tokens);
    let mut total = first.len();
    for _ in 0..10 {
        total += bed.step_acked().len();
    }
    assert_eq!(total, 100);
}

#[test]
fn a_new_container_restart_is_a_new_file() {
    let mut bed = Bed::new();
    bed.append(&format!("{POD}/0.log"), "run0\n");
    assert_eq!(bed.step_acked(), ["run0"]);
    bed.append(&format!("{POD}/1.log"), "run1\n");
    assert_eq!(bed.step_acked(), ["run1"]);
    assert_eq!(bed.tailer.open_paths().len(), 2);
}

fn lag(bed: &Bed) -> (u64, u64, bool) {
    let lag = bed.ledger.lag(now_ms());
    (
        lag.written,
        lag.acknowledged,
        lag.oldest_unacknowledged_ms.is_some(),
    )
}

#[test]
fn lag_is_zero_where_nothing_was_written() {
    let mut bed = Bed::new();
    assert_eq!(lag(&bed), (0, 0, false), "no files at all");
    bed.append(&format!("{POD}/0.log"), "");
    bed.step_acked();
    assert_eq!(lag(&bed), (0, 0, false), "an empty file");
    // A restart at the end of what was written: quiet, whatever the file holds.
    bed.append(&format!("{POD}/0.log"), "a\nb\n");
    bed.step_acked();
    let records = bed.ledger.snapshot(now_ms());
    let mut bed = Bed::with(bed.dir, Ledger::new(records), 1 << 20, now_ms());
    bed.step_acked();
    assert_eq!(lag(&bed), (0, 0, false));
}

#[test]
fn written_bytes_are_acknowledged_once_loki_acknowledged_them() {
    let mut bed = Bed::new();
    bed.append(&format!("{POD}/0.log"), "one\ntwo\n");
    let (lines, tokens) = bed.step();
    assert_eq!(lines, ["one", "two"]);
    assert_eq!(lag(&bed), (8, 0, true), "read and sent, not acknowledged");
    bed.ledger.ack(&tokens[1..]);
    assert_eq!(lag(&bed), (8, 0, true), "in order: one is still out");
    bed.ledger.ack(&tokens[..1]);
    assert_eq!(lag(&bed), (8, 8, false));
}

#[test]
fn bytes_not_read_yet_are_lag() {
    let dir = tempfile::tempdir().unwrap();
    let mut bed = Bed::with(dir, Ledger::default(), 100, 0);
    let many: String = (0..50).map(|i| format!("line {i:02}\n")).collect();
    bed.append(&format!("{POD}/0.log"), &many);
    bed.append("ns_pod-b_uid-2/app/0.log", &many);
    let (_, tokens) = bed.step();
    let (written, acknowledged, _) = lag(&bed);
    assert_eq!((written, acknowledged), (800, 0), "the scan saw it all");
    bed.ledger.ack(&tokens);
    let (written, acknowledged, oldest) = lag(&bed);
    assert!(
        written == 800 && acknowledged < 800 && oldest,
        "{acknowledged}: the paused file is behind"
    );
    for _ in 0..20 {
        bed.step_acked();
    }
    assert_eq!(lag(&bed), (800, 800, false));
}

#[test]
fn dropped_lines_count_as_acknowledged_but_a_lost_line_is_lag() {
    let mut bed = Bed::new();
    let rel = format!("{POD}/0.log");
    bed.append(&rel, "DROP a\nDROP b\n");
    bed.step_acked();
    assert_eq!(lag(&bed), (14, 14, false), "a drop is decided, not lag");
    // A line lost without a decision: lag, and the position stays before it even
    // though the lines after it are acknowledged.
    bed.append(&rel, "LOSE\nc\n");
    assert_eq!(bed.step_acked(), ["c"]);
    assert_eq!(lag(&bed), (21, 14, true));
    let key = bed.path(&rel).display().to_string();
    assert_eq!(bed.ledger.snapshot(0)[&key].offset, 14);
    // Still lag once the file is gone: it is not forgotten as done.
    fs::remove_dir_all(bed.path("ns_pod-a_uid-1")).unwrap();
    bed.step_acked();
    assert_eq!(bed.ledger.open_files(), 0);
    assert_eq!(lag(&bed), (21, 14, true));
    assert!(
        !bed.ledger.snapshot(0)[&key].finished,
        "read again after a restart"
    );
}

#[test]
fn rotation_and_deletion_keep_the_totals() {
    let mut bed = Bed::new();
    let active = format!("{POD}/0.log");
    let rotated = format!("{POD}/0.log.20240101-000000");
    bed.append(&active, "r1\nr2\n");
    bed.step_acked();
    fs::rename(bed.path(&active), bed.path(&rotated)).unwrap();
    bed.append(&rotated, "r3\n");
    bed.append(&active, "n1\n");
    let (_, tokens) = bed.step();
    assert_eq!(lag(&bed), (12, 6, true), "r3 and n1 in flight");
    bed.ledger.ack(&tokens);
    fs::remove_file(bed.path(&rotated)).unwrap();
    bed.step_acked();
    assert_eq!(bed.tailer.open_paths(), [bed.path(&active)]);
    assert_eq!(lag(&bed), (12, 12, false), "the deleted file still counts");
    // A copytruncate: the new content counts from 0, the old instance stays counted.
    fs::OpenOptions::new()
        .write(true)
        .open(bed.path(&active))
        .unwrap()
        .set_len(0)
        .unwrap();
    bed.append(&active, "x\n");
    bed.step_acked();
    assert_eq!(lag(&bed), (14, 14, false));
}

#[test]
fn the_oldest_unacknowledged_byte_is_aged_from_when_it_was_first_seen() {
    let ledger = Ledger::default();
    let key = ledger.open("/f".into(), PositionRecord::of_file(1, 0));
    ledger.written(key, 10, 1_000);
    ledger.written(key, 20, 1_500);
    ledger.written(key, 30, 5_000);
    let t = ledger.register(key, 10, 10).unwrap();
    let u = ledger.register(key, 30, 20).unwrap();
    ledger.progress(key, 30, None);
    let lag = ledger.lag(9_000);
    assert_eq!((lag.written, lag.acknowledged), (30, 0));
    assert_eq!(lag.oldest_unacknowledged_ms, Some(1_000));
    ledger.ack(&[t]);
    // Bytes 10..20 were first seen with the mark of 1_000 (merged within a second).
    assert_eq!(ledger.lag(9_000).oldest_unacknowledged_ms, Some(1_000));
    assert_eq!(ledger.lag(9_000).acknowledged, 10);
    ledger.ack(&[u]);
    assert_eq!(ledger.lag(9_000).oldest_unacknowledged_ms, None);

    let metrics = Metrics::new();
    metrics.publish_lag(
        &Lag {
            written: 30,
            acknowledged: 10,
            oldest_unacknowledged_ms: Some(1_000),
        },
        9_000,
    );
    let text = metrics.encode().unwrap();
    for needle in [
        "logpipe_written_bytes_total 30",
        "logpipe_acknowledged_bytes_total 10",
        "logpipe_unacknowledged_bytes 20",
        "logpipe_oldest_unacknowledged_seconds 8.0",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}
