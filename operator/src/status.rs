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
//!   message with the numbers).
//!
//! A condition keeps its `lastTransitionTime` while its status does not change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{GateStatus, LogPipelineStatus, Phase, Verification};
use crate::rollout::{PodView, State};

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
    /// A reconcile failure to report: (reason in PascalCase, message).
    pub failure: Option<(String, String)>,
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
    let updated = count(observed.pods.iter().filter(on_target));
    let ready = count(observed.pods.iter().filter(on_target).filter(|p| p.ready));
    let desired = observed.desired_nodes;
    let complete = updated == desired && ready == desired;

    // Without a rollout decision (a reconcile failure), the rollout fields stay as they were.
    let state = match rollout {
        Some(r) => r.state.clone(),
        None => rollout_state(old),
    };
    let (phase, message) = match (&observed.failure, rollout) {
        (Some((_, message)), _) => (Phase::Degraded, message.clone()),
        (None, Some(r)) => (state.phase.unwrap_or(Phase::Pending), r.message.clone()),
        (None, None) => (
            old.and_then(|s| s.phase).unwrap_or(Phase::Pending),
            old.and_then(|s| s.message.clone()).unwrap_or_default(),
        ),
    };
    let rolled_back = matches!(phase, Phase::Degraded | Phase::RollingBack);
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
        cond(
            "Ready",
            complete && !rolled_back,
            if complete && !rolled_back {
                "AllNodesReady"
            } else if rolled_back {
                "RolledBack"
            } else {
                "NodesNotReady"
            },
            &format!("{ready}/{desired} agents ready at the target revision"),
        ),
        cond(
            "Progressing",
            moving,
            match phase {
                Phase::Healthy => "RolloutComplete",
                Phase::Paused => "RolloutPaused",
                Phase::Pending => "HeldByGate",
                Phase::RollingBack => "RollingBack",
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
            (Some((reason, message)), _) => cond("Degraded", true, reason, message),
            (None, true) => cond(
                "Degraded",
                true,
                if state
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("aborted"))
                {
                    "Aborted"
                } else {
                    "VerificationFailed"
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
        healthy_since,
        gate: match rollout {
            Some(r) => r.gate.clone(),
            None => old.and_then(|s| s.gate.clone()),
        },
        last_verification: verification,
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
    fn the_state_round_trips_through_the_status() {
        let mut r = rollout(Phase::Canary, "r1");
        r.state.window_started = Some(Timestamp::from_second(130).unwrap());
        r.state.failed = Some("r0".into());
        let s = compute(None, &observed(vec![], 0), Some(&r), &at(1));
        assert_eq!(rollout_state(Some(&s)), r.state);
    }

    #[test]
    fn failure_is_degraded_with_its_reason() {
        let mut o = observed(vec![], 0);
        o.failure = Some(("ApplyFailed".into(), "cannot apply DaemonSet".into()));
        let s = compute(None, &o, None, &at(1));
        assert_eq!(s.phase, Some(Phase::Degraded));
        assert_eq!(get(&s, "Degraded").reason, "ApplyFailed");
        assert_eq!(get(&s, "Ready").status, "False");
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
