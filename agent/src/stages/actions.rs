//! What the extracting and filtering stages do to one entry. Input that does not fit
//! (not JSON, no match, missing field) extracts nothing and never fails the entry.

use std::sync::Arc;

use regex::Regex;

use super::Work;
use super::compile::DropRule;
use super::fields::{FieldId, Fields};
use super::labels::LabelMemo;
use super::timestamp::{ParseTime, TimeFormat};
use crate::entry::LabelSet;

pub(super) fn parse_timestamp(
    fields: &Fields,
    source: FieldId,
    formats: &[TimeFormat],
) -> Option<i64> {
    if formats.first() == Some(&TimeFormat::Rfc3339)
        && let Some(nanos) = fields.parsed_time(source)
    {
        return Some(nanos);
    }
    let text = fields.get(source)?;
    formats.iter().find_map(|format| format.parse(text))
}

pub(super) fn extract_json(
    fields: &mut Fields,
    line: &str,
    source: Option<FieldId>,
    expressions: &[(FieldId, Vec<String>)],
) {
    let document = match source {
        Some(id) => fields
            .get(id)
            .map(serde_json::from_str::<serde_json::Value>),
        None => Some(serde_json::from_str(line)),
    };
    // Not JSON (or no source field): nothing is extracted and the entry goes on, as in
    // Promtail.
    let Some(Ok(document)) = document else {
        return;
    };
    for (field, path) in expressions {
        let mut value = &document;
        let mut found = true;
        for segment in path {
            let next = match value {
                serde_json::Value::Object(map) => map.get(segment),
                serde_json::Value::Array(items) => {
                    segment.parse::<usize>().ok().and_then(|i| items.get(i))
                }
                _ => None,
            };
            match next {
                Some(next) => value = next,
                None => {
                    found = false;
                    break;
                }
            }
        }
        match value {
            _ if !found => {}
            serde_json::Value::Null => {}
            serde_json::Value::String(text) => fields.set(*field, text),
            other => fields.set(*field, &other.to_string()),
        }
    }
}

pub(super) fn extract_regex(
    fields: &mut Fields,
    line: &str,
    source: Option<FieldId>,
    regex: &Regex,
    groups: &[(usize, FieldId)],
) {
    let taken = match source {
        Some(id) => match fields.take(id) {
            Some(text) => Some((id, text)),
            None => return,
        },
        None => None,
    };
    let text = taken.as_ref().map_or(line, |(_, text)| text.as_str());
    if let Some(captures) = regex.captures(text) {
        for (group, field) in groups {
            if let Some(value) = captures.get(*group) {
                fields.set(*field, value.as_str());
            }
        }
    }
    if let Some((id, text)) = taken {
        fields.restore(id, text);
    }
}

pub(super) fn set_labels(
    labels: &mut LabelSet,
    fields: &Fields,
    pairs: &[(String, FieldId)],
    memo: &mut LabelMemo,
) {
    let value = |i: usize| {
        pairs
            .get(i)
            .and_then(|(_, field)| fields.get(*field))
            .filter(|v| !v.is_empty())
    };
    let unchanged = (0..pairs.len()).all(|i| match value(i) {
        None => true,
        Some(v) => labels.get(&pairs[i].0).map(String::as_str) == Some(v),
    });
    if unchanged {
        return;
    }
    if let Some(output) = memo.get(labels, value, pairs.len()) {
        *labels = output;
        return;
    }
    let input = Arc::clone(labels);
    let map = Arc::make_mut(labels);
    for (i, (name, _)) in pairs.iter().enumerate() {
        if let Some(v) = value(i) {
            map.insert(name.clone(), v.to_string());
        }
    }
    memo.put(
        &input,
        (0..pairs.len())
            .map(|i| value(i).map(str::to_string))
            .collect(),
        labels,
    );
}

impl DropRule {
    pub(super) fn drops(&self, work: &Work, fields: &Fields, now_ns: i64) -> bool {
        let text = match self.source {
            Some(id) => match fields.get(id) {
                Some(text) => text,
                // Promtail: a missing source field never drops.
                None => return false,
            },
            None => work.line.as_str(),
        };
        let expression = self.expression.as_ref().is_none_or(|e| e.is_match(text));
        let old = self
            .older_than_ns
            .is_none_or(|age| work.timestamp_ns < now_ns.saturating_sub(age));
        let long = self
            .longer_than
            .is_none_or(|limit| work.line.len() as u64 > limit);
        expression && old && long
    }
}
