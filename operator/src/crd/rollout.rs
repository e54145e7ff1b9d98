//! `spec.rollout`: how a new revision moves across the nodes. Stored and validated now;
//! the phased engine (canary, verified steps, rollback, cross-cluster gate) reads it.
//!
//! Step semantics: canary steps (a node count or a node selector) come first, then
//! percentage steps in strictly increasing order; after the last step every remaining node
//! moves, then the revision soaks before it becomes stable.

use std::collections::BTreeMap;

use kube::KubeSchema;
use logpipe_api::config::HumanDuration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Stop moving nodes (pods already moved stay); resume by setting it back to false.
    #[serde(default)]
    pub paused: bool,
    /// Most agent pods down at once while nodes move.
    #[serde(default = "default_max_unavailable")]
    #[x_kube(validation = Rule::new("self >= 1").message("rollout.maxUnavailable must be at least 1"))]
    pub max_unavailable: i32,
    /// Steps in order; empty: all nodes in one step (bounded by maxUnavailable).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(s, has(s.canary) != has(s.percent))")
        .message("rollout.steps: each step sets exactly one of canary or percent"))]
    #[x_kube(validation = Rule::new("self.map(s, has(s.canary) ? 0 : 1).isSorted()")
        .message("rollout.steps: canary steps must come before percentage steps"))]
    #[x_kube(validation = Rule::new("self.filter(s, has(s.percent)).map(s, s.percent).isSorted() && self.filter(s, has(s.percent)).all(s, self.filter(t, has(t.percent) && t.percent == s.percent).size() == 1)")
        .message("rollout.steps: percentages must be strictly increasing (e.g. 10, 50, 100)"))]
    pub steps: Vec<RolloutStep>,
    /// How each step is verified.
    #[serde(default)]
    pub verify: VerifySpec,
    /// Time the fully rolled-out revision must stay healthy before it becomes stable.
    #[serde(default = "default_soak")]
    pub soak: HumanDuration,
    /// Hold a new revision until a LogPipeline in another cluster is Healthy with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateSpec>,
    /// Time a new agent pod of a step has to become Ready after it was created, and time a
    /// step may go without moving a node, before the step fails (ErrImagePull,
    /// CrashLoopBackOff fail it at once).
    #[serde(default = "default_progress_deadline")]
    pub progress_deadline: HumanDuration,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            paused: false,
            max_unavailable: default_max_unavailable(),
            steps: Vec::new(),
            verify: VerifySpec::default(),
            soak: default_soak(),
            gate: None,
            progress_deadline: default_progress_deadline(),
        }
    }
}

fn default_max_unavailable() -> i32 {
    1
}
fn default_soak() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(600))
}
fn default_progress_deadline() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(300))
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStep {
    /// Move a few chosen nodes first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStep>,
    /// Move nodes until this share of all nodes runs the new revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("rollout.steps[].percent must be between 1 and 100"))]
    pub percent: Option<i32>,
    /// Verification window of this step (default: rollout.verify.window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<HumanDuration>,
}

/// A quantity the API server can parse, above zero (`sign()` is not in its library).
const POSITIVE_QUANTITY_RULE: &str =
    "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))";

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.nodes) != has(self.nodeSelector)")
    .message("rollout.steps[].canary sets exactly one of nodes or nodeSelector"))]
pub struct CanaryStep {
    /// Number of nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("rollout.steps[].canary.nodes must be at least 1"))]
    pub nodes: Option<i32>,
    /// Nodes with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 16))]
    #[x_kube(validation = Rule::new("size(self) > 0")
        .message("rollout.steps[].canary.nodeSelector must name at least one label: an empty selector selects every node, so the canary would be the whole fleet"))]
    pub node_selector: Option<BTreeMap<String, String>>,
}

/// Checks of a step; each one measured and recorded in `status.lastVerification`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.queryEndpoint) && has(self.query))")
    .message("rollout.verify: set query {type, endpoint} or the deprecated queryEndpoint, not both"))]
pub struct VerifySpec {
    /// How long a step is watched before it passes.
    #[serde(default = "default_window")]
    pub window: HumanDuration,
    /// The log store asked for the step's nodes' logs (check `storeEntries`, and the
    /// written -> queryable latency). Unset: the store check is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<QuerySpec>,
    /// Deprecated: use query {type: loki, endpoint}. A Loki query URL (LogQL), e.g.
    /// `http://loki-query-frontend.loki.svc:3100`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#\\\\s]+(/[^\\\\s]*)?$')")
        .message("rollout.verify.queryEndpoint must be an http:// or https:// URL"))]
    pub query_endpoint: Option<String>,
    /// New pods must be Ready with no restarts.
    #[serde(default = "yes")]
    pub pods_ready: bool,
    /// Agents must have shipped entries where lines were written (nodes that wrote
    /// nothing are quiet), left nothing behind at the end of the window (check `lag`), and
    /// report no send errors or dropped entries.
    #[serde(default = "yes")]
    pub shipping: bool,
    /// CPU budget per agent (e.g. 250m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(POSITIVE_QUANTITY_RULE)
        .message("rollout.verify.maxCpu must be a Kubernetes CPU quantity above 0, such as 250m or 1"))]
    pub max_cpu: Option<String>,
    /// Memory budget per agent (e.g. 700Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(POSITIVE_QUANTITY_RULE)
        .message("rollout.verify.maxMemory must be a Kubernetes memory quantity above 0, such as 700Mi or 1Gi"))]
    pub max_memory: Option<String>,
    /// Delivery latency budget, file write to queryable in the store; also how old the
    /// oldest unacknowledged byte may be at the end of a window (check `lag`, 30s when
    /// unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency: Option<HumanDuration>,
    /// Most active streams (label sets pushed over the last 5 minutes) per agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("rollout.verify.maxStreams must be at least 1"))]
    pub max_streams: Option<i64>,
    /// Most growth of the active streams per node, new revision over the stable one on
    /// the same nodes before they moved: a ratio such as `2x` or `1.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+([.][0-9]+)?x?$') && !self.matches('^0+([.]0+)?x?$')")
        .message("rollout.verify.maxStreamGrowth must be a ratio above 0, such as 2x or 1.5"))]
    pub max_stream_growth: Option<String>,
    /// Most increase, in percentage points, of the share of lines the agent's pipeline
    /// stages drop on purpose (drop, limit, ...), new revision over the stable one on the
    /// same nodes before they moved (check `pipelineDrops`): a dropped line counts as
    /// shipped everywhere else, so a bad `drop` rule would pass every other check. `10%`
    /// by default; `100%` turns the check off.
    #[serde(default = "default_max_drop_increase")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.matches('^(100([.]0+)?|[0-9]{1,2}([.][0-9]+)?)%$')")
        .message("rollout.verify.maxDropIncrease must be a percentage from 0% to 100%, such as 10% (100% turns the check off)"))]
    pub max_drop_increase: String,
}

impl VerifySpec {
    /// The store to ask and its query URL: `query`, else the deprecated `queryEndpoint`
    /// (Loki). `None`: the store check is skipped.
    pub fn store(&self) -> Option<(StoreKind, &str)> {
        match (&self.query, &self.query_endpoint) {
            (Some(q), _) => Some((q.kind, q.endpoint.as_str())),
            (None, Some(endpoint)) => Some((StoreKind::Loki, endpoint.as_str())),
            (None, None) => None,
        }
    }

    /// `maxStreamGrowth` as a number (`2x` -> 2.0); `None` when unset or unreadable.
    pub fn stream_growth_limit(&self) -> Option<f64> {
        let s = self.max_stream_growth.as_deref()?.trim();
        let n = s.strip_suffix('x').unwrap_or(s).parse::<f64>().ok()?;
        (n.is_finite() && n > 0.0).then_some(n)
    }

    /// `maxDropIncrease` as a share (`10%` -> 0.1); `None` when unreadable.
    pub fn drop_increase_limit(&self) -> Option<f64> {
        let n = self
            .max_drop_increase
            .trim()
            .strip_suffix('%')?
            .trim()
            .parse::<f64>()
            .ok()?;
        (n.is_finite() && (0.0..=100.0).contains(&n)).then_some(n / 100.0)
    }

    /// Is `pipelineDrops` on? Below `100%` (an unreadable limit too: the check then says
    /// so, and fails at the end of the window).
    pub fn pipeline_drops(&self) -> bool {
        self.drop_increase_limit().is_none_or(|l| l < 1.0)
    }

    /// Must a step start by scraping the stable agents it is about to replace
    /// (`status.streamBaseline`)? When a check compares with them: `streamGrowth` or
    /// `pipelineDrops`.
    pub fn needs_baseline(&self) -> bool {
        self.max_stream_growth.is_some() || self.pipeline_drops()
    }

    /// Does any check need the agents scraped or the store asked? (Only `podsReady`
    /// otherwise, which the pods' status answers.)
    pub fn measures(&self) -> bool {
        self.shipping
            || self.max_cpu.is_some()
            || self.max_memory.is_some()
            || self.max_latency.is_some()
            || self.max_streams.is_some()
            || self.needs_baseline()
            || self.store().is_some()
    }

    /// Age the oldest unacknowledged byte may reach at the end of a window (`maxLatency`,
    /// else 30 s).
    pub fn max_lag(&self) -> std::time::Duration {
        self.max_latency
            .map_or(std::time::Duration::from_secs(30), |d| d.0)
    }
}

impl Default for VerifySpec {
    fn default() -> Self {
        Self {
            window: default_window(),
            query: None,
            query_endpoint: None,
            pods_ready: true,
            shipping: true,
            max_cpu: None,
            max_memory: None,
            max_latency: None,
            max_streams: None,
            max_stream_growth: None,
            max_drop_increase: default_max_drop_increase(),
        }
    }
}

/// Where the step's logs are queried.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QuerySpec {
    /// The store and its query language: `loki` (LogQL, tenant sent as X-Scope-OrgID) or
    /// `victorialogs` (LogsQL; the tenant must be `<accountID>[:<projectID>]`, numbers,
    /// sent as the AccountID and ProjectID headers).
    #[serde(rename = "type")]
    pub kind: StoreKind,
    /// Query URL of the store, e.g. `http://loki-query-frontend.loki.svc:3100` or
    /// `http://victorialogs.logging.svc:9428`.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#\\\\s]+(/[^\\\\s]*)?$')")
        .message("rollout.verify.query.endpoint must be an http:// or https:// URL, e.g. http://victorialogs.logging.svc:9428"))]
    pub endpoint: String,
}

/// A log store verification can query.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Loki,
    VictoriaLogs,
}

impl StoreKind {
    /// The store's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Loki => "Loki",
            Self::VictoriaLogs => "VictoriaLogs",
        }
    }
}

fn default_max_drop_increase() -> String {
    "10%".into()
}
fn default_window() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(120))
}
fn yes() -> bool {
    true
}

/// Promotion gate on another cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateSpec {
    /// Secret with the other cluster's credentials (kubeconfig, or an ArgoCD cluster Secret).
    pub cluster_secret_ref: super::KeyRef,
    /// The LogPipeline there.
    pub namespace: String,
    pub name: String,
    /// How long it must have been Healthy with the same release.
    #[serde(default = "default_gate_soak")]
    pub soak: HumanDuration,
    /// How often the other cluster is asked, while a release waits for the gate and while
    /// it moves here (at least 5s).
    #[serde(default = "default_gate_poll_interval")]
    pub poll_interval: HumanDuration,
    /// What this cluster does when the LogPipeline there turns Degraded on the release
    /// moving here, or moves to another release: `pause` (default) or `rollback`.
    #[serde(default)]
    pub on_failure: GateFailureAction,
}

/// What a release moving here does when its gate turns against it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GateFailureAction {
    /// Stop moving nodes (moved ones stay) until the gate's LogPipeline is back on this
    /// release, or the spec changes.
    #[default]
    Pause,
    /// Put the stable revision back on every node.
    Rollback,
}

fn default_gate_soak() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(24 * 3600))
}
fn default_gate_poll_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}
