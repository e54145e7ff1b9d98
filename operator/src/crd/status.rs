//! `status`: what the operator observed, written only by the operator (status subresource).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogPipelineStatus {
    /// The spec generation this status describes (Progressing while it lags).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Verified, Degraded (metav1.Condition).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Nodes that should run an agent.
    #[serde(default)]
    pub desired_nodes: i32,
    /// Nodes whose agent runs the target revision.
    #[serde(default)]
    pub updated_nodes: i32,
    /// Nodes whose agent runs the target revision and is Ready.
    #[serde(default)]
    pub ready_nodes: i32,
    /// `readyNodes/desiredNodes`, for `kubectl get lp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Last revision that was fully rolled out and healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,
    /// Revision the spec asks for (hash of the agent pod template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_revision: Option<String>,
    /// Name of the ConfigMap holding the target revision's agent config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
    /// Release of the target revision: hash of what moves together across clusters (agent
    /// image, pipeline, labels), not per-cluster fields such as tenant or endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// Release of the stable revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_release: Option<String>,
    /// Index of the step in progress in the effective steps (`spec.rollout.steps`, plus a
    /// final 100% step when the last one is not 100%); equal to their count while soaking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<i32>,
    /// The current step (or soak, or rollback) began at (RFC 3339); with the fields
    /// below, what lets a restarted operator resume exactly where it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<String>,
    /// The step's nodes were all moved and Ready at (RFC 3339): its verification window
    /// started then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_started_at: Option<String>,
    /// The revision that failed verification (or was aborted) and was rolled back; the
    /// operator does not try it again unless promoted (`logpipe.io/promote`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_revision: Option<String>,
    /// Why the last rollback happened, with the numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_reason: Option<String>,
    /// Why the last rollback happened, as a value (the `Degraded` condition's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_cause: Option<RollbackCause>,
    /// Healthy without interruption at `release` since (RFC 3339): what a gate in another
    /// cluster compares with its soak time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since: Option<String>,
    /// The promotion gate, when `spec.rollout.gate` is set: what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verification: Option<Verification>,
    /// What the stable revision's agents on the current step's nodes said, scraped once
    /// when the step started, before they moved: active streams (check `streamGrowth`)
    /// and lines read and dropped by pipeline stages (check `pipelineDrops`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_baseline: Option<StreamBaseline>,
    /// Pods this pipeline ships that another LogPipeline's `selector` selects too: each
    /// of their lines is stored once per pipeline. Absent: no overlap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlapping_pods: Option<i32>,
    /// The LogPipelines (`namespace/name`) that ship those pods too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlaps_with: Vec<String>,
    /// One line a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What a promotion gate waits for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateStatus {
    /// `<server>/<namespace>/<name>` of the LogPipeline in the other cluster.
    pub pipeline: String,
    /// The release it must be Healthy at.
    pub release: String,
    pub open: bool,
    /// When the gate opens (RFC 3339), once the other side is Healthy at the release: its
    /// `healthySince` plus the gate's soak. A time, not a countdown, so the status does
    /// not change while nothing happens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opens_at: Option<String>,
    pub message: String,
    /// When the other cluster gave the answer in `message` (RFC 3339). It is asked again
    /// at most every `gate.pollInterval` (timed in memory, and from this time after an
    /// operator restart); this changes only with the answer, so a steady gate writes no
    /// status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<String>,
    /// The gate stopped the release moving here (paused or rolled back, see `message`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
}

/// Where the LogPipeline stands. The rollout engine moves through Pending (gate) ->
/// Why a revision was rolled back (or, with nothing to go back to, left Degraded).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RollbackCause {
    /// A step failed its checks, or did not complete within its deadline.
    VerificationFailed,
    /// A person (`logpipe.io/abort`) or the gate (`onFailure: rollback`) stopped it.
    Aborted,
    /// The stable revision's own agents fail where they run (nothing to roll back).
    AgentsFailing,
}

impl RollbackCause {
    pub const ALL: [Self; 3] = [Self::VerificationFailed, Self::Aborted, Self::AgentsFailing];

    /// The `Degraded` condition's reason.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::VerificationFailed => "VerificationFailed",
            Self::Aborted => "Aborted",
            Self::AgentsFailing => "AgentsFailing",
        }
    }
}

/// Canary -> Step -> Soak -> Healthy, or RollingBack -> Degraded. `Progressing`: nodes
/// return to the stable revision with no verification (the spec went back to it), or a
/// LogPipeline from before the rollout engine. `Paused`: `spec.rollout.paused` mid-rollout.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Progressing,
    Canary,
    Step,
    Soak,
    Healthy,
    Paused,
    RollingBack,
    Degraded,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Progressing => "Progressing",
            Self::Canary => "Canary",
            Self::Step => "Step",
            Self::Soak => "Soak",
            Self::Healthy => "Healthy",
            Self::Paused => "Paused",
            Self::RollingBack => "RollingBack",
            Self::Degraded => "Degraded",
        }
    }
}

/// The stable revision's agents per node, before a step moved the nodes. Named for its
/// first use (streams); it also carries the pipeline drops, so a step is scraped once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamBaseline {
    /// The step (index in the effective steps) it was taken for.
    pub step: i32,
    /// Node name -> `logpipe_active_streams` of its stable agent (a sample of the step's
    /// nodes on a large step).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub nodes: std::collections::BTreeMap<String, i64>,
    /// Node name -> lines its stable agent had read and its pipeline stages had dropped
    /// since it started (same sample of nodes); a node whose agent does not export them
    /// is left out.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub drops: std::collections::BTreeMap<String, LineCounts>,
}

/// Lines an agent read, and of those, the lines its pipeline stages dropped on purpose.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LineCounts {
    /// `logpipe_read_lines_total` (or the sum of `promtail_read_lines_total`).
    pub read: i64,
    /// `logentry_dropped_lines_total`, summed over reasons.
    pub dropped: i64,
}

/// The result of verifying one step, with the measured numbers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    pub revision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i32>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    pub passed: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckResult>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    /// Measured value, e.g. `183m`, `412Mi`, `2.4s`, `5/5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Budget it was compared with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
