//! Which pods a LogPipeline ships: a namespace selector and a pod selector, each a
//! Kubernetes `LabelSelector` (`matchLabels` and `matchExpressions`, the same semantics
//! as a Deployment's selector). Defined here once: the CRD embeds it (`spec.selector`),
//! the operator renders it into the agent config and counts overlapping pods with
//! [`PodSelection::selects`], and the agent filters its pods with the same function.
//!
//! Guarantees: an empty selector selects everything (a LogPipeline without `selector`
//! ships every pod, as before); matching is a pure function of the labels.
//!
//! Caveats: namespaces are matched by their labels only; select one by name with the
//! label the API server sets on every namespace, `kubernetes.io/metadata.name`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Label the API server sets on every namespace to its name (select a namespace by name).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// `spec.selector`: the pods whose logs this pipeline ships. Empty: every pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSelection {
    /// Namespaces whose pods are shipped, by namespace labels (by name:
    /// `kubernetes.io/metadata.name`). Empty: every namespace.
    #[serde(default, skip_serializing_if = "LabelSelector::is_empty")]
    pub namespace_selector: LabelSelector,
    /// Pods shipped, by pod labels, within the selected namespaces. Empty: every pod.
    #[serde(default, skip_serializing_if = "LabelSelector::is_empty")]
    pub pod_selector: LabelSelector,
}

/// A Kubernetes label selector: every `matchLabels` pair and every expression must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// `{key, operator, values}` as in Kubernetes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 : !has(self.values) || size(self.values) == 0",
        "message": "matchExpressions[]: In and NotIn need values; Exists and DoesNotExist take none"
    }
]))]
pub struct LabelSelectorRequirement {
    /// The label key, e.g. `app` or `logpipe.io/team`.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    /// `In` and `NotIn` compare with `values`; `Exists` and `DoesNotExist` test the key.
    pub operator: SelectorOperator,
    /// For `In` and `NotIn`, at least one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl PodSelection {
    pub fn is_empty(&self) -> bool {
        self.namespace_selector.is_empty() && self.pod_selector.is_empty()
    }

    /// A pod with `pod_labels` in a namespace with `namespace_labels` is shipped.
    pub fn selects(
        &self,
        namespace_labels: &BTreeMap<String, String>,
        pod_labels: &BTreeMap<String, String>,
    ) -> bool {
        self.namespace_selector.matches(namespace_labels) && self.pod_selector.matches(pod_labels)
    }
}

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl LabelSelectorRequirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.contains(v)),
            SelectorOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

/// Everything wrong with `selection`, as (field under `selector`, reason).
pub fn problems(selection: &PodSelection) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, selector) in [
        ("namespaceSelector", &selection.namespace_selector),
        ("podSelector", &selection.pod_selector),
    ] {
        for (key, value) in &selector.match_labels {
            if let Err(e) = label_key(key).and_then(|()| label_value(value)) {
                out.push((format!("{name}.matchLabels.{key}"), e));
            }
        }
        for (i, r) in selector.match_expressions.iter().enumerate() {
            if let Err(e) = requirement(r) {
                out.push((format!("{name}.matchExpressions[{i}]"), e));
            }
        }
    }
    out
}

fn requirement(r: &LabelSelectorRequirement) -> Result<(), String> {
    label_key(&r.key)?;
    let needs_values = matches!(r.operator, SelectorOperator::In | SelectorOperator::NotIn);
    if needs_values && r.values.is_empty() {
        return Err(format!("{:?} needs values", r.operator));
    }
    if !needs_values && !r.values.is_empty() {
        return Err(format!("{:?} takes no values", r.operator));
    }
    r.values.iter().try_for_each(|v| label_value(v))
}

/// A Kubernetes label key: `[prefix/]name`, name at most 63 characters of
/// alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
pub fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if prefix.is_some_and(|p| p.is_empty() || p.len() > 253) || name.is_empty() {
        return Err(format!("{key:?} is not a label key"));
    }
    label_value(name).map_err(|_| format!("{key:?} is not a label key"))
}

/// A Kubernetes label value: empty, or at most 63 characters of alphanumerics, `-`, `_`,
/// `.`, starting and ending alphanumeric.
fn label_value(value: &str) -> Result<(), String> {
    let edges_ok = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
    let ok = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && edges_ok(value.chars().next())
        && edges_ok(value.chars().last());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a label value (at most 63 of letters, digits, - _ ., alphanumeric at both ends)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, operator: SelectorOperator, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn selectors_match_as_kubernetes_does() {
        use SelectorOperator::*;
        let pod = labels(&[("app", "web"), ("tier", "front")]);
        let cases: &[(&str, LabelSelector, bool)] = &[
            ("empty selects all", LabelSelector::default(), true),
            (
                "matchLabels hit",
                LabelSelector {
                    match_labels: labels(&[("app", "web")]),
                    ..Default::default()
                },
                true,
            ),
            (
                "matchLabels miss",
                LabelSelector {
                    match_labels: labels(&[("app", "api")]),
                    ..Default::default()
                },
                false,
            ),
            ("In", sel(expr("app", In, &["web", "api"])), true),
            ("In absent", sel(expr("team", In, &["a"])), false),
            ("NotIn absent", sel(expr("team", NotIn, &["a"])), true),
            ("NotIn hit", sel(expr("app", NotIn, &["web"])), false),
            ("Exists", sel(expr("tier", Exists, &[])), true),
            ("DoesNotExist", sel(expr("tier", DoesNotExist, &[])), false),
        ];
        for (name, selector, want) in cases {
            assert_eq!(selector.matches(&pod), *want, "{name}");
        }
    }

    fn sel(r: LabelSelectorRequirement) -> LabelSelector {
        LabelSelector {
            match_expressions: vec![r],
            ..Default::default()
        }
    }

    #[test]
    fn a_selection_needs_both_selectors() {
        let selection: PodSelection = serde_yaml::from_str(
            "namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [kube-system, logging]}]}\n\
             podSelector: {matchLabels: {app: web}}\n",
        )
        .unwrap();
        let ns = labels(&[(NAMESPACE_NAME_LABEL, "logging")]);
        assert!(selection.selects(&ns, &labels(&[("app", "web")])));
        assert!(!selection.selects(&ns, &labels(&[("app", "api")])));
        let other = labels(&[(NAMESPACE_NAME_LABEL, "shop")]);
        assert!(!selection.selects(&other, &labels(&[("app", "web")])));
        assert!(PodSelection::default().selects(&other, &BTreeMap::new()));
    }

    #[test]
    fn bad_selectors_are_named() {
        use SelectorOperator::*;
        let selection = PodSelection {
            namespace_selector: LabelSelector {
                match_labels: labels(&[("team", "-bad")]),
                ..Default::default()
            },
            pod_selector: LabelSelector {
                match_expressions: vec![
                    expr("app", In, &[]),
                    expr("app", Exists, &["x"]),
                    expr("bad key!", Exists, &[]),
                    expr("example.com/app", In, &["ok"]),
                ],
                ..Default::default()
            },
        };
        let fields: Vec<String> = problems(&selection).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "namespaceSelector.matchLabels.team",
                "podSelector.matchExpressions[0]",
                "podSelector.matchExpressions[1]",
                "podSelector.matchExpressions[2]",
            ]
        );
    }
}
