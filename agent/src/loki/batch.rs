//! A batch of entries for one push: grouped per stream (the canonical, sorted label
//! string, external labels merged under the entry's own), entries sorted by timestamp
//! within a stream, encoded as a protobuf `PushRequest` compressed with Snappy's *block*
//! format (what Loki's distributor decodes; the framed format is refused).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use prost::Message;

use super::proto::{EntryAdapter, LabelPairAdapter, PushRequest, StreamAdapter, Timestamp};
use crate::entry::{LabelSet, render_labels};
use crate::tail::ack::{AckToken, Pending};

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("snappy compression failed: {0}")]
    Compress(#[from] snap::Error),
}

#[derive(Debug)]
struct StreamEntries {
    labels: LabelSet,
    entries: Vec<EntryAdapter>,
}

/// Entries waiting to be pushed together.
#[derive(Debug, Default)]
pub struct Batch {
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
        match self.index.get(&entry.labels) {
            Some(&i) => self.streams[i].entries.push(adapter),
            None => {
                self.index.insert(entry.labels.clone(), self.streams.len());
                self.streams.push(StreamEntries {
                    labels: entry.labels,
                    entries: vec![adapter],
                });
            }
        }
    }

    /// Encode and compress; the batch is consumed.
    pub fn encode(self, external: &BTreeMap<String, String>) -> Result<Encoded, BatchError> {
        let mut merged: BTreeMap<String, StreamAdapter> = BTreeMap::new();
        for stream in self.streams {
            let labels = if external.is_empty() {
                render_labels(&stream.labels)
            } else {
                let mut all = external.clone();
                all.extend(stream.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
                render_labels(&all)
            };
            // Two label sets can render the same once external labels are merged.
            merged
                .entry(labels.clone())
                .or_insert_with(|| StreamAdapter {
                    labels,
                    entries: Vec::new(),
                    hash: 0,
                })
                .entries
                .extend(stream.entries);
        }
        let streams = merged
            .into_values()
            .map(|mut s| {
                s.entries
                    .sort_by_key(|e| e.timestamp.map(|t| (t.seconds, t.nanos)));
                s
            })
            .collect();
        let raw = PushRequest { streams }.encode_to_vec();
        let body = snap::raw::Encoder::new().compress_vec(&raw)?;
        Ok(Encoded {
            body: bytes::Bytes::from(body),
            entries: self.entries,
            line_bytes: self.bytes,
            tokens: self.tokens,
            newest_ns: self.newest_ns,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
}
