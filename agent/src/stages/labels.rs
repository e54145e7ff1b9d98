//! Label changes without per-line copies. A stream's label set is one `Arc` shared by all
//! its entries; a stage that changes labels remembers, per stream, which output it made
//! from which input (by pointer) and for which extracted values, so the next line with the
//! same input gets the same `Arc` back instead of a fresh map.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::entry::LabelSet;

/// Enough for stdout and stderr variants of a stream and a few values of a
/// per-line label (a log level, say); beyond that the oldest is replaced.
const MEMO_CAPACITY: usize = 4;

#[derive(Debug)]
struct Remembered {
    /// Held, so its address cannot be reused by another set while remembered.
    input: LabelSet,
    key: Vec<Option<String>>,
    output: LabelSet,
}

#[derive(Debug, Default)]
pub(super) struct LabelMemo {
    entries: Vec<Remembered>,
    next: usize,
}

impl LabelMemo {
    pub(super) fn get<'a>(
        &self,
        input: &LabelSet,
        key: impl Fn(usize) -> Option<&'a str>,
        key_len: usize,
    ) -> Option<LabelSet> {
        self.entries
            .iter()
            .find(|r| {
                Arc::ptr_eq(&r.input, input)
                    && r.key.len() == key_len
                    && r.key
                        .iter()
                        .enumerate()
                        .all(|(i, v)| v.as_deref() == key(i))
            })
            .map(|r| Arc::clone(&r.output))
    }

    pub(super) fn put(&mut self, input: &LabelSet, key: Vec<Option<String>>, output: &LabelSet) {
        let remembered = Remembered {
            input: Arc::clone(input),
            key,
            output: Arc::clone(output),
        };
        if self.entries.len() < MEMO_CAPACITY {
            self.entries.push(remembered);
        } else {
            let slot = self.next % MEMO_CAPACITY;
            self.entries[slot] = remembered;
            self.next = slot + 1;
        }
    }
}

/// A label change that depends only on the input labels.
#[derive(Debug)]
pub(super) enum StaticChange {
    Drop(Vec<String>),
    Keep(Vec<String>),
    Add(Vec<(String, String)>),
}

impl StaticChange {
    /// `None` when the change leaves `labels` as they are.
    pub(super) fn apply(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Option<BTreeMap<String, String>> {
        match self {
            Self::Drop(names) => {
                if !names.iter().any(|n| labels.contains_key(n)) {
                    return None;
                }
                let mut out = labels.clone();
                for name in names {
                    out.remove(name);
                }
                Some(out)
            }
            Self::Keep(names) => {
                if labels.keys().all(|k| names.contains(k)) {
                    return None;
                }
                let mut out = labels.clone();
                out.retain(|k, _| names.contains(k));
                Some(out)
            }
            Self::Add(pairs) => {
                if pairs
                    .iter()
                    .all(|(k, v)| labels.get(k).map(String::as_str) == Some(v.as_str()))
                {
                    return None;
                }
                let mut out = labels.clone();
                for (name, value) in pairs {
                    out.insert(name.clone(), value.clone());
                }
                Some(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_returns_the_same_arc_for_the_same_input_and_key() {
        let input: LabelSet = Arc::new(BTreeMap::from([("a".to_string(), "1".to_string())]));
        let output: LabelSet = Arc::new(BTreeMap::new());
        let mut memo = LabelMemo::default();
        memo.put(&input, vec![Some("x".into())], &output);
        let hit = memo.get(&input, |_| Some("x"), 1).unwrap();
        assert!(Arc::ptr_eq(&hit, &output));
        assert!(memo.get(&input, |_| Some("y"), 1).is_none());
        let other: LabelSet = Arc::new((*input).clone());
        assert!(memo.get(&other, |_| Some("x"), 1).is_none());
    }

    #[test]
    fn memo_is_bounded() {
        let mut memo = LabelMemo::default();
        let output: LabelSet = Arc::new(BTreeMap::new());
        let inputs: Vec<LabelSet> = (0..10).map(|_| Arc::new(BTreeMap::new())).collect();
        for input in &inputs {
            memo.put(input, vec![], &output);
        }
        assert_eq!(memo.entries.len(), MEMO_CAPACITY);
        assert!(memo.get(&inputs[9], |_| None, 0).is_some());
    }
}
