//! `tenantFrom`: the tenant of each entry.
//!
//! Flow: the pipeline handler asks [`TenantResolver::for_pod`] when it opens a file and
//! whenever a pod or namespace changed (the pod and namespace sources are per file); with
//! a `field` source the pipeline puts the field's value on each entry and the handler
//! checks it with [`TenantResolver::checked`]. The shipper batches, pushes and retries per
//! tenant (see [`crate::loki`]).
//!
//! Decisions:
//! - A source missing for an entry (the namespace or pod has no such label or annotation,
//!   the line no such field, or it is empty) means the default `loki.tenant`, not counted:
//!   a cluster where only some namespaces name a tenant is a normal setup.
//! - A value that is not a valid tenant ID (Loki's rules, see
//!   [`logpipe_api::validate::tenant`]) also means the default tenant, counted per entry in
//!   `logpipe_tenant_fallback_entries_total`; it never stops the agent.
//! - With a pod or namespace source, a file waits until its pod (and its namespace) are
//!   known, as a selector does: its lines are never sent to the default tenant on a guess.
//!
//! Memory: each distinct value is checked and allocated once, in a memo of at most
//! [`MEMO_LIMIT`] values (cleared when full: a `field` source may see many values).

use std::collections::{BTreeMap, HashMap};

use logpipe_api::config::{TenantFrom, TenantSource};

use crate::discovery::PodMeta;
use crate::entry::Tenant;
use crate::selection::NamespaceIndex;

/// Distinct values remembered before the memo starts over.
pub const MEMO_LIMIT: usize = 1024;

/// Where tenants come from, owned (the config's [`TenantFrom`], checked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    NamespaceLabel(String),
    PodLabel(String),
    PodAnnotation(String),
    Field(String),
}

impl Source {
    /// `None` for a config without `tenantFrom`; the error names what is wrong.
    pub fn from_config(from: Option<&TenantFrom>) -> Result<Option<Self>, String> {
        let Some(from) = from else {
            return Ok(None);
        };
        logpipe_api::validate::tenant_from(from)?;
        Ok(Some(match from.source()? {
            TenantSource::NamespaceLabel(k) => Self::NamespaceLabel(k.to_string()),
            TenantSource::PodLabel(k) => Self::PodLabel(k.to_string()),
            TenantSource::PodAnnotation(k) => Self::PodAnnotation(k.to_string()),
            TenantSource::Field(name) => Self::Field(name.to_string()),
        }))
    }

    /// Whether the source is the pod's metadata (it needs pod discovery).
    pub fn needs_pods(&self) -> bool {
        !matches!(self, Self::Field(_))
    }

    /// The extracted field the pipeline reads, for a `field` source.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Field(name) => Some(name),
            _ => None,
        }
    }
}

/// The raw value `source` gives for a pod whose namespace has `namespace_labels`;
/// `None` when it is missing or empty (and always for a `field` source).
pub fn pod_value<'a>(
    source: &Source,
    pod: &'a PodMeta,
    namespace_labels: &'a BTreeMap<String, String>,
) -> Option<&'a str> {
    let value = match source {
        Source::NamespaceLabel(key) => namespace_labels.get(key),
        Source::PodLabel(key) => pod.labels.get(key),
        Source::PodAnnotation(key) => pod.annotations.get(key),
        Source::Field(_) => None,
    };
    value.map(String::as_str).filter(|v| !v.is_empty())
}

/// A file's tenant as far as its pod tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileTenant {
    /// Not decidable yet (pod or namespaces not known): keep the file unopened.
    Wait,
    /// `None`: the default tenant; `fallback`: because the value was not a valid tenant.
    Known {
        tenant: Option<Tenant>,
        fallback: bool,
    },
}

impl FileTenant {
    pub const DEFAULT: Self = Self::Known {
        tenant: None,
        fallback: false,
    };
}

/// Resolves tenants on the tailer thread (one per agent, no locking).
#[derive(Debug, Default)]
pub struct TenantResolver {
    source: Option<Source>,
    /// Checked values: `None` for a value that is not a valid tenant.
    memo: HashMap<String, Option<Tenant>>,
}

impl TenantResolver {
    pub fn new(source: Option<Source>) -> Self {
        Self {
            source,
            memo: HashMap::new(),
        }
    }

    pub fn source(&self) -> Option<&Source> {
        self.source.as_ref()
    }

    /// The tenant of a file of `pod` (`None` while discovery does not know it);
    /// `namespaces` is `None` without a namespace watch.
    pub fn for_pod(
        &mut self,
        pod: Option<&PodMeta>,
        namespaces: Option<&NamespaceIndex>,
    ) -> FileTenant {
        let Some(source) = self.source.as_ref().filter(|s| s.needs_pods()) else {
            return FileTenant::DEFAULT;
        };
        let Some(pod) = pod else {
            return FileTenant::Wait;
        };
        // A namespace the watch has not seen yet (created just before its pod) waits too.
        let namespace_labels = match (source, namespaces) {
            (Source::NamespaceLabel(_), Some(index)) if index.is_synced() => {
                match index.get(&pod.namespace) {
                    Some(labels) => labels,
                    None => return FileTenant::Wait,
                }
            }
            (Source::NamespaceLabel(_), _) => return FileTenant::Wait,
            _ => BTreeMap::new(),
        };
        match pod_value(source, pod, &namespace_labels).map(str::to_string) {
            None => FileTenant::DEFAULT,
            Some(value) => {
                let tenant = self.checked(&value);
                FileTenant::Known {
                    fallback: tenant.is_none(),
                    tenant,
                }
            }
        }
    }

    /// `value` as a tenant, or `None` when it is not a valid tenant ID.
    pub fn checked(&mut self, value: &str) -> Option<Tenant> {
        if let Some(known) = self.memo.get(value) {
            return known.clone();
        }
        let tenant = match logpipe_api::validate::tenant(value) {
            Ok(()) => Some(Tenant::from(value)),
            Err(reason) => {
                tracing::warn!(
                    value,
                    reason,
                    "tenantFrom gives an invalid tenant, using loki.tenant"
                );
                None
            }
        };
        if self.memo.len() >= MEMO_LIMIT {
            self.memo.clear();
        }
        self.memo.insert(value.to_string(), tenant.clone());
        tenant
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> PodMeta {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        PodMeta {
            namespace: "shop".into(),
            name: "cart-0".into(),
            uid: "u1".into(),
            labels: map(labels),
            annotations: map(annotations),
            controller: None,
            containers: Vec::new(),
        }
    }

    fn namespaces(labels: &[(&str, &str)]) -> NamespaceIndex {
        let index = NamespaceIndex::default();
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        index.replace_all(HashMap::from([("shop".to_string(), labels)]));
        index
    }

    fn known(tenant: Option<&str>, fallback: bool) -> FileTenant {
        FileTenant::Known {
            tenant: tenant.map(Tenant::from),
            fallback,
        }
    }

    /// Each source, with the value present, missing, empty or invalid.
    #[test]
    fn each_source_names_the_tenant_or_falls_back() {
        let key = "logpipe.io/tenant";
        let ns = |v: &str| namespaces(&[(key, v)]);
        let cases: Vec<(Source, PodMeta, NamespaceIndex, FileTenant)> = vec![
            (
                Source::NamespaceLabel(key.into()),
                pod(&[], &[]),
                ns("12"),
                known(Some("12"), false),
            ),
            (
                Source::NamespaceLabel(key.into()),
                pod(&[(key, "99")], &[]),
                namespaces(&[]),
                FileTenant::DEFAULT,
            ),
            (
                Source::NamespaceLabel(key.into()),
                pod(&[], &[]),
                ns(""),
                FileTenant::DEFAULT,
            ),
            (
                Source::PodLabel("team".into()),
                pod(&[("team", "shop")], &[]),
                ns("12"),
                known(Some("shop"), false),
            ),
            (
                Source::PodAnnotation(key.into()),
                pod(&[], &[(key, "a|b")]),
                ns("12"),
                known(None, true),
            ),
            (
                Source::PodAnnotation(key.into()),
                pod(&[], &[(key, "..")]),
                ns("12"),
                known(None, true),
            ),
            (
                Source::Field("tenant".into()),
                pod(&[], &[]),
                ns("12"),
                FileTenant::DEFAULT,
            ),
        ];
        for (source, pod, index, want) in cases {
            let mut resolver = TenantResolver::new(Some(source.clone()));
            let got = resolver.for_pod(Some(&pod), Some(&index));
            assert_eq!(got, want, "{source:?}");
        }
    }

    #[test]
    fn an_unknown_pod_or_unlisted_namespaces_wait() {
        let source = Source::NamespaceLabel("t".into());
        let mut resolver = TenantResolver::new(Some(source));
        assert_eq!(resolver.for_pod(None, None), FileTenant::Wait);
        let unsynced = NamespaceIndex::default();
        assert_eq!(
            resolver.for_pod(Some(&pod(&[], &[])), Some(&unsynced)),
            FileTenant::Wait
        );
        let other = NamespaceIndex::default();
        other.replace_all(HashMap::from([("web".to_string(), BTreeMap::new())]));
        assert_eq!(
            resolver.for_pod(Some(&pod(&[], &[])), Some(&other)),
            FileTenant::Wait,
            "its namespace not seen yet"
        );
        let mut plain = TenantResolver::new(None);
        assert_eq!(plain.for_pod(None, None), FileTenant::DEFAULT);
    }

    #[test]
    fn checked_values_are_shared_and_the_memo_is_bounded() {
        let mut resolver = TenantResolver::new(Some(Source::Field("t".into())));
        let a = resolver.checked("12").expect("valid");
        let b = resolver.checked("12").expect("valid");
        assert!(std::sync::Arc::ptr_eq(&a, &b), "one allocation per value");
        assert_eq!(resolver.checked("no spaces"), None);
        for i in 0..(2 * MEMO_LIMIT) {
            resolver.checked(&i.to_string());
        }
        assert!(resolver.memo.len() <= MEMO_LIMIT);
    }

    #[test]
    fn the_config_names_one_source() {
        let from = |yaml: &str| serde_yaml::from_str::<TenantFrom>(yaml).expect("parses");
        assert_eq!(Source::from_config(None), Ok(None));
        assert_eq!(
            Source::from_config(Some(&from("{namespaceLabel: team-tenant}"))),
            Ok(Some(Source::NamespaceLabel("team-tenant".into())))
        );
        assert_eq!(
            Source::from_config(Some(&from("{field: tenant}")))
                .map(|s| s.as_ref().and_then(|s| s.field().map(str::to_string))),
            Ok(Some("tenant".to_string()))
        );
        assert!(Source::from_config(Some(&from("{podLabel: a, podAnnotation: b}"))).is_err());
    }
}
