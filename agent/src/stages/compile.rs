//! Compiling the configured stages. Each stage is first checked by the contract's
//! [`logpipe_api::validate::stage`] (the check the operator runs before any node moves),
//! reported as `pipeline[i] (kind): message`; building it then cannot find anything new.

use std::collections::BTreeMap;

use logpipe_api::validate::{self, stage_regex};
use regex::Regex;

use super::fields::{FieldId, FieldTable};
use super::labels::StaticChange;
use super::timestamp::TimeFormat;
use super::{DROP_STAGE_REASON, Parser, ParserFields, Pipeline, StageError};
use crate::config::{Limits, Stage};

#[derive(Debug)]
pub(super) enum Compiled {
    Timestamp {
        source: FieldId,
        formats: Vec<TimeFormat>,
    },
    StaticLabels {
        change: StaticChange,
        memo: usize,
    },
    Json {
        source: Option<FieldId>,
        expressions: Vec<(FieldId, Vec<String>)>,
    },
    Regex {
        source: Option<FieldId>,
        regex: Regex,
        groups: Vec<(usize, FieldId)>,
    },
    Labels {
        pairs: Vec<(String, FieldId)>,
        memo: usize,
    },
    StructuredMetadata {
        pairs: Vec<(String, FieldId)>,
    },
    Drop(DropRule),
    Multiline {
        first_line: Regex,
        max_wait_ns: i64,
        max_lines: u32,
        slot: usize,
    },
    Limit {
        rate: super::limit::Rate,
        /// `byLabels`: buckets shared by streams with the same label values.
        keyed: Option<super::limit::Keyed>,
        /// The per-stream bucket's slot, when not keyed.
        slot: usize,
    },
}

#[derive(Debug)]
pub(super) struct DropRule {
    pub(super) source: Option<FieldId>,
    pub(super) expression: Option<Regex>,
    pub(super) older_than_ns: Option<i64>,
    pub(super) longer_than: Option<u64>,
    pub(super) reason: String,
}

pub(super) fn pipeline(
    stages: &[Stage],
    limits: &Limits,
    tenant_field: Option<&str>,
) -> Result<Pipeline, StageError> {
    let mut table = FieldTable::default();
    let mut pipeline = Pipeline {
        parser: Parser::None,
        stages: Vec::with_capacity(stages.len()),
        max_line: usize::try_from(limits.max_line_bytes)
            .unwrap_or(usize::MAX)
            .max(1),
        malformed: limits.malformed_lines,
        parser_fields: ParserFields::default(),
        multiline_stages: Vec::new(),
        tenant_field: None,
        label_memos: 0,
        limits: 0,
    };
    for (index, stage) in stages.iter().enumerate() {
        let kind = stage.kind().map_err(|message| StageError::Invalid {
            index,
            kind: "stage",
            message,
        })?;
        let invalid = |message: String| StageError::Invalid {
            index,
            kind,
            message,
        };
        validate::stage(index, stage).map_err(invalid)?;
        pipeline.compile(stage, &mut table).map_err(invalid)?;
    }
    // Interned before the parser's fields are looked up, so `field: stream` works too.
    pipeline.tenant_field = tenant_field.map(|name| table.intern(name));
    pipeline.parser_fields = ParserFields {
        time: table.lookup("time"),
        stream: table.lookup("stream"),
        flags: table.lookup("flags"),
        content: table.lookup("content"),
    };
    Ok(pipeline)
}

impl Pipeline {
    fn compile(&mut self, stage: &Stage, table: &mut FieldTable) -> Result<(), String> {
        let source = |table: &mut FieldTable, name: &Option<String>| {
            name.as_deref().map(|name| table.intern(name))
        };
        let compiled = if stage.cri.is_some() || stage.docker.is_some() {
            self.parser = if stage.cri.is_some() {
                Parser::Cri
            } else {
                Parser::Docker
            };
            return Ok(());
        } else if let Some(ts) = &stage.timestamp {
            let mut formats = vec![TimeFormat::new(&ts.format)?];
            for fallback in ts.fallback_formats.iter().flatten() {
                formats.push(TimeFormat::new(fallback)?);
            }
            Compiled::Timestamp {
                source: table.intern(&ts.source),
                formats,
            }
        } else if let Some(names) = &stage.label_drop {
            self.static_labels(StaticChange::Drop(names.clone()))
        } else if let Some(names) = &stage.label_keep {
            self.static_labels(StaticChange::Keep(names.clone()))
        } else if let Some(labels) = &stage.static_labels {
            let pairs = labels
                .iter()
                .filter(|(_, value)| !value.is_empty())
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect();
            self.static_labels(StaticChange::Add(pairs))
        } else if let Some(json) = &stage.json {
            let expressions = json
                .expressions
                .iter()
                .map(|(field, path)| {
                    let path = if path.is_empty() { field } else { path };
                    (
                        table.intern(field),
                        path.split('.').map(str::to_string).collect(),
                    )
                })
                .collect();
            Compiled::Json {
                source: source(table, &json.source),
                expressions,
            }
        } else if let Some(stage) = &stage.regex {
            let compiled = stage_regex(&stage.expression)?;
            let groups: Vec<(usize, FieldId)> = compiled
                .capture_names()
                .enumerate()
                .filter_map(|(i, name)| name.map(|name| (i, table.intern(name))))
                .collect();
            Compiled::Regex {
                source: source(table, &stage.source),
                regex: compiled,
                groups,
            }
        } else if let Some(labels) = &stage.labels {
            let pairs = field_pairs(labels, table);
            let memo = self.label_memos;
            self.label_memos += 1;
            Compiled::Labels { pairs, memo }
        } else if let Some(metadata) = &stage.structured_metadata {
            Compiled::StructuredMetadata {
                pairs: field_pairs(metadata, table),
            }
        } else if let Some(drop) = &stage.drop {
            Compiled::Drop(DropRule {
                source: source(table, &drop.source),
                expression: drop.expression.as_deref().map(stage_regex).transpose()?,
                older_than_ns: drop
                    .older_than
                    .map(|d| i64::try_from(d.0.as_nanos()).unwrap_or(i64::MAX)),
                longer_than: drop.longer_than,
                reason: drop
                    .drop_counter_reason
                    .clone()
                    .unwrap_or_else(|| DROP_STAGE_REASON.to_string()),
            })
        } else if let Some(multiline) = &stage.multiline {
            let slot = self.multiline_stages.len();
            self.multiline_stages.push(self.stages.len());
            Compiled::Multiline {
                first_line: stage_regex(&multiline.first_line)?,
                max_wait_ns: i64::try_from(multiline.max_wait.0.as_nanos()).unwrap_or(i64::MAX),
                max_lines: multiline.max_lines,
                slot,
            }
        } else if let Some(limit) = &stage.limit {
            let slot = self.limits;
            self.limits += 1;
            Compiled::Limit {
                rate: super::limit::Rate {
                    rate: limit.rate,
                    burst: f64::from(limit.burst),
                    drop: limit.drop,
                },
                keyed: limit
                    .by_labels
                    .clone()
                    .map(|labels| super::limit::Keyed::new(labels, limit.max_keys)),
                slot,
            }
        } else {
            return Err("unknown stage".into());
        };
        self.stages.push(compiled);
        Ok(())
    }

    fn static_labels(&mut self, change: StaticChange) -> Compiled {
        let memo = self.label_memos;
        self.label_memos += 1;
        Compiled::StaticLabels { change, memo }
    }
}

/// `name -> field` maps where an empty field means the same name.
fn field_pairs(map: &BTreeMap<String, String>, table: &mut FieldTable) -> Vec<(String, FieldId)> {
    map.iter()
        .map(|(name, field)| {
            let field = if field.is_empty() { name } else { field };
            (name.clone(), table.intern(field))
        })
        .collect()
}
