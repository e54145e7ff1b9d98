//! The benchmark corpus: CRI log files as a kubelet and containerd leave them under
//! `<root>/var/log/pods/<ns>_<pod>_<uid>/<container>/0.log`, generated from a fixed seed.
//!
//! Shape (chosen to look like a busy node, not to flatter a parser):
//! - pods with 1 to 3 containers, in a handful of namespaces; a container logs either JSON
//!   (structured loggers), plain text (logback/log4j style) or klog; how much each
//!   container logs is skewed (a few chatty pods, a long tail of quiet ones);
//! - entry lengths: 85 % 40..320 B, 13 % 320 B..4 KiB, 2 % 4..16 KiB; 0.5 % of entries
//!   are larger than the runtime's 16 KiB buffer and so written as 16 KiB `P` pieces and a
//!   final `F` piece, as containerd does; another 0.5 % are split once at a random point;
//! - a second shape, [`Shape::Short`] (issue 16), has the lengths of ordinary Kubernetes
//!   logs: 94 % 40..220 B, 5 % 220 B..1 KiB, 0.8 % 1..4 KiB, 0.15 % 4..16 KiB and 0.05 %
//!   over 16 KiB (so written in pieces), 0.2 % split once: about 200 B per entry, half
//!   JSON; the long shape above flatters MB/s, this one shows the per-line cost;
//! - 10 % of entries on stderr; timestamps RFC3339Nano with trailing zeros trimmed (Go's
//!   layout), strictly increasing per file, starting at a fixed instant.
//!
//! Every byte is a function of (seed, size): the same parameters give the same files,
//! and [`Manifest`] records the exact counts (entries after joining partial lines) that
//! a receiver must see. The fixed start instant (2025-06-01) relies on the test bed's Loki
//! accepting old samples (`reject_old_samples: false`).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::BenchError;
use super::rng::Rng;

/// Bumped whenever the generator's output changes, so a stale corpus is regenerated.
const GENERATOR_VERSION: u32 = 2;
/// 2025-06-01T00:00:00Z.
const BASE_TIME_NS: i64 = 1_748_736_000_000_000_000;
/// containerd's (and docker's) line buffer: longer lines are split into `P` pieces.
pub const RUNTIME_SPLIT: usize = 16 * 1024;

/// The length distribution of a corpus (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// Long entries (about 890 B on average): today's corpus since issue 7.
    #[default]
    Long,
    /// Ordinary lengths (about 200 B on average): issue 16.
    Short,
}

impl Shape {
    pub const ALL: [Shape; 2] = [Shape::Long, Shape::Short];

    /// Short name: directories, flags, JSON keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Long => "long",
            Self::Short => "short",
        }
    }

    /// The corpus directory under the bench's output directory (`corpus` for the long
    /// shape, as before, so an existing corpus is reused).
    pub fn dir_name(self) -> &'static str {
        match self {
            Self::Long => "corpus",
            Self::Short => "corpus-short",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Json,
    Plain,
    Klog,
}

/// One container's log file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerFile {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub container: String,
    pub format: Format,
    /// Relative weight of this container's log volume.
    pub weight: f64,
    /// Entries (after joining partial lines), CRI lines, bytes: filled by generation.
    #[serde(default)]
    pub entries: u64,
    #[serde(default)]
    pub cri_lines: u64,
    #[serde(default)]
    pub bytes: u64,
}

impl ContainerFile {
    /// Relative to the `/var/log/pods` root.
    pub fn rel_dir(&self) -> PathBuf {
        PathBuf::from(format!("{}_{}_{}", self.namespace, self.pod, self.uid)).join(&self.container)
    }

    pub fn rel_path(&self) -> PathBuf {
        self.rel_dir().join("0.log")
    }
}

/// What was generated, and the counts a receiver must see.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub generator_version: u32,
    #[serde(default)]
    pub shape: Shape,
    pub seed: u64,
    pub target_bytes: u64,
    /// Bytes of all files (what an agent reads).
    pub bytes: u64,
    /// Log entries after joining partial lines (what Loki must receive).
    pub entries: u64,
    /// Lines in the files (`P` and `F`).
    pub cri_lines: u64,
    pub partial_lines: u64,
    /// Bytes of entry content after joining (what the push requests carry as lines).
    pub content_bytes: u64,
    pub json_entries: u64,
    pub plain_entries: u64,
    pub klog_entries: u64,
    pub longest_entry: u64,
    pub pods: u64,
    pub files: Vec<ContainerFile>,
}

impl Manifest {
    pub fn summary(&self) -> String {
        format!(
            "{} shape: {:.1} MiB in {} files of {} pods: {} entries (mean {:.0} B; {} CRI lines, {} partial), json {} / plain {} / klog {}",
            self.shape.name(),
            self.bytes as f64 / 1048576.0,
            self.files.len(),
            self.pods,
            self.entries,
            self.content_bytes as f64 / self.entries.max(1) as f64,
            self.cri_lines,
            self.partial_lines,
            self.json_entries,
            self.plain_entries,
            self.klog_entries
        )
    }
}

const NAMESPACES: &[&str] = &[
    "default",
    "kube-system",
    "shop",
    "payments",
    "monitoring",
    "ingress-nginx",
    "auth",
    "search",
    "data",
    "batch",
];
const APPS: &[&str] = &[
    "checkout",
    "cart",
    "catalog",
    "orders",
    "api-gateway",
    "billing",
    "coredns",
    "kube-proxy",
    "ingress-controller",
    "prometheus",
    "grafana",
    "keycloak",
    "elasticsearch",
    "kafka",
    "zookeeper",
    "postgres",
    "redis",
    "worker",
    "scheduler",
    "notifier",
];
const SIDECARS: &[&str] = &[
    "istio-proxy",
    "log-rotator",
    "config-reloader",
    "oauth-proxy",
];
const WORDS: &[&str] = &[
    "request",
    "completed",
    "user",
    "order",
    "item",
    "cache",
    "miss",
    "hit",
    "timeout",
    "retry",
    "connection",
    "pool",
    "query",
    "rows",
    "latency",
    "upstream",
    "downstream",
    "session",
    "token",
    "refresh",
    "shard",
    "replica",
    "leader",
    "election",
    "partition",
    "offset",
    "commit",
    "rollback",
    "snapshot",
    "compaction",
    "flush",
    "batch",
    "queue",
    "worker",
    "heartbeat",
    "lease",
    "renewed",
    "failed",
    "succeeded",
    "started",
    "stopped",
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "200",
    "201",
    "204",
    "404",
    "500",
    "503",
    "ms",
    "bytes",
    "tenant",
    "region",
    "eu-west-1",
    "us-east-2",
    "checksum",
    "0x7f3a9c",
    "payload",
    "validated",
    "rejected",
    "accepted",
    "scheduled",
    "deadline",
    "exceeded",
    "context",
    "canceled",
    "goroutine",
    "stack",
    "trace",
    "span",
    "parent",
    "child",
    "metric",
];
const LEVELS: &[&str] = &["info", "info", "info", "info", "debug", "warn", "error"];
const PATHS: &[&str] = &[
    "/api/v1/items",
    "/api/v1/orders",
    "/healthz",
    "/metrics",
    "/api/v2/users",
    "/login",
    "/cart/add",
];

/// Produces entry texts; shared by the corpus and the steady-state writer.
#[derive(Clone, Debug)]
pub struct LineMaker {
    rng: Rng,
}

impl LineMaker {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
        }
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// The corpus length distribution (see the module docs); `huge` lengths exceed the
    /// runtime's split size.
    pub fn corpus_length(&mut self) -> usize {
        let roll = self.rng.below(1000);
        let len = if roll < 5 {
            // Bigger than the runtime buffer: 2..4 full pieces and a tail.
            RUNTIME_SPLIT * self.rng.range(1, 3) as usize
                + self.rng.range(40, RUNTIME_SPLIT as u64) as usize
        } else if roll < 25 {
            self.rng.range(4096, RUNTIME_SPLIT as u64) as usize
        } else if roll < 155 {
            self.rng.range(320, 4096) as usize
        } else {
            self.rng.range(40, 320) as usize
        };
        len.max(40)
    }

    /// An entry length of `shape`.
    pub fn length(&mut self, shape: Shape) -> (usize, bool) {
        match shape {
            Shape::Long => (self.corpus_length(), false),
            Shape::Short => self.ordinary_length(),
        }
    }

    /// The short shape's length distribution (see the module docs), and whether the
    /// entry is split once more at a random point (a few partial lines).
    pub fn ordinary_length(&mut self) -> (usize, bool) {
        let roll = self.rng.below(10_000);
        let len = if roll < 5 {
            RUNTIME_SPLIT + self.rng.range(40, RUNTIME_SPLIT as u64) as usize
        } else if roll < 20 {
            self.rng.range(4096, RUNTIME_SPLIT as u64) as usize
        } else if roll < 100 {
            self.rng.range(1024, 4096) as usize
        } else if roll < 600 {
            self.rng.range(220, 1024) as usize
        } else {
            self.rng.range(40, 220) as usize
        };
        (len.max(40), self.rng.below(1000) < 2)
    }

    /// A short line (40..400 B), the usual steady-state traffic.
    pub fn short_length(&mut self) -> usize {
        self.rng.range(40, 400) as usize
    }

    /// Entry text of exactly `len` ASCII bytes in `format`, stamped `time_ns`.
    pub fn entry(&mut self, format: Format, len: usize, time_ns: i64, out: &mut String) {
        out.clear();
        let level = *self.rng.pick(LEVELS);
        let when = DateTime::<Utc>::from_timestamp_nanos(time_ns);
        match format {
            Format::Json => {
                let full = format!(
                    "{{\"level\":\"{level}\",\"ts\":\"{}\",\"caller\":\"server/handler.go:{}\",\"msg\":\"{} {}\",\"method\":\"{}\",\"path\":\"{}/{}\",\"status\":{},\"duration_ms\":{},\"trace_id\":\"{:016x}\",\"detail\":\"",
                    when.to_rfc3339_opts(SecondsFormat::Millis, true),
                    self.rng.range(20, 900),
                    self.rng.pick(WORDS),
                    self.rng.pick(WORDS),
                    self.rng.pick(&["GET", "POST", "PUT"]),
                    self.rng.pick(PATHS),
                    self.rng.range(1, 99999),
                    self.rng.pick(&[200, 200, 200, 201, 204, 404, 500]),
                    self.rng.range(0, 2500),
                    self.rng.next_u64(),
                );
                let head = if full.len() + 2 <= len {
                    full
                } else {
                    format!("{{\"level\":\"{level}\",\"msg\":\"")
                };
                out.push_str(&head);
                self.filler(len.saturating_sub(head.len() + 2), out);
                out.push_str("\"}");
            }
            Format::Plain => {
                let full = format!(
                    "{} {:5} [worker-{}] c.e.{}Service - {} {} {} in {} ms ",
                    when.format("%Y-%m-%d %H:%M:%S%.3f"),
                    level.to_ascii_uppercase(),
                    self.rng.range(1, 16),
                    self.rng
                        .pick(&["Order", "Cart", "User", "Payment", "Stock"]),
                    self.rng.pick(WORDS),
                    self.rng.pick(WORDS),
                    self.rng.range(1, 999_999),
                    self.rng.range(0, 999),
                );
                self.headed(full, len, out);
            }
            Format::Klog => {
                let full = format!(
                    "{}{} {:>7} {}.go:{}] \"{} {}\" object=\"{}/{}\" ",
                    level.as_bytes()[0].to_ascii_uppercase() as char,
                    when.format("%m%d %H:%M:%S%.6f"),
                    self.rng.range(1, 40),
                    self.rng
                        .pick(&["controller", "reflector", "leaderelection", "server"]),
                    self.rng.range(20, 900),
                    self.rng.pick(WORDS),
                    self.rng.pick(WORDS),
                    self.rng.pick(NAMESPACES),
                    self.rng.pick(APPS),
                );
                self.headed(full, len, out);
            }
        }
    }

    /// Exactly `n` bytes of words (no quote or backslash, so JSON stays valid).
    /// `head` then filler up to `len` bytes; filler alone when `head` is longer than that.
    fn headed(&mut self, head: String, len: usize, out: &mut String) {
        let head = if head.len() <= len {
            head
        } else {
            String::new()
        };
        out.push_str(&head);
        self.filler(len.saturating_sub(head.len()), out);
    }

    fn filler(&mut self, n: usize, out: &mut String) {
        let start = out.len();
        while out.len() - start < n {
            if out.len() > start {
                out.push(' ');
            }
            let word = WORDS[self.rng.below(WORDS.len() as u64) as usize];
            out.push_str(word);
            if self.rng.chance(100) {
                out.push_str(&format!("={}", self.rng.range(0, 1_000_000)));
            }
        }
        out.truncate(start + n);
    }
}

/// RFC3339Nano as Go formats it (trailing zeros of the fraction trimmed).
pub fn cri_time(ns: i64) -> String {
    let when = DateTime::<Utc>::from_timestamp_nanos(ns);
    let frac = ns.rem_euclid(1_000_000_000);
    if frac == 0 {
        return when.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    }
    let mut digits = format!("{frac:09}");
    while digits.ends_with('0') {
        digits.pop();
    }
    format!("{}.{digits}Z", when.format("%Y-%m-%dT%H:%M:%S"))
}

/// Split an entry as the runtime writes it: `(tag, piece)` pairs.
pub fn pieces(text: &str, extra_split: Option<usize>) -> Vec<(&'static str, &str)> {
    let mut out = Vec::new();
    let mut rest = text;
    if let Some(at) = extra_split.filter(|&at| at > 0 && at < rest.len()) {
        // ASCII only, so any byte index is a char boundary.
        out.push(("P", &rest[..at]));
        rest = &rest[at..];
    }
    while rest.len() > RUNTIME_SPLIT {
        out.push(("P", &rest[..RUNTIME_SPLIT]));
        rest = &rest[RUNTIME_SPLIT..];
    }
    out.push(("F", rest));
    out
}

/// The pods and containers of a corpus (or a steady-state run) of `pods` pods.
pub fn containers(seed: u64, pods: usize) -> Vec<ContainerFile> {
    let mut rng = Rng::new(seed ^ 0x00c0_ffee);
    let mut files = Vec::new();
    for index in 0..pods {
        let app = *rng.pick(APPS);
        let namespace = (*rng.pick(NAMESPACES)).to_string();
        let pod = format!(
            "{app}-{:010x}-{}",
            rng.next_u64() & 0xff_ffff_ffff,
            base36(rng.below(36u64.pow(5)), 5)
        );
        let r = rng.next_u64();
        let uid = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            r >> 32,
            (r >> 16) & 0xffff,
            r & 0xfff,
            rng.below(0x1000),
            rng.next_u64() & 0xffff_ffff_ffff
        );
        let count = rng.range(1, 3) as usize;
        for c in 0..count {
            let container = if c == 0 {
                app.to_string()
            } else {
                SIDECARS[(c - 1) % SIDECARS.len()].to_string()
            };
            let format = match (c, rng.below(10)) {
                (0, 0..=5) => Format::Json,
                (0, 6..=8) => Format::Plain,
                (0, _) => Format::Klog,
                (_, 0..=4) => Format::Json,
                _ => Format::Plain,
            };
            // Zipf-like by pod rank: pod 0 is the chattiest; sidecars log less.
            let weight = 1.0 / ((index + 1) as f64).powf(0.8) / if c == 0 { 1.0 } else { 4.0 };
            files.push(ContainerFile {
                namespace: namespace.clone(),
                pod: pod.clone(),
                uid: uid.clone(),
                container,
                format,
                weight,
                entries: 0,
                cri_lines: 0,
                bytes: 0,
            });
        }
    }
    files
}

fn base36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Picks a file by weight.
pub struct WeightedPick {
    cumulative: Vec<f64>,
}

impl WeightedPick {
    pub fn new(files: &[ContainerFile]) -> Self {
        let mut sum = 0.0;
        let cumulative = files
            .iter()
            .map(|f| {
                sum += f.weight;
                sum
            })
            .collect();
        Self { cumulative }
    }

    pub fn pick(&self, rng: &mut Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.cumulative.len().saturating_sub(1))
    }
}

/// Where the corpus lives: `<dir>/var/log/pods` and `<dir>/manifest.json`.
pub fn pods_root(dir: &Path) -> PathBuf {
    dir.join("var/log/pods")
}

/// The corpus for (seed, size): reused when `dir` already holds it intact, else written.
pub fn ensure(
    dir: &Path,
    seed: u64,
    target_bytes: u64,
    shape: Shape,
) -> Result<Manifest, BenchError> {
    let manifest_path = dir.join("manifest.json");
    if let Ok(text) = fs::read_to_string(&manifest_path)
        && let Ok(manifest) = serde_json::from_str::<Manifest>(&text)
        && manifest.generator_version == GENERATOR_VERSION
        && manifest.seed == seed
        && manifest.shape == shape
        && manifest.target_bytes == target_bytes
        && intact(dir, &manifest)
    {
        return Ok(manifest);
    }
    let manifest = generate(dir, seed, target_bytes, shape)?;
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| BenchError::Other(format!("cannot serialise the corpus manifest: {e}")))?;
    fs::write(&manifest_path, text).map_err(BenchError::io(&manifest_path))?;
    Ok(manifest)
}

fn intact(dir: &Path, manifest: &Manifest) -> bool {
    let root = pods_root(dir);
    manifest.files.iter().all(|f| {
        fs::metadata(root.join(f.rel_path()))
            .map(|m| m.len() == f.bytes)
            .unwrap_or(false)
    })
}

fn generate(
    dir: &Path,
    seed: u64,
    target_bytes: u64,
    shape: Shape,
) -> Result<Manifest, BenchError> {
    let root = pods_root(dir);
    if root.exists() {
        fs::remove_dir_all(&root).map_err(BenchError::io(&root))?;
    }
    // One pod per 4 MiB, within 32..200: ~200 pods, ~400 files for 1 GiB, ~50 for small.
    let pods = (target_bytes / (4 << 20)).clamp(32, 200) as usize;
    let mut files = containers(seed, pods);
    let mut writers = Vec::with_capacity(files.len());
    for file in &files {
        let path = root.join(file.rel_path());
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(BenchError::io(parent))?;
        }
        let handle = File::create(&path).map_err(BenchError::io(&path))?;
        writers.push((path, BufWriter::with_capacity(64 * 1024, handle)));
    }
    let picker = WeightedPick::new(&files);
    let mut maker = LineMaker::new(seed);
    let mut layout = Rng::new(seed ^ 0x5eed_1a70);
    let mut clock = vec![BASE_TIME_NS; files.len()];
    let mut manifest = Manifest {
        generator_version: GENERATOR_VERSION,
        shape,
        seed,
        target_bytes,
        bytes: 0,
        entries: 0,
        cri_lines: 0,
        partial_lines: 0,
        content_bytes: 0,
        json_entries: 0,
        plain_entries: 0,
        klog_entries: 0,
        longest_entry: 0,
        pods: pods as u64,
        files: Vec::new(),
    };
    let mut text = String::new();
    let mut line = Vec::with_capacity(64 * 1024);
    while manifest.bytes < target_bytes {
        let index = picker.pick(&mut layout);
        let file = &mut files[index];
        let (len, split_once) = match shape {
            Shape::Long => (maker.corpus_length(), false),
            Shape::Short => maker.ordinary_length(),
        };
        // Per-file clocks advance 0.05..2 ms per entry (pieces share their entry's clock
        // step plus 1 µs each), so each stream is ordered as Loki wants it.
        clock[index] += layout.range(50_000, 2_000_000) as i64;
        maker.entry(file.format, len, clock[index], &mut text);
        let stream = if layout.chance(100) {
            "stderr"
        } else {
            "stdout"
        };
        // Long shape: 0.5 % split once, as before (the layout stream decides); short
        // shape: the length stream decided, so the long corpus stays byte for byte.
        let split = len < RUNTIME_SPLIT
            && match shape {
                Shape::Long => layout.chance(5),
                Shape::Short => split_once,
            };
        let extra = split.then(|| layout.range(1, len as u64 - 1) as usize);
        let (path, writer) = &mut writers[index];
        for (n, (tag, piece)) in pieces(&text, extra).into_iter().enumerate() {
            line.clear();
            line.extend_from_slice(cri_time(clock[index] + n as i64 * 1000).as_bytes());
            line.push(b' ');
            line.extend_from_slice(stream.as_bytes());
            line.push(b' ');
            line.extend_from_slice(tag.as_bytes());
            line.push(b' ');
            line.extend_from_slice(piece.as_bytes());
            line.push(b'\n');
            writer
                .write_all(&line)
                .map_err(BenchError::io(path.as_path()))?;
            file.cri_lines += 1;
            file.bytes += line.len() as u64;
            manifest.cri_lines += 1;
            manifest.bytes += line.len() as u64;
            if tag == "P" {
                manifest.partial_lines += 1;
            }
        }
        file.entries += 1;
        manifest.entries += 1;
        manifest.content_bytes += text.len() as u64;
        manifest.longest_entry = manifest.longest_entry.max(text.len() as u64);
        match file.format {
            Format::Json => manifest.json_entries += 1,
            Format::Plain => manifest.plain_entries += 1,
            Format::Klog => manifest.klog_entries += 1,
        }
    }
    for (path, mut writer) in writers {
        writer.flush().map_err(BenchError::io(&path))?;
    }
    manifest.files = files;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_have_the_asked_length_and_json_stays_json() {
        let mut maker = LineMaker::new(1);
        let mut text = String::new();
        for len in [40, 41, 100, 319, 4096, 20_000] {
            for format in [Format::Json, Format::Plain, Format::Klog] {
                maker.entry(format, len, BASE_TIME_NS + 123_456_789, &mut text);
                assert_eq!(text.len(), len, "{format:?} {len}: {text}");
                if format == Format::Json {
                    serde_json::from_str::<serde_json::Value>(&text).unwrap();
                }
            }
        }
    }

    #[test]
    fn runtime_splits_at_16_kib() {
        let text = "x".repeat(RUNTIME_SPLIT * 2 + 5);
        let tags: Vec<_> = pieces(&text, None)
            .iter()
            .map(|(t, p)| (*t, p.len()))
            .collect();
        assert_eq!(tags, [("P", RUNTIME_SPLIT), ("P", RUNTIME_SPLIT), ("F", 5)]);
        let tags: Vec<_> = pieces("abcdef", Some(2))
            .iter()
            .map(|(t, p)| (*t, *p))
            .collect();
        assert_eq!(tags, [("P", "ab"), ("F", "cdef")]);
    }

    #[test]
    fn go_trims_trailing_zeros() {
        assert_eq!(cri_time(BASE_TIME_NS), "2025-06-01T00:00:00Z");
        assert_eq!(
            cri_time(BASE_TIME_NS + 120_000_000),
            "2025-06-01T00:00:00.12Z"
        );
    }

    #[test]
    fn same_seed_same_corpus_and_counts_add_up() {
        let a = tempdir("a");
        let b = tempdir("b");
        let ma = generate(&a, 42, 2 << 20, Shape::Long).unwrap();
        let mb = generate(&b, 42, 2 << 20, Shape::Long).unwrap();
        assert_eq!(ma, mb);
        let root = pods_root(&a);
        let (mut entries, mut lines, mut bytes) = (0, 0, 0);
        for f in &ma.files {
            let data = fs::read(root.join(f.rel_path())).unwrap();
            assert_eq!(data, fs::read(pods_root(&b).join(f.rel_path())).unwrap());
            bytes += data.len() as u64;
            for l in data.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
                lines += 1;
                let tag = l.split(|&c| c == b' ').nth(2).unwrap();
                if tag == b"F" {
                    entries += 1;
                }
            }
        }
        assert_eq!(
            (entries, lines, bytes),
            (ma.entries, ma.cri_lines, ma.bytes)
        );
        assert!(ma.partial_lines > 0 && ma.json_entries > 0 && ma.plain_entries > 0);
        fs::remove_dir_all(&a).unwrap();
        fs::remove_dir_all(&b).unwrap();
    }

    #[test]
    fn the_short_shape_has_ordinary_lengths_half_json_and_some_partial_lines() {
        let dir = tempdir("short");
        let m = generate(&dir, 42, 8 << 20, Shape::Short).unwrap();
        let mean = m.content_bytes as f64 / m.entries as f64;
        assert!((150.0..260.0).contains(&mean), "mean entry {mean:.0} B");
        let json = m.json_entries as f64 / m.entries as f64;
        assert!((0.3..0.7).contains(&json), "json share {json:.2}");
        assert!(m.partial_lines > 0 && m.longest_entry > 4096, "{m:?}");
        assert_eq!(m.shape, Shape::Short);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "logpipe-corpus-{name}-{}",
            logpipe_e2e::unique_suffix()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
