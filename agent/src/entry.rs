//! What flows from the parser and stages to the Loki batcher.

use std::collections::BTreeMap;
use std::sync::Arc;

/// A stream's labels, sorted by name (Loki keys streams by the canonical label string).
/// Shared by every entry of a stream; a stage that changes labels per line copies it.
pub type LabelSet = Arc<BTreeMap<String, String>>;

/// A tenant ID (`X-Scope-OrgID`), shared by every entry of a file or a field value.
pub type Tenant = Arc<str>;

/// One log entry ready for Loki.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Unix time in nanoseconds.
    pub timestamp_ns: i64,
    pub line: String,
    pub labels: LabelSet,
    /// Loki structured metadata (name, value), in stage order.
    pub structured_metadata: Vec<(String, String)>,
    /// Byte offset in the source file just past the last raw line this entry was built
    /// from: once Loki acknowledged the entry, reading may resume here.
    pub end_offset: u64,
    /// Its tenant when `tenantFrom` placed it; `None`: the pipeline's `tenant`.
    pub tenant: Option<Tenant>,
}

/// Render labels in Loki's stream selector form: `{a="x", b="y"}`, escaping `"` and `\`.
pub fn render_labels(labels: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(labels.len() * 24 + 2);
    out.push('{');
    for (index, (name, value)) in labels.iter().enumerate() {
        if index > 0 {
            out.push_str(", ");
        }
        out.push_str(name);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let labels = BTreeMap::from([
            ("b".to_string(), r#"say "hi" \o/"#.to_string()),
            ("a".to_string(), "x".to_string()),
        ]);
        assert_eq!(render_labels(&labels), r#"{a="x", b="say \"hi\" \\o/"}"#);
    }
}
