//! The small objects: ServiceAccount, ClusterRoleBinding, ConfigMap, metrics Service, ServiceMonitor.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::{Key, cluster_meta, common_labels, owned_meta, selector_labels};
use crate::crd::LogPipeline;

pub fn service_account(lp: &LogPipeline, key: &Key) -> ServiceAccount {
    ServiceAccount {
        metadata: owned_meta(lp, key, key.name.clone()),
        ..ServiceAccount::default()
    }
}

/// Binds the agents' ServiceAccount to `agent_cluster_role`, the chart's ClusterRole (read
/// pods, nothing else). Its roleRef is immutable: `apply` replaces a binding an older
/// operator made to its own per-LogPipeline ClusterRole.
pub fn cluster_role_binding(key: &Key, agent_cluster_role: &str) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: cluster_meta(key),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: agent_cluster_role.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: key.name.clone(),
            namespace: Some(key.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

/// Immutable: a new config is a new ConfigMap (and so a new pod template), which the
/// rollout moves node by node; the old one stays until no pod mounts it.
pub fn config_map(lp: &LogPipeline, key: &Key, config_yaml: &str, hash: &str) -> ConfigMap {
    let mut metadata = owned_meta(lp, key, format!("{}{hash}", key.config_map_prefix()));
    metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(super::ANNOTATION_CONFIG_HASH.into(), hash.into());
    ConfigMap {
        metadata,
        immutable: Some(true),
        data: Some(BTreeMap::from([(
            "config.yaml".to_string(),
            config_yaml.to_string(),
        )])),
        ..ConfigMap::default()
    }
}

/// Headless: Prometheus scrapes each agent (through the EndpointSlices), never a
/// load-balanced one.
pub fn service(lp: &LogPipeline, key: &Key) -> Service {
    Service {
        metadata: owned_meta(lp, key, key.service_name()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(key)),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port: lp.spec.monitoring.port,
                target_port: Some(IntOrString::String("metrics".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// A prometheus-operator ServiceMonitor, as a dynamic object (its CRD is optional).
pub fn service_monitor(lp: &LogPipeline, key: &Key) -> DynamicObject {
    let sm = &lp.spec.monitoring.service_monitor;
    let mut metadata = owned_meta(lp, key, key.name.clone());
    let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.extend(sm.labels.clone());
    let mut endpoint = json!({"port": "metrics", "path": logpipe_api::process::METRICS_PATH});
    if let Some(interval) = &sm.interval {
        endpoint["interval"] = json!(interval.to_string());
    }
    let mut object = DynamicObject::new(&key.name, &service_monitor_resource());
    object.metadata = metadata;
    object.data = json!({
        "spec": {
            "selector": {"matchLabels": common_labels(key)},
            "namespaceSelector": {"matchNames": [key.namespace]},
            "endpoints": [endpoint],
        }
    });
    object
}
