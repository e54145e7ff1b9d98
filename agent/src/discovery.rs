//! Pod discovery for this node: one watch on Pods with `fieldSelector=spec.nodeName=<node>`
//! (no per-pod API calls), kept as an index `uid -> PodMeta` the tailer's handler reads to
//! label files.
//!
//! Without a Kubernetes client (no `--kubeconfig` and not in a cluster) the index is
//! disabled and files get labels derived from their path only (namespace, pod, container,
//! node), so the agent runs on a laptop against a plain `/var/log/pods` tree.
//!
//! A deleted pod stays in the index for [`DELETED_RETENTION`], so the lines its files
//! still hold are shipped with the pod's labels.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::server::Health;

pub const DELETED_RETENTION: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("--kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("in-cluster Kubernetes config: {0}")]
    InCluster(String),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(String),
}

/// What labeling needs from a pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The owner reference marked `controller: true`, as (kind, name).
    pub controller: Option<(String, String)>,
    pub containers: Vec<String>,
}

impl PodMeta {
    /// `None` for a pod without a uid (never from the API server).
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone()?;
        let controller = meta.owner_references.as_ref().and_then(|owners| {
            owners
                .iter()
                .find(|o| o.controller == Some(true))
                .map(|o| (o.kind.clone(), o.name.clone()))
        });
        let mut containers = Vec::new();
        if let Some(spec) = &pod.spec {
            containers.extend(spec.containers.iter().map(|c| c.name.clone()));
            containers.extend(
                spec.init_containers
                    .iter()
                    .flatten()
                    .map(|c| c.name.clone()),
            );
            containers.extend(
                spec.ephemeral_containers
                    .iter()
                    .flatten()
                    .map(|c| c.name.clone()),
            );
        }
        Some(Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid,
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
            controller,
            containers,
        })
    }
}

#[derive(Debug, Default)]
struct Entry {
    meta: PodMeta,
    deleted_at: Option<Instant>,
}

/// The node's pods by uid, shared with the tailer's handler.
#[derive(Debug, Default)]
pub struct PodIndex {
    enabled: bool,
    pods: RwLock<HashMap<String, Entry>>,
    synced: AtomicBool,
    version: AtomicU64,
}

impl PodIndex {
    /// No discovery: every lookup misses and the index counts as synced.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            synced: AtomicBool::new(true),
            ..Self::default()
        }
    }

    pub fn enabled() -> Self {
        Self {
            enabled: true,
            ..Self::default()
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The first full list arrived.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Changes whenever any pod changes; handlers re-label when it moved.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn get(&self, uid: &str) -> Option<PodMeta> {
        let pods = self.pods.read().unwrap_or_else(|p| p.into_inner());
        pods.get(uid).map(|e| e.meta.clone())
    }

    pub fn len(&self) -> usize {
        let pods = self.pods.read().unwrap_or_else(|p| p.into_inner());
        pods.values().filter(|e| e.deleted_at.is_none()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn apply(&self, meta: PodMeta) {
        let mut pods = self.pods.write().unwrap_or_else(|p| p.into_inner());
        let changed = pods
            .get(&meta.uid)
            .is_none_or(|e| e.meta != meta || e.deleted_at.is_some());
        if changed {
            pods.insert(
                meta.uid.clone(),
                Entry {
                    meta,
                    deleted_at: None,
                },
            );
            self.version.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub fn delete(&self, uid: &str) {
        let mut pods = self.pods.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = pods.get_mut(uid) {
            entry.deleted_at.get_or_insert_with(Instant::now);
        }
        prune(&mut pods);
    }

    /// A full list: pods missing from it were deleted while the watch was down.
    pub fn replace_all(&self, metas: Vec<PodMeta>) {
        let mut pods = self.pods.write().unwrap_or_else(|p| p.into_inner());
        let listed: HashMap<String, PodMeta> =
            metas.into_iter().map(|m| (m.uid.clone(), m)).collect();
        let now = Instant::now();
        for (uid, entry) in pods.iter_mut() {
            if !listed.contains_key(uid) {
                entry.deleted_at.get_or_insert(now);
            }
        }
        for (uid, meta) in listed {
            pods.insert(
                uid,
                Entry {
                    meta,
                    deleted_at: None,
                },
            );
        }
        prune(&mut pods);
        self.version.fetch_add(1, Ordering::AcqRel);
        self.synced.store(true, Ordering::Release);
    }
}

fn prune(pods: &mut HashMap<String, Entry>) {
    pods.retain(|_, e| e.deleted_at.is_none_or(|t| t.elapsed() < DELETED_RETENTION));
}

/// A Kubernetes client from `--kubeconfig`, else the in-cluster config, else `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Option<Client>, DiscoveryError> {
    let config = if let Some(path) = kubeconfig {
        let kc =
            kube::config::Kubeconfig::read_from(path).map_err(|e| DiscoveryError::Kubeconfig {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| DiscoveryError::Kubeconfig {
                path: path.display().to_string(),
                message: e.to_string(),
            })?
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        kube::Config::incluster().map_err(|e| DiscoveryError::InCluster(e.to_string()))?
    } else {
        return Ok(None);
    };
    Client::try_from(config)
        .map(Some)
        .map_err(|e| DiscoveryError::Client(e.to_string()))
}

/// Watch this node's pods until `cancel`; the watcher retries with backoff on errors.
pub async fn run(
    client: Client,
    node: String,
    index: Arc<PodIndex>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut listing: Vec<PodMeta> = Vec::new();
    loop {
        let next = tokio::select! {
            next = events.try_next() => next,
            _ = cancel.cancelled() => return,
        };
        match next {
            Ok(Some(Event::Init)) => listing.clear(),
            Ok(Some(Event::InitApply(pod))) => listing.extend(PodMeta::from_pod(&pod)),
            Ok(Some(Event::InitDone)) => {
                index.replace_all(std::mem::take(&mut listing));
                health.set_discovery_ready(true);
                metrics.discovery_synced.set(1);
                tracing::info!(node = %node, pods = index.len(), "pod discovery synced");
            }
            Ok(Some(Event::Apply(pod))) => {
                if let Some(meta) = PodMeta::from_pod(&pod) {
                    index.apply(meta);
                }
            }
            Ok(Some(Event::Delete(pod))) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    index.delete(uid);
                }
            }
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "pod watch failed, retrying"),
        }
        metrics.discovery_pods.set(index.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;

    fn pod(uid: &str, app: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("{app}-7d9f8c6b5d-x2x2x")),
                namespace: Some("shop".into()),
                uid: Some(uid.into()),
                labels: Some(BTreeMap::from([("app".into(), app.into())])),
                owner_references: Some(vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "ReplicaSet".into(),
                    name: format!("{app}-7d9f8c6b5d"),
                    uid: "rs".into(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn index_tracks_applies_deletes_and_relists() {
        let index = PodIndex::enabled();
        assert!(!index.is_synced());
        let meta = PodMeta::from_pod(&pod("u1", "web")).unwrap();
        assert_eq!(
            meta.controller,
            Some(("ReplicaSet".to_string(), "web-7d9f8c6b5d".to_string()))
        );
        index.replace_all(vec![meta]);
        assert!(index.is_synced() && index.len() == 1);
        let v = index.version();
        index.apply(PodMeta::from_pod(&pod("u2", "api")).unwrap());
        assert!(index.version() > v);
        index.delete("u1");
        // Kept for the files it still has, but not counted.
        assert_eq!(index.get("u1").unwrap().name, "web-7d9f8c6b5d-x2x2x");
        assert_eq!(index.len(), 1);
        index.replace_all(vec![]);
        assert_eq!(index.len(), 0);
        assert!(index.get("u2").is_some());
    }
}
