//! Overlap between LogPipelines: pods that two (or more) pipelines' `spec.selector`
//! select are shipped by each of them, so every line is stored twice. Nobody should pay
//! for that unknowingly: each pipeline's status says how many of the pods it ships are
//! also shipped by others, and by which.
//!
//! Flow: observe (every LogPipeline's selector, every pod's namespace and labels, every
//! namespace's labels, from the caches) → [`decide`] (pure, table-tested) → the status of
//! each pipeline carries its [`Overlap`].
//!
//! Guarantees: a pipeline is compared with pipelines of every namespace (agents of all
//! pipelines run on every node); a pod is counted once per pipeline however many others
//! select it; `with` is sorted, so an unchanged cluster gives an identical status.
//!
//! Caveats: the counts are those of the observed pods (the caches may be an event
//! behind), counted again at most every [`RECOUNT`] unless a pipeline's spec changed, and
//! written when the pipeline is reconciled; a pod whose namespace is not observed is
//! judged by its namespace name label.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::PartialObjectMeta;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use logpipe_api::selector::{NAMESPACE_NAME_LABEL, PodSelection};

use crate::crd::{LogPipeline, LogPipelineStatus};

/// A pipeline, as `namespace/name`, and what it selects.
#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline<'a> {
    pub key: String,
    pub selector: &'a PodSelection,
}

/// A pod's namespace and labels.
#[derive(Clone, Debug, PartialEq)]
pub struct PodLabels<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// What one pipeline shares with others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overlap {
    /// Pods this pipeline ships that another pipeline ships too.
    pub pods: usize,
    /// The other pipelines (`namespace/name`), sorted.
    pub with: BTreeSet<String>,
}

/// Each pipeline's overlap with the others; pipelines without overlap are absent.
pub fn decide(
    pipelines: &[Pipeline<'_>],
    pods: &[PodLabels<'_>],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> BTreeMap<String, Overlap> {
    let mut out: BTreeMap<String, Overlap> = BTreeMap::new();
    if pipelines.len() < 2 {
        return out;
    }
    for pod in pods {
        let fallback;
        let ns_labels = match namespaces.get(pod.namespace) {
            Some(labels) => labels,
            None => {
                fallback =
                    BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), pod.namespace.to_string())]);
                &fallback
            }
        };
        let shippers: Vec<&str> = pipelines
            .iter()
            .filter(|p| p.selector.selects(ns_labels, pod.labels))
            .map(|p| p.key.as_str())
            .collect();
        if shippers.len() < 2 {
            continue;
        }
        for me in &shippers {
            let entry = out.entry((*me).to_string()).or_default();
            entry.pods += 1;
            entry.with.extend(
                shippers
                    .iter()
                    .filter(|other| *other != me)
                    .map(|o| o.to_string()),
            );
        }
    }
    out
}

/// Every pod's and every namespace's metadata.
type Watches = (
    Store<PartialObjectMeta<Pod>>,
    Store<PartialObjectMeta<Namespace>>,
);

/// The observe layer: the controller's LogPipeline store, and metadata watches of every
/// pod and namespace, started by the first reconcile that sees two LogPipelines (a
/// cluster with one pipeline never pays for them).
#[derive(Default)]
pub struct Observer {
    pipelines: OnceLock<Store<LogPipeline>>,
    watches: OnceLock<Watches>,
    /// Every pipeline's overlap, when it was decided and for which pipeline specs: one pass
    /// over the pods serves every reconcile for [`RECOUNT`] (a rollout wakes hundreds of
    /// them) unless a pipeline came, went or changed its spec.
    counted: Mutex<Option<Counted>>,
}

struct Counted {
    at: Instant,
    /// Each pipeline's key and spec generation, sorted.
    specs: Vec<(String, Option<i64>)>,
    overlaps: BTreeMap<String, Overlap>,
}

/// How long an overlap count stands before the pods are counted again.
pub const RECOUNT: Duration = Duration::from_secs(10);

impl Observer {
    /// The controller's store of every LogPipeline it watches (set once by `run`).
    pub fn set_pipelines(&self, store: Store<LogPipeline>) {
        let _ = self.pipelines.set(store);
    }

    /// `lp`'s overlap; `None` while not known yet (the watches have not listed once).
    pub fn of(&self, client: &Client, lp: &LogPipeline) -> Option<Overlap> {
        let all = self.pipelines.get()?.state();
        if all.len() < 2 {
            return Some(Overlap::default());
        }
        let (pods, namespaces) = self.watches.get_or_init(|| {
            tracing::info!("watching pod and namespace labels: two LogPipelines may overlap");
            (
                crate::cache::watch_metadata::<Pod>(client),
                crate::cache::watch_metadata::<Namespace>(client),
            )
        });
        let ready = |ready: Option<Result<(), _>>| matches!(ready, Some(Ok(())));
        use futures::FutureExt;
        if !ready(pods.wait_until_ready().now_or_never())
            || !ready(namespaces.wait_until_ready().now_or_never())
        {
            return None;
        }
        let mut specs: Vec<_> = all
            .iter()
            .map(|p| (key(p), p.metadata.generation))
            .collect();
        specs.sort();
        let mut counted = self.counted.lock().ok()?;
        let fresh = |c: &Counted| c.at.elapsed() < RECOUNT && c.specs == specs;
        if !counted.as_ref().is_some_and(fresh) {
            let overlaps = count(&all, pods, namespaces);
            *counted = Some(Counted {
                at: Instant::now(),
                specs,
                overlaps,
            });
        }
        let overlaps = &counted.as_ref()?.overlaps;
        Some(overlaps.get(&key(lp)).cloned().unwrap_or_default())
    }
}

fn key(p: &LogPipeline) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

/// Every pipeline's overlap from the stores' current state.
fn count(
    all: &[std::sync::Arc<LogPipeline>],
    pods: &Store<PartialObjectMeta<Pod>>,
    namespaces: &Store<PartialObjectMeta<Namespace>>,
) -> BTreeMap<String, Overlap> {
    let pipelines: Vec<Pipeline> = all
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| Pipeline {
            key: key(p),
            selector: &p.spec.selector,
        })
        .collect();
    let pod_state = pods.state();
    let pod_labels: Vec<PodLabels> = pod_state
        .iter()
        .filter_map(|p| {
            Some(PodLabels {
                namespace: p.metadata.namespace.as_deref()?,
                labels: p.metadata.labels.as_ref()?,
            })
        })
        .collect();
    let namespace_labels = namespaces
        .state()
        .iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect();
    decide(&pipelines, &pod_labels, &namespace_labels)
}

/// Write `overlap` into `status`; when unknown, keep what `old` said.
pub fn annotate(
    status: &mut LogPipelineStatus,
    overlap: Option<Overlap>,
    old: Option<&LogPipelineStatus>,
) {
    match overlap {
        Some(o) => {
            status.overlapping_pods =
                (o.pods > 0).then(|| i32::try_from(o.pods).unwrap_or(i32::MAX));
            status.overlaps_with = o.with.into_iter().collect();
        }
        None => {
            status.overlapping_pods = old.and_then(|s| s.overlapping_pods);
            status.overlaps_with = old.map(|s| s.overlaps_with.clone()).unwrap_or_default();
        }
    }
}

/// The status message of an overlap: `12 pods are also shipped by logging/teams`.
pub fn message(overlap: &Overlap) -> String {
    let with: Vec<&str> = overlap.with.iter().map(String::as_str).collect();
    format!(
        "{} pods are also shipped by {} (each of their lines is stored once per pipeline)",
        overlap.pods,
        with.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name, pipelines, expected overlap of each.
    type Case<'a> = (&'a str, Vec<Pipeline<'a>>, Vec<(&'a str, Overlap)>);

    fn sel(yaml: &str) -> PodSelection {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn overlap_table() {
        let everything = PodSelection::default();
        let ops = sel(
            "namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [kube-system, logging]}]}",
        );
        let teams = sel(
            "namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [kube-system, logging]}]}",
        );
        let web = sel("podSelector: {matchLabels: {app: web}}");
        let namespaces = BTreeMap::from([
            (
                "shop".to_string(),
                labels(&[(NAMESPACE_NAME_LABEL, "shop")]),
            ),
            (
                "logging".to_string(),
                labels(&[(NAMESPACE_NAME_LABEL, "logging")]),
            ),
        ]);
        let (a, b, c) = (
            labels(&[("app", "web")]),
            labels(&[("app", "api")]),
            labels(&[]),
        );
        let pods = [
            PodLabels {
                namespace: "shop",
                labels: &a,
            },
            PodLabels {
                namespace: "shop",
                labels: &b,
            },
            PodLabels {
                namespace: "logging",
                labels: &c,
            },
            // Not in the namespace cache: judged by its name.
            PodLabels {
                namespace: "kube-system",
                labels: &a,
            },
        ];
        let p = |key: &str, selector| Pipeline {
            key: key.into(),
            selector,
        };
        let o = |pods: usize, with: &[&str]| Overlap {
            pods,
            with: with.iter().map(|w| w.to_string()).collect(),
        };
        let cases: Vec<Case> = vec![
            (
                "one pipeline never overlaps",
                vec![p("a/all", &everything)],
                vec![],
            ),
            (
                "a partition has none",
                vec![p("x/ops", &ops), p("x/teams", &teams)],
                vec![],
            ),
            (
                "everything overlaps a partition half",
                vec![p("x/ops", &ops), p("x/all", &everything)],
                vec![("x/all", o(2, &["x/ops"])), ("x/ops", o(2, &["x/all"]))],
            ),
            (
                "three pipelines on one pod",
                vec![
                    p("x/teams", &teams),
                    p("x/web", &web),
                    p("y/all", &everything),
                ],
                vec![
                    ("x/teams", o(2, &["x/web", "y/all"])),
                    ("x/web", o(2, &["x/teams", "y/all"])),
                    ("y/all", o(3, &["x/teams", "x/web"])),
                ],
            ),
        ];
        for (name, pipelines, want) in cases {
            let got = decide(&pipelines, &pods, &namespaces);
            let want: BTreeMap<String, Overlap> =
                want.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn the_message_names_the_others() {
        let overlap = Overlap {
            pods: 3,
            with: BTreeSet::from(["logging/teams".to_string()]),
        };
        assert!(message(&overlap).starts_with("3 pods are also shipped by logging/teams"));
    }
}
