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
    /// Index in `spec.rollout.steps` of the step in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verification: Option<Verification>,
    /// One line a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where the LogPipeline stands. The rollout engine moves through Pending (gate) ->
/// Canary -> Step -> Soak -> Healthy, or RollingBack -> Degraded.
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
