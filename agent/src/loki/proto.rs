//! Loki's push API messages (`pkg/push/push.proto`, package `logproto`), written with
//! prost's derive macros so no protoc is needed. Field numbers are Loki's:
//!
//! ```text
//! PushRequest      { repeated StreamAdapter streams = 1; }
//! StreamAdapter    { string labels = 1; repeated EntryAdapter entries = 2; uint64 hash = 3; }
//! EntryAdapter     { google.protobuf.Timestamp timestamp = 1; string line = 2;
//!                    repeated LabelPairAdapter structuredMetadata = 3; }
//! LabelPairAdapter { string name = 1; string value = 2; }
//! ```

#[derive(Clone, PartialEq, prost::Message)]
pub struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    pub streams: Vec<StreamAdapter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamAdapter {
    #[prost(string, tag = "1")]
    pub labels: String,
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<EntryAdapter>,
    #[prost(uint64, tag = "3")]
    pub hash: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EntryAdapter {
    #[prost(message, optional, tag = "1")]
    pub timestamp: Option<Timestamp>,
    #[prost(string, tag = "2")]
    pub line: String,
    #[prost(message, repeated, tag = "3")]
    pub structured_metadata: Vec<LabelPairAdapter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelPairAdapter {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Timestamp {
    pub fn from_unix_nanos(ns: i64) -> Self {
        Self {
            seconds: ns.div_euclid(1_000_000_000),
            nanos: ns.rem_euclid(1_000_000_000) as i32,
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn wire_format_uses_loki_field_numbers() {
        let req = PushRequest {
            streams: vec![StreamAdapter {
                labels: "{a=\"b\"}".into(),
                entries: vec![EntryAdapter {
                    timestamp: Some(Timestamp::from_unix_nanos(1_500_000_001)),
                    line: "hi".into(),
                    structured_metadata: vec![LabelPairAdapter {
                        name: "k".into(),
                        value: "v".into(),
                    }],
                }],
                hash: 0,
            }],
        };
        let bytes = req.encode_to_vec();
        // streams=1 (LEN), labels=1 (LEN), entries=2 (LEN), timestamp=1 (LEN) seconds=1
        // nanos=2, line=2 (LEN), structuredMetadata=3 (LEN).
        assert_eq!(bytes[0], 0x0a);
        let stream = &bytes[2..];
        assert_eq!(stream[0], 0x0a);
        assert_eq!(&stream[2..9], b"{a=\"b\"}");
        assert_eq!(stream[9], 0x12);
        let entry = &stream[11..];
        assert_eq!(entry[0], 0x0a);
        assert_eq!(&entry[2..6], &[0x08, 0x01, 0x10, 0x81]);
        assert!(bytes.windows(4).any(|w| w == [0x12, 0x02, b'h', b'i']));
        assert!(bytes.windows(2).any(|w| w == [0x1a, 0x06]));
        assert_eq!(PushRequest::decode(bytes.as_slice()).unwrap(), req);
        assert_eq!(
            Timestamp::from_unix_nanos(-1),
            Timestamp {
                seconds: -1,
                nanos: 999_999_999
            }
        );
    }
}
