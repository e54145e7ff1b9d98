use k8s_openapi::api::core::v1::PodSpec;
use logpipe_api::config::AgentConfig;

use super::*;
use crate::render::parse_log_pipelines;

fn ctx() -> Context {
    Context {
        agent_image: "logpipe-agent:bundled".into(),
        service_monitor_crd: true,
        agent_cluster_role: crate::rbac::AGENT_CLUSTER_ROLE.into(),
    }
}

/// The reference ops pipeline exactly as shipped in examples/ops.yaml.
fn ops() -> LogPipeline {
    let text = include_str!("../../../examples/ops.yaml");
    let mut lp = parse_log_pipelines(text).unwrap().remove(0);
    lp.metadata.uid = Some("7c1c7f6e-0000-4000-8000-000000000001".into());
    lp
}

fn pod_spec(objects: &Objects) -> &PodSpec {
    objects
        .daemon_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

#[test]
fn reference_ops_daemon_set_has_exactly_the_reference_settings() {
    let objects = desired(&ops(), &ctx()).unwrap();
    let ds_spec = objects.daemon_set.spec.as_ref().unwrap();
    assert_eq!(
        ds_spec.update_strategy.as_ref().unwrap().type_.as_deref(),
        Some("OnDelete")
    );
    let pod = pod_spec(&objects);
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert_eq!(tolerations.len(), 1);
    assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
    assert_eq!(tolerations[0].key, None);
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("logpipe-agent:bundled"));
    let r = c.resources.as_ref().unwrap();
    let q =
        |m: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
         k: &str| { m.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone()) };
    assert_eq!(q(&r.requests, "cpu").as_deref(), Some("250m"));
    assert_eq!(q(&r.requests, "memory").as_deref(), Some("300Mi"));
    assert_eq!(q(&r.limits, "memory").as_deref(), Some("700Mi"));
    assert_eq!(q(&r.limits, "cpu"), None, "no CPU limit in the reference");
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 12345);
    let ready = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/-/ready"));
    let live = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/-/healthy"));
    let env = &c.env.as_ref().unwrap()[0];
    assert_eq!(env.name, "NODE_NAME");
    assert_eq!(
        env.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let annotations = objects
        .daemon_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap();
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some("12345")
    );
    assert!(
        annotations["ad.datadoghq.com/logpipe-agent.checks"]
            .contains("http://%%host%%:12345/metrics")
    );
    assert_eq!(
        annotations.get(ANNOTATION_CONFIG_HASH),
        Some(&objects.config_hash)
    );
    assert_eq!(
        annotations.get(ANNOTATION_REVISION),
        Some(&objects.revision)
    );
}

#[test]
fn agent_runs_locked_down_and_reads_logs_read_only() {
    let objects = desired(&ops(), &ctx()).unwrap();
    let pod = pod_spec(&objects);
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    let mounts = c.volume_mounts.as_ref().unwrap();
    let logs = mounts.iter().find(|m| m.name == "pod-logs").unwrap();
    assert_eq!(
        (logs.mount_path.as_str(), logs.read_only),
        ("/var/log/pods", Some(true))
    );
    let volumes = pod.volumes.as_ref().unwrap();
    let positions = volumes.iter().find(|v| v.name == "positions").unwrap();
    assert_eq!(
        positions.host_path.as_ref().unwrap().path,
        "/var/lib/logpipe/loki-v3-logpipe"
    );
    let config = volumes.iter().find(|v| v.name == "config").unwrap();
    assert_eq!(
        config.config_map.as_ref().unwrap().name,
        format!("logpipe-config-{}", objects.config_hash)
    );
    // The kubelet must wait longer than the agent's flush deadline (20s by default).
    assert!(pod.termination_grace_period_seconds.unwrap() > 20);
}

/// The agent's last words reach the pod status (and a failed canary's message).
#[test]
fn agent_leaves_its_last_words_in_the_termination_message() {
    let objects = desired(&ops(), &ctx()).unwrap();
    let c = &pod_spec(&objects).containers[0];
    assert_eq!(
        c.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some(logpipe_api::process::TERMINATION_MESSAGE_PATH)
    );
    // The agent's default is that path: no flag needed.
    let args = c.args.as_deref().unwrap_or_default();
    assert!(
        !args.iter().any(|a| a.contains("termination-log")),
        "{args:?}"
    );
}

#[test]
fn rendered_agent_config_is_accepted_by_the_agent() {
    let objects = desired(&ops(), &ctx()).unwrap();
    let yaml = &objects.config_map.data.as_ref().unwrap()["config.yaml"];
    let config = AgentConfig::from_yaml(yaml).unwrap();
    assert_eq!(
        config.loki.url,
        "http://loki-v3-distributor.loki-v3.svc.cluster.local:3100/loki/api/v1/push"
    );
    assert_eq!(config.loki.tenant, "ops");
    assert_eq!(config.listen, "0.0.0.0:12345");
    assert!(
        config.relabel.is_empty(),
        "empty = the agent's Promtail-compatible defaults"
    );
    let kinds: Vec<_> = config.pipeline.iter().map(|s| s.kind().unwrap()).collect();
    assert_eq!(kinds, ["cri", "timestamp", "labelDrop"]);
    let ts = config.pipeline[1].timestamp.as_ref().unwrap();
    assert_eq!(
        (ts.source.as_str(), ts.format.as_str()),
        ("time", "RFC3339")
    );
    assert_eq!(
        config.pipeline[2].label_drop.as_deref(),
        Some(&["filename".to_string()][..])
    );
    assert_eq!(objects.config_map.immutable, Some(true));
}

/// The multi-team example: each pipeline's selector (and the teams' `tenantFrom`) reaches
/// its agents as written, and a selector or tenant source the agent would refuse is named
/// by the LogPipeline's field.
#[test]
fn selector_and_keyed_limit_reach_the_agent_config() {
    let text = include_str!("../../../examples/multi-team.yaml");
    let pipelines = parse_log_pipelines(text).unwrap();
    assert_eq!(pipelines.len(), 2);
    for lp in &pipelines {
        let objects = desired(lp, &ctx()).unwrap();
        let yaml = &objects.config_map.data.as_ref().unwrap()["config.yaml"];
        let config = AgentConfig::from_yaml(yaml).unwrap();
        assert_eq!(config.selector, lp.spec.selector);
        assert!(!config.selector.is_empty());
        assert_eq!(config.loki.tenant_from, lp.spec.tenant_from);
    }
    let from = pipelines[1].spec.tenant_from.as_ref().unwrap();
    assert_eq!(from.namespace_label.as_deref(), Some("logpipe.io/tenant"));
    let mut two_sources = pipelines[1].clone();
    if let Some(from) = two_sources.spec.tenant_from.as_mut() {
        from.pod_label = Some("team".into());
    }
    let err = desired(&two_sources, &ctx()).unwrap_err().to_string();
    assert!(err.contains("spec.tenantFrom: set only one of"), "{err}");
    let limit = pipelines[1].spec.pipeline[2].limit.as_ref().unwrap();
    assert_eq!(
        limit.by_labels.as_deref(),
        Some(&["namespace".to_string(), "app".to_string()][..])
    );
    let mut bad = pipelines[0].clone();
    bad.spec
        .selector
        .pod_selector
        .match_labels
        .insert("app".into(), "not ok!".into());
    let err = desired(&bad, &ctx()).unwrap_err().to_string();
    assert!(
        err.contains("spec.selector.podSelector.matchLabels.app"),
        "{err}"
    );
}

#[test]
fn binds_the_charts_agent_role_and_names_are_per_namespace() {
    let objects = desired(&ops(), &ctx()).unwrap();
    let crb = &objects.cluster_role_binding;
    assert_eq!(
        crb.metadata.name.as_deref(),
        Some("logpipe:loki-v3:logpipe")
    );
    assert_eq!(crb.metadata.owner_references, None);
    assert_eq!(
        (crb.role_ref.kind.as_str(), crb.role_ref.name.as_str()),
        ("ClusterRole", "logpipe-agent")
    );
    let subject = &crb.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("logpipe", Some("loki-v3"))
    );
    // The chart may name the role otherwise (release name, --agent-cluster-role).
    let other = Context {
        agent_cluster_role: "other-agent".into(),
        ..ctx()
    };
    let objects = desired(&ops(), &other).unwrap();
    assert_eq!(objects.cluster_role_binding.role_ref.name, "other-agent");
}

#[test]
fn namespaced_objects_are_owned_by_the_log_pipeline() {
    let objects = desired(&ops(), &ctx()).unwrap();
    for meta in [
        &objects.daemon_set.metadata,
        &objects.config_map.metadata,
        &objects.service.metadata,
        &objects.service_account.metadata,
    ] {
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("LogPipeline", Some(true))
        );
    }
}

#[test]
fn service_monitor_only_when_enabled_and_its_crd_exists() {
    let sm = desired(&ops(), &ctx()).unwrap().service_monitor.unwrap();
    assert_eq!(
        sm.metadata.labels.as_ref().unwrap()["release"],
        "kube-prometheus-stack"
    );
    assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "metrics");
    let no_crd = Context {
        service_monitor_crd: false,
        ..ctx()
    };
    assert!(desired(&ops(), &no_crd).unwrap().service_monitor.is_none());
}

#[test]
fn same_spec_same_objects_and_config_change_is_a_new_revision() {
    let a = desired(&ops(), &ctx()).unwrap();
    let b = desired(&ops(), &ctx()).unwrap();
    assert_eq!(
        serde_json::to_value(&a.daemon_set).unwrap(),
        serde_json::to_value(&b.daemon_set).unwrap()
    );
    let mut changed = ops();
    changed.spec.tenant = "dev".into();
    let c = desired(&changed, &ctx()).unwrap();
    assert_ne!(a.config_hash, c.config_hash);
    assert_ne!(a.revision, c.revision);
    assert_ne!(a.config_map.metadata.name, c.config_map.metadata.name);
    // The selector never depends on the spec.
    assert_eq!(
        a.daemon_set.spec.unwrap().selector,
        c.daemon_set.spec.unwrap().selector
    );
}

#[test]
fn image_change_is_a_new_revision_with_the_same_config() {
    let a = desired(&ops(), &ctx()).unwrap();
    let mut changed = ops();
    changed.spec.agent.image = Some("logpipe-agent:next".into());
    let b = desired(&changed, &ctx()).unwrap();
    assert_eq!(a.config_hash, b.config_hash);
    assert_ne!(a.revision, b.revision);
}

#[test]
fn release_is_image_pipeline_and_labels_not_per_cluster_fields() {
    let a = desired(&ops(), &ctx()).unwrap();
    let mut dev = ops();
    dev.spec.tenant = "dev".into();
    dev.spec.endpoint = "http://loki-dev:3100/loki/api/v1/push".into();
    dev.spec.agent.resources = None;
    let b = desired(&dev, &ctx()).unwrap();
    assert_ne!(
        a.revision, b.revision,
        "a per-cluster change is a new revision"
    );
    assert_eq!(a.release, b.release, "but the same release");
    let mut image = ops();
    image.spec.agent.image = Some("logpipe-agent:next".into());
    assert_ne!(desired(&image, &ctx()).unwrap().release, a.release);
    let mut pipeline = ops();
    pipeline.spec.pipeline.pop();
    assert_ne!(desired(&pipeline, &ctx()).unwrap().release, a.release);
}
