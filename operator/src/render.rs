//! `logpipe-operator render -f lp.yaml`: every object the operator would create, as YAML,
//! with no cluster (reviewable in a GitOps pull request, like `helm template`).
//! `logpipe-operator validate -f lp.yaml`: the same checks, every problem of every
//! LogPipeline listed, for a CI job that must fail before Argo CD syncs a bad spec.
//!
//! With no cluster there is no uid, so no owner references are printed, and the
//! ServiceMonitor is printed whenever it is enabled (the controller creates it only when
//! the ServiceMonitor CRD exists).

use serde::Deserialize;
use serde::Serialize;

use crate::crd::LogPipeline;
use crate::desired::{Context, DesiredError, Objects, desired};

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot read the input: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("no LogPipeline in the input")]
    Empty,
    #[error("LogPipeline {name}: {source}")]
    Desired { name: String, source: DesiredError },
    #[error("{} of {checked} LogPipelines would be held as InvalidSpec", .invalid)]
    Invalid { invalid: usize, checked: usize },
}

/// Every `LogPipeline` document of a (multi-document) YAML text; other kinds are skipped.
/// A LogPipeline with no namespace gets `default`, as `kubectl apply` would.
pub fn parse_log_pipelines(text: &str) -> Result<Vec<LogPipeline>, RenderError> {
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document)?;
        if value.get("kind").and_then(|k| k.as_str()) != Some("LogPipeline") {
            continue;
        }
        let mut lp: LogPipeline = serde_yaml::from_value(value)?;
        if lp.metadata.namespace.is_none() {
            lp.metadata.namespace = Some("default".into());
        }
        out.push(lp);
    }
    Ok(out)
}

/// The objects of every LogPipeline in `text`, as one multi-document YAML stream. The
/// agents' ClusterRole is the chart's, not printed: only its binding is the operator's.
pub fn render(
    text: &str,
    agent_image: &str,
    agent_cluster_role: &str,
) -> Result<String, RenderError> {
    let pipelines = parse_log_pipelines(text)?;
    if pipelines.is_empty() {
        return Err(RenderError::Empty);
    }
    let ctx = Context {
        agent_image: agent_image.to_string(),
        service_monitor_crd: true,
        agent_cluster_role: agent_cluster_role.to_string(),
    };
    let mut out = String::new();
    for lp in &pipelines {
        let name = lp.metadata.name.clone().unwrap_or_default();
        let objects = desired(lp, &ctx).map_err(|source| RenderError::Desired {
            name: name.clone(),
            source,
        })?;
        out.push_str(&format!(
            "# LogPipeline {}/{name}: revision {}, agent config hash {}\n",
            lp.metadata.namespace.as_deref().unwrap_or_default(),
            objects.revision,
            objects.config_hash
        ));
        for doc in documents(&objects)? {
            out.push_str("---\n");
            out.push_str(&doc);
        }
    }
    Ok(out)
}

/// What the operator would say of each LogPipeline in `text`: `ok <ns>/<name>` or
/// `invalid <ns>/<name>: <every problem>`, one line each, and whether all are valid.
pub fn validate(text: &str) -> Result<(String, Result<(), RenderError>), RenderError> {
    let pipelines = parse_log_pipelines(text)?;
    if pipelines.is_empty() {
        return Err(RenderError::Empty);
    }
    let ctx = Context {
        agent_image: "validate".into(),
        service_monitor_crd: true,
        agent_cluster_role: crate::rbac::AGENT_CLUSTER_ROLE.into(),
    };
    let mut report = String::new();
    let mut invalid = 0;
    for lp in &pipelines {
        let name = format!(
            "{}/{}",
            lp.metadata.namespace.as_deref().unwrap_or_default(),
            lp.metadata.name.as_deref().unwrap_or_default()
        );
        match desired(lp, &ctx) {
            Ok(_) => report.push_str(&format!("ok {name}\n")),
            Err(e) => {
                invalid += 1;
                report.push_str(&format!("invalid {name}: {e}\n"));
            }
        }
    }
    let verdict = match invalid {
        0 => Ok(()),
        _ => Err(RenderError::Invalid {
            invalid,
            checked: pipelines.len(),
        }),
    };
    Ok((report, verdict))
}

fn documents(o: &Objects) -> Result<Vec<String>, serde_yaml::Error> {
    fn yaml<T: Serialize>(value: &T) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(value)
    }
    let mut docs = vec![
        yaml(&o.service_account)?,
        yaml(&o.cluster_role_binding)?,
        yaml(&o.config_map)?,
        yaml(&o.daemon_set)?,
        yaml(&o.service)?,
    ];
    if let Some(sm) = &o.service_monitor {
        docs.push(yaml(sm)?);
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_object_of_the_ops_example() {
        let out = render(
            include_str!("../../examples/ops.yaml"),
            "logpipe-agent:test",
            crate::rbac::AGENT_CLUSTER_ROLE,
        )
        .unwrap();
        for kind in [
            "kind: ServiceAccount",
            "kind: ClusterRoleBinding",
            "kind: ConfigMap",
            "kind: DaemonSet",
            "kind: Service\n",
            "kind: ServiceMonitor",
        ] {
            assert!(out.contains(kind), "missing {kind:?} in\n{out}");
        }
        assert!(out.contains("tenant: ops"), "the agent config is printed");
        assert!(
            !out.contains("\nkind: ClusterRole\n"),
            "the agents' ClusterRole is the chart's"
        );
        assert!(
            out.contains("  name: logpipe-agent\n"),
            "the binding's roleRef"
        );
        assert_eq!(out.matches("\n---\n").count(), 6, "one document per object");
    }

    #[test]
    fn validate_lists_every_problem_of_every_pipeline() {
        let good = include_str!("../../examples/ops.yaml");
        let bad = "apiVersion: logpipe.io/v1alpha1\nkind: LogPipeline\nmetadata: {name: bad}\n\
                   spec:\n  tenant: t\n  endpoint: http://loki:3100/loki/api/v1/push\n\
                   \x20 pipeline:\n  - regex: {expression: '('}\n  - multiline: {firstLine: '['}\n";
        let (report, verdict) = validate(&format!("{good}\n---\n{bad}")).unwrap();
        assert!(report.starts_with("ok "), "{report}");
        assert!(
            report.contains("invalid default/bad: spec.pipeline[0].regex: invalid regex")
                && report.contains("spec.pipeline[1].multiline: invalid regex"),
            "{report}"
        );
        assert!(matches!(
            verdict,
            Err(RenderError::Invalid {
                invalid: 1,
                checked: 2
            })
        ));
    }

    #[test]
    fn input_without_a_log_pipeline_is_an_error() {
        assert!(matches!(
            render("kind: Namespace\n", "x", "y"),
            Err(RenderError::Empty)
        ));
    }
}
