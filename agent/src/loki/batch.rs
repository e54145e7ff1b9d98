//! A batch of entries for one push: grouped per stream (the canonical, sorted label
//! string, external labels merged under the entry's own), entries sorted by timestamp
//! within a stream, encoded as a protobuf `PushRequest` compressed with Snappy's *block*
//! format (what Loki's distributor decodes; the framed format is refused).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

use prost::Message;
use prost::encoding::{self, WireType};

use super::proto::{EntryAdapter, LabelPairAdapter, StreamAdapter, Timestamp};
use super::streams::stream_key;
use crate::entry::{LabelSet, render_labels};
use crate::tail::ack::{AckToken, Pending};

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("snappy compression failed: {0}")]
    Compress(#[from] snap::Error),
    #[error("encoded {written} bytes of a request measured at {promised}")]
    Length { promised: usize, written: usize },
}

#[derive(Debug)]
struct StreamEntries {
    labels: LabelSet,
    entries: Vec<EntryAdapter>,
}

/// Hashes a pointer-sized key: it is already unique, one multiply spreads it.
#[derive(Debug, Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

/// Entries waiting to be pushed together.
#[derive(Debug, Default)]
pub struct Batch {
    /// Stream of a label set, by the set's address: label sets are shared `Arc`s (one per
    /// file and output stream), so this finds a stream without hashing its labels. Each
    /// key's `Arc` is held in `aliases` or `streams`, so no address is reused meanwhile.
    by_address: HashMap<usize, usize, BuildHasherDefault<AddressHasher>>,
    /// Label sets equal to a stream's but another `Arc` (e.g. rebuilt after discovery).
    aliases: Vec<LabelSet>,
    index: HashMap<LabelSet, usize>,
    streams: Vec<StreamEntries>,
    /// Bytes of log lines (Promtail's batch size measure).
    bytes: u64,
    entries: u64,
    tokens: Vec<AckToken>,
    started: Option<Instant>,
    newest_ns: i64,
}

/// An encoded batch, ready to send.
#[derive(Debug)]
pub struct Encoded {
    pub body: bytes::Bytes,
    pub entries: u64,
    pub line_bytes: u64,
    pub tokens: Vec<AckToken>,
    pub newest_ns: i64,
    /// [`super::streams::stream_key`] of each stream of the request.
    pub streams: Vec<u64>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> u64 {
        self.entries
    }

    /// When the first entry arrived.
    pub fn started(&self) -> Option<Instant> {
        self.started
    }

    pub fn push(&mut self, pending: Pending) {
        let Pending { entry, token, .. } = pending;
        self.started.get_or_insert_with(Instant::now);
        self.bytes += entry.line.len() as u64;
        self.entries += 1;
        self.newest_ns = self.newest_ns.max(entry.timestamp_ns);
        self.tokens.push(token);
        let adapter = EntryAdapter {
            timestamp: Some(Timestamp::from_unix_nanos(entry.timestamp_ns)),
            line: entry.line,
            structured_metadata: entry
                .structured_metadata
                .into_iter()
                .map(|(name, value)| LabelPairAdapter { name, value })
                .collect(),
        };
        // Entries arrive in runs from one file, which share one label set: comparing the
        // pointer with the previous stream's avoids hashing the whole label map per entry.
        if let Some(last) = self.streams.last_mut()
            && std::sync::Arc::ptr_eq(&last.labels, &entry.labels)
        {
            last.entries.push(adapter);
            return;
        }
        let address = std::sync::Arc::as_ptr(&entry.labels) as usize;
        if let Some(&i) = self.by_address.get(&address) {
            self.streams[i].entries.push(adapter);
            return;
        }
        match self.index.get(&entry.labels) {
            Some(&i) => {
                self.streams[i].entries.push(adapter);
                self.by_address.insert(address, i);
                self.aliases.push(entry.labels);
            }
            None => {
                self.index.insert(entry.labels.clone(), self.streams.len());
                self.by_address.insert(address, self.streams.len());
                self.streams.push(StreamEntries {
                    labels: entry.labels,
                    entries: vec![adapter],
                });
            }
        }
    }

    /// Encode and compress; the batch is consumed.
    ///
    /// The protobuf is never held whole: it is written in Snappy-block-sized pieces, each
    /// compressed as it fills, and every entry is dropped once written. So a push holds
    /// its lines or their compressed form, not the lines, the encoded request and the
    /// compressed body at once (about 3.3 MiB for a 1 MiB batch before). The body is the
    /// same, byte for byte, as compressing the whole encoded request: Snappy's encoder
    /// compresses its input in independent 64 KiB blocks too.
    pub fn encode(self, external: &BTreeMap<String, String>) -> Result<Encoded, BatchError> {
        let mut merged: BTreeMap<String, Vec<EntryAdapter>> = BTreeMap::new();
        for stream in self.streams {
            let labels = if external.is_empty() {
                render_labels(&stream.labels)
            } else {
                let mut all = external.clone();
                all.extend(stream.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
                render_labels(&all)
            };
            // Two label sets can render the same once external labels are merged.
            merged.entry(labels).or_default().extend(stream.entries);
        }
        let keys: Vec<u64> = merged.keys().map(|labels| stream_key(labels)).collect();
        let streams: Vec<StreamAdapter> = merged
            .into_iter()
            .map(|(labels, entries)| stream(labels, entries))
            .collect();
        // Each entry's length is measured once here, not again for its stream's length
        // and again when it is written (prost's `encoded_len` per level did that).
        let lengths: Vec<Vec<usize>> = streams
            .iter()
            .map(|s| s.entries.iter().map(entry_len).collect())
            .collect();
        let stream_lens: Vec<usize> = streams
            .iter()
            .zip(&lengths)
            .map(|(s, lens)| stream_len(&s.labels, lens))
            .collect();
        let raw_len: usize = stream_lens.iter().map(|&n| field_len(1, n)).sum();
        let mut out = BlockWriter::new(raw_len);
        for ((stream, lens), len) in streams.into_iter().zip(lengths).zip(stream_lens) {
            // `PushRequest.streams` (1), written field by field so each entry can go.
            encoding::encode_key(1, WireType::LengthDelimited, &mut out.staging);
            encoding::encode_varint(len as u64, &mut out.staging);
            if !stream.labels.is_empty() {
                encoding::string::encode(1, &stream.labels, &mut out.staging);
            }
            for (entry, len) in stream.entries.into_iter().zip(lens) {
                write_entry(&entry, len, &mut out.staging);
                out.compress_full_blocks()?;
            }
            // `hash` (3) is 0, which proto3 leaves out.
        }
        let body = out.finish()?;
        Ok(Encoded {
            body: bytes::Bytes::from(body),
            entries: self.entries,
            line_bytes: self.bytes,
            tokens: self.tokens,
            newest_ns: self.newest_ns,
            streams: keys,
        })
    }
}

/// Snappy's block size: its encoder never looks back across a block boundary.
const SNAPPY_BLOCK: usize = 64 * 1024;

/// Snappy block-format output fed in pieces: the preamble (the uncompressed length, known
/// in advance), then each 64 KiB block's compressed elements.
struct BlockWriter {
    encoder: snap::raw::Encoder,
    /// Encoded protobuf not compressed yet: less than a block plus one entry.
    staging: Vec<u8>,
    /// One compressed block, with the preamble `compress` writes (dropped on copy).
    scratch: Vec<u8>,
    body: Vec<u8>,
    raw_len: usize,
    written: usize,
}

impl BlockWriter {
    fn new(raw_len: usize) -> Self {
        // The worst case, so the body is never moved while it grows; pages it does not
        // use are never touched, so they cost no memory.
        let mut body = Vec::with_capacity(snap::raw::max_compress_len(raw_len).max(16));
        encoding::encode_varint(raw_len as u64, &mut body);
        Self {
            encoder: snap::raw::Encoder::new(),
            staging: Vec::with_capacity(2 * SNAPPY_BLOCK),
            scratch: vec![0; snap::raw::max_compress_len(SNAPPY_BLOCK)],
            body,
            raw_len,
            written: 0,
        }
    }

    /// Compress `staging[start..end]` (at most one block) onto the body.
    fn compress(&mut self, start: usize, end: usize) -> Result<(), BatchError> {
        let n = self
            .encoder
            .compress(&self.staging[start..end], &mut self.scratch)?;
        let preamble = encoding::encoded_len_varint((end - start) as u64);
        self.body.extend_from_slice(&self.scratch[preamble..n]);
        self.written += end - start;
        Ok(())
    }

    fn compress_full_blocks(&mut self) -> Result<(), BatchError> {
        let mut start = 0;
        while self.staging.len() - start >= SNAPPY_BLOCK {
            self.compress(start, start + SNAPPY_BLOCK)?;
            start += SNAPPY_BLOCK;
        }
        if start > 0 {
            self.staging.drain(..start);
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<u8>, BatchError> {
        self.compress_full_blocks()?;
        if !self.staging.is_empty() {
            self.compress(0, self.staging.len())?;
        }
        // The preamble promised `raw_len` bytes; a body that decodes to anything else
        // would be refused by Loki and its entries lost.
        if self.written != self.raw_len {
            return Err(BatchError::Length {
                promised: self.raw_len,
                written: self.written,
            });
        }
        Ok(self.body)
    }
}

/// Bytes of a length-delimited field `tag` holding `len` bytes.
fn field_len(tag: u32, len: usize) -> usize {
    encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len
}

/// `StreamAdapter`'s length: its labels and its entries of lengths `entries`.
fn stream_len(labels: &str, entries: &[usize]) -> usize {
    let labels = if labels.is_empty() {
        0
    } else {
        field_len(1, labels.len())
    };
    labels + entries.iter().map(|&n| field_len(2, n)).sum::<usize>()
}

/// `EntryAdapter`'s length (what prost's `encoded_len` gives).
fn entry_len(entry: &EntryAdapter) -> usize {
    let timestamp = entry
        .timestamp
        .as_ref()
        .map_or(0, |t| field_len(1, t.encoded_len()));
    let line = if entry.line.is_empty() {
        0
    } else {
        field_len(2, entry.line.len())
    };
    let metadata: usize = entry
        .structured_metadata
        .iter()
        .map(|pair| field_len(3, pair.encoded_len()))
        .sum();
    timestamp + line + metadata
}

/// `EntryAdapter` as field 2 of its stream, its length `len` already measured: the bytes
/// prost's `message::encode` writes.
fn write_entry(entry: &EntryAdapter, len: usize, buf: &mut Vec<u8>) {
    encoding::encode_key(2, WireType::LengthDelimited, buf);
    encoding::encode_varint(len as u64, buf);
    if let Some(timestamp) = &entry.timestamp {
        encoding::message::encode(1, timestamp, buf);
    }
    if !entry.line.is_empty() {
        encoding::encode_key(2, WireType::LengthDelimited, buf);
        encoding::encode_varint(entry.line.len() as u64, buf);
        buf.extend_from_slice(entry.line.as_bytes());
    }
    for pair in &entry.structured_metadata {
        encoding::message::encode(3, pair, buf);
    }
}

/// One stream of a push: its entries in time order, as Loki wants them.
fn stream(labels: String, mut entries: Vec<EntryAdapter>) -> StreamAdapter {
    let key = |e: &EntryAdapter| e.timestamp.map(|t| (t.seconds, t.nanos));
    // Usually in order already (one file's lines): checking is cheaper than sorting.
    if !entries.is_sorted_by_key(key) {
        entries.sort_by_key(key);
    }
    StreamAdapter {
        labels,
        entries,
        hash: 0,
    }
}
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::proto::PushRequest;
    use super::*;
    use crate::entry::Entry;

    fn pending(labels: &LabelSet, ts: i64, line: &str, seq: u64) -> Pending {
        Pending {
            entry: Entry {
                timestamp_ns: ts,
                line: line.into(),
                labels: labels.clone(),
                structured_metadata: vec![("trace".into(), "t1".into())],
                end_offset: seq,
                tenant: None,
            },
            token: AckToken { file: 1, seq },
            bytes: 0,
        }
    }

    #[test]
    fn groups_by_stream_sorts_by_time_and_round_trips_through_snappy() {
        let a: LabelSet = Arc::new(BTreeMap::from([("app".into(), "a".into())]));
        let b: LabelSet = Arc::new(BTreeMap::from([("app".into(), "b\"q".into())]));
        let mut batch = Batch::default();
        batch.push(pending(&a, 3_000_000_000, "a3", 0));
        batch.push(pending(&b, 1, "b1", 1));
        batch.push(pending(&a, 1_000_000_000, "a1", 2));
        assert_eq!((batch.len(), batch.bytes()), (3, 6));
        let external =
            BTreeMap::from([("cluster".into(), "ops".into()), ("app".into(), "x".into())]);
        let encoded = batch.encode(&external).unwrap();
        assert_eq!(encoded.tokens.len(), 3);
        assert_eq!(
            encoded.streams,
            [
                stream_key(r#"{app="a", cluster="ops"}"#),
                stream_key(r#"{app="b\"q", cluster="ops"}"#)
            ],
            "streams are keyed as pushed, external labels merged"
        );
        assert_eq!(encoded.newest_ns, 3_000_000_000);
        let raw = snap::raw::Decoder::new()
            .decompress_vec(&encoded.body)
            .unwrap();
        let req = PushRequest::decode(raw.as_slice()).unwrap();
        let streams: Vec<_> = req
            .streams
            .iter()
            .map(|s| {
                (
                    s.labels.as_str(),
                    s.entries
                        .iter()
                        .map(|e| e.line.as_str())
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(
            streams,
            [
                (r#"{app="a", cluster="ops"}"#, vec!["a1", "a3"]),
                (r#"{app="b\"q", cluster="ops"}"#, vec!["b1"]),
            ]
        );
        assert_eq!(
            req.streams[0].entries[0].structured_metadata[0].name,
            "trace"
        );
    }

    /// Entries written with their measured length are prost's bytes, edge cases included
    /// (empty line, no metadata, no timestamp, negative and zero times).
    #[test]
    fn written_entries_are_prosts_bytes() {
        let pair = |n: &str, v: &str| LabelPairAdapter {
            name: n.into(),
            value: v.into(),
        };
        let entries = [
            (Some(Timestamp::from_unix_nanos(0)), "", vec![]),
            (
                Some(Timestamp::from_unix_nanos(-1)),
                "x",
                vec![pair("", "")],
            ),
            (None, "no time", vec![pair("k", "v"), pair("trace", "t")]),
            (
                Some(Timestamp::from_unix_nanos(i64::MAX)),
                &"y".repeat(300),
                vec![],
            ),
        ];
        for (timestamp, line, structured_metadata) in entries {
            let entry = EntryAdapter {
                timestamp,
                line: line.to_string(),
                structured_metadata,
            };
            assert_eq!(entry_len(&entry), entry.encoded_len(), "{entry:?}");
            let mut ours = Vec::new();
            write_entry(&entry, entry_len(&entry), &mut ours);
            let mut theirs = Vec::new();
            encoding::message::encode(2, &entry, &mut theirs);
            assert_eq!(ours, theirs, "{entry:?}");
        }
    }

    /// The piecewise encoder gives exactly the body of encoding the whole request and
    /// compressing it at once, across many Snappy blocks, streams and entry sizes.
    #[test]
    fn piecewise_body_is_identical_to_whole_request_compression() {
        let streams: Vec<LabelSet> = (0..7)
            .map(|i| Arc::new(BTreeMap::from([("pod".into(), format!("p{i}"))])))
            .collect();
        let mut batch = Batch::default();
        let mut expected: BTreeMap<String, Vec<EntryAdapter>> = BTreeMap::new();
        let mut seed = 7u64;
        for seq in 0..3000u64 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let labels = &streams[(seed >> 33) as usize % streams.len()];
            let len = [3usize, 90, 700, 5000, 70_000][(seed >> 40) as usize % 5];
            let line: String = (0..len)
                .map(|i| char::from(b'a' + ((seed as usize >> 8) + i * 7 % 13) as u8 % 26))
                .collect();
            let ts = 1_000_000_000 + (seed >> 20) as i64 % 5_000_000;
            let p = pending(labels, ts, &line, seq);
            expected
                .entry(render_labels(labels))
                .or_default()
                .push(EntryAdapter {
                    timestamp: Some(Timestamp::from_unix_nanos(ts)),
                    line: line.clone(),
                    structured_metadata: vec![LabelPairAdapter {
                        name: "trace".into(),
                        value: "t1".into(),
                    }],
                });
            batch.push(p);
        }
        let request = PushRequest {
            streams: expected
                .into_iter()
                .map(|(labels, entries)| stream(labels, entries))
                .collect(),
        };
        let raw = request.encode_to_vec();
        assert!(raw.len() > 20 * SNAPPY_BLOCK, "{}", raw.len());
        let whole = snap::raw::Encoder::new().compress_vec(&raw).unwrap();
        let encoded = batch.encode(&BTreeMap::new()).unwrap();
        assert_eq!(encoded.body.as_ref(), whole.as_slice());
        // And an empty batch is a valid empty request.
        let empty = Batch::default().encode(&BTreeMap::new()).unwrap();
        let raw = snap::raw::Decoder::new()
            .decompress_vec(&empty.body)
            .unwrap();
        assert!(raw.is_empty());
    }
}
