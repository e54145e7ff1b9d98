//! The writes of one reconcile, decided from what it saw: a pure function of the desired
//! objects, the stable snapshot, the rollout decision and the cached pods and ConfigMaps.
//!
//! # Flow
//! `controller::reconcile_live` observes (caches, gate, verification), asks
//! `rollout::step` for a [`rollout::Decision`], then [`writes`] turns that decision into
//! [`Writes`], which it executes in this order: apply (with [`Writes::daemon_set`]), delete
//! [`Writes::delete_pods`] (bounded concurrency), save [`Writes::save_stable`], clear the
//! annotations, delete [`Writes::delete_config_maps`], write the status.
//!
//! # Guarantees
//! - The DaemonSet carries the target's template, or the saved stable one when the engine
//!   chose it and a snapshot exists, or nothing (held before any stable revision).
//! - A ConfigMap is deleted only when it is not the current config, not the stable one (the
//!   one being saved, else the saved one), and mounted by no pod in the cache.
//!
//! # Caveats
//! - The rest of the reconcile's glue (gate stage, verification inputs, status inputs)
//!   still lives in `controller`; moving it here is issue 15's remaining step.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;

use crate::apply::{self, StableSnapshot};
use crate::desired::{Key, Objects};
use crate::rollout::{self, Template};

/// Everything one reconcile writes besides the status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Writes {
    /// The DaemonSet to apply; `None`: leave whatever runs alone.
    pub daemon_set: Option<DaemonSet>,
    pub delete_pods: Vec<String>,
    pub save_stable: Option<StableSnapshot>,
    pub clear_annotations: bool,
    pub delete_config_maps: Vec<String>,
}

/// Pure: the writes that carry out `decision` (see the module docs).
pub fn writes(
    key: &Key,
    objects: &Objects,
    stable: Option<&StableSnapshot>,
    decision: &rollout::Decision,
    pods: &[Arc<Pod>],
    config_maps: &[String],
) -> Writes {
    let daemon_set = match (decision.template, stable) {
        (Template::Target, _) | (Template::Stable, None) => Some(objects.daemon_set.clone()),
        (Template::Stable, Some(snapshot)) => Some(snapshot.apply_to(&objects.daemon_set)),
        // Held before its first stable revision: leave whatever runs alone.
        (Template::None, _) => None,
    };
    let mut out = Writes {
        daemon_set,
        ..Writes::default()
    };
    for action in &decision.actions {
        match action {
            rollout::Action::DeletePods(names) => out.delete_pods.extend(names.iter().cloned()),
            rollout::Action::SaveStable => out.save_stable = StableSnapshot::of(objects),
            rollout::Action::ClearAnnotations => out.clear_annotations = true,
        }
    }
    let mut used: Vec<String> = pods
        .iter()
        .flat_map(|p| apply::mounted_config_maps(p))
        .collect();
    used.extend(
        out.save_stable
            .as_ref()
            .or(stable)
            .map(|s| s.config_map.clone()),
    );
    let current = objects.config_map.metadata.name.clone().unwrap_or_default();
    out.delete_config_maps =
        apply::unused_config_maps(&key.config_map_prefix(), config_maps, &current, &used);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn objects() -> (Key, Objects) {
        let text = include_str!("../../examples/ops.yaml");
        let lp = crate::render::parse_log_pipelines(text).unwrap().remove(0);
        let ctx = crate::desired::Context {
            agent_image: "logpipe-agent:new".into(),
            service_monitor_crd: false,
            agent_cluster_role: crate::rbac::AGENT_CLUSTER_ROLE.into(),
        };
        (
            Key::of(&lp).unwrap(),
            crate::desired::desired(&lp, &ctx).unwrap(),
        )
    }

    fn decision(template: Template, actions: Vec<rollout::Action>) -> rollout::Decision {
        rollout::Decision {
            state: rollout::State::default(),
            template,
            actions,
            message: String::new(),
            requeue: Duration::from_secs(2),
            store_unreachable: None,
        }
    }

    fn pod_mounting(cm: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [], "volumes": [{"name": "c", "configMap": {"name": cm}}]},
            }))
            .unwrap(),
        )
    }

    fn image(ds: Option<&DaemonSet>) -> Option<String> {
        ds?.spec.as_ref()?.template.spec.as_ref()?.containers[0]
            .image
            .clone()
    }

    #[test]
    fn writes_table() {
        let (key, objects) = objects();
        let current = objects.config_map.metadata.name.clone().unwrap();
        let prefix = key.config_map_prefix();
        let (old_cm, older_cm) = (format!("{prefix}old"), format!("{prefix}older"));
        let mut old_template = objects.daemon_set.spec.clone().unwrap().template;
        if let Some(spec) = old_template.spec.as_mut() {
            spec.containers[0].image = Some("logpipe-agent:old".into());
        }
        let stable = StableSnapshot {
            revision: "r1".into(),
            release: "old".into(),
            config_map: old_cm.clone(),
            template: old_template,
        };
        let cms = vec![current.clone(), old_cm.clone(), older_cm.clone()];
        let delete = rollout::Action::DeletePods(vec!["a".into(), "b".into()]);
        struct Case {
            name: &'static str,
            template: Template,
            actions: Vec<rollout::Action>,
            stable: Option<StableSnapshot>,
            pods: Vec<Arc<Pod>>,
            image: Option<&'static str>,
            deletes: usize,
            saves: bool,
            gc: Vec<String>,
        }
        let cases = [
            Case {
                name: "moving: the target's template, old configs unmounted go",
                template: Template::Target,
                actions: vec![delete.clone()],
                stable: Some(stable.clone()),
                pods: vec![],
                image: Some("logpipe-agent:new"),
                deletes: 2,
                saves: false,
                gc: vec![older_cm.clone()],
            },
            Case {
                name: "rolling back: the stable template",
                template: Template::Stable,
                actions: vec![delete.clone(), rollout::Action::ClearAnnotations],
                stable: Some(stable.clone()),
                pods: vec![pod_mounting(&older_cm)],
                image: Some("logpipe-agent:old"),
                deletes: 2,
                saves: false,
                gc: vec![],
            },
            Case {
                name: "stable asked for, none saved: the target's",
                template: Template::Stable,
                actions: vec![],
                stable: None,
                pods: vec![],
                image: Some("logpipe-agent:new"),
                deletes: 0,
                saves: false,
                gc: vec![old_cm.clone(), older_cm.clone()],
            },
            Case {
                name: "held before any stable revision: no DaemonSet",
                template: Template::None,
                actions: vec![],
                stable: None,
                pods: vec![pod_mounting(&old_cm)],
                image: None,
                deletes: 0,
                saves: false,
                gc: vec![older_cm.clone()],
            },
            Case {
                name: "healthy: the target becomes stable, the old stable's config goes",
                template: Template::Target,
                actions: vec![rollout::Action::SaveStable],
                stable: Some(stable.clone()),
                pods: vec![],
                image: Some("logpipe-agent:new"),
                deletes: 0,
                saves: true,
                gc: vec![old_cm.clone(), older_cm.clone()],
            },
        ];
        for c in cases {
            let w = writes(
                &key,
                &objects,
                c.stable.as_ref(),
                &decision(c.template, c.actions.clone()),
                &c.pods,
                &cms,
            );
            assert_eq!(
                image(w.daemon_set.as_ref()).as_deref(),
                c.image,
                "{}",
                c.name
            );
            assert_eq!(w.delete_pods.len(), c.deletes, "{}", c.name);
            assert_eq!(w.save_stable.is_some(), c.saves, "{}", c.name);
            assert_eq!(
                w.clear_annotations,
                c.actions.contains(&rollout::Action::ClearAnnotations),
                "{}",
                c.name
            );
            assert_eq!(w.delete_config_maps, c.gc, "{}", c.name);
        }
    }
}
