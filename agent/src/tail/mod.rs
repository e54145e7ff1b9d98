//! The tailer: finds the kubelet's pod log files, reads them line by line, hands lines to
//! a [`LineHandler`] (the pipeline), and ships what comes out with an acknowledgement token.
//!
//! Flow, one thread, every pass:
//! 0. an inotify watch of the root ([`watch`]) says which files were written and whether
//!    anything appeared, vanished or was renamed; without a watch (it could not be set
//!    up) the tree is listed every `poll_interval` instead;
//! 1. when the tree changed, and every `rescan_interval` as a safety net (every
//!    `poll_interval` while a file waits for its pod, or without a watch),
//!    [`Tailer::scan`] lists `<root>/<pod>/<container>/<file>`
//!    (see [`crate::podlogs`]) and reconciles it with the open files by identity
//!    (dev, inode): a known inode under a new name is a rotation (the file keeps being read
//!    under its new name); an open file no longer on disk is finished (read to its end,
//!    then forgotten); a new file is matched to a position record (by inode and
//!    fingerprint, or by fingerprint for a `.gz`) or started as described below;
//! 2. [`Tailer::read_pass`] reads the files written since they were last read to their
//!    end (and only those: an idle file costs nothing), within a per-file budget, unless the
//!    bytes read and not yet acknowledged exceed `max_buffered_bytes` (backpressure), or
//!    the file's tenant's share of them, `tenant_buffered_bytes` (`tenantFrom`), splits
//!    lines, feeds the handler, registers each entry in the [`ack::Ledger`] and sends it;
//!    then reports how far the handler decided every line ([`LineOutcome::decided`]) and
//!    from where it holds lines, and how far the file extends (the lag accounting of
//!    [`ack`]: written and acknowledged bytes).
//!
//! Guarantees:
//! - Each byte of a file is handed to the handler once per agent run; a rotated file is
//!   read to its end under its new name before it is forgotten, and its compressed copy
//!   (same first bytes) is not read again, now or after a restart.
//! - A copytruncated file (size below the read offset) is read again from the start
//!   under a new ledger key, so the old instance's acknowledgements cannot move the new
//!   one's position.
//! - Memory: at most `max_buffered_bytes` of unacknowledged entries, plus one read chunk
//!   shared by all files and one unfinished raw line (at most `max_raw_line_bytes`) per
//!   open file.
//!
//! Assumptions:
//! - Lines end with `\n` (CRI and docker json-file writers do). An unterminated last line
//!   is read only when its file is finished (deleted or compressed).
//! - The kubelet's rotation renames `<n>.log` and the runtime reopens a new `<n>.log`;
//!   compression writes `<name>.gz` and then deletes `<name>`.
//!
//! Caveats:
//! - Files that appear before discovery knows their pod: the handler may ask to wait
//!   ([`LineHandler::open`] returns `None`); the runtime waits a few seconds and then
//!   reads with labels derived from the path, refined when the pod becomes known.
//! - A rotated or compressed file of unknown identity is read only if it changed after
//!   the baseline (the last positions save, or this agent's start): otherwise it predates
//!   the agent (first start, Promtail import) and is skipped, and recorded as such.
//! - Without a watch, a file created and deleted between two scans (under
//!   `poll_interval`) is not seen.
//! - Files holding lines (a partial line, a multiline entry) or paused by a `limit` stage
//!   are visited every `poll_interval` without being read, so their stages can flush.

pub mod ack;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flate2::read::MultiGzDecoder;
use tokio::sync::mpsc::UnboundedSender;

use crate::entry::Entry;
use crate::metrics::{Metrics, PathLabel};
use crate::podlogs::{self, LogFileKind, PodLogFile};
use crate::positions::{FINGERPRINT_BYTES, Fingerprint, PositionRecord};

use self::ack::{CloseKind, FileKey, Ledger, Parcel};
use self::watch::Watch;

const READ_CHUNK: usize = 64 * 1024;

/// The lag metrics walk every tracked file: at most this often, not every pass (with
/// 1,000 files, ten walks a second were a tenth of the agent's idle cost; gauges are
/// scraped every 15 s or so).
const LAG_PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("cannot list {path}: {source}")]
    List { path: String, source: io::Error },
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: io::Error },
}

/// What the handler learns about a file.
#[derive(Clone, Debug)]
pub struct FileInfo {
    pub path: PathBuf,
    /// Pod, container and restart parsed from the path.
    pub pod: Option<PodLogFile>,
    /// When the tailer first saw the file (for "wait for discovery" decisions).
    pub first_seen: Instant,
}

/// What the handler did with one raw line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineOutcome {
    /// Pause reading this file that long (rate limit in wait mode).
    pub wait: Option<Duration>,
    /// The line was emitted, dropped on purpose, or is held (see
    /// [`LineHandler::held_from`]). A line handed over and not decided holds the file's
    /// position (and its acknowledged bytes) at its start for the rest of the run.
    pub decided: bool,
}

impl LineOutcome {
    /// Decided, no pause.
    pub const DONE: Self = Self {
        wait: None,
        decided: true,
    };
}

/// Turns raw lines into entries: the pipeline, in the runtime.
pub trait LineHandler {
    type Stream;
    /// Per-file state, or `None` to be asked again at the next scan (pod not known yet).
    fn open(&mut self, file: &FileInfo) -> Option<Self::Stream>;
    /// Called once per visit before the file is read (labels may have changed; the
    /// clock has moved).
    fn refresh(&mut self, _file: &FileInfo, _stream: &mut Self::Stream) {}
    /// One raw line without its `\n`, at `[start, end)` in the file.
    fn line(
        &mut self,
        stream: &mut Self::Stream,
        raw: &[u8],
        start: u64,
        end: u64,
        out: &mut Vec<Entry>,
    ) -> LineOutcome;
    /// Emit what waited too long, or everything when `force`.
    fn flush(&mut self, stream: &mut Self::Stream, force: bool, out: &mut Vec<Entry>);
    /// Start of the earliest raw line the stream still holds.
    fn held_from(&self, stream: &Self::Stream) -> Option<u64>;
}

#[derive(Clone, Debug)]
pub struct TailConfig {
    pub root: PathBuf,
    pub poll_interval: Duration,
    /// With a watch, the tree is listed at least this often (the safety net for lost
    /// events).
    pub rescan_interval: Duration,
    /// Watch the root with inotify (tests that drive scans by hand turn it off).
    pub watch: bool,
    /// With a watch, passes woken by writes are at least this far apart: a container
    /// writing a line a millisecond would otherwise wake the reader for every line.
    pub coalesce: Duration,
    pub max_buffered_bytes: u64,
    /// With several tenants (`tenantFrom`): a file whose latest entries' tenant holds this
    /// many buffered bytes is not read until some are acknowledged, while files of other
    /// tenants are (see [`ack::Ledger::tenant_full`]). `None`: one limit for all.
    pub tenant_buffered_bytes: Option<u64>,
    /// Bytes read from one file in one pass.
    pub per_file_budget: usize,
    /// A raw line longer than this is cut (counted) so one bad file cannot exhaust memory.
    pub max_raw_line_bytes: usize,
    /// Rotated files of unknown identity changed after this (Unix ms) are read.
    pub baseline_ms: i64,
}

impl TailConfig {
    pub fn new(root: impl Into<PathBuf>, max_buffered_bytes: u64, max_line_bytes: u64) -> Self {
        Self {
            root: root.into(),
            poll_interval: Duration::from_millis(250),
            rescan_interval: Duration::from_secs(10),
            watch: true,
            coalesce: Duration::from_millis(250),
            max_buffered_bytes,
            tenant_buffered_bytes: None,
            per_file_budget: 1024 * 1024,
            max_raw_line_bytes: (2 * max_line_bytes as usize).max(1024 * 1024),
            baseline_ms: now_ms(),
        }
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A file found by a scan.
#[derive(Clone, Debug)]
struct Found {
    path: PathBuf,
    pod: PodLogFile,
    dev: u64,
    inode: u64,
    size: u64,
    mtime_ms: i64,
}

enum Source {
    Plain(File),
    Gz(Box<MultiGzDecoder<File>>),
}

impl Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Plain(f) => f.read(buf),
            Source::Gz(d) => d.read(buf),
        }
    }
}

struct Tailed<S> {
    key: FileKey,
    info: FileInfo,
    path_str: String,
    kind: LogFileKind,
    dev: u64,
    inode: u64,
    fingerprint: Fingerprint,
    source: Source,
    /// Content bytes read from `source`.
    read_pos: u64,
    /// File offset of `buf[0]`: everything before was handed to the handler.
    consumed: u64,
    /// End of the contiguous run of lines, from the start, whose fate the handler decided
    /// (what the ledger may count as done). Equal to `consumed` unless a line was lost.
    decided: u64,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    stream: S,
    gone: bool,
    wait_until: Option<Instant>,
}

impl<S> Tailed<S> {
    /// The line `[start, end)` went to the handler: it is consumed, and done only if
    /// decided and every line before it was.
    fn handed(&mut self, start: u64, end: u64, outcome: LineOutcome) -> Option<Duration> {
        self.consumed = end;
        if outcome.decided && self.decided == start {
            self.decided = end;
        }
        outcome.wait
    }
}

/// Why a present file is not tailed.
#[derive(Clone, Debug)]
struct Skipped {
    fingerprint: Option<Fingerprint>,
}

/// The tailing engine. See the module documentation.
pub struct Tailer<H: LineHandler> {
    cfg: TailConfig,
    handler: H,
    ledger: Arc<Ledger>,
    tx: UnboundedSender<Parcel>,
    metrics: Arc<Metrics>,
    files: BTreeMap<FileKey, Tailed<H::Stream>>,
    /// (dev, inode) of present files read to their end or skipped on purpose.
    skipped: HashMap<(u64, u64), Skipped>,
    /// (dev, inode) -> first seen, for files whose handler asked to wait.
    waiting: HashMap<(u64, u64), Instant>,
    out: Vec<Entry>,
    /// One read buffer for every file: allocating it per file and pass was measurable.
    chunk: Vec<u8>,
    closed_channel: bool,
    /// The last read pass stopped at the buffer limit.
    backpressured: bool,
    /// When the lag gauges were last refreshed.
    lag_published: Option<Instant>,
    /// Open files that may have unread bytes: written since last read to their end, new,
    /// gone, or not finished by the last pass (budget, buffer limit).
    dirty: BTreeSet<FileKey>,
    /// Open files to visit every `poll_interval` although not written: they hold lines or
    /// wait (a `limit` stage).
    ticking: BTreeSet<FileKey>,
    /// Open files by their current path, for the watch's events.
    by_path: HashMap<PathBuf, FileKey>,
    watch: Option<Watch>,
}

/// What one visit of a file found.
#[derive(Clone, Copy, Debug, Default)]
struct Visit {
    read: u64,
    /// Read to its end with nothing pending: no need to read it again until written.
    idle: bool,
    /// Holds lines or waits: visit it again at the next tick.
    ticking: bool,
}

impl<H: LineHandler> Tailer<H> {
    pub fn new(
        cfg: TailConfig,
        handler: H,
        ledger: Arc<Ledger>,
        tx: UnboundedSender<Parcel>,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics
            .buffered_bytes_limit
            .set(cfg.max_buffered_bytes as i64);
        Self {
            cfg,
            handler,
            ledger,
            tx,
            metrics,
            files: BTreeMap::new(),
            skipped: HashMap::new(),
            waiting: HashMap::new(),
            out: Vec::new(),
            chunk: vec![0u8; READ_CHUNK],
            closed_channel: false,
            backpressured: false,
            lag_published: None,
            dirty: BTreeSet::new(),
            ticking: BTreeSet::new(),
            by_path: HashMap::new(),
            watch: None,
        }
    }

    /// Open files (for tests and metrics).
    pub fn open_paths(&self) -> Vec<PathBuf> {
        self.files.values().map(|f| f.info.path.clone()).collect()
    }

    /// Scan and read until `stop` is set. Positions are never forced here: on stop, lines
    /// held by the handler (partial lines, multiline) stay uncommitted and are read again
    /// by the next run.
    pub fn run(mut self, stop: &AtomicBool) {
        let mut next_scan = Instant::now();
        let mut last_scan: Option<Instant> = None;
        let mut watch_retry = Instant::now();
        while !stop.load(Ordering::Relaxed) && !self.closed_channel {
            let now = Instant::now();
            if self.watch.is_none() && self.cfg.watch && now >= watch_retry {
                match Watch::start(&self.cfg.root) {
                    Ok(watch) => {
                        tracing::debug!(root = %self.cfg.root.display(), "watching the log tree");
                        self.watch = Some(watch);
                        // Whatever happened before the watch: list and read it all.
                        next_scan = now;
                        self.dirty.extend(self.files.keys().copied());
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot watch the log tree, polling it");
                        watch_retry = now + self.cfg.rescan_interval;
                    }
                }
            }
            if let Some(watch) = &self.watch {
                let changes = watch.take();
                if changes.everything {
                    self.dirty.extend(self.files.keys().copied());
                    next_scan = now;
                }
                if changes.structure {
                    next_scan = now;
                }
                for path in &changes.written {
                    match self.by_path.get(path) {
                        Some(&key) => {
                            self.dirty.insert(key);
                        }
                        // Written under a name no open file has (yet): list soon, at
                        // most every poll interval (a `.gz` being written, say).
                        None => {
                            let soon = last_scan.map_or(now, |at| at + self.cfg.poll_interval);
                            next_scan = next_scan.min(soon);
                        }
                    }
                }
            }
            if now >= next_scan {
                if let Err(e) = self.scan() {
                    tracing::warn!(error = %e, "scanning the pod log tree failed");
                }
                last_scan = Some(now);
                let interval = if self.watch.is_some() && self.waiting.is_empty() {
                    self.cfg.rescan_interval
                } else {
                    self.cfg.poll_interval
                };
                next_scan = now + interval;
            }
            let pass_started = Instant::now();
            let read = self.read_pass();
            if read == 0 {
                // Idle: sleep to the next scan or event; tick sooner while lines are held
                // or entries are in flight (the lag gauges move).
                let tick = if self.watch.is_none()
                    || !self.ticking.is_empty()
                    || self.ledger.buffered_bytes() > 0
                {
                    self.cfg.poll_interval
                } else {
                    self.cfg.rescan_interval
                };
                let pause = next_scan
                    .saturating_duration_since(Instant::now())
                    .min(tick);
                if self.backpressured {
                    // Paused by the buffer limit: go on as soon as Loki acknowledged a
                    // batch. Sleeping to the next scan made a backlog drain at one buffer
                    // per poll interval (4 MiB per 250 ms), however fast Loki answered.
                    self.ledger
                        .wait_for_room(self.cfg.max_buffered_bytes, pause);
                } else if let Some(watch) = &self.watch {
                    watch.wait(pause);
                    let since = pass_started.elapsed();
                    if since < self.cfg.coalesce && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(self.cfg.coalesce - since);
                    }
                } else {
                    std::thread::sleep(pause);
                }
            }
        }
        tracing::info!(files = self.files.len(), "tailer stopped");
    }

    fn list(&self) -> Result<Vec<Found>, TailError> {
        let root = &self.cfg.root;
        let list_err = |path: &Path, source| TailError::List {
            path: path.display().to_string(),
            source,
        };
        let mut found = Vec::new();
        let pods = match fs::read_dir(root) {
            Ok(pods) => pods,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(list_err(root, e)),
        };
        for pod_dir in pods.flatten() {
            let name = pod_dir.file_name();
            if name.to_str().and_then(podlogs::parse_pod_dir).is_none() {
                continue;
            }
            // A pod directory may vanish while listed: that is a deletion, not an error.
            let Ok(containers) = fs::read_dir(pod_dir.path()) else {
                continue;
            };
            for container in containers.flatten() {
                let Ok(logs) = fs::read_dir(container.path()) else {
                    continue;
                };
                for log in logs.flatten() {
                    let path = log.path();
                    let Some(pod) = podlogs::parse(root, &path) else {
                        continue;
                    };
                    let Ok(meta) = fs::metadata(&path) else {
                        continue;
                    };
                    if !meta.is_file() {
                        continue;
                    }
                    found.push(Found {
                        path,
                        pod,
                        dev: meta.dev(),
                        inode: meta.ino(),
                        size: meta.len(),
                        mtime_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
                    });
                }
            }
        }
        // Older restarts and rotated files first, so a container's lines go out in order.
        found.sort_by(|a, b| {
            (a.pod.restart, kind_rank(&a.pod.kind), &a.path).cmp(&(
                b.pod.restart,
                kind_rank(&b.pod.kind),
                &b.path,
            ))
        });
        Ok(found)
    }

    /// Reconcile the files on disk with the open ones.
    pub fn scan(&mut self) -> Result<(), TailError> {
        let found = self.list()?;
        let seen_ms = now_ms();
        let by_inode: HashMap<(u64, u64), &Found> =
            found.iter().map(|f| ((f.dev, f.inode), f)).collect();

        // Open files: renamed (rotation) or gone.
        for file in self.files.values_mut() {
            match by_inode.get(&(file.dev, file.inode)) {
                Some(now) => {
                    if now.path != file.info.path {
                        tracing::debug!(from = %file.path_str, to = %now.path.display(), "file renamed");
                        if self.by_path.get(&file.info.path) == Some(&file.key) {
                            self.by_path.remove(&file.info.path);
                        }
                        self.by_path.insert(now.path.clone(), file.key);
                        self.metrics.forget_path(&file.path_str);
                        file.info.path = now.path.clone();
                        file.path_str = now.path.display().to_string();
                        file.kind = now.pod.kind.clone();
                        self.ledger.update(file.key, Some(&file.path_str), None);
                    }
                    self.metrics
                        .file_bytes
                        .get_or_create(&PathLabel {
                            path: file.path_str.clone(),
                        })
                        .set(now.size as i64);
                    // A `.gz`'s size on disk is not its content's: its reads count.
                    if matches!(file.source, Source::Plain(_)) {
                        self.ledger.written(file.key, now.size, seen_ms);
                        // Grown or truncated (or written while no watch saw it).
                        if now.size != file.read_pos {
                            self.dirty.insert(file.key);
                        }
                    } else {
                        self.dirty.insert(file.key);
                    }
                }
                None => {
                    file.gone = true;
                    // Read to its end, then forgotten.
                    self.dirty.insert(file.key);
                }
            }
        }
        let open: HashSet<(u64, u64)> = self.files.values().map(|f| (f.dev, f.inode)).collect();
        self.skipped.retain(|id, _| by_inode.contains_key(id));
        self.waiting.retain(|id, _| by_inode.contains_key(id));

        for f in &found {
            let id = (f.dev, f.inode);
            if open.contains(&id) || self.skipped.contains_key(&id) {
                continue;
            }
            if let Err(e) = self.consider(f) {
                self.metrics.file_errors.inc();
                tracing::warn!(error = %e, "cannot start tailing");
            }
        }

        let mut inodes: HashSet<(u64, u64)> = by_inode.keys().copied().collect();
        let mut fingerprints: HashSet<Fingerprint> = HashSet::new();
        for file in self.files.values() {
            inodes.insert((file.dev, file.inode));
            fingerprints.insert(file.fingerprint.clone());
        }
        for skipped in self.skipped.values() {
            if let Some(fp) = &skipped.fingerprint {
                fingerprints.insert(fp.clone());
            }
        }
        self.ledger
            .refresh_retired(&inodes, &fingerprints, now_ms());
        self.metrics.files_active.set(self.files.len() as i64);
        Ok(())
    }

    /// A file on disk that is not open: open it where its position says, or skip it.
    fn consider(&mut self, f: &Found) -> Result<(), TailError> {
        let id = (f.dev, f.inode);
        let compressed = f.pod.kind == LogFileKind::Compressed;
        let prefix = match read_prefix(&f.path, compressed) {
            Ok(prefix) => prefix,
            // A .gz still being renamed into place, or a file deleted meanwhile.
            Err(e) => {
                tracing::debug!(path = %f.path.display(), error = %e, "cannot read the first bytes yet");
                return Ok(());
            }
        };
        let fingerprint = Fingerprint::of(&prefix);

        // The compressed copy of a file still open here: that file is read to its end.
        if fingerprint.len > 0
            && f.pod.kind != LogFileKind::Active
            && self
                .files
                .values()
                .any(|open| open.fingerprint.len > 0 && open.fingerprint.matches(&prefix))
        {
            self.skipped.insert(
                id,
                Skipped {
                    fingerprint: Some(fingerprint),
                },
            );
            return Ok(());
        }

        let first_seen = *self.waiting.entry(id).or_insert_with(Instant::now);
        let info = FileInfo {
            path: f.path.clone(),
            pod: Some(f.pod.clone()),
            first_seen,
        };
        let Some(stream) = self.handler.open(&info) else {
            return Ok(());
        };
        self.waiting.remove(&id);

        let claimed = self.ledger.claim(|_, record| {
            if compressed {
                record
                    .fingerprint
                    .as_ref()
                    .is_some_and(|fp| fp.len > 0 && fp.matches(&prefix))
            } else {
                !record.compressed
                    && record.dev == f.dev
                    && record.inode == f.inode
                    && record
                        .fingerprint
                        .as_ref()
                        .is_none_or(|fp| fp.matches(&prefix))
            }
        });
        let path_str = f.path.display().to_string();
        let start = match claimed {
            Some((_, mut record)) if record.finished => {
                record.compressed = compressed;
                record.dev = f.dev;
                record.inode = f.inode;
                self.ledger.retire(path_str, record);
                self.skipped.insert(
                    id,
                    Skipped {
                        fingerprint: Some(fingerprint),
                    },
                );
                return Ok(());
            }
            // Shrunk while the agent was down: copytruncate, read it all again.
            Some((_, record)) if !compressed && record.offset > f.size => 0,
            Some((_, record)) => record.offset,
            None if f.pod.kind == LogFileKind::Active => 0,
            None if f.mtime_ms >= self.cfg.baseline_ms => 0,
            None => {
                self.metrics.skipped_rotated_files.inc();
                tracing::info!(path = %path_str, "rotated file predates this agent, not read");
                let size = if compressed { u64::MAX } else { f.size };
                self.ledger.retire(
                    path_str,
                    PositionRecord {
                        offset: size,
                        dev: f.dev,
                        inode: f.inode,
                        fingerprint: Some(fingerprint.clone()),
                        compressed,
                        finished: true,
                        last_seen_ms: now_ms(),
                    },
                );
                self.skipped.insert(
                    id,
                    Skipped {
                        fingerprint: Some(fingerprint),
                    },
                );
                return Ok(());
            }
        };
        let source = open_at(&f.path, compressed, start).map_err(|source| TailError::Open {
            path: path_str.clone(),
            source,
        })?;
        let key = self.ledger.open(
            path_str.clone(),
            PositionRecord {
                offset: start,
                dev: f.dev,
                inode: f.inode,
                fingerprint: Some(fingerprint.clone()),
                compressed,
                finished: false,
                last_seen_ms: now_ms(),
            },
        );
        tracing::info!(path = %path_str, offset = start, "tailing");
        self.dirty.insert(key);
        self.by_path.insert(f.path.clone(), key);
        self.files.insert(
            key,
            Tailed {
                key,
                info,
                path_str,
                kind: f.pod.kind.clone(),
                dev: f.dev,
                inode: f.inode,
                fingerprint,
                source,
                read_pos: start,
                consumed: start,
                decided: start,
                buf: Vec::new(),
                scanned: 0,
                stream,
                gone: false,
                wait_until: None,
            },
        );
        Ok(())
    }

    /// Read every file that may have unread bytes, and visit those holding lines; returns
    /// the bytes read. Idle files are not touched.
    pub fn read_pass(&mut self) -> u64 {
        let mut total = 0;
        let keys: Vec<FileKey> = self.dirty.union(&self.ticking).copied().collect();
        let mut paused = false;
        for key in keys {
            if self.closed_channel {
                break;
            }
            if !paused && self.ledger.buffered_bytes() >= self.cfg.max_buffered_bytes {
                paused = true;
                self.metrics.backpressure_passes.inc();
            }
            // Its tenant's share full (Loki throttles that tenant): this file waits, the
            // other tenants' files are read.
            let tenant_full = !paused
                && self
                    .cfg
                    .tenant_buffered_bytes
                    .is_some_and(|limit| self.ledger.tenant_full(key, limit));
            // A file only ticking (holding lines, not written) is not read.
            let read = !paused && !tenant_full && self.dirty.contains(&key);
            match self.read_file(key, !read) {
                Ok(visit) => {
                    total += visit.read;
                    if visit.idle {
                        self.dirty.remove(&key);
                    }
                    if visit.ticking {
                        self.ticking.insert(key);
                    } else {
                        self.ticking.remove(&key);
                    }
                }
                Err(e) => {
                    self.metrics.file_errors.inc();
                    tracing::warn!(error = %e, "reading a log file failed, will retry");
                }
            }
            if !self.files.contains_key(&key) {
                // Finished, or truncated and re-keyed (its new key is dirty).
                self.dirty.remove(&key);
                self.ticking.remove(&key);
            }
        }
        self.backpressured = paused;
        self.metrics
            .buffered_bytes
            .set(self.ledger.buffered_bytes() as i64);
        self.metrics.files_active.set(self.files.len() as i64);
        if self
            .lag_published
            .is_none_or(|at| at.elapsed() >= LAG_PUBLISH_INTERVAL)
        {
            self.lag_published = Some(Instant::now());
            self.metrics
                .publish_lag(&self.ledger.lag(now_ms()), now_ms());
        }
        total
    }

    fn read_file(&mut self, key: FileKey, paused: bool) -> io::Result<Visit> {
        let Some(file) = self.files.get_mut(&key) else {
            return Ok(Visit::default());
        };
        let mut at_end = false;
        self.handler.refresh(&file.info, &mut file.stream);
        let now = Instant::now();
        let waiting = file.wait_until.is_some_and(|until| until > now);
        let mut read_total = 0u64;
        let mut finished = false;
        if !paused && !waiting {
            file.wait_until = None;
            // Lines left over from a limit-stage wait go first.
            let mut wait = process_lines(
                file,
                &mut self.handler,
                &mut self.out,
                self.cfg.max_raw_line_bytes,
                &self.metrics,
            );
            // The read itself is capped by what the buffer limit has left: one backlogged
            // file cannot overshoot it by a whole per-file budget.
            let budget = (self.cfg.per_file_budget as u64).min(
                self.cfg
                    .max_buffered_bytes
                    .saturating_sub(self.ledger.buffered_bytes()),
            );
            while wait.is_none() && read_total < budget {
                let n = file.source.read(&mut self.chunk)?;
                if n == 0 {
                    match eof_action(file)? {
                        Eof::Wait => {
                            at_end = true;
                            // An idle file keeps only its unfinished line: a burst of long
                            // lines must not pin a large buffer per file for ever.
                            release_spare(&mut file.buf);
                        }
                        Eof::Truncated => {
                            self.metrics.truncations.inc();
                            tracing::info!(path = %file.path_str, "file truncated, reading it again from the start");
                            let stream = self.handler.open(&file.info);
                            if let Some(stream) = stream {
                                file.stream = stream;
                            }
                            self.ledger.close(file.key, CloseKind::Abandoned);
                            let fingerprint = read_prefix(&file.info.path, false)
                                .map(|p| Fingerprint::of(&p))
                                .unwrap_or_else(|_| Fingerprint::of(b""));
                            let new_key = self.ledger.open(
                                file.path_str.clone(),
                                PositionRecord {
                                    offset: 0,
                                    dev: file.dev,
                                    inode: file.inode,
                                    fingerprint: Some(fingerprint.clone()),
                                    compressed: false,
                                    finished: false,
                                    last_seen_ms: now_ms(),
                                },
                            );
                            file.fingerprint = fingerprint;
                            file.key = new_key;
                            file.read_pos = 0;
                            file.consumed = 0;
                            file.decided = 0;
                            file.buf.clear();
                            file.scanned = 0;
                            if let Source::Plain(f) = &mut file.source {
                                f.seek(SeekFrom::Start(0))?;
                            }
                            // Re-key below, after the borrow ends.
                            self.out.clear();
                            let mut file = match self.files.remove(&key) {
                                Some(file) => file,
                                None => return Ok(Visit::default()),
                            };
                            file.key = new_key;
                            self.by_path.insert(file.info.path.clone(), new_key);
                            self.dirty.insert(new_key);
                            self.files.insert(new_key, file);
                            return Ok(Visit {
                                read: read_total,
                                idle: false,
                                ticking: false,
                            });
                        }
                        Eof::Finish => finished = true,
                    }
                    break;
                }
                file.read_pos += n as u64;
                read_total += n as u64;
                wait = feed(
                    file,
                    &mut self.handler,
                    &mut self.out,
                    self.cfg.max_raw_line_bytes,
                    &self.metrics,
                    &self.chunk[..n],
                );
                // Ship per chunk rather than per file: the entries of a whole per-file
                // budget (up to 1 MiB of lines) would otherwise wait in `out`, whose
                // capacity stays.
                ship(
                    &self.ledger,
                    &self.tx,
                    &mut self.out,
                    file.key,
                    &mut self.closed_channel,
                );
            }
            if let Some(wait) = wait {
                file.wait_until = Some(now + wait);
            }
            if read_total > 0 {
                let label = PathLabel {
                    path: file.path_str.clone(),
                };
                self.metrics
                    .read_bytes
                    .get_or_create(&label)
                    .set(file.read_pos as i64);
                // Scans are rare with a watch: the size is at least what was read.
                let size = self.metrics.file_bytes.get_or_create(&label);
                if size.get() < file.read_pos as i64 {
                    size.set(file.read_pos as i64);
                }
                self.ledger.written(file.key, file.read_pos, now_ms());
                refresh_fingerprint(file, &self.ledger);
            }
        }
        if finished {
            // The unterminated tail of a file that will not grow any more.
            if !file.buf.is_empty() {
                let start = file.consumed;
                let end = file.read_pos;
                let raw = std::mem::take(&mut file.buf);
                let outcome = self
                    .handler
                    .line(&mut file.stream, &raw, start, end, &mut self.out);
                file.handed(start, end, outcome);
                file.scanned = 0;
                count_lines(&self.metrics, &file.path_str, 1);
            }
            self.handler.flush(&mut file.stream, true, &mut self.out);
        } else {
            self.handler.flush(&mut file.stream, false, &mut self.out);
        }
        let held = self.handler.held_from(&file.stream);
        let visit = Visit {
            read: read_total,
            idle: at_end && !finished && file.wait_until.is_none(),
            ticking: held.is_some() || file.wait_until.is_some(),
        };
        let (file_key, decided) = (file.key, file.decided);
        self.ship(file_key);
        self.ledger.progress(file_key, decided, held);
        if finished && let Some(file) = self.files.remove(&key) {
            tracing::info!(path = %file.path_str, offset = file.read_pos, "file finished");
            if self.by_path.get(&file.info.path) == Some(&file.key) {
                self.by_path.remove(&file.info.path);
            }
            self.ledger.close(file.key, CloseKind::Finished);
            self.metrics.forget_path(&file.path_str);
            self.skipped.insert(
                (file.dev, file.inode),
                Skipped {
                    fingerprint: Some(file.fingerprint),
                },
            );
        }
        Ok(visit)
    }

    fn ship(&mut self, key: FileKey) {
        ship(
            &self.ledger,
            &self.tx,
            &mut self.out,
            key,
            &mut self.closed_channel,
        );
    }
}

/// Register `out`'s entries in the ledger and send them to the shipper, in order, as one
/// parcel.
fn ship(
    ledger: &Ledger,
    tx: &UnboundedSender<Parcel>,
    out: &mut Vec<Entry>,
    key: FileKey,
    closed_channel: &mut bool,
) {
    if out.is_empty() {
        return;
    }
    let parcel = ledger.register_all(key, out.drain(..), entry_cost);
    if !parcel.is_empty() && tx.send(parcel).is_err() {
        *closed_channel = true;
    }
}

/// What an entry counts for in the buffer limit: its text plus bookkeeping.
pub fn entry_cost(entry: &Entry) -> u64 {
    let metadata: usize = entry
        .structured_metadata
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    (entry.line.len() + metadata + 64) as u64
}

fn kind_rank(kind: &LogFileKind) -> u8 {
    match kind {
        LogFileKind::Compressed => 0,
        LogFileKind::Rotated => 1,
        LogFileKind::Active => 2,
    }
}

enum Eof {
    /// Nothing more yet.
    Wait,
    /// Size below the read offset: copytruncate.
    Truncated,
    /// The file will not grow: gone from disk, or compressed.
    Finish,
}

fn eof_action<S>(file: &Tailed<S>) -> io::Result<Eof> {
    match &file.source {
        Source::Gz(_) => Ok(Eof::Finish),
        Source::Plain(f) => {
            let meta = f.metadata()?;
            if meta.len() < file.read_pos {
                Ok(Eof::Truncated)
            } else if file.gone && meta.len() == file.read_pos {
                Ok(Eof::Finish)
            } else {
                Ok(Eof::Wait)
            }
        }
    }
}

/// Capacity a file's buffer may keep while it holds less: it usually holds only the
/// unfinished end of the last read, a few hundred bytes.
const KEEP_BUF: usize = 16 * 1024;

/// Give back a file buffer's spare capacity once it is large and mostly unused: every
/// open file has one, so what each keeps adds up.
fn release_spare(buf: &mut Vec<u8>) {
    if buf.capacity() > KEEP_BUF && buf.capacity() > 2 * buf.len() {
        buf.shrink_to(buf.len().max(1024));
    }
}

/// Hand the lines of `data`, just read from `file`, to the handler. Lines are taken from
/// `data` itself (the shared read chunk); only the unfinished end is copied into the
/// file's buffer. So a file's buffer holds one partial line, not a read chunk: with
/// hundreds of open files that is the difference between kilobytes and megabytes, and
/// it saves copying every byte once. Returns the handler's wait request.
fn feed<H: LineHandler>(
    file: &mut Tailed<H::Stream>,
    handler: &mut H,
    out: &mut Vec<Entry>,
    max_raw_line: usize,
    metrics: &Metrics,
    data: &[u8],
) -> Option<Duration> {
    let mut rest = data;
    if !file.buf.is_empty() {
        // Finish what the buffer holds first (a partial line, or lines left by a wait).
        let Some(i) = memchr::memchr(b'\n', rest) else {
            file.buf.extend_from_slice(rest);
            return process_lines(file, handler, out, max_raw_line, metrics);
        };
        file.buf.extend_from_slice(&rest[..=i]);
        rest = &rest[i + 1..];
        let wait = process_lines(file, handler, out, max_raw_line, metrics);
        if wait.is_some() || !file.buf.is_empty() {
            file.buf.extend_from_slice(rest);
            return wait;
        }
        release_spare(&mut file.buf);
    }
    let mut head = 0usize;
    let mut wait = None;
    let mut lines = 0u64;
    while let Some(i) = memchr::memchr(b'\n', &rest[head..]) {
        let newline = head + i;
        let start = file.consumed;
        let end = start + (newline + 1 - head) as u64;
        let outcome = handler.line(&mut file.stream, &rest[head..newline], start, end, out);
        wait = file.handed(start, end, outcome);
        head = newline + 1;
        lines += 1;
        if wait.is_some() {
            break;
        }
    }
    file.buf.extend_from_slice(&rest[head..]);
    // After a wait the rest may hold whole lines; otherwise it has no newline.
    file.scanned = if wait.is_some() { 0 } else { file.buf.len() };
    count_lines(metrics, &file.path_str, lines);
    if wait.is_none() && file.buf.len() > max_raw_line {
        return process_lines(file, handler, out, max_raw_line, metrics);
    }
    wait
}

/// Add `lines` to the file's `promtail_read_lines_total` and to
/// `logpipe_read_lines_total`.
fn count_lines(metrics: &Metrics, path: &str, lines: u64) {
    if lines > 0 {
        metrics.all_read_lines.inc_by(lines);
        metrics
            .read_lines
            .get_or_create(&PathLabel {
                path: path.to_string(),
            })
            .inc_by(lines);
    }
}

/// Hand every complete line in the buffer to the handler; cut a raw line that exceeds
/// the limit. Returns the handler's wait request.
fn process_lines<H: LineHandler>(
    file: &mut Tailed<H::Stream>,
    handler: &mut H,
    out: &mut Vec<Entry>,
    max_raw_line: usize,
    metrics: &Metrics,
) -> Option<Duration> {
    let mut head = 0usize;
    let mut wait = None;
    let mut lines = 0u64;
    loop {
        match memchr::memchr(b'\n', &file.buf[file.scanned..]) {
            Some(i) => {
                let newline = file.scanned + i;
                let start = file.consumed;
                let end = start + (newline + 1 - head) as u64;
                let outcome =
                    handler.line(&mut file.stream, &file.buf[head..newline], start, end, out);
                wait = file.handed(start, end, outcome);
                head = newline + 1;
                file.scanned = head;
                lines += 1;
                if wait.is_some() {
                    break;
                }
            }
            None => {
                file.scanned = file.buf.len();
                if file.buf.len() - head > max_raw_line {
                    let start = file.consumed;
                    let end = start + (file.buf.len() - head) as u64;
                    metrics.oversized_raw_lines.inc();
                    let outcome =
                        handler.line(&mut file.stream, &file.buf[head..], start, end, out);
                    wait = file.handed(start, end, outcome);
                    head = file.buf.len();
                    file.scanned = head;
                    lines += 1;
                }
                break;
            }
        }
    }
    file.buf.drain(..head);
    file.scanned -= head;
    count_lines(metrics, &file.path_str, lines);
    wait
}

/// While a file is shorter than the fingerprint, its fingerprint grows with it.
fn refresh_fingerprint<S>(file: &mut Tailed<S>, ledger: &Ledger) {
    if file.fingerprint.is_complete() || file.read_pos <= file.fingerprint.len as u64 {
        return;
    }
    if let Source::Plain(f) = &file.source {
        let mut prefix = vec![0u8; FINGERPRINT_BYTES];
        let mut filled = 0;
        while filled < prefix.len() {
            match f.read_at(&mut prefix[filled..], filled as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
        let fingerprint = Fingerprint::of(&prefix[..filled]);
        if fingerprint.len > file.fingerprint.len {
            ledger.update(file.key, None, Some(&fingerprint));
            file.fingerprint = fingerprint;
        }
    }
}

/// The first [`FINGERPRINT_BYTES`] of a file's content (decompressed for `.gz`).
fn read_prefix(path: &Path, compressed: bool) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut prefix = Vec::with_capacity(FINGERPRINT_BYTES);
    if compressed {
        MultiGzDecoder::new(file)
            .take(FINGERPRINT_BYTES as u64)
            .read_to_end(&mut prefix)?;
    } else {
        file.take(FINGERPRINT_BYTES as u64)
            .read_to_end(&mut prefix)?;
    }
    Ok(prefix)
}

fn open_at(path: &Path, compressed: bool, offset: u64) -> io::Result<Source> {
    let mut file = File::open(path)?;
    if compressed {
        let mut decoder = MultiGzDecoder::new(file);
        let skipped = io::copy(&mut (&mut decoder).take(offset), &mut io::sink())?;
        if skipped < offset {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "compressed file shorter than its position",
            ));
        }
        Ok(Source::Gz(Box::new(decoder)))
    } else {
        file.seek(SeekFrom::Start(offset))?;
        Ok(Source::Plain(file))
    }
}

#[cfg(test)]
mod tests;
