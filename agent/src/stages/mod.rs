//! The processing pipeline: parser stages (cri, docker), then the configured stages, in
//! order, per stream (one stream per file).
//!
//! ```text
//! raw line -> parser (cri | docker: fields time/stream/flags/content, `stream` label,
//!             timestamp; partial lines joined per stdout/stderr)
//!          -> timestamp, labelDrop, labelKeep, staticLabels, json, regex, labels,
//!             structuredMetadata, drop, multiline, limit (in configured order)
//!          -> Entry
//! ```
//!
//! Guarantees:
//! - No input makes it panic. A line the parser cannot read is counted
//!   (`malformed_lines`) and shipped raw, timestamped when read, or dropped, per
//!   `limits.malformedLines`. Invalid UTF-8 is shipped with U+FFFD and counted.
//! - No line longer than `limits.maxLineBytes` raw bytes leaves the pipeline: a longer
//!   one (joined or not) is split, at a character boundary when there is one, into pieces
//!   and counted once in `split_lines`. (U+FFFD for an invalid byte takes 3 bytes, so a
//!   piece of invalid UTF-8 can grow up to 3 times; multiline joins stay under the limit.)
//! - Offsets: an entry's `end_offset` is where reading may resume once it is acknowledged
//!   without losing anything it was built from (the end of its last raw line, or the
//!   start of the raw line a split piece was cut in); [`StreamState::held_from`] is the
//!   start of the earliest raw line still held (a partial line, a pending multiline
//!   entry). Committing `min(acknowledged end_offset, held_from)` never loses data;
//!   at worst a restart repeats the prefix of a split line.
//! - Every line's fate is explicit: each path that emits, drops or holds a line records
//!   it, and [`PushOutcome::decided`] says whether the pushed line got one. The reader
//!   counts a line as done only then, so a line lost by a bug shows as lag
//!   (`logpipe_unacknowledged_bytes`) instead of moving the position past it.
//! - Entries of a stream leave in the order their first raw line was read.
//! - The hot path (a parsed CRI line through timestamp and label stages) allocates only
//!   the entry's line: labels are shared `Arc`s, and a stage that changes them reuses the
//!   set it built for the previous line with the same input (see `labels.rs`).
//!
//! A parser stage (`cri` or `docker`) must be the first stage; without one each raw line
//! is an entry timestamped when read.
//!
//! Semantics follow Promtail's stages where they exist: the cri/docker parsers add the
//! `stream` label and set the timestamp; `drop` drops only when every configured
//! condition holds; `multiline` starts a block with the first line of a stream even if
//! it does not match `firstLine`. Deviations: partial lines are joined with nothing
//! between them (they are pieces of one line), the joined entry has its first piece's
//! time; a `limit` stage's bucket is per stream, not shared by all streams, unless it
//! is keyed by labels (`byLabels`, see `limit.rs`).

mod actions;
mod compile;
mod fields;
mod labels;
mod limit;
mod timestamp;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Limits, MalformedLinePolicy, Stage};
use crate::cri::{self, Stream};
use crate::entry::{Entry, LabelSet};

use actions::{extract_json, extract_regex, parse_timestamp, set_labels};
use compile::Compiled;
use fields::{FieldId, Fields};
use labels::LabelMemo;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("pipeline[{index}] ({kind}): {message}")]
    Invalid {
        index: usize,
        kind: &'static str,
        message: String,
    },
}

/// Counters a push or flush bumps; the runtime adds them to the metrics (per batch of
/// lines, not per line).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PipelineStats {
    /// Lines the parser could not read (passed raw or dropped by `limits.malformedLines`).
    pub malformed_lines: u64,
    /// Lines longer than `limits.maxLineBytes`, split.
    pub split_lines: u64,
    /// Lines whose bytes were not valid UTF-8 (shipped with U+FFFD replacements).
    pub invalid_utf8_lines: u64,
    /// Entries dropped, by reason (drop stage `dropCounterReason`, `rate_limited`,
    /// `malformed`, ...).
    pub dropped: BTreeMap<String, u64>,
}

impl PipelineStats {
    fn count_drop(&mut self, reason: &str) {
        match self.dropped.get_mut(reason) {
            Some(count) => *count += 1,
            None => {
                self.dropped.insert(reason.to_string(), 1);
            }
        }
    }
}

/// What the pipeline asks of the reader after a push.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PushOutcome {
    /// A `limit` stage in wait mode: pause reading this stream this long.
    pub wait: Option<Duration>,
    /// The line's fate was decided: it went out in an entry, a stage (or the malformed
    /// policy) dropped it on purpose, or the state holds it (see
    /// [`StreamState::held_from`]). `false` means the line vanished without a decision —
    /// a bug — and the reader must not count it as done (it shows as unacknowledged lag
    /// and holds the file's position back).
    pub decided: bool,
}

/// Drop reason of lines the parser could not read, under `malformedLines: drop`.
pub const MALFORMED_REASON: &str = "malformed";
pub use self::limit::{RATE_LIMITED_OVERFLOW_REASON, RATE_LIMITED_REASON};
/// Drop reason of a `drop` stage without `dropCounterReason`.
pub const DROP_STAGE_REASON: &str = "drop_stage";

/// Compiled stages, shared by every stream.
#[derive(Debug)]
pub struct Pipeline {
    parser: Parser,
    stages: Vec<Compiled>,
    max_line: usize,
    malformed: MalformedLinePolicy,
    parser_fields: ParserFields,
    /// Stage index of each multiline slot, in stage order.
    multiline_stages: Vec<usize>,
    /// `tenantFrom.field`: the extracted field that names an entry's tenant.
    tenant_field: Option<FieldId>,
    label_memos: usize,
    limits: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Parser {
    None,
    Cri,
    Docker,
}

/// Fields the parser fills, only those some stage reads.
#[derive(Debug, Default)]
struct ParserFields {
    time: Option<FieldId>,
    stream: Option<FieldId>,
    flags: Option<FieldId>,
    content: Option<FieldId>,
}

/// Per-stream state: a partial CRI line being joined, a multiline entry being built.
#[derive(Debug, Default)]
pub struct StreamState {
    /// Partial lines being joined, one per output stream (stdout, stderr): the runtime
    /// interleaves them in one file.
    partial: [Partial; 2],
    scratch: Fields,
    /// The input labels and the same labels with `stream` set, per output stream.
    stream_labels: [Option<(LabelSet, LabelSet)>; 2],
    label_memos: Vec<LabelMemo>,
    multiline: Vec<Option<Pending>>,
    buckets: Vec<Option<limit::Bucket>>,
}

#[derive(Debug, Default)]
struct Partial {
    active: bool,
    buf: Vec<u8>,
    /// Start offset of the earliest raw line whose bytes are in `buf`.
    start: u64,
    /// End offset of the last raw line appended.
    end: u64,
    timestamp_ns: i64,
    time: String,
    /// Already counted in `split_lines`.
    split: bool,
}

#[derive(Debug)]
struct Pending {
    work: Work,
    fields: Fields,
    lines: u32,
    last_push_ns: i64,
}

/// The entry being built.
#[derive(Debug)]
struct Work {
    timestamp_ns: i64,
    line: String,
    labels: LabelSet,
    structured_metadata: Vec<(String, String)>,
    start_offset: u64,
    end_offset: u64,
}

/// One logical line handed from the parser to the stages.
struct Parsed<'a> {
    timestamp_ns: i64,
    time: &'a str,
    stream: Stream,
    partial: bool,
    content: &'a [u8],
}

impl StreamState {
    /// Offset where the earliest raw line still held in this state starts: a position
    /// must not be committed past it.
    pub fn held_from(&self) -> Option<u64> {
        let partials = self.partial.iter().filter(|p| p.active).map(|p| p.start);
        let pending = self.multiline.iter().flatten().map(|p| p.work.start_offset);
        partials.chain(pending).min()
    }

    /// Size the per-stage slots (a `StreamState::default()` starts with none).
    fn fit(&mut self, pipeline: &Pipeline) {
        if self.label_memos.len() < pipeline.label_memos {
            self.label_memos
                .resize_with(pipeline.label_memos, LabelMemo::default);
        }
        if self.multiline.len() < pipeline.multiline_stages.len() {
            self.multiline
                .resize_with(pipeline.multiline_stages.len(), || None);
        }
        if self.buckets.len() < pipeline.limits {
            self.buckets.resize_with(pipeline.limits, || None);
        }
    }
}

fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl Pipeline {
    pub fn new(stages: &[Stage], limits: &Limits) -> Result<Self, StageError> {
        compile::pipeline(stages, limits, None)
    }

    /// A pipeline whose entries carry the value of the extracted field `tenant_field`
    /// (when set and not empty) as their tenant, for the runtime to check.
    pub fn with_tenant_field(
        stages: &[Stage],
        limits: &Limits,
        tenant_field: Option<&str>,
    ) -> Result<Self, StageError> {
        compile::pipeline(stages, limits, tenant_field)
    }

    pub fn stream(&self) -> StreamState {
        let mut state = StreamState::default();
        state.fit(self);
        state
    }

    /// Feed one raw line (without its trailing newline) that ends at `end_offset` in its
    /// file (just past the newline). `labels` are the stream's labels after relabeling,
    /// `filename` included. Finished entries are appended to `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &self,
        state: &mut StreamState,
        raw: &[u8],
        start_offset: u64,
        end_offset: u64,
        labels: &LabelSet,
        now_ns: i64,
        out: &mut Vec<Entry>,
        stats: &mut PipelineStats,
    ) -> PushOutcome {
        state.fit(self);
        let mut ctx = Ctx {
            now_ns,
            out,
            stats,
            wait: None,
            decided_to: 0,
        };
        let parsed = match self.parser {
            Parser::None => {
                self.unparsed(state, raw, start_offset, end_offset, labels, &mut ctx);
                return ctx.outcome(end_offset);
            }
            Parser::Cri => cri::parse_cri(raw).map(|line| {
                self.parsed(
                    state,
                    Parsed {
                        timestamp_ns: line.timestamp_ns,
                        time: line.time,
                        stream: line.stream,
                        partial: line.partial,
                        content: line.content,
                    },
                    start_offset,
                    end_offset,
                    labels,
                    &mut ctx,
                )
            }),
            Parser::Docker => cri::parse_docker(raw).map(|line| {
                self.parsed(
                    state,
                    Parsed {
                        timestamp_ns: line.timestamp_ns,
                        time: &line.time,
                        stream: line.stream,
                        partial: line.partial,
                        content: line.content.as_bytes(),
                    },
                    start_offset,
                    end_offset,
                    labels,
                    &mut ctx,
                )
            }),
        };
        if parsed.is_err() {
            ctx.stats.malformed_lines += 1;
            match self.malformed {
                MalformedLinePolicy::Drop => {
                    ctx.stats.count_drop(MALFORMED_REASON);
                    ctx.decide(end_offset);
                }
                MalformedLinePolicy::Pass => {
                    self.unparsed(state, raw, start_offset, end_offset, labels, &mut ctx)
                }
            }
        }
        ctx.outcome(end_offset)
    }

    /// Emit what the state holds longer than its stage allows (multiline `maxWait`), or
    /// everything when `force` (file finished, shutdown).
    pub fn flush(
        &self,
        state: &mut StreamState,
        now_ns: i64,
        force: bool,
        out: &mut Vec<Entry>,
        stats: &mut PipelineStats,
    ) {
        state.fit(self);
        let mut ctx = Ctx {
            now_ns,
            out,
            stats,
            wait: None,
            decided_to: 0,
        };
        if force {
            // The stdout/stderr order of two unfinished lines is unknown; the earlier
            // start goes first.
            let mut order = [0, 1];
            order.sort_by_key(|&i| state.partial[i].start);
            for i in order {
                let mut partial = std::mem::take(&mut state.partial[i]);
                if partial.active
                    && let Some(labels) = self.finish_partial_labels(state, i)
                {
                    let stream = if i == 0 {
                        Stream::Stdout
                    } else {
                        Stream::Stderr
                    };
                    let end = partial.end;
                    self.emit_partial(state, &mut partial, stream, end, &labels, &mut ctx);
                }
                partial.active = false;
                state.partial[i] = partial;
            }
        }
        for slot in 0..self.multiline_stages.len() {
            let Some(Some(pending)) = state.multiline.get(slot) else {
                continue;
            };
            let max_wait_ns = match self.stages.get(self.multiline_stages[slot]) {
                Some(Compiled::Multiline { max_wait_ns, .. }) => *max_wait_ns,
                _ => continue,
            };
            if (force || now_ns.saturating_sub(pending.last_push_ns) >= max_wait_ns)
                && let Some(mut pending) = state.multiline[slot].take()
            {
                let next = self.multiline_stages[slot] + 1;
                self.run(next, pending.work, &mut pending.fields, state, &mut ctx);
            }
        }
    }

    /// A partial line's labels were chosen when its first piece arrived; they are the
    /// stream-labelled set remembered for that output stream.
    fn finish_partial_labels(&self, state: &StreamState, index: usize) -> Option<LabelSet> {
        state.stream_labels[index]
            .as_ref()
            .map(|(_, with_stream)| Arc::clone(with_stream))
    }

    /// A line without parser (or one the parser refused): the raw bytes, timestamped now.
    fn unparsed(
        &self,
        state: &mut StreamState,
        raw: &[u8],
        start_offset: u64,
        end_offset: u64,
        labels: &LabelSet,
        ctx: &mut Ctx<'_>,
    ) {
        let mut fields = std::mem::take(&mut state.scratch);
        let mut rest = raw;
        if rest.len() > self.max_line {
            ctx.stats.split_lines += 1;
        }
        loop {
            let (piece, end) = if rest.len() > self.max_line {
                let cut = cut_at(rest, self.max_line, true);
                (&rest[..cut], start_offset)
            } else {
                (rest, end_offset)
            };
            rest = &rest[piece.len()..];
            fields.clear();
            let work = Work {
                timestamp_ns: ctx.now_ns,
                line: into_line(Cow::Borrowed(piece), ctx.stats),
                labels: Arc::clone(labels),
                structured_metadata: Vec::new(),
                start_offset,
                end_offset: end,
            };
            self.run(0, work, &mut fields, state, ctx);
            if rest.is_empty() {
                break;
            }
        }
        state.scratch = fields;
    }

    fn parsed(
        &self,
        state: &mut StreamState,
        line: Parsed<'_>,
        start_offset: u64,
        end_offset: u64,
        labels: &LabelSet,
        ctx: &mut Ctx<'_>,
    ) {
        let index = stream_index(line.stream);
        let labels = self.with_stream_label(state, labels, line.stream);
        let fits = line.content.len() <= self.max_line;
        if !line.partial && !state.partial[index].active && fits {
            // The common case: one whole line, no copy but the entry's own.
            let mut fields = std::mem::take(&mut state.scratch);
            self.fill_parser_fields(&mut fields, &line, line.content);
            let work = Work {
                timestamp_ns: line.timestamp_ns,
                line: into_line(Cow::Borrowed(line.content), ctx.stats),
                labels,
                structured_metadata: Vec::new(),
                start_offset,
                end_offset,
            };
            self.run(0, work, &mut fields, state, ctx);
            state.scratch = fields;
            return;
        }
        let mut partial = std::mem::take(&mut state.partial[index]);
        if !partial.active {
            partial.active = true;
            partial.start = start_offset;
            partial.buf.clear();
            partial.timestamp_ns = line.timestamp_ns;
            partial.time.clear();
            partial.time.push_str(line.time);
            partial.split = false;
        }
        let mut content = line.content;
        loop {
            let room = self.max_line.saturating_sub(partial.buf.len());
            if content.len() <= room {
                partial.buf.extend_from_slice(content);
                break;
            }
            let cut = cut_at(content, room, partial.buf.is_empty());
            partial.buf.extend_from_slice(&content[..cut]);
            content = &content[cut..];
            if !partial.split {
                partial.split = true;
                ctx.stats.split_lines += 1;
            }
            // The rest of this raw line is still held: resuming at its start repeats
            // this piece's share of it at worst, and loses nothing.
            self.emit_partial(state, &mut partial, line.stream, start_offset, &labels, ctx);
            partial.start = start_offset;
        }
        partial.end = end_offset;
        if line.partial {
            state.partial[index] = partial;
            ctx.decide(end_offset);
            return;
        }
        self.emit_partial(state, &mut partial, line.stream, end_offset, &labels, ctx);
        partial.active = false;
        state.partial[index] = partial;
    }

    /// Emit the joined bytes of `partial` as one entry from `partial.start` to `end`.
    fn emit_partial(
        &self,
        state: &mut StreamState,
        partial: &mut Partial,
        stream: Stream,
        end: u64,
        labels: &LabelSet,
        ctx: &mut Ctx<'_>,
    ) {
        let bytes = std::mem::take(&mut partial.buf);
        let mut fields = std::mem::take(&mut state.scratch);
        let parsed = Parsed {
            timestamp_ns: partial.timestamp_ns,
            time: &partial.time,
            stream,
            partial: false,
            content: &bytes,
        };
        self.fill_parser_fields(&mut fields, &parsed, &bytes);
        let work = Work {
            timestamp_ns: partial.timestamp_ns,
            line: into_line(Cow::Owned(bytes), ctx.stats),
            labels: Arc::clone(labels),
            structured_metadata: Vec::new(),
            start_offset: partial.start,
            end_offset: end,
        };
        self.run(0, work, &mut fields, state, ctx);
        state.scratch = fields;
    }

    fn fill_parser_fields(&self, fields: &mut Fields, line: &Parsed<'_>, content: &[u8]) {
        fields.clear();
        let names = &self.parser_fields;
        if let Some(id) = names.time {
            fields.set_time(id, line.time, line.timestamp_ns);
        }
        if let Some(id) = names.stream {
            fields.set(id, line.stream.as_str());
        }
        if let Some(id) = names.flags {
            fields.set(id, if line.partial { "P" } else { "F" });
        }
        if let Some(id) = names.content {
            fields.set(id, &String::from_utf8_lossy(content));
        }
    }

    /// The stream's labels with `stream` set, as Promtail's cri and docker stages do;
    /// the same `Arc` for every line of the stream.
    fn with_stream_label(
        &self,
        state: &mut StreamState,
        labels: &LabelSet,
        stream: Stream,
    ) -> LabelSet {
        let slot = &mut state.stream_labels[stream_index(stream)];
        if let Some((input, output)) = slot
            && Arc::ptr_eq(input, labels)
        {
            return Arc::clone(output);
        }
        let output = if labels.get("stream").map(String::as_str) == Some(stream.as_str()) {
            Arc::clone(labels)
        } else {
            let mut map = (**labels).clone();
            map.insert("stream".to_string(), stream.as_str().to_string());
            Arc::new(map)
        };
        *slot = Some((Arc::clone(labels), Arc::clone(&output)));
        output
    }

    /// Run stages `from..` on one entry; append it to the output unless a stage drops or
    /// holds it.
    fn run(
        &self,
        from: usize,
        mut work: Work,
        fields: &mut Fields,
        state: &mut StreamState,
        ctx: &mut Ctx<'_>,
    ) {
        for index in from..self.stages.len() {
            let Some(stage) = self.stages.get(index) else {
                break;
            };
            match stage {
                Compiled::Timestamp { source, formats } => {
                    if let Some(nanos) = parse_timestamp(fields, *source, formats) {
                        work.timestamp_ns = nanos;
                    }
                }
                Compiled::StaticLabels { change, memo } => {
                    let Some(memo) = state.label_memos.get_mut(*memo) else {
                        continue;
                    };
                    work.labels = match memo.get(&work.labels, |_| None, 0) {
                        Some(output) => output,
                        None => {
                            let output = match change.apply(&work.labels) {
                                Some(changed) => Arc::new(changed),
                                None => Arc::clone(&work.labels),
                            };
                            memo.put(&work.labels, Vec::new(), &output);
                            output
                        }
                    };
                }
                Compiled::Json {
                    source,
                    expressions,
                } => {
                    extract_json(fields, &work.line, *source, expressions);
                }
                Compiled::Regex {
                    source,
                    regex,
                    groups,
                } => {
                    extract_regex(fields, &work.line, *source, regex, groups);
                }
                Compiled::Labels { pairs, memo } => {
                    if let Some(memo) = state.label_memos.get_mut(*memo) {
                        set_labels(&mut work.labels, fields, pairs, memo);
                    }
                }
                Compiled::StructuredMetadata { pairs } => {
                    for (name, field) in pairs {
                        if let Some(value) = fields.get(*field).filter(|v| !v.is_empty()) {
                            work.structured_metadata
                                .push((name.clone(), value.to_string()));
                        }
                    }
                }
                Compiled::Drop(rule) => {
                    if rule.drops(&work, fields, ctx.now_ns) {
                        ctx.stats.count_drop(&rule.reason);
                        ctx.decide(work.end_offset);
                        return;
                    }
                }
                Compiled::Multiline {
                    first_line,
                    max_lines,
                    slot,
                    ..
                } => {
                    let Some(pending) = state.multiline.get_mut(*slot) else {
                        continue;
                    };
                    let starts = first_line.is_match(&work.line);
                    let previous = match pending {
                        Some(block)
                            if !starts
                                && block.work.line.len() + 1 + work.line.len() <= self.max_line =>
                        {
                            block.work.line.push('\n');
                            block.work.line.push_str(&work.line);
                            block.work.end_offset = work.end_offset;
                            ctx.decide(work.end_offset);
                            block.lines += 1;
                            block.last_push_ns = ctx.now_ns;
                            if block.lines < *max_lines {
                                return;
                            }
                            // Full: it goes on now rather than waiting for the next line.
                            pending.take()
                        }
                        _ => {
                            ctx.decide(work.end_offset);
                            pending.replace(Pending {
                                work,
                                fields: fields.clone(),
                                lines: 1,
                                last_push_ns: ctx.now_ns,
                            })
                        }
                    };
                    if let Some(mut block) = previous {
                        self.run(index + 1, block.work, &mut block.fields, state, ctx);
                    }
                    return;
                }
                Compiled::Limit { rate, keyed, slot } => {
                    let (take, reason) = match keyed {
                        Some(keyed) => keyed.take(rate, &work.labels, ctx.now_ns),
                        None => {
                            let Some(bucket) = state.buckets.get_mut(*slot) else {
                                continue;
                            };
                            let bucket = bucket.get_or_insert(rate.full(ctx.now_ns));
                            (rate.take(bucket, ctx.now_ns), RATE_LIMITED_REASON)
                        }
                    };
                    match take {
                        limit::Take::Pass => {}
                        limit::Take::Drop => {
                            ctx.stats.count_drop(reason);
                            ctx.decide(work.end_offset);
                            return;
                        }
                        limit::Take::Wait(wait) => {
                            ctx.wait = Some(ctx.wait.map_or(wait, |w| w.max(wait)));
                        }
                    }
                }
            }
        }
        ctx.decide(work.end_offset);
        ctx.out.push(Entry {
            timestamp_ns: work.timestamp_ns,
            line: work.line,
            labels: work.labels,
            structured_metadata: work.structured_metadata,
            end_offset: work.end_offset,
            // Taken as written; the runtime checks it once per value (`tenant.rs`).
            tenant: self
                .tenant_field
                .and_then(|id| fields.get(id))
                .filter(|v| !v.is_empty())
                .map(Arc::from),
        });
    }
}

/// What one push or flush accumulates.
struct Ctx<'a> {
    now_ns: i64,
    out: &'a mut Vec<Entry>,
    stats: &'a mut PipelineStats,
    wait: Option<Duration>,
    /// The furthest end offset of anything emitted, dropped on purpose or held.
    decided_to: u64,
}

impl Ctx<'_> {
    /// Every terminal path of a line (out, dropped, held) calls this with its end offset.
    fn decide(&mut self, end_offset: u64) {
        self.decided_to = self.decided_to.max(end_offset);
    }

    fn outcome(&self, end_offset: u64) -> PushOutcome {
        PushOutcome {
            wait: self.wait,
            decided: self.decided_to >= end_offset,
        }
    }
}

/// Where to cut `bytes` to keep at most `limit` of them: at a UTF-8 character boundary
/// when one is within 3 bytes, else exactly at `limit`. Never 0 when `must_progress`.
fn cut_at(bytes: &[u8], limit: usize, must_progress: bool) -> usize {
    let limit = limit.min(bytes.len());
    let is_continuation = |at: usize| bytes.get(at).is_some_and(|b| b & 0xC0 == 0x80);
    let mut cut = limit;
    while cut > 0 && limit - cut < 3 && is_continuation(cut) {
        cut -= 1;
    }
    if is_continuation(cut) || (cut == 0 && must_progress) {
        cut = limit.max(usize::from(must_progress));
    }
    cut.min(bytes.len())
}

fn into_line(bytes: Cow<'_, [u8]>, stats: &mut PipelineStats) -> String {
    match bytes {
        Cow::Borrowed(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => text.to_owned(),
            Err(_) => {
                stats.invalid_utf8_lines += 1;
                String::from_utf8_lossy(bytes).into_owned()
            }
        },
        Cow::Owned(bytes) => match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(error) => {
                stats.invalid_utf8_lines += 1;
                String::from_utf8_lossy(error.as_bytes()).into_owned()
            }
        },
    }
}
