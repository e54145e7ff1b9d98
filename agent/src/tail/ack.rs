//! Ordered acknowledgement: which offset of each file may be committed.
//!
//! Flow: the tailer [`Ledger::open`]s a file, [`Ledger::register`]s every entry it hands
//! to the shipper (getting an [`AckToken`]), and reports after each read pass how far the
//! pipeline consumed the file and from where it still holds lines
//! ([`Ledger::progress`]). The shipper [`Ledger::ack`]s tokens once Loki accepted them (or
//! refused them for good). [`Ledger::snapshot`] turns all of it into position records.
//!
//! Guarantees:
//! - A file's committed offset is never past an entry that is not acknowledged: it is the
//!   end of the last entry whose every predecessor (in that file) is acknowledged, or,
//!   when no entry is outstanding, the consumed offset (lines the pipeline dropped do not
//!   hold positions back) — and never past the first line the pipeline still holds.
//! - `buffered_bytes` counts every registered, unacknowledged entry; the tailer stops
//!   reading above its limit, so memory is bounded by it (plus one read pass).
//!
//! Assumptions: per file, entries are registered in file order (the pipeline emits them in
//! the order of their lines).
//!
//! Caveats: a closed file's record stays (retired) while files with its identity exist,
//! and for [`RETIRED_RETENTION_MS`] after, so a compressed copy is recognised.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::entry::Entry;
use crate::positions::{Fingerprint, PositionRecord};

/// A tailed file instance (a truncated file gets a new key).
pub type FileKey = u64;

/// How long a retired record is kept after no file with its identity was seen.
pub const RETIRED_RETENTION_MS: i64 = 60 * 60 * 1000;

/// Slots a file's queue of unacknowledged entries keeps when it empties.
const KEEP_SLOTS: usize = 64;

/// Identifies one registered entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AckToken {
    pub file: FileKey,
    pub seq: u64,
}

/// An entry on its way to Loki.
#[derive(Clone, Debug)]
pub struct Pending {
    pub entry: Entry,
    pub token: AckToken,
    /// What it counts for in the buffer limit.
    pub bytes: u64,
}

/// What the tailer knows of a file when it closes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseKind {
    /// Read to its end: once acknowledged, keep a finished record.
    Finished,
    /// Superseded (truncated and reopened under a new key): forget it once drained.
    Abandoned,
}

#[derive(Debug)]
struct Slot {
    end_offset: u64,
    bytes: u64,
    acked: bool,
}

#[derive(Debug)]
struct FileAcks {
    path: String,
    identity: PositionRecord,
    /// End of the last entry popped in order (everything before it is done).
    watermark: u64,
    front_seq: u64,
    pending: VecDeque<Slot>,
    consumed: u64,
    held_from: Option<u64>,
    closed: Option<CloseKind>,
}

impl FileAcks {
    fn committed(&self) -> u64 {
        let done = if self.pending.is_empty() {
            self.consumed.max(self.watermark)
        } else {
            self.watermark
        };
        match self.held_from {
            Some(held) => done.min(held),
            None => done,
        }
    }

    fn pop_acked(&mut self) {
        while self.pending.front().is_some_and(|s| s.acked) {
            if let Some(slot) = self.pending.pop_front() {
                self.watermark = self.watermark.max(slot.end_offset);
                self.front_seq += 1;
            }
        }
        // A file that once held the whole buffer (thousands of entries) would keep that
        // capacity for as long as it is open: every open file's high-water mark, added up,
        // made the agent grow by about 1 MiB/s while reading a backlog of 388 files.
        let capacity = self.pending.capacity();
        if capacity > KEEP_SLOTS && self.pending.len() < capacity / 4 {
            self.pending
                .shrink_to((2 * self.pending.len()).max(KEEP_SLOTS));
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_key: FileKey,
    files: BTreeMap<FileKey, FileAcks>,
    retired: BTreeMap<String, PositionRecord>,
    buffered: u64,
    generation: u64,
}

impl Inner {
    fn retire_drained(&mut self, key: FileKey) {
        let Some(file) = self.files.get(&key) else {
            return;
        };
        let (Some(kind), true) = (file.closed, file.pending.is_empty()) else {
            return;
        };
        if let Some(file) = self.files.remove(&key)
            && kind == CloseKind::Finished
        {
            let mut record = file.identity.clone();
            record.offset = file.committed();
            record.finished = file.held_from.is_none() && record.offset >= file.consumed;
            self.retired.insert(file.path, record);
        }
    }
}

/// Shared between the tailer thread, the shipper and the positions writer.
#[derive(Debug, Default)]
pub struct Ledger {
    inner: Mutex<Inner>,
    /// Signalled when acknowledgements release bytes: a tailer paused by the buffer limit
    /// resumes at once instead of at its next scan.
    released: Condvar,
}

impl Ledger {
    /// Start from the records of a loaded positions document.
    pub fn new(loaded: BTreeMap<String, PositionRecord>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                retired: loaded,
                ..Inner::default()
            }),
            released: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere must not stop acknowledgements: the data is plain counters.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remove and return the first retired record `matches` accepts.
    pub fn claim(
        &self,
        mut matches: impl FnMut(&str, &PositionRecord) -> bool,
    ) -> Option<(String, PositionRecord)> {
        let mut inner = self.lock();
        let path = inner
            .retired
            .iter()
            .find(|(path, record)| matches(path, record))
            .map(|(path, _)| path.clone())?;
        let record = inner.retired.remove(&path)?;
        Some((path, record))
    }

    /// Keep a record for a file that is not tailed (finished, or skipped on purpose).
    pub fn retire(&self, path: String, record: PositionRecord) {
        let mut inner = self.lock();
        inner.retired.insert(path, record);
        inner.generation += 1;
    }

    /// Start tracking a file read from `identity.offset`.
    pub fn open(&self, path: String, identity: PositionRecord) -> FileKey {
        let mut inner = self.lock();
        let key = inner.next_key;
        inner.next_key += 1;
        let start = identity.offset;
        inner.files.insert(
            key,
            FileAcks {
                path,
                identity,
                watermark: start,
                front_seq: 0,
                pending: VecDeque::new(),
                consumed: start,
                held_from: None,
                closed: None,
            },
        );
        inner.generation += 1;
        key
    }

    /// Register an entry ending at `end_offset`; `None` if the file is unknown.
    pub fn register(&self, key: FileKey, end_offset: u64, bytes: u64) -> Option<AckToken> {
        let mut inner = self.lock();
        let file = inner.files.get_mut(&key)?;
        if file.pending.is_empty() {
            // Lines before this entry's were dropped or delivered: count them as done.
            file.watermark = file.watermark.max(file.committed());
        }
        let seq = file.front_seq + file.pending.len() as u64;
        file.pending.push_back(Slot {
            end_offset,
            bytes,
            acked: false,
        });
        inner.buffered += bytes;
        Some(AckToken { file: key, seq })
    }

    /// Loki accepted (or refused for good) these entries.
    pub fn ack(&self, tokens: &[AckToken]) {
        let mut inner = self.lock();
        let mut touched = HashSet::new();
        let mut released = 0;
        for token in tokens {
            let Some(file) = inner.files.get_mut(&token.file) else {
                continue;
            };
            let Some(index) = token.seq.checked_sub(file.front_seq) else {
                continue;
            };
            if let Some(slot) = file.pending.get_mut(index as usize)
                && !slot.acked
            {
                slot.acked = true;
                released += slot.bytes;
                touched.insert(token.file);
            }
        }
        inner.buffered = inner.buffered.saturating_sub(released);
        for key in touched {
            if let Some(file) = inner.files.get_mut(&key) {
                file.pop_acked();
            }
            inner.retire_drained(key);
        }
        inner.generation += 1;
        drop(inner);
        if released > 0 {
            self.released.notify_all();
        }
    }

    /// Wait until fewer than `limit` bytes are buffered, at most `timeout`; returns
    /// whether there is room.
    pub fn wait_for_room(&self, limit: u64, timeout: Duration) -> bool {
        let inner = self.lock();
        let (inner, _) = self
            .released
            .wait_timeout_while(inner, timeout, |inner| inner.buffered >= limit)
            .unwrap_or_else(|p| p.into_inner());
        inner.buffered < limit
    }

    /// The pipeline consumed the file up to `consumed` and still holds lines from
    /// `held_from`.
    pub fn progress(&self, key: FileKey, consumed: u64, held_from: Option<u64>) {
        let mut inner = self.lock();
        if let Some(file) = inner.files.get_mut(&key)
            && (file.consumed != consumed || file.held_from != held_from)
        {
            file.consumed = consumed;
            file.held_from = held_from;
            inner.generation += 1;
        }
    }

    /// The file was renamed (rotation) or its fingerprint grew.
    pub fn update(&self, key: FileKey, path: Option<&str>, fingerprint: Option<&Fingerprint>) {
        let mut inner = self.lock();
        if let Some(file) = inner.files.get_mut(&key) {
            if let Some(path) = path {
                file.path = path.to_string();
            }
            if let Some(fp) = fingerprint {
                file.identity.fingerprint = Some(fp.clone());
            }
            inner.generation += 1;
        }
    }

    /// The tailer is done with the file; its record is retired once every entry is
    /// acknowledged.
    pub fn close(&self, key: FileKey, kind: CloseKind) {
        let mut inner = self.lock();
        if let Some(file) = inner.files.get_mut(&key) {
            file.closed = Some(kind);
        }
        inner.retire_drained(key);
        inner.generation += 1;
    }

    /// Refresh `last_seen_ms` of retired records whose file still exists (by inode for
    /// plain files, by fingerprint for any), and drop those unseen for the retention.
    pub fn refresh_retired(
        &self,
        inodes: &HashSet<(u64, u64)>,
        fingerprints: &HashSet<Fingerprint>,
        now_ms: i64,
    ) {
        let mut inner = self.lock();
        let before = inner.retired.len();
        inner.retired.retain(|_, record| {
            let seen = (!record.compressed && inodes.contains(&(record.dev, record.inode)))
                || record
                    .fingerprint
                    .as_ref()
                    .is_some_and(|fp| fp.len > 0 && fingerprints.contains(fp));
            if seen {
                record.last_seen_ms = now_ms;
            }
            now_ms - record.last_seen_ms < RETIRED_RETENTION_MS
        });
        if inner.retired.len() != before {
            inner.generation += 1;
        }
    }

    /// Bytes registered and not yet acknowledged.
    pub fn buffered_bytes(&self) -> u64 {
        self.lock().buffered
    }

    /// Bumped by every change; the positions writer saves when it moved.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Committed offset of one open file (for tests and logs).
    pub fn committed(&self, key: FileKey) -> Option<u64> {
        self.lock().files.get(&key).map(FileAcks::committed)
    }

    /// Number of files still tracked (open or draining).
    pub fn open_files(&self) -> usize {
        self.lock().files.len()
    }

    /// Every position record: open files at their committed offset (the newest instance
    /// wins when a path was reopened), then retired ones.
    pub fn snapshot(&self, now_ms: i64) -> BTreeMap<String, PositionRecord> {
        let inner = self.lock();
        let mut out: BTreeMap<String, PositionRecord> = BTreeMap::new();
        let mut by_path: HashMap<&str, FileKey> = HashMap::new();
        for (key, file) in &inner.files {
            if file.closed == Some(CloseKind::Abandoned) {
                continue;
            }
            by_path.insert(&file.path, *key);
        }
        for key in by_path.values() {
            if let Some(file) = inner.files.get(key) {
                let mut record = file.identity.clone();
                record.offset = file.committed();
                record.last_seen_ms = now_ms;
                record.finished = false;
                out.insert(file.path.clone(), record);
            }
        }
        for (path, record) in &inner.retired {
            out.entry(path.clone()).or_insert_with(|| record.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(offset: u64) -> PositionRecord {
        PositionRecord {
            offset,
            dev: 1,
            inode: 7,
            fingerprint: None,
            compressed: false,
            finished: false,
            last_seen_ms: 0,
        }
    }

    #[test]
    fn commits_only_up_to_the_first_unacknowledged_entry() {
        let ledger = Ledger::default();
        let key = ledger.open("/f".into(), identity(0));
        let a = ledger.register(key, 10, 10).unwrap();
        let b = ledger.register(key, 20, 10).unwrap();
        let c = ledger.register(key, 30, 10).unwrap();
        ledger.progress(key, 30, None);
        assert_eq!(ledger.buffered_bytes(), 30);
        ledger.ack(&[b, c]);
        assert_eq!(ledger.committed(key), Some(0), "a is outstanding");
        ledger.ack(&[a]);
        assert_eq!(ledger.committed(key), Some(30));
        assert_eq!(ledger.buffered_bytes(), 0);
    }

    #[test]
    fn dropped_lines_do_not_hold_positions_back_but_held_lines_do() {
        let ledger = Ledger::default();
        let key = ledger.open("/f".into(), identity(5));
        assert_eq!(ledger.committed(key), Some(5));
        // Lines up to 50 consumed, all dropped by the pipeline.
        ledger.progress(key, 50, None);
        assert_eq!(ledger.committed(key), Some(50));
        // A partial line from 50 is held, the next complete ones dropped.
        ledger.progress(key, 80, Some(50));
        assert_eq!(ledger.committed(key), Some(50));
        let t = ledger.register(key, 90, 1).unwrap();
        ledger.progress(key, 90, None);
        assert_eq!(ledger.committed(key), Some(50));
        ledger.ack(&[t]);
        assert_eq!(ledger.committed(key), Some(90));
    }

    #[test]
    fn a_finished_file_is_retired_once_drained_and_claimable() {
        let ledger = Ledger::default();
        let key = ledger.open("/f.log".into(), identity(0));
        let t = ledger.register(key, 12, 12).unwrap();
        ledger.progress(key, 12, None);
        ledger.close(key, CloseKind::Finished);
        assert_eq!(ledger.open_files(), 1);
        assert_eq!(ledger.snapshot(1)["/f.log"].offset, 0);
        ledger.ack(&[t]);
        assert_eq!(ledger.open_files(), 0);
        let snap = ledger.snapshot(2);
        assert!(snap["/f.log"].finished && snap["/f.log"].offset == 12);
        let (path, record) = ledger.claim(|_, r| r.inode == 7).unwrap();
        assert_eq!((path.as_str(), record.offset), ("/f.log", 12));
        assert!(ledger.snapshot(3).is_empty());
    }

    #[test]
    fn a_drained_file_gives_back_its_queue_and_wakes_a_waiting_reader() {
        let ledger = std::sync::Arc::new(Ledger::default());
        let key = ledger.open("/f.log".into(), identity(0));
        let tokens: Vec<AckToken> = (1..=10_000)
            .map(|i| ledger.register(key, i * 10, 10).unwrap())
            .collect();
        assert!(!ledger.wait_for_room(100_000, Duration::from_millis(1)));
        let waiter = {
            let ledger = ledger.clone();
            std::thread::spawn(move || ledger.wait_for_room(100_000, Duration::from_secs(30)))
        };
        ledger.ack(&tokens[..9_990]);
        assert!(waiter.join().unwrap());
        let capacity = |ledger: &Ledger| ledger.lock().files[&key].pending.capacity();
        assert!(capacity(&ledger) <= KEEP_SLOTS, "{}", capacity(&ledger));
        ledger.ack(&tokens[9_990..]);
        assert_eq!(ledger.committed(key), Some(100_000));
    }

    #[test]
    fn a_reopened_path_reports_the_newest_instance() {
        let ledger = Ledger::default();
        let old = ledger.open("/f.log".into(), identity(0));
        let pending = ledger.register(old, 100, 100).unwrap();
        ledger.close(old, CloseKind::Abandoned);
        let new = ledger.open("/f.log".into(), identity(0));
        ledger.progress(new, 40, None);
        assert_eq!(ledger.snapshot(1)["/f.log"].offset, 40);
        ledger.ack(&[pending]);
        assert_eq!(ledger.open_files(), 1);
        assert_eq!(ledger.buffered_bytes(), 0);
    }

    #[test]
    fn retired_records_expire_only_when_unseen() {
        let ledger = Ledger::new(BTreeMap::from([
            ("/a".to_string(), identity(1)),
            (
                "/b".to_string(),
                PositionRecord {
                    inode: 8,
                    ..identity(2)
                },
            ),
        ]));
        let inodes = HashSet::from([(1, 7)]);
        ledger.refresh_retired(&inodes, &HashSet::new(), RETIRED_RETENTION_MS + 1);
        let snap = ledger.snapshot(0);
        assert!(snap.contains_key("/a") && !snap.contains_key("/b"));
    }
}
