//! Desired state: a pure function from a `LogPipeline` to every object the operator owns.
//!
//! No client, no clock, no randomness: the same LogPipeline always gives byte-identical
//! objects, which is what makes server-side apply a no-op when nothing changed and lets
//! `logpipe-operator render` print exactly what the controller would apply.
//!
//! Naming (all derived from the LogPipeline's namespace and name, never from content,
//! except the ConfigMap):
//! - DaemonSet, ServiceAccount: `<name>`; metrics Service: `<name>-metrics`;
//!   ServiceMonitor: `<name>`;
//! - ConfigMap: `<name>-config-<hash>`, immutable, hash of the rendered agent config, so
//!   a config change is a new pod template (a new revision), never an in-place edit;
//! - ClusterRoleBinding: `logpipe:<namespace>:<name>` (cluster-scoped, so the namespace is
//!   part of the name; `:` cannot appear in either part). It binds the ServiceAccount to the
//!   agents' ClusterRole, which the chart creates ([`crate::rbac::AGENT_CLUSTER_ROLE`]):
//!   the operator creates no ClusterRole.
//!
//! The DaemonSet selector is `app.kubernetes.io/name=logpipe-agent` plus
//! `app.kubernetes.io/instance=<name>`: stable labels chosen once, because a selector is
//! immutable and changing it would break every upgrade.

mod agent_config;
pub mod daemonset;
mod resources;

pub use agent_config::{AgentConfigError, CONFIG_FILE, CONFIG_MOUNT, render_agent_config};
pub use daemonset::daemon_set;
pub use resources::{
    cluster_role_binding, config_map, service, service_account, service_monitor,
    service_monitor_resource,
};

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::DynamicObject;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::crd::LogPipeline;

/// The field manager of every write: one manager, so fields others set (e.g.
/// `kubectl rollout restart` annotations) are left alone and ours are always ours.
pub const MANAGER: &str = "logpipe-operator";
pub const APP_NAME: &str = "logpipe-agent";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// On cluster-scoped objects (which cannot carry an owner reference to a namespaced one).
pub const LABEL_OWNER_NAMESPACE: &str = "logpipe.io/namespace";
pub const LABEL_OWNER_NAME: &str = "logpipe.io/name";
/// Pod template annotation: the revision (hash of the template), compared per pod.
pub const ANNOTATION_REVISION: &str = "logpipe.io/revision";
/// Pod template annotation: hash of the agent config (rolls the pods when it changes).
pub const ANNOTATION_CONFIG_HASH: &str = "logpipe.io/config-hash";

/// What the builders need besides the LogPipeline.
#[derive(Clone, Debug)]
pub struct Context {
    /// Agent image when `spec.agent.image` is unset: the release bundled with this operator.
    pub agent_image: String,
    /// Build a ServiceMonitor (only when its CRD exists in the cluster).
    pub service_monitor_crd: bool,
    /// The ClusterRole the agents' ServiceAccounts are bound to (the chart creates it).
    pub agent_cluster_role: String,
}

/// Everything one LogPipeline owns.
#[derive(Clone, Debug)]
pub struct Objects {
    pub service_account: ServiceAccount,
    pub cluster_role_binding: ClusterRoleBinding,
    pub config_map: ConfigMap,
    pub daemon_set: DaemonSet,
    pub service: Service,
    pub service_monitor: Option<DynamicObject>,
    /// Hash of the agent pod template: one revision per distinct template.
    pub revision: String,
    /// Hash of the rendered agent config (suffix of the ConfigMap name).
    pub config_hash: String,
    /// What moves together across clusters (see [`release`]).
    pub release: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("LogPipeline has no namespace")]
    NoNamespace,
    #[error(transparent)]
    AgentConfig(#[from] AgentConfigError),
    #[error("cannot hash the pod template: {0}")]
    Hash(#[from] serde_json::Error),
}

/// Namespace and name of a LogPipeline, the key of everything derived from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn of(lp: &LogPipeline) -> Result<Self, DesiredError> {
        Ok(Self {
            namespace: lp.namespace().ok_or(DesiredError::NoNamespace)?,
            name: lp.name_any(),
        })
    }
    pub fn cluster_name(&self) -> String {
        format!("logpipe:{}:{}", self.namespace, self.name)
    }
    pub fn config_map_prefix(&self) -> String {
        format!("{}-config-", self.name)
    }
    pub fn service_name(&self) -> String {
        format!("{}-metrics", self.name)
    }
}

/// Build every object for `lp`.
pub fn desired(lp: &LogPipeline, ctx: &Context) -> Result<Objects, DesiredError> {
    let key = Key::of(lp)?;
    let config_yaml = render_agent_config(lp)?;
    let config_hash = short_hash(config_yaml.as_bytes());
    let config_map = config_map(lp, &key, &config_yaml, &config_hash);
    let config_map_name = config_map.metadata.name.clone().unwrap_or_default();
    let daemon_set = daemon_set(lp, &key, ctx, &config_map_name, &config_hash)?;
    let revision = daemon_set
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(ANNOTATION_REVISION))
        .cloned()
        .unwrap_or_default();
    let service_monitor = (ctx.service_monitor_crd && lp.spec.monitoring.service_monitor.enabled)
        .then(|| service_monitor(lp, &key));
    Ok(Objects {
        service_account: service_account(lp, &key),
        cluster_role_binding: cluster_role_binding(&key, &ctx.agent_cluster_role),
        config_map,
        daemon_set,
        service: service(lp, &key),
        service_monitor,
        revision,
        config_hash,
        release: release(lp, ctx)?,
    })
}

/// The release identity, compared across clusters by a promotion gate: the agent image,
/// the pipeline and the labels (what a change to the agent *is*), not per-cluster fields
/// (tenant, endpoint, auth, resources, scheduling), which differ between ops and prod for
/// the same release.
pub fn release(lp: &LogPipeline, ctx: &Context) -> Result<String, DesiredError> {
    let image = lp
        .spec
        .agent
        .image
        .clone()
        .unwrap_or_else(|| ctx.agent_image.clone());
    let identity = serde_json::json!({
        "image": image,
        "pipeline": lp.spec.pipeline,
        "labels": lp.spec.labels,
    });
    Ok(short_hash(&serde_json::to_vec(&identity)?))
}

/// First 10 hex digits of SHA-256: short enough for names, collisions irrelevant at the
/// scale of one LogPipeline's history.
pub fn short_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..5])
}

/// The labels selecting the agent pods; never change them (immutable selector).
pub fn selector_labels(key: &Key) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), APP_NAME.to_string()),
        (LABEL_INSTANCE.to_string(), key.name.clone()),
    ])
}

/// Labels on every owned object.
pub fn common_labels(key: &Key) -> BTreeMap<String, String> {
    let mut labels = selector_labels(key);
    labels.insert(LABEL_MANAGED_BY.to_string(), MANAGER.to_string());
    labels
}

/// Metadata of a namespaced object owned (garbage collected) through an owner reference.
/// The reference needs the LogPipeline's uid: absent when rendering with no cluster.
pub(crate) fn owned_meta(lp: &LogPipeline, key: &Key, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(key.namespace.clone()),
        labels: Some(common_labels(key)),
        owner_references: owner_ref(lp).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

fn owner_ref(lp: &LogPipeline) -> Option<OwnerReference> {
    lp.controller_owner_ref(&())
}

/// Metadata of a cluster-scoped object: no owner reference is possible, so it is found by
/// labels and deleted by the LogPipeline's finalizer.
pub(crate) fn cluster_meta(key: &Key) -> ObjectMeta {
    let mut labels = common_labels(key);
    labels.insert(LABEL_OWNER_NAMESPACE.to_string(), key.namespace.clone());
    labels.insert(LABEL_OWNER_NAME.to_string(), key.name.clone());
    ObjectMeta {
        name: Some(key.cluster_name()),
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}

#[cfg(test)]
mod tests;
