//! The agent configuration document: the contract between the operator, which renders it
//! into a ConfigMap, and the agent, which loads it. Defined once, here, with no I/O beyond
//! [`AgentConfig::from_yaml`]; the operator embeds the same types in the `LogPipeline` CRD
//! (`labels`, `pipeline`), so what a user writes is exactly what the agent runs.
//!
//! Field names are camelCase, as in every Kubernetes resource. Unknown fields are refused
//! so a typo is an error that names the field, never a silently ignored setting.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::process;
use crate::selector::PodSelection;

/// Everything one agent process needs. Rendered by the operator; flags override a few
/// fields for runs outside a cluster (see `main.rs`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// Where and how to push.
    pub loki: LokiClientConfig,
    /// Root of the kubelet's pod log tree.
    #[serde(default = "default_log_root")]
    pub log_root: String,
    /// Positions (acknowledged read offsets) file, on a hostPath in a cluster.
    #[serde(default = "default_positions_file")]
    pub positions_file: String,
    /// Address of the metrics and health server.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Relabel rules from Kubernetes meta labels to stream labels. Empty means the
    /// Promtail-compatible defaults ([`crate::relabel::default_rules`]).
    #[serde(default)]
    pub relabel: Vec<RelabelRule>,
    /// Ordered processing stages.
    #[serde(default)]
    pub pipeline: Vec<Stage>,
    /// The pods whose logs are shipped (namespace and pod label selectors). Empty: every
    /// pod of the node.
    #[serde(default, skip_serializing_if = "PodSelection::is_empty")]
    pub selector: PodSelection,
    /// Size and memory limits.
    #[serde(default)]
    pub limits: Limits,
    /// Graceful shutdown: how long SIGTERM may wait for Loki's answers before positions
    /// are saved (keep it below the pod's terminationGracePeriodSeconds).
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
}

fn default_log_root() -> String {
    process::DEFAULT_LOG_ROOT.to_string()
}
fn default_positions_file() -> String {
    process::POSITIONS_FILE.to_string()
}
fn default_listen() -> String {
    format!("0.0.0.0:{}", process::DEFAULT_PORT)
}
fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(
        process::DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
    ))
}

/// The Loki push client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LokiClientConfig {
    /// Push URL, e.g. `http://loki:3100/loki/api/v1/push`.
    pub url: String,
    /// Sent as `X-Scope-OrgID`; the tenant of every entry `tenantFrom` does not place.
    pub tenant: String,
    /// Where each entry's tenant comes from (a namespace label, a pod label or annotation,
    /// an extracted field). Missing or invalid there: `tenant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_from: Option<TenantFrom>,
    /// Authentication; secrets are read from files (mounted from Secrets in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    /// TLS settings for an `https` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Longest time an entry waits in a batch before the batch is sent.
    #[serde(default = "default_batch_wait")]
    pub batch_wait: HumanDuration,
    /// Largest batch, in bytes of log lines, before it is sent.
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: u64,
    /// Timeout of one push request.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// First retry delay after a 429, a 5xx or a connection error (doubles, with jitter).
    #[serde(default = "default_min_backoff")]
    pub min_backoff: HumanDuration,
    /// Longest retry delay. Retries never give up on retryable errors: data is kept
    /// (and reading stops) until Loki accepts it.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
    /// Labels added to every stream.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub external_labels: BTreeMap<String, String>,
}

/// The source of an entry's tenant: exactly one field is set (a CEL rule in the CRD, and
/// [`crate::validate`]). Per file for the pod and namespace sources, per line for `field`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.namespaceLabel), has(self.podLabel), has(self.podAnnotation), has(self.field)].filter(x, x).size() == 1",
    "message": "tenantFrom must set exactly one of namespaceLabel, podLabel, podAnnotation or field"
}]))]
pub struct TenantFrom {
    /// A label of the pod's namespace, e.g. `logpipe.io/tenant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317))]
    pub namespace_label: Option<String>,
    /// A label of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317))]
    pub pod_label: Option<String>,
    /// An annotation of the pod, e.g. `logpipe.io/tenant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317))]
    pub pod_annotation: Option<String>,
    /// A field a `json` or `regex` stage extracted from the line (Promtail's `tenant`
    /// stage with `source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub field: Option<String>,
}

/// The one source a [`TenantFrom`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantSource<'a> {
    NamespaceLabel(&'a str),
    PodLabel(&'a str),
    PodAnnotation(&'a str),
    Field(&'a str),
}

impl TenantFrom {
    /// The source, or why there is not exactly one.
    pub fn source(&self) -> Result<TenantSource<'_>, String> {
        let set: Vec<TenantSource<'_>> = [
            self.namespace_label
                .as_deref()
                .map(TenantSource::NamespaceLabel),
            self.pod_label.as_deref().map(TenantSource::PodLabel),
            self.pod_annotation
                .as_deref()
                .map(TenantSource::PodAnnotation),
            self.field.as_deref().map(TenantSource::Field),
        ]
        .into_iter()
        .flatten()
        .collect();
        match set.as_slice() {
            [one] => Ok(*one),
            [] => Err("set one of namespaceLabel, podLabel, podAnnotation or field".into()),
            _ => Err("set only one of namespaceLabel, podLabel, podAnnotation or field".into()),
        }
    }
}

fn default_batch_wait() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_batch_bytes() -> u64 {
    1024 * 1024
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_min_backoff() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_max_backoff() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    /// HTTP basic auth: username, and the file holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<BasicAuth>,
    /// File holding a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    pub password_file: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificates that sign Loki's serving certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Skip verification of Loki's certificate (never in production).
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// Explicit size limits; each one is counted in metrics when it triggers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Longest line after joining CRI partial lines; longer lines are split.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: u64,
    /// Bytes of entries read but not yet acknowledged by Loki; reading pauses above it.
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: u64,
    /// What to do with a line the parser stage cannot read: pass it on raw, or drop it.
    #[serde(default)]
    pub malformed_lines: MalformedLinePolicy,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line_bytes: default_max_line_bytes(),
            max_buffered_bytes: default_max_buffered_bytes(),
            malformed_lines: MalformedLinePolicy::default(),
        }
    }
}

fn default_max_line_bytes() -> u64 {
    256 * 1024
}
fn default_max_buffered_bytes() -> u64 {
    // Four 1 MiB batches of read-ahead: reading runs at hundreds of MB/s, so a larger buffer
    // buys no throughput (one batch is in flight at a time) and only raises peak memory.
    4 * 1024 * 1024
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MalformedLinePolicy {
    /// Ship the line as read, with the file's labels, timestamped when read.
    #[default]
    Pass,
    /// Count it and drop it.
    Drop,
}

/// One Prometheus relabel rule (same semantics as Prometheus' `relabel_config`).
/// The API server refuses what Prometheus refuses where a rule can say it; regex syntax
/// is judged by the operator before any node moves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.action) || self.action != 'hashmod' || has(self.modulus) && self.modulus > 0",
        "message": "labels[]: the hashmod action requires a modulus above 0"
    },
    {
        "rule": "has(self.action) && !(self.action in ['replace', 'hashmod', 'lowercase', 'uppercase']) || has(self.targetLabel) && self.targetLabel != ''",
        "message": "labels[]: the replace, hashmod, lowercase and uppercase actions require a targetLabel"
    },
    {
        "rule": "!has(self.targetLabel) || (has(self.action) && self.action != 'replace' ? self.targetLabel.matches('^[a-zA-Z_][a-zA-Z0-9_]*$') : self.targetLabel.matches('^[a-zA-Z_$][a-zA-Z0-9_${}]*$'))",
        "message": "labels[].targetLabel must be a label name: letters, digits and _, not starting with a digit (replace may also use $1 or ${name}); Loki refuses other names"
    },
    {
        "rule": "!has(self.action) || !(self.action in ['labeldrop', 'labelkeep']) || !has(self.sourceLabels) && !has(self.targetLabel) && !has(self.modulus) && !has(self.separator) && !has(self.replacement)",
        "message": "labels[]: the labeldrop and labelkeep actions take only a regex"
    }
]))]
pub struct RelabelRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub source_labels: Vec<String>,
    /// Joins the source label values; default `;`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub separator: Option<String>,
    /// RE2-style regex, fully anchored; default `(.*)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub target_label: Option<String>,
    /// Default `$1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement: Option<String>,
    /// For `hashmod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modulus: Option<u64>,
    #[serde(default)]
    pub action: RelabelAction,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RelabelAction {
    #[default]
    Replace,
    Keep,
    Drop,
    Labelmap,
    Labeldrop,
    Labelkeep,
    Hashmod,
    Lowercase,
    Uppercase,
}

/// One processing stage. Written as a one-key object, as in Promtail:
/// `- cri: {}`, `- timestamp: {source: time, format: RFC3339}`, `- labelDrop: [filename]`.
/// Exactly one field is set (checked by a CEL rule in the CRD and by the agent's validation).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Stage {
    /// Parse CRI lines (`<time> <stream> <P|F> <text>`), joining partial lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cri: Option<CriStage>,
    /// Parse docker json-file lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerStage>,
    /// Set the entry's timestamp from an extracted field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<TimestampStage>,
    /// Remove these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), extend("items" = {"type": "string", "maxLength": 256}, "x-kubernetes-validations" = [{"rule": LABEL_NAMES_RULE, "message": "labelDrop: each entry must be a label name: letters, digits and _, not starting with a digit"}]))]
    pub label_drop: Option<Vec<String>>,
    /// Keep only these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), extend("items" = {"type": "string", "maxLength": 256}, "x-kubernetes-validations" = [{"rule": LABEL_NAMES_RULE, "message": "labelKeep: each entry must be a label name: letters, digits and _, not starting with a digit"}]))]
    pub label_keep: Option<Vec<String>>,
    /// Add fixed labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64, "x-kubernetes-validations" = [{"rule": STREAM_LABEL_KEYS_RULE, "message": "staticLabels: each name must be a label name Loki accepts: letters, digits and _, not starting with a digit nor with __ (e.g. team, not my-team)"}]))]
    pub static_labels: Option<BTreeMap<String, String>>,
    /// Extract fields from a JSON line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<JsonStage>,
    /// Extract fields with named capture groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<RegexStage>,
    /// Turn extracted fields into labels: label name -> field name (empty: same name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64, "x-kubernetes-validations" = [{"rule": STREAM_LABEL_KEYS_RULE, "message": "labels: each name must be a label name Loki accepts: letters, digits and _, not starting with a digit nor with __ (e.g. level, not log-level)"}]))]
    pub labels: Option<BTreeMap<String, String>>,
    /// Attach extracted fields as Loki structured metadata: name -> field (empty: same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured_metadata: Option<BTreeMap<String, String>>,
    /// Drop entries by content, age or size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropStage>,
    /// Join lines into one entry until the next line that starts an entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiline: Option<MultilineStage>,
    /// Rate-limit entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<LimitStage>,
}

/// CEL (the CRD): a list of label names, as [`crate::validate::label_name`] checks them.
const LABEL_NAMES_RULE: &str = "self.all(n, n.matches('^[a-zA-Z_][a-zA-Z0-9_]*$'))";
/// CEL (the CRD): the keys of a map of labels added to streams, as
/// [`crate::validate::stream_label`] checks them.
const STREAM_LABEL_KEYS_RULE: &str =
    "self.all(k, k.matches('^[a-zA-Z_][a-zA-Z0-9_]*$') && !k.startsWith('__'))";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CriStage {}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DockerStage {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimestampStage {
    /// Extracted field holding the time (`time` is the CRI/docker time).
    pub source: String,
    /// `RFC3339`, `RFC3339Nano`, `Unix`, `UnixMs`, `UnixUs`, `UnixNs`, or a chrono
    /// strftime format.
    pub format: String,
    /// Formats tried in order when `format` does not parse the field. When none does (or
    /// the field is missing) the entry keeps its current timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_formats: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JsonStage {
    /// Field name -> dotted path in the JSON document (empty: the same name at the top).
    pub expressions: BTreeMap<String, String>,
    /// Extracted field to parse instead of the line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegexStage {
    /// RE2-style regex with named capture groups; each group becomes a field.
    pub expression: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DropStage {
    /// Field to match (default: the line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Drop when this regex matches (unanchored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
    /// Drop entries whose timestamp is older than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_than: Option<HumanDuration>,
    /// Drop lines longer than this many bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longer_than: Option<u64>,
    /// The `reason` label of the dropped-entries counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_counter_reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MultilineStage {
    /// A line matching this regex starts a new entry.
    pub first_line: String,
    /// Flush a pending entry after this long without a new line.
    #[serde(default = "default_multiline_wait")]
    pub max_wait: HumanDuration,
    /// Flush after this many lines.
    #[serde(default = "default_multiline_lines")]
    #[schemars(range(min = 1))]
    pub max_lines: u32,
}

fn default_multiline_wait() -> HumanDuration {
    HumanDuration(Duration::from_secs(3))
}
fn default_multiline_lines() -> u32 {
    128
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitStage {
    /// Entries per second.
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true))]
    pub rate: f64,
    /// Burst size, in entries.
    #[schemars(range(min = 1))]
    pub burst: u32,
    /// Drop entries over the limit (true) or wait, which slows reading (false).
    #[serde(default)]
    pub drop: bool,
    /// One bucket per combination of these labels' values (e.g. `[namespace, app]`),
    /// shared by every stream with those values. Unset: one bucket per stream (file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8), extend("items" = {"type": "string", "maxLength": 256}, "x-kubernetes-validations" = [{"rule": LABEL_NAMES_RULE, "message": "limit.byLabels: each entry must be a label name: letters, digits and _, not starting with a digit"}]))]
    pub by_labels: Option<Vec<String>>,
    /// Most keys (label value combinations) with a bucket of their own; entries of
    /// further keys share one overflow bucket (their drops are counted as
    /// `rate_limited_overflow`). Default 1000.
    #[serde(default = "default_limit_max_keys")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_keys: u32,
}

fn default_limit_max_keys() -> u32 {
    1000
}

/// A duration written as Go and Prometheus write them: `500ms`, `10s`, `5m`, `1h30m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("invalid duration {text:?}: expected e.g. 500ms, 10s, 5m, 1h30m");
        if text.is_empty() {
            return Err(bad());
        }
        let mut total = Duration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            if digits == 0 {
                return Err(bad());
            }
            let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let seconds_per_unit = match &rest[..unit_len] {
                "ns" => 1e-9,
                "us" | "µs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            total += Duration::from_secs_f64(value * seconds_per_unit);
        }
        Ok(Self(total))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            let s = d.as_secs();
            if s != 0 && s.is_multiple_of(3600) {
                write!(f, "{}h", s / 3600)
            } else if s != 0 && s.is_multiple_of(60) {
                write!(f, "{}m", s / 60)
            } else {
                write!(f, "{s}s")
            }
        } else if d.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}ns", d.as_nanos())
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$",
            "description": "A duration such as 500ms, 10s, 5m or 1h30m."
        })
    }
}

/// The problems of a config, shown as `field: reason; field: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<crate::validate::Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// A configuration file the agent cannot use; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {0}")]
    Invalid(Problems),
}

impl AgentConfig {
    /// Parse and validate a YAML (or JSON) document.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Self =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_yaml::to_string(self).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Every check of [`crate::validate::config`]: the config the agent can run, or every
    /// problem in it, each with its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = crate::validate::config(self);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(Problems(problems)))
        }
    }
}

impl Stage {
    /// The stage's kind, as written in the document (`cri`, `labelDrop`, ...).
    pub fn kind(&self) -> Result<&'static str, String> {
        let set: Vec<&'static str> = [
            ("cri", self.cri.is_some()),
            ("docker", self.docker.is_some()),
            ("timestamp", self.timestamp.is_some()),
            ("labelDrop", self.label_drop.is_some()),
            ("labelKeep", self.label_keep.is_some()),
            ("staticLabels", self.static_labels.is_some()),
            ("json", self.json.is_some()),
            ("regex", self.regex.is_some()),
            ("labels", self.labels.is_some()),
            ("structuredMetadata", self.structured_metadata.is_some()),
            ("drop", self.drop.is_some()),
            ("multiline", self.multiline.is_some()),
            ("limit", self.limit.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, present)| present.then_some(name))
        .collect();
        match set.as_slice() {
            [one] => Ok(one),
            [] => Err("a stage must name exactly one kind (cri, docker, timestamp, labelDrop, labelKeep, staticLabels, json, regex, labels, structuredMetadata, drop, multiline, limit)".into()),
            many => Err(format!("a stage must name exactly one kind, found {}", many.join(", "))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(
            HumanDuration::parse("500ms").unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            HumanDuration::parse("1h30m").unwrap().0,
            Duration::from_secs(5400)
        );
        assert_eq!(
            HumanDuration::parse("1.5s").unwrap().0,
            Duration::from_millis(1500)
        );
        for bad in ["", "10", "s", "10x", "-1s"] {
            assert!(
                HumanDuration::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn durations_round_trip() {
        for text in ["500ms", "10s", "5m", "2h", "90s"] {
            let d = HumanDuration::parse(text).unwrap();
            assert_eq!(HumanDuration::parse(&d.to_string()).unwrap(), d);
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let err = AgentConfig::from_yaml("loki: {url: http://x, tenant: a, batchWiat: 1s}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("batchWiat"), "{err}");
    }

    #[test]
    fn a_stage_with_two_kinds_is_refused() {
        let err = AgentConfig::from_yaml(
            "loki: {url: http://x, tenant: a}\npipeline:\n- {cri: {}, docker: {}}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("pipeline[0]") && err.contains("cri, docker"),
            "{err}"
        );
    }

    #[test]
    fn reference_ops_pipeline_parses() {
        let config = AgentConfig::from_yaml(
            "loki: {url: 'http://loki:3100/loki/api/v1/push', tenant: ops}\n\
             pipeline:\n- cri: {}\n- timestamp: {source: time, format: RFC3339}\n- labelDrop: [filename]\n",
        )
        .unwrap();
        let kinds: Vec<_> = config.pipeline.iter().map(|s| s.kind().unwrap()).collect();
        assert_eq!(kinds, ["cri", "timestamp", "labelDrop"]);
    }
}
