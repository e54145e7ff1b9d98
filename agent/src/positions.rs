//! The positions file: how far each log file has been read *and acknowledged by Loki*.
//!
//! Flow: on start [`PositionsFile::load`] reads the document (or, on a node moving from
//! Promtail, [`import_promtail`] converts Promtail's `positions.yaml`); the tailer claims a
//! record for each file it finds by identity; the runtime calls [`PositionsFile::save`]
//! after acknowledgements and on shutdown with the offsets the ledger
//! (`tail::ack::Ledger`) computed.
//!
//! Guarantees:
//! - A position is committed only after every entry before it in that file was
//!   acknowledged by Loki (or dropped on purpose: pipeline drop rules, a non-retryable 4xx).
//!   The offsets handed to `save` are computed that way; this module stores them.
//! - A save is atomic and durable: the document is written to `<file>.tmp`, fsynced,
//!   renamed over the file, and the directory is fsynced, so after a crash (kill -9, power
//!   loss) the file holds either the previous or the new document, never a mix.
//!
//! Assumptions:
//! - One agent per positions file (the hostPath is per node, DaemonSet surge is off).
//! - Files are identified by (dev, inode) plus a fingerprint of their first bytes
//!   ([`FINGERPRINT_BYTES`]); a compressed rotated file by the fingerprint of its
//!   decompressed first bytes. Paths are kept for people and for Promtail import.
//!
//! Caveats:
//! - A document that cannot be parsed is reported as [`PositionsError::Corrupt`]; the
//!   runtime moves it aside and starts without positions (re-reads active files: duplicates,
//!   never silent loss of a file it can still see).
//! - Promtail keys positions by path only: an imported offset is applied to whatever file
//!   is at that path now (Promtail's own semantics: a file smaller than the offset is read
//!   from the start).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Current document version.
pub const VERSION: u32 = 1;

/// How many leading bytes identify a file's content.
pub const FINGERPRINT_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PositionsError {
    #[error("cannot read positions file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("positions file {path} is corrupt: {message}")]
    Corrupt { path: String, message: String },
    #[error("positions file {path} has version {version}, this agent reads up to {VERSION}")]
    UnsupportedVersion { path: String, version: u32 },
    #[error("cannot write positions file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot encode positions: {0}")]
    Encode(String),
    #[error("cannot read Promtail positions file {path}: {message}")]
    Promtail { path: String, message: String },
}

/// The first bytes of a file's content, hashed: `len` bytes (fewer than
/// [`FINGERPRINT_BYTES`] only while the file is shorter), SHA-256 truncated to 64 bits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint {
    pub len: u32,
    pub hash: String,
}

impl Fingerprint {
    /// Fingerprint of `prefix` (at most [`FINGERPRINT_BYTES`] of it are used).
    pub fn of(prefix: &[u8]) -> Self {
        let used = &prefix[..prefix.len().min(FINGERPRINT_BYTES)];
        let digest = Sha256::digest(used);
        Self {
            len: used.len() as u32,
            hash: hex::encode(&digest[..8]),
        }
    }

    /// Whether a file whose first bytes are `prefix` has this fingerprint's content.
    pub fn matches(&self, prefix: &[u8]) -> bool {
        let len = self.len as usize;
        prefix.len() >= len && Self::of(&prefix[..len]) == *self
    }

    /// Complete fingerprints are stable; shorter ones grow with the file.
    pub fn is_complete(&self) -> bool {
        self.len as usize >= FINGERPRINT_BYTES
    }
}

/// One file's acknowledged position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PositionRecord {
    /// Bytes (of decompressed content, for `.gz`) acknowledged or deliberately dropped.
    pub offset: u64,
    pub dev: u64,
    pub inode: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    /// The file is a gzip-compressed rotated log; `offset` counts decompressed bytes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compressed: bool,
    /// Every byte of the file is accounted for: it ended (deleted, or a compressed file
    /// read to its end) or was deliberately skipped (rotated before this agent knew it).
    /// Kept so the compressed copy of the same content is not read again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub finished: bool,
    /// Unix milliseconds when a file with this identity was last seen.
    pub last_seen_ms: i64,
}

#[cfg(test)]
impl PositionRecord {
    /// A plain file (device 1, `inode`) at `offset`, for tests.
    pub fn of_file(inode: u64, offset: u64) -> Self {
        Self {
            offset,
            dev: 1,
            inode,
            fingerprint: None,
            compressed: false,
            finished: false,
            last_seen_ms: 0,
        }
    }
}

/// The positions document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PositionsDoc {
    pub version: u32,
    /// Unix milliseconds of the save. Rotated files of unknown identity modified after it
    /// were written while the agent was down, and are read.
    pub saved_at_ms: i64,
    /// Path (as last seen) -> position.
    pub files: BTreeMap<String, PositionRecord>,
}

impl PositionsDoc {
    pub fn new(saved_at_ms: i64, files: BTreeMap<String, PositionRecord>) -> Self {
        Self {
            version: VERSION,
            saved_at_ms,
            files,
        }
    }
}

/// The positions file on disk.
#[derive(Clone, Debug)]
pub struct PositionsFile {
    path: PathBuf,
}

impl PositionsFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn display(&self) -> String {
        self.path.display().to_string()
    }

    /// Read the document; `None` when there is no file yet.
    pub fn load(&self) -> Result<Option<PositionsDoc>, PositionsError> {
        let text = match fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PositionsError::Read {
                    path: self.display(),
                    source,
                });
            }
        };
        let doc: PositionsDoc =
            serde_json::from_slice(&text).map_err(|e| PositionsError::Corrupt {
                path: self.display(),
                message: e.to_string(),
            })?;
        if doc.version > VERSION {
            return Err(PositionsError::UnsupportedVersion {
                path: self.display(),
                version: doc.version,
            });
        }
        Ok(Some(doc))
    }

    /// Move an unreadable file aside (kept for a person to look at).
    pub fn quarantine(&self, now_ms: i64) -> Result<PathBuf, PositionsError> {
        let aside = self.path.with_extension(format!("corrupt-{now_ms}"));
        fs::rename(&self.path, &aside).map_err(|source| PositionsError::Write {
            path: self.display(),
            source,
        })?;
        Ok(aside)
    }

    /// Write `doc` atomically and durably (temp file, fsync, rename, fsync directory).
    pub fn save(&self, doc: &PositionsDoc) -> Result<(), PositionsError> {
        let body =
            serde_json::to_vec_pretty(doc).map_err(|e| PositionsError::Encode(e.to_string()))?;
        let write_err = |source| PositionsError::Write {
            path: self.display(),
            source,
        };
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(write_err)?;
        let mut tmp_name = self.path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        {
            let mut file = fs::File::create(&tmp).map_err(write_err)?;
            file.write_all(&body).map_err(write_err)?;
            file.sync_all().map_err(write_err)?;
        }
        fs::rename(&tmp, &self.path).map_err(write_err)?;
        // Without this the rename itself may not survive a power loss.
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err)?;
        Ok(())
    }
}

/// What the importer needs to know about a file that exists now.
#[derive(Clone, Debug, PartialEq)]
pub struct FileFacts {
    pub dev: u64,
    pub inode: u64,
    pub size: u64,
    pub fingerprint: Fingerprint,
}

/// Promtail's positions document: `positions: {"<path>": "<offset>"}`.
#[derive(Debug, Deserialize)]
struct PromtailFile {
    #[serde(default)]
    positions: BTreeMap<String, String>,
}

/// Convert Promtail's `positions.yaml` into records for the files that exist now
/// (`facts` looks a path up on disk). Non-numeric values (journal cursors) and files gone
/// since are skipped; a file smaller than its offset starts at 0, as Promtail would.
pub fn import_promtail(
    source: &str,
    yaml: &str,
    now_ms: i64,
    facts: impl Fn(&Path) -> Option<FileFacts>,
) -> Result<BTreeMap<String, PositionRecord>, PositionsError> {
    let file: PromtailFile = serde_yaml::from_str(yaml).map_err(|e| PositionsError::Promtail {
        path: source.to_string(),
        message: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (path, value) in file.positions {
        let Ok(offset) = value.trim().parse::<u64>() else {
            continue;
        };
        let Some(facts) = facts(Path::new(&path)) else {
            continue;
        };
        let offset = if facts.size < offset { 0 } else { offset };
        out.insert(
            path,
            PositionRecord {
                offset,
                dev: facts.dev,
                inode: facts.inode,
                fingerprint: Some(facts.fingerprint),
                compressed: false,
                finished: false,
                last_seen_ms: now_ms,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: u64) -> PositionRecord {
        PositionRecord {
            offset,
            dev: 1,
            inode: 2,
            fingerprint: Some(Fingerprint::of(b"hello")),
            compressed: false,
            finished: false,
            last_seen_ms: 5,
        }
    }

    #[test]
    fn save_then_load_round_trips_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = PositionsFile::new(dir.path().join("sub/positions.json"));
        assert_eq!(file.load().unwrap(), None);
        let doc = PositionsDoc::new(42, BTreeMap::from([("/a/0.log".to_string(), record(10))]));
        file.save(&doc).unwrap();
        assert_eq!(file.load().unwrap(), Some(doc.clone()));
        let mut doc2 = doc;
        doc2.files.insert("/b/0.log".into(), record(20));
        file.save(&doc2).unwrap();
        assert_eq!(file.load().unwrap(), Some(doc2));
        let names: Vec<_> = fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["positions.json"]);
    }

    #[test]
    fn corrupt_and_future_documents_are_refused_not_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("positions.json");
        let file = PositionsFile::new(&path);
        fs::write(&path, b"{\"version\": 1, \"files\": {").unwrap();
        assert!(matches!(file.load(), Err(PositionsError::Corrupt { .. })));
        let aside = file.quarantine(7).unwrap();
        assert!(aside.exists() && !path.exists());
        fs::write(&path, br#"{"version": 9, "savedAtMs": 1, "files": {}}"#).unwrap();
        assert!(matches!(
            file.load(),
            Err(PositionsError::UnsupportedVersion { version: 9, .. })
        ));
    }

    #[test]
    fn fingerprints_match_longer_files_with_the_same_start() {
        let short = Fingerprint::of(b"2024-01-01T00:00:00Z stdout F a");
        assert!(short.matches(b"2024-01-01T00:00:00Z stdout F a\nmore"));
        assert!(!short.matches(b"2024-01-01T00:00:00Z stdout F b\n"));
        assert!(!short.matches(b"2024"));
        let long = Fingerprint::of(&[b'x'; 1000]);
        assert_eq!(long.len as usize, FINGERPRINT_BYTES);
        assert!(long.is_complete() && long.matches(&[b'x'; 300]));
    }

    #[test]
    fn promtail_positions_are_imported_with_promtail_semantics() {
        let yaml = r#"positions:
  /var/log/pods/ns_a_1/c/0.log: "120"
  /var/log/pods/ns_b_2/c/0.log: "500"
  /var/log/pods/ns_gone_3/c/0.log: "10"
  journal-default: "s=abc;i=1"
"#;
        let facts = |p: &Path| -> Option<FileFacts> {
            let size = match p.to_str()? {
                "/var/log/pods/ns_a_1/c/0.log" => 300,
                "/var/log/pods/ns_b_2/c/0.log" => 100,
                _ => return None,
            };
            Some(FileFacts {
                dev: 1,
                inode: size,
                size,
                fingerprint: Fingerprint::of(b"x"),
            })
        };
        let records = import_promtail("p.yaml", yaml, 9, facts).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records["/var/log/pods/ns_a_1/c/0.log"].offset, 120);
        // Smaller than the offset: truncated since, read from the start.
        assert_eq!(records["/var/log/pods/ns_b_2/c/0.log"].offset, 0);
        assert!(import_promtail("p.yaml", "positions: [1", 0, facts).is_err());
    }
}
