//! What the operator knows of the cluster: one reflector cache per kind a reconcile reads,
//! so that a reconcile lists and gets nothing to learn state.
//!
//! # Flow
//! 1. [`Caches::new`] makes the stores; [`Writers`] go to `controller::run`, which builds a
//!    watch stream per kind ([`pod_stream`], [`daemon_set_stream`], [`config_map_stream`],
//!    [`service_monitor_crd_trigger`]) and hands them to the `Controller`, which drives
//!    them: the agent pods, DaemonSets and ConfigMaps labelled
//!    `app.kubernetes.io/managed-by: logpipe-operator`, and the ServiceMonitor CRD by name
//!    (metadata only; its appearance or removal reconciles every LogPipeline).
//! 2. Agent pods are trimmed before they enter the store ([`trim_pod`]) to what
//!    `controller::pod_view`, verification targets and the ConfigMap GC read: a thousand
//!    pods take a few hundred KiB, not the megabytes full pods (managed fields, container
//!    specs) do.
//! 3. Nodes are watched (metadata only) from the first reconcile that needs their labels (a
//!    canary step with a `nodeSelector`), never before: [`Caches::node_labels`].
//! 4. A reconcile first asks [`Caches::ready`]: until every store has its first full list,
//!    it acts on nothing and looks again in a second.
//!
//! # Guarantees
//! - After start, the only requests to learn state are the watches (and one list per
//!   watch when it starts or its resourceVersion expires).
//! - A reconcile never acts on a store that has not been listed once.
//!
//! # Caveats
//! - A cache may be a few events behind the API server: the reconcile may act on an older
//!   view. Every write is idempotent (server-side apply, delete of a gone pod is fine), and
//!   the next event brings the next reconcile.
//! - The node watch, once started, stays for the life of the process.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, ContainerState, ContainerStateTerminated, ContainerStatus,
    Node, Pod, PodCondition, PodSpec, PodStatus, Volume,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::desired::daemonset::CONTAINER;
use crate::desired::{
    ANNOTATION_REVISION, APP_NAME, Key, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME, MANAGER,
};
use crate::rbac::SERVICE_MONITOR_CRD;

/// The read side of every cache.
#[derive(Clone)]
pub struct Caches {
    pub pods: Store<Pod>,
    pub daemon_sets: Store<DaemonSet>,
    pub config_maps: Store<ConfigMap>,
    pub crds: Store<PartialObjectMeta<CustomResourceDefinition>>,
    nodes: Arc<OnceLock<Store<PartialObjectMeta<Node>>>>,
}

/// The write side, consumed by the watch streams.
pub struct Writers {
    pub pods: reflector::store::Writer<Pod>,
    pub daemon_sets: reflector::store::Writer<DaemonSet>,
    pub config_maps: reflector::store::Writer<ConfigMap>,
    pub crds: reflector::store::Writer<PartialObjectMeta<CustomResourceDefinition>>,
}

fn listed<K>(store: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

/// Nodes' labels by node name.
pub type NodeLabels = BTreeMap<String, BTreeMap<String, String>>;

impl Caches {
    pub fn new() -> (Self, Writers) {
        let (pods, pods_w) = reflector::store();
        let (daemon_sets, ds_w) = reflector::store();
        let (config_maps, cm_w) = reflector::store();
        let (crds, crds_w) = reflector::store();
        (
            Self {
                pods,
                daemon_sets,
                config_maps,
                crds,
                nodes: Arc::new(OnceLock::new()),
            },
            Writers {
                pods: pods_w,
                daemon_sets: ds_w,
                config_maps: cm_w,
                crds: crds_w,
            },
        )
    }

    /// Every store the reconcile reads has had its first full list.
    pub fn ready(&self) -> bool {
        listed(&self.pods)
            && listed(&self.daemon_sets)
            && listed(&self.config_maps)
            && listed(&self.crds)
    }

    /// This LogPipeline's agent pods.
    pub fn pods_of(&self, key: &Key) -> Vec<Arc<Pod>> {
        let mut pods = self.pods.state_filter(|p| {
            p.metadata.namespace.as_deref() == Some(key.namespace.as_str())
                && p.labels().get(LABEL_INSTANCE) == Some(&key.name)
                && p.labels().get(LABEL_NAME).map(String::as_str) == Some(APP_NAME)
        });
        // The store's order is a hash map's: sort, so the plan sees the same list twice.
        pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        pods
    }

    pub fn daemon_set(&self, key: &Key) -> Option<Arc<DaemonSet>> {
        self.daemon_sets
            .get(&reflector::ObjectRef::new(&key.name).within(&key.namespace))
    }

    pub fn config_map(&self, namespace: &str, name: &str) -> Option<Arc<ConfigMap>> {
        self.config_maps
            .get(&reflector::ObjectRef::new(name).within(namespace))
    }

    /// Names of this LogPipeline's ConfigMaps (hashed configs and the stable snapshot).
    pub fn config_map_names(&self, key: &Key) -> Vec<String> {
        let mut names: Vec<String> = self
            .config_maps
            .state_filter(|cm| {
                cm.metadata.namespace.as_deref() == Some(key.namespace.as_str())
                    && cm.labels().get(LABEL_INSTANCE) == Some(&key.name)
            })
            .iter()
            .map(|cm| cm.name_any())
            .collect();
        names.sort();
        names
    }

    pub fn service_monitor_crd(&self) -> bool {
        self.crds
            .state()
            .iter()
            .any(|crd| crd.name_any() == SERVICE_MONITOR_CRD)
    }

    /// Labels of every node, from a metadata watch started by the first call. `None` until
    /// that watch has listed the nodes once (the caller looks again soon).
    pub fn node_labels(&self, client: &Client) -> Option<NodeLabels> {
        let store = self.nodes.get_or_init(|| {
            tracing::info!("watching nodes: a canary step selects nodes by labels");
            watch_metadata::<Node>(client)
        });
        if !listed(store) {
            return None;
        }
        Some(
            store
                .state()
                .iter()
                .map(|n| (n.name_any(), n.labels().clone()))
                .collect(),
        )
    }
}

/// A store of every `K`'s metadata (managed fields dropped), kept by a watch spawned now
/// for the life of the process.
pub fn watch_metadata<K>(client: &Client) -> Store<PartialObjectMeta<K>>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let api: Api<PartialObjectMeta<K>> = Api::all(client.clone());
    let stream = watcher(api, watcher::Config::default())
        // Only labels are read: annotations (last-applied configurations among them) would
        // be most of the store's memory on a cluster of many pods.
        .modify(|o: &mut PartialObjectMeta<K>| {
            o.metadata.managed_fields = None;
            o.metadata.annotations = None;
        })
        .default_backoff()
        .reflect(writer);
    tokio::spawn(stream.for_each(|_| std::future::ready(())));
    reader
}

fn managed() -> watcher::Config {
    watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"))
}

/// The agent pods, trimmed, into the pod store; every event is a reconcile trigger.
pub fn pod_stream(
    api: Api<Pod>,
    writer: reflector::store::Writer<Pod>,
) -> impl Stream<Item = Result<Pod, watcher::Error>> + Send + 'static {
    watcher(api, managed())
        .modify(trim_pod)
        .default_backoff()
        .reflect(writer)
        .touched_objects()
}

pub fn daemon_set_stream(
    api: Api<DaemonSet>,
    writer: reflector::store::Writer<DaemonSet>,
) -> impl Stream<Item = Result<DaemonSet, watcher::Error>> + Send + 'static {
    watcher(api, managed())
        .modify(|ds: &mut DaemonSet| ds.metadata.managed_fields = None)
        .default_backoff()
        .reflect(writer)
        .touched_objects()
}

pub fn config_map_stream(
    api: Api<ConfigMap>,
    writer: reflector::store::Writer<ConfigMap>,
) -> impl Stream<Item = Result<ConfigMap, watcher::Error>> + Send + 'static {
    watcher(api, managed())
        .modify(|cm: &mut ConfigMap| cm.metadata.managed_fields = None)
        .default_backoff()
        .reflect(writer)
        .touched_objects()
}

/// One item whenever the ServiceMonitor CRD appears, changes or goes.
pub fn service_monitor_crd_trigger(
    client: Client,
    writer: reflector::store::Writer<PartialObjectMeta<CustomResourceDefinition>>,
) -> impl Stream<Item = ()> + Send + 'static {
    let api: Api<PartialObjectMeta<CustomResourceDefinition>> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={SERVICE_MONITOR_CRD}"));
    watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .touched_objects()
        .filter_map(|r| std::future::ready(r.ok().map(|_| ())))
}

/// What the operator reads of an agent pod, and nothing else (see the module docs).
pub fn trim_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.generate_name = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|k, _| k == ANNOTATION_REVISION);
    }
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        volumes: spec.volumes.map(|vs| {
            vs.into_iter()
                .filter_map(|v| {
                    let cm = v.config_map?;
                    Some(Volume {
                        name: v.name,
                        config_map: Some(ConfigMapVolumeSource {
                            name: cm.name,
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                })
                .collect()
        }),
        ..Default::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        pod_ip: status.pod_ip,
        phase: status.phase,
        conditions: status.conditions.map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready" || c.type_ == "ContainersReady")
                .map(|c| PodCondition {
                    type_: c.type_,
                    status: c.status,
                    ..Default::default()
                })
                .collect()
        }),
        container_statuses: status.container_statuses.map(|cs| {
            // The agent's (or the first), as `controller::pod_view` reads it.
            let keep = cs
                .iter()
                .position(|c| c.name == CONTAINER)
                .unwrap_or_default();
            cs.into_iter()
                .enumerate()
                .filter(|(i, _)| *i == keep)
                .map(|(_, c)| trim_container(c))
                .collect()
        }),
        ..Default::default()
    });
}

fn trim_container(c: ContainerStatus) -> ContainerStatus {
    let trim_state = |s: Option<ContainerState>| {
        s.map(|s| ContainerState {
            running: s.running,
            waiting: s.waiting,
            terminated: s.terminated.map(|t| ContainerStateTerminated {
                exit_code: t.exit_code,
                message: t.message,
                finished_at: t.finished_at,
                ..Default::default()
            }),
        })
    };
    ContainerStatus {
        name: c.name,
        ready: c.ready,
        restart_count: c.restart_count,
        state: trim_state(c.state),
        last_state: trim_state(c.last_state),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::pod_view;

    /// What the reconcile reads of a pod is the same before and after trimming.
    #[test]
    fn trimming_keeps_what_the_reconcile_reads() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "lp-abc", "namespace": "ns", "uid": "u1",
                "labels": {LABEL_INSTANCE: "lp", LABEL_NAME: APP_NAME},
                "annotations": {ANNOTATION_REVISION: "r2", "other": "x"},
                "creationTimestamp": "2026-12-01T00:00:00Z",
                "managedFields": [{"manager": "kubelet"}],
            },
            "spec": {
                "nodeName": "node-0",
                "containers": [{"name": CONTAINER, "image": "agent:1"}],
                "volumes": [
                    {"name": "config", "configMap": {"name": "lp-config-abc"}},
                    {"name": "logs", "hostPath": {"path": "/var/log"}},
                ],
            },
            "status": {
                "podIP": "127.1.0.2",
                "conditions": [
                    {"type": "Ready", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "PodScheduled", "status": "True"},
                ],
                "containerStatuses": [
                    {"name": "sidecar", "image": "x", "imageID": "", "ready": true, "restartCount": 9},
                    {"name": CONTAINER, "image": "x", "imageID": "", "ready": false, "restartCount": 3,
                     "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                     "lastState": {"terminated": {"exitCode": 1, "message": "bad regex",
                        "finishedAt": "2026-12-01T00:01:00Z"}}},
                ],
            },
        }))
        .unwrap();
        let mut trimmed = pod.clone();
        trim_pod(&mut trimmed);
        assert_eq!(pod_view(&trimmed), pod_view(&pod));
        assert_eq!(
            crate::verify::Target::of(&trimmed).ip,
            Some("127.1.0.2".into())
        );
        assert!(trimmed.metadata.managed_fields.is_none());
        assert_eq!(trimmed.annotations().len(), 1);
        let volumes = trimmed.spec.as_ref().unwrap().volumes.as_ref().unwrap();
        assert_eq!(volumes.len(), 1);
        assert_eq!(
            trimmed
                .status
                .as_ref()
                .unwrap()
                .container_statuses
                .as_ref()
                .unwrap()
                .len(),
            1
        );
    }
}
