//! Writes container logs the way the kubelet and a CRI runtime do, into a simulated node's
//! `/var/log/pods` tree (`<testbed>/<cluster>/nodes/<node>/var/log/pods`), for pods that
//! exist in the cluster, so an agent's discovery knows the pods whose files it reads.
//!
//! Each line carries a sequence number (`<prefix> <pod> seq=<n>`), so a test can tell
//! exactly which lines reached Loki, which are missing and which came twice.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, SecondsFormat, Utc};

/// One container's log stream on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerLog {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub container: String,
    pub node: String,
}

impl ContainerLog {
    /// `<node root>/var/log/pods/<ns>_<pod>_<uid>/<container>/<restart>.log`, as kubelet names it.
    pub fn path(&self, cluster_dir: &Path, restart: u32) -> PathBuf {
        cluster_dir
            .join("nodes")
            .join(&self.node)
            .join("var/log/pods")
            .join(format!("{}_{}_{}", self.namespace, self.pod, self.uid))
            .join(&self.container)
            .join(format!("{restart}.log"))
    }
}

/// Appends CRI-formatted lines to one file.
pub struct CriWriter {
    file: File,
    pub path: PathBuf,
}

impl CriWriter {
    pub fn open(path: PathBuf) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Self { file, path })
    }

    /// A full line (`F`).
    pub fn line(&mut self, stream: &str, text: &str) -> io::Result<()> {
        self.write_tagged(stream, "F", text)
    }

    /// A line split by the runtime into partial (`P`) pieces and a final `F` piece.
    pub fn split_line(&mut self, stream: &str, pieces: &[&str]) -> io::Result<()> {
        for (index, piece) in pieces.iter().enumerate() {
            let tag = if index + 1 == pieces.len() { "F" } else { "P" };
            self.write_tagged(stream, tag, piece)?;
        }
        Ok(())
    }

    fn write_tagged(&mut self, stream: &str, tag: &str, text: &str) -> io::Result<()> {
        let time = Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true);
        // One write per line, as a runtime does, so a reader never sees half a line
        // followed by an unrelated one.
        self.file
            .write_all(format!("{time} {stream} {tag} {text}\n").as_bytes())
    }
}

/// The text of line `seq` of a pod's stream.
pub fn numbered_line(prefix: &str, pod: &str, seq: u64) -> String {
    format!("{prefix} {pod} seq={seq}")
}

/// The sequence number in a line written by [`numbered_line`].
pub fn sequence_of(line: &str) -> Option<u64> {
    line.rsplit_once("seq=")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// RFC 3339 with nanoseconds, UTC, as a CRI runtime writes it.
pub fn rfc3339_nano(unix_ns: i64) -> String {
    DateTime::from_timestamp_nanos(unix_ns).to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// A strictly increasing clock for CRI timestamps, so no two lines share one (Loki keeps
/// one copy of identical (timestamp, line) pairs, which would hide a duplicate).
pub struct Clock(AtomicI64);

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Self(AtomicI64::new(crate::store::now_ns()))
    }

    pub fn next(&self) -> i64 {
        let now = crate::store::now_ns();
        let mut prev = self.0.load(Ordering::SeqCst);
        loop {
            let ts = now.max(prev + 1);
            match self
                .0
                .compare_exchange(prev, ts, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return ts,
                Err(p) => prev = p,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339_nano(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_nano(1_709_251_200_000_000_001),
            "2024-03-01T00:00:00.000000001Z"
        );
    }

    #[test]
    fn clock_never_repeats() {
        let clock = Clock::new();
        let a = clock.next();
        assert!(clock.next() > a);
    }
}
