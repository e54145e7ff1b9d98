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
//!   when no entry is outstanding, the decided offset (lines the pipeline dropped on
//!   purpose do not hold positions back) — never past the first line the pipeline still
//!   holds, nor past a line it lost without a decision.
//! - `buffered_bytes` counts every registered, unacknowledged entry; the tailer stops
//!   reading above its limit, so memory is bounded by it (plus one read pass). It is also
//!   counted per tenant of the entries, so the tailer can pause only the files of a
//!   tenant that holds too much of it ([`Ledger::tenant_full`]).
//!
//! Assumptions: per file, entries are registered in file order (the pipeline emits them in
//! the order of their lines).
//!
//! Caveats: a closed file's record stays (retired) while files with its identity exist,
//! and for [`RETIRED_RETENTION_MS`] after, so a compressed copy is recognised.
//!
//! # Lag: written and acknowledged bytes
//!
//! The same records answer "is anything left behind?" ([`Ledger::lag`]), with no second
//! bookkeeping: for every file instance the agent tails in this run (from the offset it
//! started at: its saved position, or 0),
//! - *written* is how far the file is known to extend: the largest of its size at a scan
//!   and the offset read so far ([`Ledger::written`]; for a `.gz`, the decompressed bytes
//!   read), minus the start offset;
//! - *acknowledged* is the committed offset (what positions may advance to) minus the
//!   start offset: it covers lines Loki acknowledged (or refused for good) and lines a
//!   stage dropped on purpose, never a line still held, in flight, unread, or handed to
//!   the pipeline and lost without a decision (see [`crate::tail::LineOutcome`]).
//!
//! Files the tailer is done with are folded into running totals, so both sums only grow
//! (counters) across rotation and deletion. Files never tailed (skipped rotated files,
//! already finished ones) count for nothing. Each instance keeps, per second in which it
//! grew, a mark (offset, first seen); the oldest unacknowledged byte's age is measured
//! from the mark that covers it: from when the agent first saw the byte, at most a second
//! early. Caveat: bytes a copytruncate destroyed before they were read, and lines held
//! when it happened, cannot be shipped by anyone: they count as acknowledged.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::entry::{Entry, Tenant};
use crate::positions::{Fingerprint, PositionRecord};

/// A tailed file instance (a truncated file gets a new key).
pub type FileKey = u64;

/// How long a retired record is kept after no file with its identity was seen.
pub const RETIRED_RETENTION_MS: i64 = 60 * 60 * 1000;

/// Slots a file's queue of unacknowledged entries keeps when it empties.
const KEEP_SLOTS: usize = 64;

/// A file's growth marks are merged within this window (ms): the age resolution.
const MARK_MS: i64 = 1000;
/// At most this many marks per file; further growth extends the newest (ages err long).
const MAX_MARKS: usize = 128;

/// What [`Ledger::lag`] reports: totals over this run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lag {
    /// Bytes written to the tailed files since the agent started tailing them.
    pub written: u64,
    /// Of those, bytes up to the committed offsets.
    pub acknowledged: u64,
    /// When (Unix ms) the agent first saw the oldest byte not acknowledged; `None` when
    /// everything written is acknowledged.
    pub oldest_unacknowledged_ms: Option<i64>,
}

impl Lag {
    pub fn unacknowledged(&self) -> u64 {
        self.written.saturating_sub(self.acknowledged)
    }
}

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

/// Bytes per consecutive run of one tenant (entries and tokens come in such runs).
#[derive(Default)]
struct TenantRuns(Vec<(Option<Tenant>, u64)>);

impl TenantRuns {
    fn add(&mut self, tenant: &Option<Tenant>, bytes: u64) {
        match self.0.last_mut() {
            Some((last, sum)) if last == tenant => *sum += bytes,
            _ => self.0.push((tenant.clone(), bytes)),
        }
    }
}

/// Entries of one file handed to the shipper at once (one read chunk's worth): one
/// channel message and one ledger lock for hundreds of short lines, not one each.
pub type Parcel = Vec<Pending>;

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
    /// The entry's tenant, whose share of the buffer it counts in.
    tenant: Option<Tenant>,
}

#[derive(Debug)]
struct FileAcks {
    path: String,
    identity: PositionRecord,
    /// End of the last entry popped in order (everything before it is done).
    watermark: u64,
    front_seq: u64,
    pending: VecDeque<Slot>,
    /// End of the lines whose fate the pipeline decided (see [`Ledger::progress`]).
    consumed: u64,
    held_from: Option<u64>,
    closed: Option<CloseKind>,
    /// Offset the instance was opened at: lag counts from here.
    start: u64,
    /// How far the file is known to extend.
    written_end: u64,
    /// (offset, Unix ms): bytes up to `offset` were first seen by then; oldest first.
    marks: VecDeque<(u64, i64)>,
    /// Tenant of the entry registered last: the one the file's next lines most likely
    /// feed (see [`Ledger::tenant_full`]).
    tenant: Option<Tenant>,
}

impl FileAcks {
    fn committed(&self) -> u64 {
        // Never past `consumed`: an acknowledged entry after a line lost undecided must
        // not carry the position over that line.
        let done = if self.pending.is_empty() {
            self.consumed
        } else {
            self.watermark.min(self.consumed)
        };
        match self.held_from {
            Some(held) => done.min(held),
            None => done,
        }
    }

    /// The end of the acknowledged bytes: the committed offset, or, for an instance a
    /// truncation abandoned, everything it ever had once its entries are answered.
    fn acknowledged_end(&self) -> u64 {
        if self.closed == Some(CloseKind::Abandoned) && self.pending.is_empty() {
            self.written_end.max(self.consumed)
        } else {
            self.committed()
        }
    }

    fn written_to(&mut self, end: u64, now_ms: i64) {
        if end <= self.written_end {
            return;
        }
        self.written_end = end;
        let full = self.marks.len() >= MAX_MARKS;
        match self.marks.back_mut() {
            Some(last) if full || now_ms - last.1 < MARK_MS => last.0 = end,
            _ => self.marks.push_back((end, now_ms)),
        }
    }

    /// (written, acknowledged, first seen of the oldest unacknowledged byte); drops the
    /// marks wholly acknowledged.
    fn lag(&mut self, now_ms: i64) -> (u64, u64, Option<i64>) {
        let written_end = self.written_end.max(self.consumed);
        let acked_end = self.acknowledged_end().min(written_end);
        while self.marks.front().is_some_and(|&(end, _)| end <= acked_end) {
            self.marks.pop_front();
        }
        let oldest = if acked_end < written_end {
            // Bytes read past the last scan's size may have no mark of their own yet.
            Some(
                self.marks
                    .front()
                    .map_or(now_ms, |&(_, seen)| seen.min(now_ms)),
            )
        } else {
            None
        };
        (
            written_end.saturating_sub(self.start),
            acked_end.saturating_sub(self.start),
            oldest,
        )
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
    /// `buffered`, per tenant of the entries (`None`: entries with the default tenant).
    by_tenant: HashMap<Option<Tenant>, u64>,
    generation: u64,
    /// Lag totals of the instances no longer tracked.
    closed_written: u64,
    closed_acknowledged: u64,
    /// First seen of the oldest byte a closed instance left unacknowledged (a lost line).
    closed_oldest_ms: Option<i64>,
}

impl Inner {
    /// Count `bytes` more (`released`: fewer) for `tenant`.
    fn tenant_bytes(&mut self, tenant: Option<Tenant>, bytes: u64, released: bool) {
        if bytes == 0 {
            return;
        }
        let count = self.by_tenant.entry(tenant).or_default();
        if released {
            *count = count.saturating_sub(bytes);
        } else {
            *count += bytes;
        }
        if *count == 0 {
            self.by_tenant.retain(|_, n| *n > 0);
        }
    }

    fn retire_drained(&mut self, key: FileKey) {
        let Some(file) = self.files.get(&key) else {
            return;
        };
        let (Some(kind), true) = (file.closed, file.pending.is_empty()) else {
            return;
        };
        if let Some(mut file) = self.files.remove(&key) {
            let (written, acknowledged, oldest) = file.lag(super::now_ms());
            self.closed_written += written;
            self.closed_acknowledged += acknowledged;
            if let Some(oldest) = oldest {
                self.closed_oldest_ms =
                    Some(self.closed_oldest_ms.map_or(oldest, |o| o.min(oldest)));
            }
            if kind == CloseKind::Finished {
                let mut record = file.identity.clone();
                record.offset = file.committed();
                // A line lost undecided before the end keeps the file unfinished, so the
                // next run reads it again rather than losing it.
                record.finished = file.held_from.is_none()
                    && record.offset >= file.consumed.max(file.written_end);
                self.retired.insert(file.path, record);
            }
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
                start,
                written_end: start,
                marks: VecDeque::new(),
                tenant: None,
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
            tenant: None,
        });
        inner.buffered += bytes;
        inner.tenant_bytes(None, bytes, false);
        Some(AckToken { file: key, seq })
    }

    /// Register `entries` of one file, in order, under one lock: the parcel to send, each
    /// entry with its token and its cost (see `cost`). Empty if the file is unknown.
    pub fn register_all(
        &self,
        key: FileKey,
        entries: impl Iterator<Item = Entry>,
        cost: impl Fn(&Entry) -> u64,
    ) -> Parcel {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(file) = inner.files.get_mut(&key) else {
            return Vec::new();
        };
        let mut parcel = Vec::with_capacity(entries.size_hint().0);
        // Bytes per run of one tenant: one map update per run, not per entry.
        let mut runs = TenantRuns::default();
        for entry in entries {
            if file.pending.is_empty() {
                // Lines before this entry's were dropped or delivered: count them as done.
                file.watermark = file.watermark.max(file.committed());
            }
            let seq = file.front_seq + file.pending.len() as u64;
            let bytes = cost(&entry);
            file.pending.push_back(Slot {
                end_offset: entry.end_offset,
                bytes,
                acked: false,
                tenant: entry.tenant.clone(),
            });
            inner.buffered += bytes;
            runs.add(&entry.tenant, bytes);
            parcel.push(Pending {
                entry,
                token: AckToken { file: key, seq },
                bytes,
            });
        }
        if let Some(last) = parcel.last() {
            file.tenant = last.entry.tenant.clone();
        }
        for (tenant, bytes) in runs.0 {
            inner.tenant_bytes(tenant, bytes, false);
        }
        parcel
    }

    /// Loki accepted (or refused for good) these entries.
    pub fn ack(&self, tokens: &[AckToken]) {
        let mut inner = self.lock();
        // Tokens come in runs of one file: each run's file is looked up once, and the
        // files touched are a short list, not a hash set.
        let mut touched: Vec<FileKey> = Vec::new();
        let mut released = 0;
        let mut runs = TenantRuns::default();
        for run in tokens.chunk_by(|a, b| a.file == b.file) {
            let Some(key) = run.first().map(|t| t.file) else {
                continue;
            };
            let Some(file) = inner.files.get_mut(&key) else {
                continue;
            };
            let mut acked = false;
            for token in run {
                let Some(index) = token.seq.checked_sub(file.front_seq) else {
                    continue;
                };
                if let Some(slot) = file.pending.get_mut(index as usize)
                    && !slot.acked
                {
                    slot.acked = true;
                    released += slot.bytes;
                    runs.add(&slot.tenant, slot.bytes);
                    acked = true;
                }
            }
            if acked {
                touched.push(key);
            }
        }
        inner.buffered = inner.buffered.saturating_sub(released);
        for (tenant, bytes) in runs.0 {
            inner.tenant_bytes(tenant, bytes, true);
        }
        touched.sort_unstable();
        touched.dedup();
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

    /// The pipeline decided the fate of every line of the file up to `consumed` (emitted,
    /// dropped on purpose, or held) and still holds lines from `held_from`.
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

    /// The file extends at least to `end` (its size at a scan, or the offset read), seen
    /// at `now_ms`.
    pub fn written(&self, key: FileKey, end: u64, now_ms: i64) {
        if let Some(file) = self.lock().files.get_mut(&key) {
            file.written_to(end, now_ms);
        }
    }

    /// Written and acknowledged bytes of this run, and the oldest unacknowledged byte.
    pub fn lag(&self, now_ms: i64) -> Lag {
        let mut inner = self.lock();
        let mut lag = Lag {
            written: inner.closed_written,
            acknowledged: inner.closed_acknowledged,
            oldest_unacknowledged_ms: inner.closed_oldest_ms,
        };
        for file in inner.files.values_mut() {
            let (written, acknowledged, oldest) = file.lag(now_ms);
            lag.written += written;
            lag.acknowledged += acknowledged;
            if let Some(oldest) = oldest {
                lag.oldest_unacknowledged_ms = Some(
                    lag.oldest_unacknowledged_ms
                        .map_or(oldest, |o| o.min(oldest)),
                );
            }
        }
        lag
    }

    /// The tailer is done with the file; its record is retired once every entry is
    /// acknowledged.
    pub fn close(&self, key: FileKey, kind: CloseKind) {
        let mut inner = self.lock();
        if let Some(file) = inner.files.get_mut(&key) {
            file.closed = Some(kind);
            if kind == CloseKind::Abandoned {
                // The handler's state for this instance is gone with it.
                file.held_from = None;
            }
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

    /// Whether the tenant the file's last entry went to holds `limit` bytes or more of
    /// the buffer: the tailer then pauses that file, not the others (a tenant Loki
    /// throttles cannot fill the whole buffer and stop every tenant's reading).
    pub fn tenant_full(&self, key: FileKey, limit: u64) -> bool {
        let inner = self.lock();
        let Some(file) = inner.files.get(&key) else {
            return false;
        };
        inner
            .by_tenant
            .get(&file.tenant)
            .is_some_and(|bytes| *bytes >= limit)
    }

    /// Buffered bytes of entries of `tenant` (`None`: the default tenant's).
    pub fn tenant_bytes(&self, tenant: Option<&str>) -> u64 {
        let inner = self.lock();
        inner
            .by_tenant
            .get(&tenant.map(Tenant::from))
            .copied()
            .unwrap_or(0)
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
        PositionRecord::of_file(7, offset)
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

    /// With `tenantFrom: {field: ...}` one file's entries go to several tenants, each
    /// pushed on its own: tenant B's later entry acknowledged first (A is throttled) must
    /// not move the position past A's earlier entry.
    #[test]
    fn another_tenants_acknowledgement_does_not_pass_an_earlier_entry() {
        let ledger = Ledger::default();
        let key = ledger.open("/f".into(), identity(0));
        let entry = |end: u64, tenant: &str| Entry {
            timestamp_ns: 0,
            line: format!("{tenant} {end}"),
            labels: Default::default(),
            structured_metadata: Vec::new(),
            end_offset: end,
            tenant: Some(tenant.into()),
        };
        let parcel = ledger.register_all(
            key,
            [
                entry(10, "a"),
                entry(20, "b"),
                entry(30, "a"),
                entry(40, "b"),
            ]
            .into_iter(),
            |_| 10,
        );
        ledger.progress(key, 40, None);
        let tokens = |tenant: &str| -> Vec<AckToken> {
            parcel
                .iter()
                .filter(|p| p.entry.tenant.as_deref() == Some(tenant))
                .map(|p| p.token)
                .collect()
        };
        ledger.ack(&tokens("b"));
        assert_eq!(ledger.committed(key), Some(0), "a's first entry holds it");
        assert_eq!(ledger.buffered_bytes(), 20, "b's entries are released");
        ledger.ack(&tokens("a")[..1]);
        assert_eq!(ledger.committed(key), Some(20), "up to a's next entry");
        ledger.ack(&tokens("a")[1..]);
        assert_eq!(ledger.committed(key), Some(40));
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
        ledger.progress(key, 100_000, None);
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
