//! Status: a pure function of what was observed. The controller patches it only when the
//! result differs from the stored status, so a quiet cluster sees no status writes.
//!
//! Conditions (standard `metav1.Condition`):
//! - `Ready`: every desired node runs the target revision and its agent is Ready;
//! - `Progressing`: nodes are still moving to the target revision (or the spec is not
//!   applied yet);
//! - `Degraded`: the operator cannot make the cluster match the spec (reason and message
//!   say why).
//!
//! A condition keeps its `lastTransitionTime` while its status does not change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{LogPipelineStatus, Phase};
use crate::rollout::PodView;

/// What the controller saw in the cluster for one LogPipeline.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub generation: Option<i64>,
    /// `status.desiredNumberScheduled` of the DaemonSet (0 before its first status).
    pub desired_nodes: i32,
    pub pods: Vec<PodView>,
    pub target_revision: String,
    pub config_map: String,
    pub paused: bool,
    /// A reconcile failure to report: (reason in PascalCase, message).
    pub failure: Option<(String, String)>,
}

pub fn compute(
    old: Option<&LogPipelineStatus>,
    observed: &Observed,
    now: &Time,
) -> LogPipelineStatus {
    let target = observed.target_revision.as_str();
    let on_target = |p: &&PodView| !p.terminating && p.revision.as_deref() == Some(target);
    let updated = count(observed.pods.iter().filter(on_target));
    let ready = count(observed.pods.iter().filter(on_target).filter(|p| p.ready));
    let desired = observed.desired_nodes;
    let complete = updated == desired && ready == desired;

    let (phase, message) = match &observed.failure {
        Some((_, message)) => (Phase::Degraded, message.clone()),
        None if complete && desired == 0 => (
            Phase::Healthy,
            "no node matches the agent's scheduling constraints".to_string(),
        ),
        None if complete => (
            Phase::Healthy,
            format!("{ready}/{desired} agents ready at revision {target}"),
        ),
        None if observed.paused => (
            Phase::Paused,
            format!("rollout paused: {updated}/{desired} nodes at revision {target}"),
        ),
        None => (
            Phase::Progressing,
            format!("{updated}/{desired} nodes at revision {target}, {ready} ready"),
        ),
    };

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
    let conditions = vec![
        cond(
            "Ready",
            complete && observed.failure.is_none(),
            if complete {
                "AllNodesReady"
            } else {
                "NodesNotReady"
            },
            &format!("{ready}/{desired} agents ready at the target revision"),
        ),
        cond(
            "Progressing",
            !complete && !observed.paused,
            if complete {
                "RolloutComplete"
            } else if observed.paused {
                "RolloutPaused"
            } else {
                "NodesMoving"
            },
            &format!("{updated}/{desired} nodes at revision {target}"),
        ),
        match &observed.failure {
            Some((reason, message)) => cond("Degraded", true, reason, message),
            None => cond(
                "Degraded",
                false,
                "AsExpected",
                "the cluster matches the spec",
            ),
        },
    ];

    // Stable is the last revision seen complete and healthy; the rollout engine uses it
    // to roll back.
    let stable_revision = if complete && observed.failure.is_none() {
        Some(target.to_string())
    } else {
        old.and_then(|s| s.stable_revision.clone())
    };

    LogPipelineStatus {
        observed_generation: generation,
        conditions,
        phase: Some(phase),
        desired_nodes: desired,
        updated_nodes: updated,
        ready_nodes: ready,
        ready: Some(format!("{ready}/{desired}")),
        stable_revision,
        target_revision: Some(target.to_string()),
        config_map: Some(observed.config_map.clone()),
        current_step: old.and_then(|s| s.current_step),
        last_verification: old.and_then(|s| s.last_verification.clone()),
        message: Some(message),
    }
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
    use k8s_openapi::jiff::Timestamp;

    fn pod(name: &str, revision: &str, ready: bool) -> PodView {
        PodView {
            name: name.into(),
            node: None,
            revision: Some(revision.into()),
            ready,
            terminating: false,
        }
    }

    fn observed(pods: Vec<PodView>, desired: i32) -> Observed {
        Observed {
            generation: Some(2),
            desired_nodes: desired,
            pods,
            target_revision: "r2".into(),
            config_map: "lp-config-abc".into(),
            paused: false,
            failure: None,
        }
    }

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    fn get<'a>(status: &'a LogPipelineStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn all_ready_is_healthy_and_stable() {
        let s = compute(
            None,
            &observed((0..5).map(|i| pod(&i.to_string(), "r2", true)).collect(), 5),
            &at(1),
        );
        assert_eq!(s.phase, Some(Phase::Healthy));
        assert_eq!(s.ready.as_deref(), Some("5/5"));
        assert_eq!(get(&s, "Ready").status, "True");
        assert_eq!(get(&s, "Progressing").status, "False");
        assert_eq!(s.stable_revision.as_deref(), Some("r2"));
        assert_eq!(s.observed_generation, Some(2));
    }

    #[test]
    fn moving_nodes_is_progressing_and_keeps_the_old_stable() {
        let old = LogPipelineStatus {
            stable_revision: Some("r1".into()),
            ..Default::default()
        };
        let s = compute(
            Some(&old),
            &observed(vec![pod("a", "r1", true), pod("b", "r2", false)], 2),
            &at(1),
        );
        assert_eq!(s.phase, Some(Phase::Progressing));
        assert_eq!((s.updated_nodes, s.ready_nodes), (1, 0));
        assert_eq!(get(&s, "Ready").status, "False");
        assert_eq!(s.stable_revision.as_deref(), Some("r1"));
    }

    #[test]
    fn failure_is_degraded_with_its_reason() {
        let mut o = observed(vec![], 0);
        o.failure = Some(("ApplyFailed".into(), "cannot apply DaemonSet".into()));
        let s = compute(None, &o, &at(1));
        assert_eq!(s.phase, Some(Phase::Degraded));
        assert_eq!(get(&s, "Degraded").reason, "ApplyFailed");
        assert_eq!(get(&s, "Ready").status, "False");
    }

    /// Regression: a new transition time on every reconcile would be a status write on
    /// every reconcile, forever.
    #[test]
    fn unchanged_observation_gives_an_identical_status() {
        let o = observed(vec![pod("a", "r2", true)], 1);
        let first = compute(None, &o, &at(1));
        let second = compute(Some(&first), &o, &at(500));
        assert_eq!(first, second);
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let first = compute(None, &observed(vec![pod("a", "r2", false)], 1), &at(1));
        let second = compute(
            Some(&first),
            &observed(vec![pod("a", "r2", true)], 1),
            &at(9),
        );
        assert_eq!(get(&second, "Ready").last_transition_time, at(9));
        assert_eq!(get(&second, "Degraded").last_transition_time, at(1));
    }
}
