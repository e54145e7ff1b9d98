//! Kubernetes Events on meaningful transitions only (never one per reconcile): decided by a
//! pure function of the old and new status, published through kube's Recorder.
//!
//! A reconcile failure (`status::FailureReason` on the Ready condition) is one Warning
//! Event named by its reason when it appears or its message changes; the same failure
//! reconcile after reconcile is no new Event.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};

use crate::crd::{LogPipeline, LogPipelineStatus, Phase};
use crate::status::FailureReason;

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

pub fn transitions(old: Option<&LogPipelineStatus>, new: &LogPipelineStatus) -> Vec<Transition> {
    let mut out = Vec::new();
    let old_target = old.and_then(|s| s.target_revision.as_deref());
    if let Some(target) = new.target_revision.as_deref()
        && old_target != Some(target)
    {
        {
            out.push(Transition {
                warning: false,
                reason: "NewRevision",
                note: format!(
                    "revision {target} (config {})",
                    new.config_map.as_deref().unwrap_or("?")
                ),
            });
        }
    }
    let ready = |s: &LogPipelineStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    if let Some((reason, message)) = ready(new)
        && let Some(failure) = FailureReason::of_condition(&reason)
        && old.and_then(ready) != Some((reason, message.clone()))
    {
        out.push(Transition {
            warning: true,
            reason: failure.as_str(),
            note: message,
        });
    }
    let old_phase = old.and_then(|s| s.phase);
    let old_step = old.and_then(|s| s.current_step);
    let stepped = new.phase != old_phase || new.current_step != old_step;
    if stepped && matches!(new.phase, Some(Phase::Canary | Phase::Step | Phase::Soak)) {
        out.push(Transition {
            warning: false,
            reason: "StepStarted",
            note: new.message.clone().unwrap_or_default(),
        });
    }
    if new.phase != old_phase {
        match new.phase {
            Some(Phase::Pending) => out.push(Transition {
                warning: false,
                reason: "HeldByGate",
                note: new.message.clone().unwrap_or_default(),
            }),
            Some(Phase::RollingBack) => out.push(Transition {
                warning: true,
                reason: "RollingBack",
                note: new.rollback_reason.clone().unwrap_or_default(),
            }),
            Some(Phase::Healthy) => out.push(Transition {
                warning: false,
                reason: "RolloutComplete",
                note: new.message.clone().unwrap_or_default(),
            }),
            Some(Phase::Degraded) => out.push(Transition {
                warning: true,
                reason: "Degraded",
                note: new.message.clone().unwrap_or_default(),
            }),
            _ => {}
        }
    }
    out
}

pub async fn publish(recorder: &Recorder, lp: &LogPipeline, transition: &Transition) {
    let event = Event {
        type_: if transition.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: transition.reason.into(),
        note: Some(transition.note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    // An Event that cannot be written is logged, never a reconcile failure.
    if let Err(error) = recorder.publish(&event, &lp.object_ref(&())).await {
        tracing::warn!(%error, reason = transition.reason, "cannot publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: Phase, target: &str) -> LogPipelineStatus {
        LogPipelineStatus {
            phase: Some(phase),
            target_revision: Some(target.into()),
            ..Default::default()
        }
    }

    #[test]
    fn table() {
        let reasons = |old: Option<&LogPipelineStatus>, new: &LogPipelineStatus| {
            transitions(old, new)
                .into_iter()
                .map(|t| t.reason)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            reasons(None, &status(Phase::Progressing, "a")),
            ["NewRevision"]
        );
        let healthy = status(Phase::Healthy, "a");
        assert_eq!(
            reasons(Some(&status(Phase::Progressing, "a")), &healthy),
            ["RolloutComplete"]
        );
        assert!(
            reasons(Some(&healthy), &healthy).is_empty(),
            "no event when nothing changed"
        );
        assert_eq!(
            reasons(Some(&healthy), &status(Phase::Progressing, "b")),
            ["NewRevision"]
        );
        assert_eq!(
            reasons(Some(&healthy), &status(Phase::Degraded, "a")),
            ["Degraded"]
        );
        assert_eq!(
            reasons(Some(&healthy), &status(Phase::Canary, "b")),
            ["NewRevision", "StepStarted"]
        );
        let mut step1 = status(Phase::Step, "b");
        step1.current_step = Some(1);
        let mut step2 = step1.clone();
        step2.current_step = Some(2);
        assert_eq!(reasons(Some(&step1), &step2), ["StepStarted"]);
        assert_eq!(
            reasons(Some(&step1), &status(Phase::RollingBack, "b")),
            ["RollingBack"]
        );
        assert_eq!(
            reasons(Some(&healthy), &status(Phase::Pending, "b")),
            ["NewRevision", "HeldByGate"]
        );
    }

    fn failing(reason: &str, message: &str) -> LogPipelineStatus {
        let mut s = status(Phase::Healthy, "a");
        s.conditions
            .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation: None,
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
            });
        s
    }

    #[test]
    fn a_failure_is_one_event_until_it_changes() {
        let healthy = status(Phase::Healthy, "a");
        let refused = failing("ApplyFailed", "the API server refused DaemonSet lp: x");
        let cases: [(&str, &LogPipelineStatus, &LogPipelineStatus, Vec<&str>); 5] = [
            ("appears", &healthy, &refused, vec!["ApplyFailed"]),
            ("the same again", &refused, &refused, vec![]),
            (
                "another message",
                &refused,
                &failing("ApplyFailed", "the API server refused DaemonSet lp: y"),
                vec!["ApplyFailed"],
            ),
            (
                "another reason",
                &refused,
                &failing("SecretMissing", "Secret logging/loki not found"),
                vec!["SecretMissing"],
            ),
            (
                "not one of ours",
                &healthy,
                &failing("NodesNotReady", "0/1"),
                vec![],
            ),
        ];
        for (name, old, new, want) in cases {
            let got: Vec<&str> = transitions(Some(old), new)
                .iter()
                .map(|t| t.reason)
                .collect();
            assert_eq!(got, want, "{name}");
        }
        assert!(transitions(Some(&healthy), &refused)[0].warning);
    }
}
