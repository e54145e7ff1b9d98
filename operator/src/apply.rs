//! The only module that writes to the cluster (besides Events and the Lease).
//!
//! # Flow (one reconcile of a live LogPipeline)
//! 1. Server-side apply, in dependency order, of every desired object: ServiceAccount,
//!    ClusterRoleBinding (to the chart's agent ClusterRole), ConfigMap, DaemonSet, metrics
//!    Service, and the
//!    ServiceMonitor when its CRD exists (deleted when it exists but is disabled).
//!    The DaemonSet carries the pod template the rollout engine chose: the target's, or
//!    the stable one (saved in the ConfigMap `<name>-stable`) while held or rolled back.
//! 2. Delete the agent pods the rollout decision chose (OnDelete DaemonSet); save the
//!    stable snapshot when a revision becomes stable; remove the promote/abort annotations
//!    once acted on.
//!    Pod deletes go out [`DELETES_IN_FLIGHT`] at a time.
//! 3. Delete this LogPipeline's hashed ConfigMaps that neither the current config, the
//!    stable snapshot, nor any existing pod uses (the caller finds them in its cache).
//! 4. Server-side apply of the status, only when it differs from the stored one.
//!
//! On deletion, the finalizer `logpipe.io/cluster-scoped` deletes the ClusterRoleBinding
//! (and, when allowed, the per-LogPipeline ClusterRole an earlier operator created), then
//! lets the LogPipeline go; the API server's garbage collector removes the namespaced
//! objects through their owner references.
//!
//! Nothing here reads state: the reconcile reads it from `cache`.
//!
//! Every call here needs a rule in [`crate::rbac`], which the chart grants (a test checks).
//!
//! # Guarantees
//! - One field manager (`logpipe-operator`), with force: the operator owns exactly the
//!   fields it sets and takes them back if someone else changed them; fields set by others
//!   (e.g. `kubectl rollout restart`'s annotation, other controllers' labels) are kept.
//! - Applying an unchanged object is a no-op in the API server (no new resourceVersion,
//!   no watch event), and the status is not written when unchanged: a quiet cluster sees
//!   no writes.
//! - A ConfigMap still mounted by a pod is never deleted (a pod restarting on its node
//!   would fail to start), nor the stable revision's (a rollback puts it back).
//!
//! # Assumptions
//! - Nobody else creates objects with our names and `app.kubernetes.io/managed-by:
//!   logpipe-operator`; force-apply would take them over.
//! - The API server's garbage collector runs (kube-controller-manager), for owner references.
//!
//! # Caveats
//! - Steps are not transactional: a failure half-way leaves earlier objects applied; the
//!   next reconcile (with backoff) converges, since every step is idempotent.
//! - Fields the operator stopped setting are removed by server-side apply, fields other
//!   managers own are not.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodTemplateSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::Status;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::crd::{LogPipeline, LogPipelineStatus};
use crate::desired::service_monitor_resource;
use crate::desired::{Key, MANAGER, Objects, owned_meta};
use crate::rollout::{ANNOTATION_ABORT, ANNOTATION_PROMOTE};

pub const FINALIZER: &str = "logpipe.io/cluster-scoped";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot apply {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        source: kube::Error,
    },
    #[error("cannot {action}: {source}")]
    Api {
        action: &'static str,
        source: kube::Error,
    },
    #[error("object has no name")]
    NoName,
    #[error("stable snapshot {name}: {message}")]
    Snapshot { name: String, message: String },
}

impl ApplyError {
    /// A bounded metric label per failure kind.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Apply { .. } => "apply",
            Self::Api { .. } => "api",
            Self::NoName => "invalid_object",
            Self::Snapshot { .. } => "snapshot",
        }
    }
}

fn params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Server-side apply of one object; returns the object as stored.
async fn apply<K>(api: &Api<K>, kind: &'static str, object: &K) -> Result<K, ApplyError>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().ok_or(ApplyError::NoName)?;
    api.patch(&name, &params(), &Patch::Apply(object))
        .await
        .map_err(|source| ApplyError::Apply { kind, name, source })
}

/// An API call that failed, with what the operator was doing.
fn api_error(action: &'static str, source: kube::Error) -> ApplyError {
    ApplyError::Api { action, source }
}

/// Step 1: apply every object, with `daemon_set` (the template the rollout chose; `None`:
/// no DaemonSet yet, a first install held by its gate); returns the DaemonSet as stored.
pub async fn apply_objects(
    client: &Client,
    key: &Key,
    objects: &Objects,
    daemon_set: Option<&DaemonSet>,
    service_monitor_crd: bool,
) -> Result<Option<DaemonSet>, ApplyError> {
    let ns = key.namespace.as_str();
    apply(
        &Api::<ServiceAccount>::namespaced(client.clone(), ns),
        "ServiceAccount",
        &objects.service_account,
    )
    .await?;
    apply_binding(client, key, &objects.cluster_role_binding).await?;
    apply(
        &Api::<ConfigMap>::namespaced(client.clone(), ns),
        "ConfigMap",
        &objects.config_map,
    )
    .await?;
    let ds = match daemon_set {
        Some(ds) => Some(
            apply(
                &Api::<DaemonSet>::namespaced(client.clone(), ns),
                "DaemonSet",
                ds,
            )
            .await?,
        ),
        None => None,
    };
    apply(
        &Api::<Service>::namespaced(client.clone(), ns),
        "Service",
        &objects.service,
    )
    .await?;
    if service_monitor_crd {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), ns, &service_monitor_resource());
        match &objects.service_monitor {
            Some(sm) => {
                api.patch(&key.name, &params(), &Patch::Apply(sm))
                    .await
                    .map_err(|source| ApplyError::Apply {
                        kind: "ServiceMonitor",
                        name: key.name.clone(),
                        source,
                    })?;
            }
            None => delete_if_ours(&api, &key.name).await?,
        }
    }
    Ok(ds)
}

/// How long a successful apply of unchanged objects stands before they are applied
/// again (taking back a field someone else changed on an object not cached here).
pub const REAPPLY_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

/// What one [`apply_objects`] call wrote: a digest of every object it applies, and the
/// DaemonSet's `metadata.generation` it left. A reconcile whose objects have the same
/// digest, while the cached DaemonSet is still at that generation (nobody changed its
/// spec), skips the apply: applying unchanged objects is a no-op in the API server, but
/// still six requests, and a rollout has hundreds of reconciles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    digest: u64,
    generation: Option<i64>,
    at: Option<std::time::Instant>,
}

impl Applied {
    pub fn of(
        objects: &Objects,
        daemon_set: Option<&DaemonSet>,
        service_monitor_crd: bool,
    ) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        let parts = (
            &objects.service_account,
            &objects.cluster_role_binding,
            &objects.config_map,
            daemon_set,
            &objects.service,
            &objects.service_monitor,
            service_monitor_crd,
        );
        // Serialization of our own typed objects does not fail; if it did, the digest of
        // the error text differs from any real one and the objects are applied.
        match serde_json::to_string(&parts) {
            Ok(text) => text.hash(&mut hasher),
            Err(error) => error.to_string().hash(&mut hasher),
        }
        Self {
            digest: hasher.finish(),
            generation: None,
            at: None,
        }
    }

    /// This digest, applied at `now`, leaving the DaemonSet `stored`.
    pub fn stored(self, stored: Option<&DaemonSet>, now: std::time::Instant) -> Self {
        Self {
            generation: stored.and_then(|ds| ds.metadata.generation),
            at: Some(now),
            ..self
        }
    }

    /// Pure: the `last` apply covers these objects, and nothing says otherwise since.
    pub fn still_holds(
        &self,
        last: Option<&Self>,
        cached: Option<&DaemonSet>,
        now: std::time::Instant,
    ) -> bool {
        let Some(last) = last else { return false };
        let recent = last
            .at
            .is_some_and(|at| now.saturating_duration_since(at) < REAPPLY_AFTER);
        recent
            && last.digest == self.digest
            && last.generation == cached.and_then(|ds| ds.metadata.generation)
    }
}

/// Delete a ServiceMonitor we created earlier (and only ours).
async fn delete_if_ours(api: &Api<DynamicObject>, name: &str) -> Result<(), ApplyError> {
    let existing = api
        .get_opt(name)
        .await
        .map_err(|e| api_error("read the ServiceMonitor", e))?;
    if existing.is_some_and(|sm| {
        sm.labels()
            .get(crate::desired::LABEL_MANAGED_BY)
            .map(String::as_str)
            == Some(MANAGER)
    }) {
        api.delete(name, &DeleteParams::default())
            .await
            .map_err(|e| api_error("delete the disabled ServiceMonitor", e))?;
    }
    Ok(())
}

/// Step 2: delete the chosen pods (the DaemonSet controller recreates them from the new
/// template), [`DELETES_IN_FLIGHT`] at a time. A pod already gone is not an error; the
/// pods whose delete failed are returned with why, once every delete has been answered.
pub async fn delete_pods(
    client: &Client,
    key: &Key,
    names: &[String],
) -> Vec<(String, ApplyError)> {
    let api = Api::<Pod>::namespaced(client.clone(), &key.namespace);
    futures::stream::iter(names.to_vec())
        .map(|name: String| {
            let api = api.clone();
            async move {
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => None,
                    Err(kube::Error::Api(status)) if status.code == 404 => None,
                    Err(e) => Some((name, api_error("delete an old-revision agent pod", e))),
                }
            }
        })
        .buffer_unordered(DELETES_IN_FLIGHT)
        .filter_map(std::future::ready)
        .collect()
        .await
}

/// Pod deletes of one batch in flight at once: a batch of 100 takes a few round trips,
/// not a hundred, and the API server is not flooded.
pub const DELETES_IN_FLIGHT: usize = 16;

/// Step 3: delete unused hashed ConfigMaps (see [`unused_config_maps`]); returns their names.
pub async fn delete_config_maps(
    client: &Client,
    key: &Key,
    unused: &[String],
) -> Result<Vec<String>, ApplyError> {
    let api = Api::<ConfigMap>::namespaced(client.clone(), &key.namespace);
    for name in unused {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(api_error("delete an unused agent ConfigMap", e)),
        }
    }
    Ok(unused.to_vec())
}

/// The ConfigMaps a pod mounts.
pub fn mounted_config_maps(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.config_map.as_ref().map(|c| c.name.clone()))
        .collect()
}

/// Pure: the hashed ConfigMaps of this LogPipeline that nothing uses any more.
pub fn unused_config_maps(
    prefix: &str,
    existing: &[String],
    current: &str,
    mounted: &[String],
) -> Vec<String> {
    existing
        .iter()
        .filter(|name| {
            name.starts_with(prefix) && name.as_str() != current && !mounted.contains(name)
        })
        .cloned()
        .collect()
}

/// The stable revision's pod template, kept so a rollback can put it back (the spec only
/// describes the target). Stored in the owned ConfigMap `<name>-stable`.
#[derive(Clone, Debug, PartialEq)]
pub struct StableSnapshot {
    pub revision: String,
    pub release: String,
    /// The hashed ConfigMap the template mounts (kept by the ConfigMap GC).
    pub config_map: String,
    pub template: PodTemplateSpec,
}

pub fn stable_name(key: &Key) -> String {
    format!("{}-stable", key.name)
}

impl StableSnapshot {
    /// The snapshot of the target revision of `objects`.
    pub fn of(objects: &Objects) -> Option<Self> {
        Some(Self {
            revision: objects.revision.clone(),
            release: objects.release.clone(),
            config_map: objects.config_map.metadata.name.clone()?,
            template: objects.daemon_set.spec.as_ref()?.template.clone(),
        })
    }

    pub fn to_config_map(
        &self,
        lp: &LogPipeline,
        key: &Key,
    ) -> Result<ConfigMap, serde_json::Error> {
        Ok(ConfigMap {
            metadata: owned_meta(lp, key, stable_name(key)),
            data: Some(BTreeMap::from([
                ("revision".to_string(), self.revision.clone()),
                ("release".to_string(), self.release.clone()),
                ("configMap".to_string(), self.config_map.clone()),
                (
                    "template.json".to_string(),
                    serde_json::to_string(&self.template)?,
                ),
            ])),
            ..ConfigMap::default()
        })
    }

    pub fn from_config_map(cm: &ConfigMap) -> Result<Self, String> {
        let data = cm.data.as_ref().ok_or("no data")?;
        let get = |k: &str| data.get(k).cloned().ok_or_else(|| format!("no key {k}"));
        Ok(Self {
            revision: get("revision")?,
            release: get("release")?,
            config_map: get("configMap")?,
            template: serde_json::from_str(&get("template.json")?).map_err(|e| e.to_string())?,
        })
    }

    /// `daemon_set` with this snapshot's pod template (pure).
    pub fn apply_to(&self, daemon_set: &DaemonSet) -> DaemonSet {
        let mut ds = daemon_set.clone();
        if let Some(spec) = ds.spec.as_mut() {
            spec.template = self.template.clone();
        }
        ds
    }
}

/// The stable snapshot in its ConfigMap (from the cache), if any and readable.
pub fn stable_from(cm: Option<&ConfigMap>) -> Option<StableSnapshot> {
    let cm = cm?;
    match StableSnapshot::from_config_map(cm) {
        Ok(snapshot) => Some(snapshot),
        Err(message) => {
            // A damaged snapshot is as good as none: no rollback, said in the log.
            tracing::warn!(snapshot = %cm.name_any(), %message, "ignoring an unreadable stable snapshot");
            None
        }
    }
}

pub async fn save_stable(
    client: &Client,
    lp: &LogPipeline,
    key: &Key,
    snapshot: &StableSnapshot,
) -> Result<(), ApplyError> {
    let cm = snapshot
        .to_config_map(lp, key)
        .map_err(|e| ApplyError::Snapshot {
            name: stable_name(key),
            message: e.to_string(),
        })?;
    apply(
        &Api::<ConfigMap>::namespaced(client.clone(), &key.namespace),
        "ConfigMap",
        &cm,
    )
    .await
    .map(|_| ())
}

/// Remove the promote/abort annotations once acted on (a JSON merge patch: only these).
pub async fn clear_annotations(client: &Client, key: &Key) -> Result<(), ApplyError> {
    let patch =
        json!({"metadata": {"annotations": {ANNOTATION_PROMOTE: null, ANNOTATION_ABORT: null}}});
    Api::<LogPipeline>::namespaced(client.clone(), &key.namespace)
        .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|e| api_error("remove the promote/abort annotations", e))
}

/// Step 4: write the status if it changed; returns whether it wrote.
pub async fn patch_status(
    client: &Client,
    lp: &LogPipeline,
    status: &LogPipelineStatus,
) -> Result<bool, ApplyError> {
    if lp.status.as_ref() == Some(status) {
        return Ok(false);
    }
    tracing::debug!(old = ?lp.status, new = ?status, "status changed");
    let key = Key::of(lp).map_err(|_| ApplyError::NoName)?;
    let api = Api::<LogPipeline>::namespaced(client.clone(), &key.namespace);
    let patch = json!({
        "apiVersion": "logpipe.io/v1alpha1",
        "kind": "LogPipeline",
        "status": status,
    });
    api.patch_status(&key.name, &params(), &Patch::Apply(&patch))
        .await
        .map_err(|e| api_error("write the LogPipeline status", e))?;
    Ok(true)
}

/// The agents' ClusterRoleBinding. Its roleRef is immutable: a binding an earlier operator
/// made to its own per-LogPipeline ClusterRole is refused (422), so it is deleted and made
/// again to the chart's role, and the old role is deleted when allowed. The agents' watches
/// keep running meanwhile (a request is authorized when it starts).
async fn apply_binding(
    client: &Client,
    key: &Key,
    binding: &ClusterRoleBinding,
) -> Result<(), ApplyError> {
    let api = Api::<ClusterRoleBinding>::all(client.clone());
    match apply(&api, "ClusterRoleBinding", binding).await {
        Ok(_) => Ok(()),
        Err(ApplyError::Apply {
            source: kube::Error::Api(status),
            ..
        }) if role_ref_changed(&status) => {
            let name = key.cluster_name();
            tracing::info!(binding = %name, role = %binding.role_ref.name, "moving the agents' binding to the chart's ClusterRole");
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(api_error("delete the agents' old ClusterRoleBinding", e)),
            }
            apply(&api, "ClusterRoleBinding", binding).await?;
            delete_legacy_cluster_role(client, key, true).await;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The API server's answer to a changed roleRef: 422 `cannot change roleRef`.
fn role_ref_changed(status: &Status) -> bool {
    status.code == 422 && status.message.contains("roleRef")
}

/// Finalizer cleanup: delete the agents' ClusterRoleBinding (absent is fine), and the
/// ClusterRole an earlier operator created per LogPipeline, when allowed.
pub async fn delete_cluster_scoped(client: &Client, key: &Key) -> Result<(), ApplyError> {
    let name = key.cluster_name();
    match Api::<ClusterRoleBinding>::all(client.clone())
        .delete(&name, &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => return Err(api_error("delete the agents' ClusterRoleBinding", e)),
    }
    delete_legacy_cluster_role(client, key, false).await;
    Ok(())
}

/// Best effort: delete the ClusterRole `logpipe:<namespace>:<name>` operators before the
/// chart shipped the agents' role created. The chart grants `delete` on ClusterRoles only
/// with `rbac.legacyClusterRoleCleanup=true`; without it the API server refuses (403), and
/// the leftover role, bound to nothing, grants nothing (`kubectl delete clusterrole -l
/// app.kubernetes.io/managed-by=logpipe-operator` removes them all). `known`: an old binding
/// was just replaced, so the role surely exists: a refusal is worth a warning.
async fn delete_legacy_cluster_role(client: &Client, key: &Key, known: bool) {
    let name = key.cluster_name();
    match Api::<ClusterRole>::all(client.clone())
        .delete(&name, &DeleteParams::default())
        .await
    {
        Ok(_) => {
            tracing::info!(cluster_role = %name, "deleted the ClusterRole an earlier operator created")
        }
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(kube::Error::Api(status)) if status.code == 403 && !known => {
            tracing::debug!(cluster_role = %name, "not allowed to look for an earlier operator's ClusterRole");
        }
        Err(error) => tracing::warn!(
            cluster_role = %name,
            %error,
            "cannot delete the ClusterRole an earlier operator created: delete it with kubectl, or set the chart's rbac.legacyClusterRoleCleanup=true"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_role_ref_is_recognised() {
        let status = |code: u16, message: &str| Status::failure(message, "Invalid").with_code(code);
        // What kube-apiserver answers to a binding whose roleRef differs from the stored one.
        let changed = status(
            422,
            "ClusterRoleBinding.rbac.authorization.k8s.io \"logpipe:ns:lp\" is invalid: roleRef: Invalid value: rbac.RoleRef{APIGroup:\"rbac.authorization.k8s.io\", Kind:\"ClusterRole\", Name:\"logpipe-agent\"}: cannot change roleRef",
        );
        assert!(role_ref_changed(&changed));
        assert!(!role_ref_changed(&status(
            422,
            "subjects[0].name: Required value"
        )));
        assert!(!role_ref_changed(&status(403, "roleRef: forbidden")));
    }

    #[test]
    fn an_apply_stands_until_the_objects_or_the_daemon_sets_spec_change() {
        use std::time::{Duration, Instant};
        let objects = |image: &str| {
            let text = include_str!("../../examples/ops.yaml");
            let lp = crate::render::parse_log_pipelines(text).unwrap().remove(0);
            let ctx = crate::desired::Context {
                agent_image: "logpipe-agent:bundled".into(),
                service_monitor_crd: false,
                agent_cluster_role: crate::rbac::AGENT_CLUSTER_ROLE.into(),
            };
            let mut o = crate::desired::desired(&lp, &ctx).unwrap();
            if let Some(spec) = o.daemon_set.spec.as_mut()
                && let Some(pod) = spec.template.spec.as_mut()
            {
                pod.containers[0].image = Some(image.into());
            }
            o
        };
        let ds_at = |generation: i64| {
            let mut ds = DaemonSet::default();
            ds.metadata.generation = Some(generation);
            ds
        };
        let t0 = Instant::now();
        let a = objects("agent:1");
        let first = Applied::of(&a, Some(&a.daemon_set), false);
        let last = first.clone().stored(Some(&ds_at(3)), t0);
        let soon = t0 + Duration::from_secs(5);
        let cases = [
            ("nothing changed", first.clone(), ds_at(3), soon, true),
            ("never applied", first.clone(), ds_at(3), soon, true),
            (
                "someone changed the DaemonSet's spec",
                first.clone(),
                ds_at(4),
                soon,
                false,
            ),
            (
                "a new image",
                Applied::of(
                    &objects("agent:2"),
                    Some(&objects("agent:2").daemon_set),
                    false,
                ),
                ds_at(3),
                soon,
                false,
            ),
            (
                "the ServiceMonitor CRD appeared",
                Applied::of(&a, Some(&a.daemon_set), true),
                ds_at(3),
                soon,
                false,
            ),
            (
                "held: no DaemonSet template",
                Applied::of(&a, None, false),
                ds_at(3),
                soon,
                false,
            ),
            (
                "time to take back others' changes",
                first.clone(),
                ds_at(3),
                t0 + REAPPLY_AFTER,
                false,
            ),
        ];
        for (name, now, cached, at, want) in cases {
            let previous = (name != "never applied").then_some(&last);
            let want = want && previous.is_some();
            assert_eq!(now.still_holds(previous, Some(&cached), at), want, "{name}");
        }
    }

    #[test]
    fn unused_config_maps_keep_current_and_mounted() {
        let existing: Vec<String> = [
            "lp-config-a",
            "lp-config-b",
            "lp-config-c",
            "lp-other",
            "lp2-config-x",
        ]
        .map(String::from)
        .to_vec();
        let unused = unused_config_maps(
            "lp-config-",
            &existing,
            "lp-config-c",
            &["lp-config-b".into()],
        );
        assert_eq!(unused, ["lp-config-a"]);
    }
}
