//! `selector`: which of the node's pods this agent ships.
//!
//! Flow: the pod watch ([`crate::discovery`]) gives each pod's labels; when the config has
//! a `namespaceSelector`, [`run_namespace_watch`] keeps every namespace's labels in a
//! [`NamespaceIndex`] (one cluster-wide watch, metadata only). The tailer's handler asks
//! [`decide`] when it opens a file and whenever either index changed: a file of an
//! unselected pod is read and skipped (its position moves, nothing is shipped).
//!
//! Guarantees:
//! - An empty selector ships every pod, with or without discovery, as before.
//! - With a selector, a file is never shipped on a guess: until its pod (and, for a
//!   namespace selector, the namespaces) are known, the file waits unopened.
//! - A pod or namespace whose labels change is re-decided at the next read of its files;
//!   lines read while it was unselected are not shipped later.
//!
//! Caveats: a namespace missing from the index (the watch lags a new namespace) is judged
//! by the label the API server sets on every namespace, `kubernetes.io/metadata.name`.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use logpipe_api::selector::{NAMESPACE_NAME_LABEL, PodSelection};
use tokio_util::sync::CancellationToken;

use crate::discovery::PodMeta;

/// What the handler does with a file's lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ship,
    Skip,
    /// Not decidable yet (pod or namespaces not known): keep the file unopened.
    Wait,
}

/// The selection's verdict on a pod. `pod` is `None` while discovery does not know it;
/// `namespaces` is `None` while the namespace watch has not listed.
pub fn decide(
    selection: &PodSelection,
    pod: Option<&PodMeta>,
    namespaces: Option<&NamespaceIndex>,
) -> Verdict {
    if selection.is_empty() {
        return Verdict::Ship;
    }
    let Some(pod) = pod else {
        return Verdict::Wait;
    };
    let namespace_labels = if selection.namespace_selector.is_empty() {
        BTreeMap::new()
    } else {
        match namespaces {
            Some(index) if index.is_synced() => index.labels(&pod.namespace),
            _ => return Verdict::Wait,
        }
    };
    if selection.selects(&namespace_labels, &pod.labels) {
        Verdict::Ship
    } else {
        Verdict::Skip
    }
}

/// Every namespace's labels, by name.
#[derive(Debug, Default)]
pub struct NamespaceIndex {
    labels: RwLock<HashMap<String, BTreeMap<String, String>>>,
    synced: AtomicBool,
    version: AtomicU64,
}

impl NamespaceIndex {
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Changes whenever a namespace's labels change; handlers re-decide when it moved.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The namespace's labels; for one not (yet) known, the name label every namespace has.
    pub fn labels(&self, name: &str) -> BTreeMap<String, String> {
        let map = self.labels.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).cloned().unwrap_or_else(|| {
            BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())])
        })
    }

    /// The namespace's labels, `None` while the watch has not seen it.
    pub fn get(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let map = self.labels.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).cloned()
    }

    pub fn apply(&self, name: String, labels: BTreeMap<String, String>) {
        let mut map = self.labels.write().unwrap_or_else(|p| p.into_inner());
        if map.get(&name) != Some(&labels) {
            map.insert(name, labels);
            self.version.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub fn delete(&self, name: &str) {
        let mut map = self.labels.write().unwrap_or_else(|p| p.into_inner());
        if map.remove(name).is_some() {
            self.version.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub fn replace_all(&self, listed: HashMap<String, BTreeMap<String, String>>) {
        let mut map = self.labels.write().unwrap_or_else(|p| p.into_inner());
        *map = listed;
        self.version.fetch_add(1, Ordering::AcqRel);
        self.synced.store(true, Ordering::Release);
    }
}

/// Watch every namespace's labels (metadata only) until `cancel`; retries with backoff.
pub async fn run_namespace_watch(
    client: Client,
    index: std::sync::Arc<NamespaceIndex>,
    cancel: CancellationToken,
) {
    let api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing = HashMap::new();
    loop {
        let next = tokio::select! {
            next = events.try_next() => next,
            _ = cancel.cancelled() => return,
        };
        match next {
            Ok(Some(Event::Init)) => listing.clear(),
            Ok(Some(Event::InitApply(ns))) => {
                listing.insert(ns.name_any(), ns.labels().clone());
            }
            Ok(Some(Event::InitDone)) => {
                index.replace_all(std::mem::take(&mut listing));
                tracing::info!("namespace watch synced");
            }
            Ok(Some(Event::Apply(ns))) => index.apply(ns.name_any(), ns.labels().clone()),
            Ok(Some(Event::Delete(ns))) => index.delete(&ns.name_any()),
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "namespace watch failed, retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(namespace: &str, app: &str) -> PodMeta {
        PodMeta {
            namespace: namespace.into(),
            name: format!("{app}-0"),
            uid: format!("{namespace}-{app}"),
            labels: BTreeMap::from([("app".into(), app.into())]),
            ..PodMeta::default()
        }
    }

    /// Name, selector, pod, namespaces, expected verdict.
    type Case<'a> = (
        &'a str,
        &'a PodSelection,
        Option<&'a PodMeta>,
        Option<&'a NamespaceIndex>,
        Verdict,
    );

    fn selection(yaml: &str) -> PodSelection {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn verdicts() {
        let synced = NamespaceIndex::default();
        synced.replace_all(HashMap::from([(
            "shop".to_string(),
            BTreeMap::from([("team".to_string(), "shop".to_string())]),
        )]));
        let unsynced = NamespaceIndex::default();
        let by_team = selection("namespaceSelector: {matchLabels: {team: shop}}");
        let by_name = selection(
            "namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}",
        );
        let by_app = selection("podSelector: {matchLabels: {app: web}}");
        let web = pod("shop", "web");
        let sys = pod("kube-system", "dns");
        use Verdict::*;
        let cases: &[Case] = &[
            (
                "empty ships even unknown pods",
                &PodSelection::default(),
                None,
                None,
                Ship,
            ),
            ("unknown pod waits", &by_app, None, Some(&synced), Wait),
            (
                "pod selector needs no namespaces",
                &by_app,
                Some(&web),
                None,
                Ship,
            ),
            ("pod selector skips", &by_app, Some(&sys), None, Skip),
            (
                "namespace labels",
                &by_team,
                Some(&web),
                Some(&synced),
                Ship,
            ),
            (
                "namespace not listed yet",
                &by_team,
                Some(&web),
                Some(&unsynced),
                Wait,
            ),
            ("no namespace watch", &by_team, Some(&web), None, Wait),
            (
                "unknown namespace by name",
                &by_name,
                Some(&sys),
                Some(&synced),
                Ship,
            ),
            (
                "unknown namespace, no team",
                &by_team,
                Some(&sys),
                Some(&synced),
                Skip,
            ),
        ];
        for (name, sel, p, ns, want) in cases {
            assert_eq!(decide(sel, *p, *ns), *want, "{name}");
        }
    }

    #[test]
    fn the_index_version_moves_only_on_change() {
        let index = NamespaceIndex::default();
        index.replace_all(HashMap::new());
        let v = index.version();
        index.apply("a".into(), BTreeMap::new());
        assert!(index.version() > v);
        let v = index.version();
        index.apply("a".into(), BTreeMap::new());
        assert_eq!(index.version(), v);
        index.delete("a");
        assert!(index.version() > v);
    }
}
