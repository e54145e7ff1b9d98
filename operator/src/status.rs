//! Status: a pure function of what was observed. The controller patches it only when the
//! result differs from the stored status, so a quiet cluster sees no status writes.
//!
//! Conditions (standard `metav1.Condition`):
//! - `Ready`: every desired node runs the target revision and its agent is Ready;
//! - `Progressing`: the rollout engine is moving nodes (Canary, Step, Soak, RollingBack,
//!   Progressing phases); False while held by a gate, paused, Healthy or Degraded;
//! - `Verified`: the last verification of a step passed (its checks, with numbers, are in
//!   `lastVerification`);
//! - `Degraded`: the operator cannot make the cluster match the spec, or a revision failed
//!   its verification and was rolled back (reason `VerificationFailed` or `Aborted`,
//!   message with the numbers), or the stable revision's agents fail where they run
//!   (reason `AgentsFailing`, with their last words; see `rollout`).
//!
//! A condition keeps its `lastTransitionTime` while its status does not change.
//!
//! # Failures
//! A reconcile that cannot do its work ([`Failure`]: the spec the agent would refuse, a
//! server-side apply the API server refused, a Secret the pods or the gate need that is
//! missing, a step held because its store cannot be reached) gives `Ready=False` and `Degraded=True` with the failure's
//! [`FailureReason`], the top-level `message` replaced by `<Reason>: <message>`, and
//! `observedGeneration` of the spec it failed on.
//!
//! Guarantees: a failure never moves the rollout's memory (phase, target revision,
//! step, timers, rollback reason stay as the last decision left them), so the next
//! reconcile neither mistakes the failed spec for one already rolling out nor replays an
//! old revision's Degraded message; the node counts stay as last observed.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::apply::ApplyError;
use crate::crd::{GateStatus, LogPipelineSpec, LogPipelineStatus, Phase, Verification};
use crate::rollout::{PodView, RollbackCause, State};

/// The reason of the Ready, Progressing and Degraded conditions while the stable
/// revision's agents fail where they run (crash loop, image gone): nothing to roll back.
pub const AGENTS_FAILING: &str = RollbackCause::AgentsFailing.reason();

/// Why a reconcile failed, as the `reason` of the Ready and Degraded conditions and of
/// its Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// The agent would refuse the spec (its own validation): held before any node moves.
    InvalidSpec,
    /// The API server refused a server-side apply (the object and the API's message).
    ApplyFailed,
    /// A Secret the agent pods mount (auth, TLS CA) or the gate reads is missing, or
    /// lacks the key.
    SecretMissing,
    /// The store a step's verification asks cannot be reached at the end of its window:
    /// the step holds (neither goes on nor rolls back) until it answers.
    StoreUnreachable,
}

impl FailureReason {
    pub const ALL: [Self; 4] = [
        Self::InvalidSpec,
        Self::ApplyFailed,
        Self::SecretMissing,
        Self::StoreUnreachable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidSpec => "InvalidSpec",
            Self::ApplyFailed => "ApplyFailed",
            Self::SecretMissing => "SecretMissing",
            Self::StoreUnreachable => "StoreUnreachable",
        }
    }

    /// The reason a condition carries, if it is one of ours.
    pub fn of_condition(reason: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == reason)
    }

    /// A bounded metric label.
    pub fn metric(self) -> &'static str {
        match self {
            Self::InvalidSpec => "invalid_spec",
            Self::ApplyFailed => "apply",
            Self::SecretMissing => "secret_missing",
            Self::StoreUnreachable => "store_unreachable",
        }
    }
}

/// A reconcile failure to report in the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub reason: FailureReason,
    pub message: String,
}

impl Failure {
    pub fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// An apply that failed: which object, and the API server's own words.
    pub fn of_apply(e: &ApplyError) -> Self {
        let message = match e {
            ApplyError::Apply { kind, name, source } => match source {
                kube::Error::Api(_) => {
                    format!(
                        "the API server refused {kind} {name}: {}",
                        api_message(source)
                    )
                }
                _ => format!("cannot apply {kind} {name}: {}", api_message(source)),
            },
            ApplyError::Api { action, source } => {
                format!("cannot {action}: {}", api_message(source))
            }
            ApplyError::NoName | ApplyError::Snapshot { .. } => e.to_string(),
        };
        Self::new(FailureReason::ApplyFailed, message)
    }

    /// `<Reason>: <message>`, the top-level `status.message`.
    pub fn line(&self) -> String {
        format!("{}: {}", self.reason.as_str(), self.message)
    }
}

/// What the API server said, without kube's debug dump of its answer.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        kube::Error::Api(status) => format!("{} ({})", status.reason, status.code),
        other => other.to_string(),
    }
}

/// A Secret a reconcile depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    /// The spec field naming it, for the message.
    pub field: &'static str,
    pub name: String,
    /// The key that must be in it (`None`: any content will do, e.g. the gate's Secret,
    /// a kubeconfig or an ArgoCD cluster Secret).
    pub key: Option<String>,
}

/// The Secrets the agent pods mount, and the gate's when `gated` (pure).
pub fn secret_refs(spec: &LogPipelineSpec, gated: bool) -> Vec<SecretRef> {
    let with_key = |field, r: &crate::crd::KeyRef| SecretRef {
        field,
        name: r.name.clone(),
        key: Some(r.key.clone()),
    };
    let mut refs = Vec::new();
    if let Some(auth) = &spec.auth {
        if let Some(basic) = &auth.basic {
            refs.push(with_key(
                "auth.basic.passwordSecretRef",
                &basic.password_secret_ref,
            ));
        }
        if let Some(bearer) = &auth.bearer_token_secret_ref {
            refs.push(with_key("auth.bearerTokenSecretRef", bearer));
        }
    }
    if let Some(ca) = spec.tls.as_ref().and_then(|t| t.ca_secret_ref.as_ref()) {
        refs.push(with_key("tls.caSecretRef", ca));
    }
    if let Some(gate) = spec.rollout.gate.as_ref().filter(|_| gated) {
        refs.push(SecretRef {
            field: "rollout.gate.clusterSecretRef",
            name: gate.cluster_secret_ref.name.clone(),
            key: None,
        });
    }
    refs
}

/// The failure of a Secret that is not there (`found`: its data, `None`: no such
/// Secret), or `None` when it is usable (pure).
pub fn secret_failure(
    namespace: &str,
    r: &SecretRef,
    found: Option<&BTreeMap<String, ByteString>>,
) -> Option<Failure> {
    // The gate's Secret (no key required) is not mounted: without it the gate cannot
    // be asked; without the others no new agent pod can start.
    let consequence = match r.key {
        None => "the gate's cluster cannot be asked",
        Some(_) => "no new agent pod can start",
    };
    let problem = match (found, &r.key) {
        (None, _) => "not found".to_string(),
        (Some(data), Some(key)) if !data.contains_key(key) => format!("has no key {key}"),
        _ => return None,
    };
    Some(Failure::new(
        FailureReason::SecretMissing,
        format!(
            "Secret {namespace}/{} ({}) {problem}: {consequence}",
            r.name, r.field
        ),
    ))
}

/// What the controller saw in the cluster for one LogPipeline.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub generation: Option<i64>,
    /// `status.desiredNumberScheduled` of the DaemonSet (0 before its first status).
    pub desired_nodes: i32,
    pub pods: Vec<PodView>,
    pub target_revision: String,
    /// Release of the target revision (see `desired::release`).
    pub release: String,
    pub config_map: String,
    pub paused: bool,
    /// A reconcile failure to report (see the module doc).
    pub failure: Option<Failure>,
}

/// What the rollout engine decided, to be recorded.
#[derive(Clone, Debug, Default)]
pub struct Rollout {
    pub state: State,
    pub message: String,
    /// A new verification result (the previous one is kept otherwise).
    pub verification: Option<Verification>,
    pub gate: Option<GateStatus>,
}

/// The rollout engine's memory, read back from the status (an operator restart resumes
/// from here). Unparsable timestamps read as absent: the step restarts its clock.
pub fn rollout_state(status: Option<&LogPipelineStatus>) -> State {
    let Some(s) = status else {
        return State::default();
    };
    let time = |t: &Option<String>| t.as_deref().and_then(|t| t.parse::<Timestamp>().ok());
    State {
        phase: s.phase,
        target: s.target_revision.clone(),
        stable: s.stable_revision.clone(),
        step: s.current_step.and_then(|i| usize::try_from(i).ok()),
        step_started: time(&s.step_started_at),
        window_started: time(&s.window_started_at),
        failed: s.failed_revision.clone(),
        reason: s.rollback_reason.clone(),
        cause: s.rollback_cause,
        stream_baseline: s.stream_baseline.clone(),
    }
}

fn rfc3339(t: Option<Timestamp>) -> Option<String> {
    // Whole seconds: the status stays byte-identical between reconciles of one step.
    t.and_then(|t| Timestamp::from_second(t.as_second()).ok())
        .map(|t| t.to_string())
}

pub fn compute(
    old: Option<&LogPipelineStatus>,
    observed: &Observed,
    rollout: Option<&Rollout>,
    now: &Time,
) -> LogPipelineStatus {
    let target = observed.target_revision.as_str();
    let on_target = |p: &&PodView| !p.terminating && p.revision.as_deref() == Some(target);
    // Without a rollout decision (a reconcile failure), the rollout fields and the node
    // counts stay as they were.
    let (updated, ready) = match (rollout, old) {
        (None, Some(o)) => (o.updated_nodes, o.ready_nodes),
        _ => (
            count(observed.pods.iter().filter(on_target)),
            count(observed.pods.iter().filter(on_target).filter(|p| p.ready)),
        ),
    };
    let desired = observed.desired_nodes;
    let complete = updated == desired && ready == desired;

    let state = match rollout {
        Some(r) => r.state.clone(),
        None => rollout_state(old),
    };
    // A failure never moves the phase: it is the rollout engine's memory.
    let phase = state.phase.unwrap_or(Phase::Pending);
    let message = match (&observed.failure, rollout) {
        (Some(f), _) => f.line(),
        (None, Some(r)) => r.message.clone(),
        (None, None) => old.and_then(|s| s.message.clone()).unwrap_or_default(),
    };
    let rolled_back = matches!(phase, Phase::Degraded | Phase::RollingBack);
    // Degraded without a rollback: the stable revision's agents fail where they run.
    let failing = state.settled_failure();
    let verification = rollout
        .and_then(|r| r.verification.clone())
        .or_else(|| old.and_then(|s| s.last_verification.clone()));

    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let generation = observed.generation;
    let cond = |type_: &str, status: bool, reason: &str, message: &str| {
        condition(
            old_conditions,
            type_,
            status,
            reason,
            message,
            generation,
            now,
        )
    };
    let moving = matches!(
        phase,
        Phase::Canary | Phase::Step | Phase::Soak | Phase::Progressing | Phase::RollingBack
    );
    let conditions = vec![
        match &observed.failure {
            Some(f) => cond("Ready", false, f.reason.as_str(), &f.message),
            None => cond(
                "Ready",
                complete && !rolled_back,
                if complete && !rolled_back {
                    "AllNodesReady"
                } else if failing {
                    AGENTS_FAILING
                } else if rolled_back {
                    "RolledBack"
                } else {
                    "NodesNotReady"
                },
                &format!("{ready}/{desired} agents ready at the target revision"),
            ),
        },
        cond(
            "Progressing",
            moving,
            match phase {
                Phase::Healthy => "RolloutComplete",
                Phase::Paused => "RolloutPaused",
                Phase::Pending => "HeldByGate",
                Phase::RollingBack => "RollingBack",
                Phase::Degraded if failing => AGENTS_FAILING,
                Phase::Degraded => "RolledBack",
                _ => "NodesMoving",
            },
            &format!("{updated}/{desired} nodes at revision {target}"),
        ),
        match &verification {
            Some(v) => cond(
                "Verified",
                v.passed,
                if v.passed {
                    "ChecksPassed"
                } else {
                    "ChecksFailed"
                },
                &verification_summary(v),
            ),
            None => cond("Verified", false, "NotVerified", "no verification yet"),
        },
        match (&observed.failure, rolled_back) {
            (Some(f), _) => cond("Degraded", true, f.reason.as_str(), &f.message),
            (None, true) => cond(
                "Degraded",
                true,
                if failing {
                    AGENTS_FAILING
                } else {
                    state
                        .cause
                        .unwrap_or(RollbackCause::VerificationFailed)
                        .reason()
                },
                state.reason.as_deref().unwrap_or("rolled back"),
            ),
            (None, false) => cond(
                "Degraded",
                false,
                "AsExpected",
                "the cluster matches the spec",
            ),
        },
    ];

    let release = observed.release.clone();
    let old_release = old.and_then(|s| s.release.clone());
    let healthy = phase == Phase::Healthy && observed.failure.is_none();
    let stable_release = if healthy {
        Some(release.clone())
    } else {
        old.and_then(|s| s.stable_release.clone())
    };
    // Continuously Healthy at this release since: kept across reconciles, reset when the
    // release changes or the LogPipeline leaves Healthy.
    let healthy_since = if healthy {
        old.filter(|s| s.phase == Some(Phase::Healthy) && old_release.as_deref() == Some(&release))
            .and_then(|s| s.healthy_since.clone())
            .or_else(|| Some(now.0.to_string()))
    } else {
        None
    };

    LogPipelineStatus {
        observed_generation: generation,
        conditions,
        phase: Some(phase),
        desired_nodes: desired,
        updated_nodes: updated,
        ready_nodes: ready,
        ready: Some(format!("{ready}/{desired}")),
        stable_revision: state.stable.clone(),
        target_revision: Some(target.to_string()),
        config_map: Some(observed.config_map.clone()),
        release: (!release.is_empty()).then_some(release),
        stable_release,
        current_step: state.step.and_then(|i| i32::try_from(i).ok()),
        step_started_at: rfc3339(state.step_started),
        window_started_at: rfc3339(state.window_started),
        failed_revision: state.failed.clone(),
        rollback_reason: state.reason.clone(),
        rollback_cause: state.cause,
        healthy_since,
        gate: match rollout {
            Some(r) => r.gate.clone(),
            None => old.and_then(|s| s.gate.clone()),
        },
        last_verification: verification,
        stream_baseline: state.stream_baseline.clone(),
        // Set by the caller from `overlap` (a cluster-wide observation, not this rollout's).
        overlapping_pods: old.and_then(|s| s.overlapping_pods),
        overlaps_with: old.map(|s| s.overlaps_with.clone()).unwrap_or_default(),
        message: Some(message),
    }
}

/// `podsReady 1/1, droppedEntries 12 (limit 0) FAILED, ...` for conditions and Events.
pub fn verification_summary(v: &Verification) -> String {
    v.checks
        .iter()
        .map(|c| {
            let mut s = format!("{} {}", c.name, c.value.as_deref().unwrap_or("-"));
            if let Some(limit) = &c.limit {
                s.push_str(&format!(" (limit {limit})"));
            }
            if !c.passed {
                s.push_str(" FAILED");
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn count<I: Iterator>(iter: I) -> i32 {
    i32::try_from(iter.count()).unwrap_or(i32::MAX)
}

fn condition(
    old: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, revision: &str, ready: bool) -> PodView {
        PodView {
            name: name.into(),
            revision: Some(revision.into()),
            ready,
            ..Default::default()
        }
    }

    fn observed(pods: Vec<PodView>, desired: i32) -> Observed {
        Observed {
            generation: Some(2),
            desired_nodes: desired,
            pods,
            target_revision: "r2".into(),
            release: "rel2".into(),
            config_map: "lp-config-abc".into(),
            paused: false,
            failure: None,
        }
    }

    fn rollout(phase: Phase, stable: &str) -> Rollout {
        Rollout {
            state: State {
                phase: Some(phase),
                target: Some("r2".into()),
                stable: Some(stable.into()),
                step: Some(1),
                step_started: Some(Timestamp::from_second(100).unwrap()),
                ..Default::default()
            },
            message: "m".into(),
            ..Default::default()
        }
    }

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    fn get<'a>(status: &'a LogPipelineStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn healthy_is_ready_and_records_release_and_since() {
        let s = compute(
            None,
            &observed((0..5).map(|i| pod(&i.to_string(), "r2", true)).collect(), 5),
            Some(&rollout(Phase::Healthy, "r2")),
            &at(1),
        );
        assert_eq!(s.phase, Some(Phase::Healthy));
        assert_eq!(s.ready.as_deref(), Some("5/5"));
        assert_eq!(get(&s, "Ready").status, "True");
        assert_eq!(get(&s, "Progressing").status, "False");
        assert_eq!(s.stable_revision.as_deref(), Some("r2"));
        assert_eq!(s.stable_release.as_deref(), Some("rel2"));
        assert_eq!(s.healthy_since.as_deref(), Some("1970-01-01T00:00:01Z"));
        assert_eq!(s.observed_generation, Some(2));
        // Still Healthy later: same since.
        let later = compute(
            Some(&s),
            &observed((0..5).map(|i| pod(&i.to_string(), "r2", true)).collect(), 5),
            Some(&rollout(Phase::Healthy, "r2")),
            &at(50),
        );
        assert_eq!(later.healthy_since, s.healthy_since);
    }

    #[test]
    fn a_step_is_progressing_and_keeps_the_old_stable() {
        let s = compute(
            None,
            &observed(vec![pod("a", "r1", true), pod("b", "r2", false)], 2),
            Some(&rollout(Phase::Step, "r1")),
            &at(1),
        );
        assert_eq!(s.phase, Some(Phase::Step));
        assert_eq!((s.updated_nodes, s.ready_nodes), (1, 0));
        assert_eq!(get(&s, "Ready").status, "False");
        assert_eq!(get(&s, "Progressing").status, "True");
        assert_eq!(s.stable_revision.as_deref(), Some("r1"));
        assert_eq!(s.current_step, Some(1));
        assert_eq!(s.step_started_at.as_deref(), Some("1970-01-01T00:01:40Z"));
        assert_eq!(s.healthy_since, None);
    }

    #[test]
    fn rolled_back_is_degraded_with_the_reason() {
        let mut r = rollout(Phase::Degraded, "r1");
        r.state.reason = Some("canary failed verification: droppedEntries 3".into());
        let s = compute(
            None,
            &observed(vec![pod("a", "r1", true)], 1),
            Some(&r),
            &at(1),
        );
        assert_eq!(get(&s, "Degraded").status, "True");
        assert_eq!(get(&s, "Degraded").reason, "VerificationFailed");
        assert!(get(&s, "Degraded").message.contains("droppedEntries 3"));
        assert_eq!(get(&s, "Ready").reason, "RolledBack");
    }

    #[test]
    fn a_settled_revision_failing_is_degraded_agents_failing_not_rolled_back() {
        let mut r = rollout(Phase::Degraded, "r2");
        r.state.failed = Some("r2".into());
        r.state.reason = Some("agents failing at the stable revision on 1/2 nodes: ...".into());
        let s = compute(
            None,
            &observed(vec![pod("a", "r2", true), pod("b", "r2", false)], 2),
            Some(&r),
            &at(1),
        );
        for type_ in ["Ready", "Progressing", "Degraded"] {
            assert_eq!(get(&s, type_).reason, AGENTS_FAILING, "{type_}");
        }
        assert_eq!(get(&s, "Degraded").status, "True");
        assert!(get(&s, "Degraded").message.contains("1/2 nodes"));
        assert_eq!(s.stable_revision.as_deref(), Some("r2"));
        assert_eq!(s.failed_revision.as_deref(), Some("r2"));
        assert_eq!(
            s.healthy_since, None,
            "a gate downstream no longer vouches for it"
        );
    }

    #[test]
    fn the_state_round_trips_through_the_status() {
        let mut r = rollout(Phase::Canary, "r1");
        r.state.window_started = Some(Timestamp::from_second(130).unwrap());
        r.state.failed = Some("r0".into());
        let s = compute(None, &observed(vec![], 0), Some(&r), &at(1));
        assert_eq!(rollout_state(Some(&s)), r.state);
    }

    /// The rollback's cause is typed: the condition's reason comes from it, whatever the
    /// words (a gate's abort says "stopped by"), and reads back from the status.
    #[test]
    fn the_rollback_cause_is_typed_and_round_trips() {
        for cause in RollbackCause::ALL {
            let mut r = rollout(Phase::RollingBack, "r1");
            r.state.failed = Some("r2".into());
            r.state.reason = Some("stopped by the gate: ops turned Degraded".into());
            r.state.cause = Some(cause);
            let s = compute(None, &observed(vec![], 0), Some(&r), &at(1));
            assert_eq!(get(&s, "Degraded").reason, cause.reason(), "{cause:?}");
            assert_eq!(rollout_state(Some(&s)).cause, Some(cause), "{cause:?}");
        }
    }

    /// Each failure, on top of a pipeline a previous revision left Degraded (the report
    /// that found this: a refused DaemonSet kept showing the old revision's message).
    #[test]
    fn every_failure_is_in_the_status_table() {
        let mut rolled = rollout(Phase::Degraded, "r1");
        rolled.state.reason = Some("canary failed verification: droppedEntries 3".into());
        rolled.state.cause = Some(RollbackCause::VerificationFailed);
        let before = compute(
            None,
            &observed(vec![pod("a", "r1", true)], 1),
            Some(&rolled),
            &at(1),
        );
        let cases = [
            (
                FailureReason::InvalidSpec,
                "pipeline stage 2: regex: missing ]",
            ),
            (
                FailureReason::ApplyFailed,
                "the API server refused DaemonSet lp: spec.template.spec.tolerations[0].operator: Unsupported value: \"Exsts\"",
            ),
            (
                FailureReason::SecretMissing,
                "Secret logging/loki (auth.bearerTokenSecretRef) not found",
            ),
            (
                FailureReason::StoreUnreachable,
                "canary: holding at revision r2: every check passed but the store cannot be asked: VictoriaLogs query: connection refused",
            ),
        ];
        for (reason, message) in cases {
            let name = reason.as_str();
            let mut o = observed(vec![], 1);
            o.generation = Some(3);
            o.target_revision = "r2".into();
            o.failure = Some(Failure::new(reason, message));
            let s = compute(Some(&before), &o, None, &at(9));
            assert_eq!(s.observed_generation, Some(3), "{name}");
            assert_eq!(get(&s, "Ready").status, "False", "{name}");
            assert_eq!(get(&s, "Ready").reason, name);
            assert_eq!(get(&s, "Ready").message, message, "{name}");
            assert_eq!(get(&s, "Ready").observed_generation, Some(3), "{name}");
            assert_eq!(get(&s, "Degraded").reason, name);
            assert_eq!(s.message, Some(format!("{name}: {message}")));
            // The rollout's memory is untouched: the next reconcile starts the new
            // revision over instead of resuming the old one's rollback.
            assert_eq!(
                rollout_state(Some(&s)),
                rollout_state(Some(&before)),
                "{name}"
            );
            assert_eq!(s.phase, before.phase, "{name}");
            assert_eq!(
                (s.desired_nodes, s.updated_nodes, s.ready_nodes),
                (
                    before.desired_nodes,
                    before.updated_nodes,
                    before.ready_nodes
                ),
                "{name}"
            );
            // The same failure again: the same status (no write, no Event).
            assert_eq!(compute(Some(&s), &o, None, &at(20)), s, "{name}");
        }
    }

    #[test]
    fn a_failure_beside_a_decision_keeps_the_decision() {
        let mut o = observed(vec![pod("a", "r2", true)], 1);
        o.failure = Some(Failure::new(FailureReason::SecretMissing, "no gate Secret"));
        let s = compute(None, &o, Some(&rollout(Phase::Pending, "r1")), &at(1));
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(get(&s, "Ready").reason, "SecretMissing");
        assert_eq!(s.message.as_deref(), Some("SecretMissing: no gate Secret"));
        o.failure = None;
        let fixed = compute(Some(&s), &o, Some(&rollout(Phase::Pending, "r1")), &at(2));
        assert_eq!(fixed.message.as_deref(), Some("m"));
        assert_eq!(get(&fixed, "Degraded").status, "False");
    }

    fn api(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            reason: reason.into(),
            message: message.into(),
            ..kube::core::Status::failure(message, reason)
        }))
    }

    #[test]
    fn apply_errors_map_to_the_api_message_table() {
        let invalid = "DaemonSet.apps \"lp\" is invalid: spec.template.spec.tolerations[0].operator: Unsupported value: \"Exsts\": supported values: \"Equal\", \"Exists\"";
        let cases = [
            (
                "refused apply: the object and the API's words",
                ApplyError::Apply {
                    kind: "DaemonSet",
                    name: "lp".into(),
                    source: api(422, "Invalid", invalid),
                },
                format!("the API server refused DaemonSet lp: {invalid}"),
            ),
            (
                "an answer with no message",
                ApplyError::Apply {
                    kind: "ConfigMap",
                    name: "lp-config-1".into(),
                    source: api(409, "Conflict", ""),
                },
                "the API server refused ConfigMap lp-config-1: Conflict (409)".into(),
            ),
            (
                "no answer at all",
                ApplyError::Apply {
                    kind: "Service",
                    name: "lp".into(),
                    source: kube::Error::LinesCodecMaxLineLengthExceeded,
                },
                "cannot apply Service lp: Error finding newline character".into(),
            ),
            (
                "another API call",
                ApplyError::Api {
                    action: "delete the disabled ServiceMonitor",
                    source: api(403, "Forbidden", "servicemonitors is forbidden"),
                },
                "cannot delete the disabled ServiceMonitor: servicemonitors is forbidden".into(),
            ),
        ];
        for (name, error, message) in cases {
            let f = Failure::of_apply(&error);
            assert_eq!(f.reason, FailureReason::ApplyFailed, "{name}");
            assert_eq!(f.message, message, "{name}");
            assert!(
                !f.message.contains("ErrorResponse"),
                "{name}: no debug dump"
            );
        }
    }

    #[test]
    fn reasons_round_trip_through_conditions() {
        for r in FailureReason::ALL {
            assert_eq!(FailureReason::of_condition(r.as_str()), Some(r));
        }
        assert_eq!(FailureReason::of_condition("AllNodesReady"), None);
    }

    #[test]
    fn missing_secrets_table() {
        use crate::crd::{AuthSpec, KeyRef};
        let mut spec: LogPipelineSpec =
            serde_json::from_value(serde_json::json!({"tenant": "ops", "endpoint": "http://127.0.0.1:3100/loki/api/v1/push"}))
                .unwrap();
        spec.auth = Some(AuthSpec {
            basic: None,
            bearer_token_secret_ref: Some(KeyRef {
                name: "loki".into(),
                key: "token".into(),
            }),
        });
        let refs = secret_refs(&spec, false);
        assert_eq!(refs.len(), 1);
        let data = |keys: &[&str]| -> BTreeMap<String, ByteString> {
            keys.iter()
                .map(|k| (k.to_string(), ByteString(b"x".to_vec())))
                .collect()
        };
        let gate = SecretRef {
            field: "rollout.gate.clusterSecretRef",
            name: "ops".into(),
            key: None,
        };
        type Case<'a> = (
            &'a str,
            &'a SecretRef,
            Option<BTreeMap<String, ByteString>>,
            Option<&'a str>,
        );
        let cases: [Case; 5] = [
            ("present", &refs[0], Some(data(&["token"])), None),
            (
                "absent",
                &refs[0],
                None,
                Some(
                    "Secret logging/loki (auth.bearerTokenSecretRef) not found: no new agent pod can start",
                ),
            ),
            (
                "no such key",
                &refs[0],
                Some(data(&["password"])),
                Some(
                    "Secret logging/loki (auth.bearerTokenSecretRef) has no key token: no new agent pod can start",
                ),
            ),
            (
                "gate Secret, any key",
                &gate,
                Some(data(&["server", "config"])),
                None,
            ),
            (
                "gate Secret absent",
                &gate,
                None,
                Some(
                    "Secret logging/ops (rollout.gate.clusterSecretRef) not found: the gate's cluster cannot be asked",
                ),
            ),
        ];
        for (name, r, found, says) in cases {
            let f = secret_failure("logging", r, found.as_ref());
            assert_eq!(f.as_ref().map(|f| f.message.as_str()), says, "{name}");
            assert!(f.is_none_or(|f| f.reason == FailureReason::SecretMissing));
        }
    }

    /// Regression: a new transition time on every reconcile would be a status write on
    /// every reconcile, forever.
    #[test]
    fn unchanged_observation_gives_an_identical_status() {
        let o = observed(vec![pod("a", "r2", true)], 1);
        let r = rollout(Phase::Healthy, "r2");
        let first = compute(None, &o, Some(&r), &at(1));
        let second = compute(Some(&first), &o, Some(&r), &at(500));
        assert_eq!(first, second);
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let r = rollout(Phase::Healthy, "r2");
        let first = compute(
            None,
            &observed(vec![pod("a", "r2", false)], 1),
            Some(&r),
            &at(1),
        );
        let second = compute(
            Some(&first),
            &observed(vec![pod("a", "r2", true)], 1),
            Some(&r),
            &at(9),
        );
        assert_eq!(get(&second, "Ready").last_transition_time, at(9));
        assert_eq!(get(&second, "Degraded").last_transition_time, at(1));
    }
}
