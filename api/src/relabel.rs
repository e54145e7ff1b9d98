//! Prometheus relabeling over Kubernetes meta labels: turns a container's
//! `__meta_kubernetes_*` labels into its Loki stream labels.
//!
//! Guarantees (Prometheus' `model/relabel` semantics, checked against its source):
//! - source label values (missing = empty) are joined with the separator (default `;`);
//!   the regex (default `(.*)`) is anchored as `^(?:regex)$`;
//! - `replace`: when the regex matches, the target label name and the replacement
//!   (default `$1`) are expanded like Go's `Regexp.Expand` (`$1`, `${1}`, `$name`,
//!   `${name}`, `$$`; an unknown group expands to nothing); an empty result deletes the
//!   target; an expanded target that is not a valid label name is skipped; no match leaves
//!   everything untouched;
//! - `keep`/`drop` drop the whole target; `labelmap`/`labeldrop`/`labelkeep` match label
//!   names; `hashmod` sets the target to the big-endian `u64` of the last 8 bytes of the
//!   MD5 of the joined value, modulo `modulus`; `lowercase`/`uppercase` set the target to
//!   the case-mapped joined value;
//! - setting a label to the empty string deletes it (as Prometheus' label builder does),
//!   and labels starting with `__` are removed after the last rule.
//!
//! Differences from Prometheus: regexes are Rust's `regex` syntax (RE2-like; `\w`, `\d`
//! and `\s` are Unicode-aware) and label names are validated with the classic
//! `[a-zA-Z_][a-zA-Z0-9_]*` rule, which is what Loki accepts.

use std::collections::BTreeMap;

use md5::{Digest, Md5};
use regex::Regex;

use crate::config::{RelabelAction, RelabelRule};

#[derive(Debug, thiserror::Error)]
pub enum RelabelError {
    #[error("relabel[{index}].{field}: {message}")]
    Invalid {
        index: usize,
        field: &'static str,
        message: String,
    },
}

/// Compiled relabel rules.
#[derive(Debug)]
pub struct Relabeler {
    rules: Vec<Compiled>,
}

#[derive(Debug)]
struct Compiled {
    source_labels: Vec<String>,
    separator: String,
    regex: Regex,
    target_label: String,
    replacement: String,
    modulus: u64,
    action: RelabelAction,
}

const DEFAULT_REGEX: &str = "(.*)";
const DEFAULT_REPLACEMENT: &str = "$1";

impl Relabeler {
    /// Compile `rules`; an empty list means [`default_rules`].
    pub fn new(rules: &[RelabelRule]) -> Result<Self, RelabelError> {
        let defaults;
        let rules = if rules.is_empty() {
            defaults = default_rules();
            &defaults
        } else {
            rules
        };
        let rules = rules
            .iter()
            .enumerate()
            .map(|(index, rule)| compile(index, rule))
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// Apply every rule to a target's meta labels. `None` when a keep/drop rule drops
    /// the target. Labels starting with `__` are removed from the result.
    pub fn apply(&self, meta: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
        let mut labels: BTreeMap<String, String> = meta
            .iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        for rule in &self.rules {
            if !rule.apply(&mut labels) {
                return None;
            }
        }
        labels.retain(|name, _| !name.starts_with("__"));
        Some(labels)
    }
}

/// Builds rule `index` as [`Relabeler::new`] does, and keeps only the verdict.
pub fn check_rule(index: usize, rule: &RelabelRule) -> Result<(), RelabelError> {
    compile(index, rule).map(|_| ())
}

fn compile(index: usize, rule: &RelabelRule) -> Result<Compiled, RelabelError> {
    let invalid = |field: &'static str, message: String| RelabelError::Invalid {
        index,
        field,
        message,
    };
    let pattern = rule.regex.as_deref().unwrap_or(DEFAULT_REGEX);
    let regex = Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| invalid("regex", crate::validate::regex_error(pattern, &e)))?;
    let target_label = rule.target_label.clone().unwrap_or_default();
    let replacement = rule
        .replacement
        .clone()
        .unwrap_or_else(|| DEFAULT_REPLACEMENT.to_string());
    let action = rule.action;
    let action_name = action_name(action);
    let needs_target = matches!(
        action,
        RelabelAction::Replace
            | RelabelAction::Hashmod
            | RelabelAction::Lowercase
            | RelabelAction::Uppercase
    );
    if needs_target && target_label.is_empty() {
        return Err(invalid(
            "targetLabel",
            format!("the {action_name} action requires a target label"),
        ));
    }
    let target_ok = if action == RelabelAction::Replace && target_label.contains('$') {
        is_valid_template(&target_label)
    } else {
        !needs_target || is_valid_label_name(&target_label)
    };
    if !target_ok {
        return Err(invalid(
            "targetLabel",
            format!("{target_label:?} is not a valid label name for the {action_name} action"),
        ));
    }
    if matches!(action, RelabelAction::Lowercase | RelabelAction::Uppercase)
        && replacement != DEFAULT_REPLACEMENT
    {
        return Err(invalid(
            "replacement",
            format!("cannot be set for the {action_name} action"),
        ));
    }
    if action == RelabelAction::Labelmap && !is_valid_template(&replacement) {
        return Err(invalid(
            "replacement",
            format!("{replacement:?} is not a valid label name template for the labelmap action"),
        ));
    }
    let modulus = rule.modulus.unwrap_or(0);
    if action == RelabelAction::Hashmod && modulus == 0 {
        return Err(invalid(
            "modulus",
            "the hashmod action requires a modulus above 0".to_string(),
        ));
    }
    if matches!(action, RelabelAction::Labeldrop | RelabelAction::Labelkeep)
        && (!rule.source_labels.is_empty()
            || rule.target_label.is_some()
            || rule.modulus.is_some()
            || rule.separator.is_some()
            || rule.replacement.is_some())
    {
        return Err(invalid(
            "action",
            format!("the {action_name} action takes only a regex"),
        ));
    }
    Ok(Compiled {
        source_labels: rule.source_labels.clone(),
        separator: rule.separator.clone().unwrap_or_else(|| ";".to_string()),
        regex,
        target_label,
        replacement,
        modulus,
        action,
    })
}

fn action_name(action: RelabelAction) -> &'static str {
    match action {
        RelabelAction::Replace => "replace",
        RelabelAction::Keep => "keep",
        RelabelAction::Drop => "drop",
        RelabelAction::Labelmap => "labelmap",
        RelabelAction::Labeldrop => "labeldrop",
        RelabelAction::Labelkeep => "labelkeep",
        RelabelAction::Hashmod => "hashmod",
        RelabelAction::Lowercase => "lowercase",
        RelabelAction::Uppercase => "uppercase",
    }
}

impl Compiled {
    /// `false` when the target is dropped.
    fn apply(&self, labels: &mut BTreeMap<String, String>) -> bool {
        let value = self.joined(labels);
        match self.action {
            RelabelAction::Drop => return !self.regex.is_match(&value),
            RelabelAction::Keep => return self.regex.is_match(&value),
            RelabelAction::Replace => {
                let Some(captures) = self.regex.captures(&value) else {
                    return true;
                };
                let target = expand(&captures, &self.target_label);
                if !is_valid_label_name(&target) {
                    return true;
                }
                let result = expand(&captures, &self.replacement);
                set(labels, target, result);
            }
            RelabelAction::Lowercase => {
                set(labels, self.target_label.clone(), value.to_lowercase());
            }
            RelabelAction::Uppercase => {
                set(labels, self.target_label.clone(), value.to_uppercase());
            }
            RelabelAction::Hashmod => {
                let hash = Md5::digest(value.as_bytes());
                let mut tail = [0u8; 8];
                tail.copy_from_slice(&hash[8..]);
                let modded = u64::from_be_bytes(tail) % self.modulus;
                set(labels, self.target_label.clone(), modded.to_string());
            }
            RelabelAction::Labelmap => {
                // Prometheus ranges over a snapshot: labels created here are not remapped.
                let snapshot: Vec<(String, String)> = labels
                    .iter()
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect();
                for (name, value) in snapshot {
                    if let Some(captures) = self.regex.captures(&name) {
                        let new_name = expand(&captures, &self.replacement);
                        set(labels, new_name, value);
                    }
                }
            }
            RelabelAction::Labeldrop => labels.retain(|name, _| !self.regex.is_match(name)),
            RelabelAction::Labelkeep => labels.retain(|name, _| self.regex.is_match(name)),
        }
        true
    }

    fn joined(&self, labels: &BTreeMap<String, String>) -> String {
        let mut out = String::new();
        for (i, name) in self.source_labels.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.separator);
            }
            if let Some(value) = labels.get(name) {
                out.push_str(value);
            }
        }
        out
    }
}

/// Prometheus' label builder: an empty value (or name) means "absent".
fn set(labels: &mut BTreeMap<String, String>, name: String, value: String) {
    if value.is_empty() {
        labels.remove(&name);
    } else if !name.is_empty() {
        labels.insert(name, value);
    }
}

/// Go's `Regexp.Expand`: `$$` is `$`; `$name`/`${name}` take the longest run of letters,
/// digits and `_`; an all-digit name is a group number; an unknown or unmatched group
/// expands to nothing; a `$` not followed by a name is kept as is.
fn expand(captures: &regex::Captures<'_>, template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        let Some((name, after)) = template_name(rest) else {
            out.push('$');
            continue;
        };
        rest = after;
        let group = match group_number(name) {
            Some(number) => captures.get(number),
            None => captures.name(name),
        };
        if let Some(group) = group {
            out.push_str(group.as_str());
        }
    }
    out.push_str(rest);
    out
}

/// The name after a `$`, and what follows it.
fn template_name(text: &str) -> Option<(&str, &str)> {
    let is_name_char = |c: char| c.is_alphanumeric() || c == '_';
    if let Some(inner) = text.strip_prefix('{') {
        let end = inner.find(|c: char| !is_name_char(c))?;
        if end == 0 || !inner[end..].starts_with('}') {
            return None;
        }
        Some((&inner[..end], &inner[end + 1..]))
    } else {
        let end = text.find(|c: char| !is_name_char(c)).unwrap_or(text.len());
        if end == 0 {
            return None;
        }
        Some((&text[..end], &text[end..]))
    }
}

/// Go accepts group numbers below 1e8; larger all-digit names match no group.
fn group_number(name: &str) -> Option<usize> {
    if !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match name.parse::<usize>() {
        Ok(number) if number < 100_000_000 => Some(number),
        _ => Some(usize::MAX),
    }
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`: what Loki accepts as a label name.
pub fn is_valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Prometheus' `relabelTarget`: label name characters and `$name`/`${name}` references.
fn is_valid_template(template: &str) -> bool {
    let mut rest = template;
    if rest.is_empty() || rest.starts_with(|c: char| c.is_ascii_digit()) {
        return false;
    }
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('$') {
            match template_name(after) {
                Some((_, after)) => rest = after,
                None => return false,
            }
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            if !(c.is_ascii_alphanumeric() || c == '_') {
                return false;
            }
            rest = &rest[c.len_utf8()..];
        }
    }
    true
}

/// Prometheus' `strutil.SanitizeLabelName`: every character outside `[a-zA-Z0-9_]`
/// becomes `_` (one per character, not per byte).
pub fn sanitize_label_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The meta labels Prometheus' Kubernetes discovery (pod role) gives one container of a
/// pod, built from plain data so discovery can stay apart from relabeling.
/// `controller` is the owner reference marked `controller: true`, as (kind, name).
#[allow(clippy::too_many_arguments)]
pub fn pod_meta_labels(
    namespace: &str,
    pod_name: &str,
    uid: &str,
    node_name: &str,
    container: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    controller: Option<(&str, &str)>,
) -> BTreeMap<String, String> {
    let mut meta = BTreeMap::new();
    let mut put = |name: String, value: &str| {
        meta.insert(name, value.to_string());
    };
    put("__meta_kubernetes_namespace".into(), namespace);
    put("__meta_kubernetes_pod_name".into(), pod_name);
    put("__meta_kubernetes_pod_uid".into(), uid);
    put("__meta_kubernetes_pod_node_name".into(), node_name);
    put("__meta_kubernetes_pod_container_name".into(), container);
    for (name, value) in labels {
        let name = sanitize_label_name(name);
        put(format!("__meta_kubernetes_pod_label_{name}"), value);
        put(format!("__meta_kubernetes_pod_labelpresent_{name}"), "true");
    }
    for (name, value) in annotations {
        let name = sanitize_label_name(name);
        put(format!("__meta_kubernetes_pod_annotation_{name}"), value);
        put(
            format!("__meta_kubernetes_pod_annotationpresent_{name}"),
            "true",
        );
    }
    if let Some((kind, name)) = controller {
        put("__meta_kubernetes_pod_controller_kind".into(), kind);
        put("__meta_kubernetes_pod_controller_name".into(), name);
    }
    meta
}

/// The Promtail-compatible defaults (app, component, instance, node_name, namespace, pod,
/// container), exactly the rules of the reference ops pipeline.
pub fn default_rules() -> Vec<RelabelRule> {
    const FIRST_NON_EMPTY: &str = "^;*([^;]+)(;.*)?$";
    let replace = |sources: &[&str], regex: Option<&str>, target: &str| RelabelRule {
        source_labels: sources.iter().map(|s| s.to_string()).collect(),
        separator: None,
        regex: regex.map(str::to_string),
        target_label: Some(target.to_string()),
        replacement: None,
        modulus: None,
        action: RelabelAction::Replace,
    };
    vec![
        replace(
            &["__meta_kubernetes_pod_controller_name"],
            Some("([0-9a-z-.]+?)(-[0-9a-f]{8,10})?"),
            "__tmp_controller_name",
        ),
        replace(
            &[
                "__meta_kubernetes_pod_label_app_kubernetes_io_name",
                "__meta_kubernetes_pod_label_app",
                "__tmp_controller_name",
            ],
            Some(FIRST_NON_EMPTY),
            "app",
        ),
        replace(
            &[
                "__meta_kubernetes_pod_label_app_kubernetes_io_component",
                "__meta_kubernetes_pod_label_component",
            ],
            Some(FIRST_NON_EMPTY),
            "component",
        ),
        replace(
            &["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
            Some(FIRST_NON_EMPTY),
            "instance",
        ),
        replace(&["__meta_kubernetes_pod_node_name"], None, "node_name"),
        replace(&["__meta_kubernetes_namespace"], None, "namespace"),
        replace(&["__meta_kubernetes_pod_name"], None, "pod"),
        replace(&["__meta_kubernetes_pod_container_name"], None, "container"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn rule(action: RelabelAction) -> RelabelRule {
        RelabelRule {
            source_labels: vec![],
            separator: None,
            regex: None,
            target_label: None,
            replacement: None,
            modulus: None,
            action,
        }
    }

    fn pod(
        name: &str,
        labels: &[(&str, &str)],
        controller: Option<(&str, &str)>,
    ) -> BTreeMap<String, String> {
        pod_meta_labels(
            "shop",
            name,
            "0b9f3c1e-1111-2222-3333-444455556666",
            "node-a",
            "main",
            &map(labels),
            &map(&[("prometheus.io/scrape", "true")]),
            controller,
        )
    }

    fn defaults(meta: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        Relabeler::new(&[]).unwrap().apply(meta).unwrap()
    }

    fn base(extra: &[(&str, &str)], pod: &str) -> BTreeMap<String, String> {
        let mut expected = map(&[
            ("node_name", "node-a"),
            ("namespace", "shop"),
            ("pod", pod),
            ("container", "main"),
        ]);
        expected.extend(map(extra));
        expected
    }

    #[test]
    fn deployment_pod_gets_app_from_replicaset_without_hash() {
        let meta = pod(
            "checkout-7d4b9c8f6d-x2x9z",
            &[("pod-template-hash", "7d4b9c8f6d")],
            Some(("ReplicaSet", "checkout-7d4b9c8f6d")),
        );
        assert_eq!(
            defaults(&meta),
            base(&[("app", "checkout")], "checkout-7d4b9c8f6d-x2x9z")
        );
    }

    #[test]
    fn statefulset_pod_keeps_its_controller_name() {
        let meta = pod(
            "postgres-0",
            &[("app.kubernetes.io/instance", "main-db")],
            Some(("StatefulSet", "postgres")),
        );
        assert_eq!(
            defaults(&meta),
            base(
                &[("app", "postgres"), ("instance", "main-db")],
                "postgres-0"
            )
        );
    }

    #[test]
    fn daemonset_pod_name_with_non_hex_suffix_is_not_stripped() {
        let meta = pod(
            "fluent-bit-5xk2p",
            &[("component", "logging")],
            Some(("DaemonSet", "fluent-bit")),
        );
        assert_eq!(
            defaults(&meta),
            base(
                &[("app", "fluent-bit"), ("component", "logging")],
                "fluent-bit-5xk2p"
            )
        );
    }

    #[test]
    fn bare_pod_has_no_app() {
        let meta = pod("debug", &[], None);
        assert_eq!(defaults(&meta), base(&[], "debug"));
    }

    #[test]
    fn app_kubernetes_io_name_wins_over_app_label_and_controller() {
        let meta = pod(
            "web-6f9d8c7b5-abcde",
            &[
                ("app.kubernetes.io/name", "storefront"),
                ("app", "web"),
                ("app.kubernetes.io/component", "frontend"),
                ("component", "ignored"),
            ],
            Some(("ReplicaSet", "web-6f9d8c7b5")),
        );
        assert_eq!(
            defaults(&meta),
            base(
                &[("app", "storefront"), ("component", "frontend")],
                "web-6f9d8c7b5-abcde"
            )
        );
    }

    #[test]
    fn app_label_wins_over_controller_when_name_label_is_empty() {
        let meta = pod(
            "web-6f9d8c7b5-abcde",
            &[("app.kubernetes.io/name", ""), ("app", "web")],
            Some(("ReplicaSet", "web-6f9d8c7b5")),
        );
        assert_eq!(defaults(&meta)["app"], "web");
    }

    #[test]
    fn pod_with_neither_label_uses_controller() {
        let meta = pod(
            "api-5c8d7f9b6d-q7w8e",
            &[],
            Some(("ReplicaSet", "api-5c8d7f9b6d")),
        );
        assert_eq!(defaults(&meta)["app"], "api");
    }

    #[test]
    fn meta_labels_are_sanitized_and_marked_present() {
        let meta = pod("p", &[("app.kubernetes.io/name", "x")], None);
        assert_eq!(
            meta["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
            "x"
        );
        assert_eq!(
            meta["__meta_kubernetes_pod_labelpresent_app_kubernetes_io_name"],
            "true"
        );
        assert_eq!(
            meta["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
            "true"
        );
        assert_eq!(
            meta["__meta_kubernetes_pod_uid"],
            "0b9f3c1e-1111-2222-3333-444455556666"
        );
        assert!(!meta.contains_key("__meta_kubernetes_pod_controller_kind"));
        assert_eq!(sanitize_label_name("a.b/c-dé"), "a_b_c_d_");
    }

    #[test]
    fn replace_expands_numbered_and_named_groups() {
        let mut r = rule(RelabelAction::Replace);
        r.source_labels = vec!["a".into(), "b".into()];
        r.regex = Some("(?P<first>[^;]*);(.*)".into());
        r.target_label = Some("t_${first}".into());
        r.replacement = Some("$2-${1}-$first-$$-$9-$first_x".into());
        let got = Relabeler::new(&[r])
            .unwrap()
            .apply(&map(&[("a", "x"), ("b", "y")]));
        assert_eq!(
            got.unwrap(),
            map(&[("a", "x"), ("b", "y"), ("t_x", "y-x-x-$--")])
        );
    }

    #[test]
    fn replace_without_match_leaves_target_untouched() {
        let mut r = rule(RelabelAction::Replace);
        r.source_labels = vec!["a".into()];
        r.regex = Some("z+".into());
        r.target_label = Some("t".into());
        let got = Relabeler::new(&[r])
            .unwrap()
            .apply(&map(&[("a", "x"), ("t", "old")]));
        assert_eq!(got.unwrap()["t"], "old");
    }

    #[test]
    fn replace_is_fully_anchored() {
        let mut r = rule(RelabelAction::Replace);
        r.source_labels = vec!["a".into()];
        r.regex = Some("b".into());
        r.target_label = Some("t".into());
        r.replacement = Some("hit".into());
        let relabeler = Relabeler::new(&[r]).unwrap();
        assert!(
            !relabeler
                .apply(&map(&[("a", "abc")]))
                .unwrap()
                .contains_key("t")
        );
        assert_eq!(relabeler.apply(&map(&[("a", "b")])).unwrap()["t"], "hit");
    }

    #[test]
    fn replace_with_empty_result_deletes_target() {
        let mut r = rule(RelabelAction::Replace);
        r.source_labels = vec!["missing".into()];
        r.target_label = Some("t".into());
        let got = Relabeler::new(&[r]).unwrap().apply(&map(&[("t", "old")]));
        assert_eq!(got.unwrap(), map(&[]));
    }

    #[test]
    fn replace_to_invalid_expanded_target_is_skipped() {
        let mut r = rule(RelabelAction::Replace);
        r.source_labels = vec!["a".into()];
        r.target_label = Some("$1".into());
        let got = Relabeler::new(&[r]).unwrap().apply(&map(&[("a", "1bad")]));
        assert_eq!(got.unwrap(), map(&[("a", "1bad")]));
    }

    #[test]
    fn keep_and_drop_filter_targets() {
        let mut keep = rule(RelabelAction::Keep);
        keep.source_labels = vec!["ns".into()];
        keep.regex = Some("prod|ops".into());
        let keep = Relabeler::new(&[keep]).unwrap();
        assert!(keep.apply(&map(&[("ns", "ops")])).is_some());
        assert!(keep.apply(&map(&[("ns", "ops-x")])).is_none());
        assert!(keep.apply(&map(&[])).is_none());

        let mut drop = rule(RelabelAction::Drop);
        drop.source_labels = vec!["ns".into()];
        drop.regex = Some("kube-.*".into());
        let drop = Relabeler::new(&[drop]).unwrap();
        assert!(drop.apply(&map(&[("ns", "kube-system")])).is_none());
        assert!(drop.apply(&map(&[("ns", "shop")])).is_some());
    }

    #[test]
    fn labelmap_copies_matching_labels() {
        let mut r = rule(RelabelAction::Labelmap);
        r.regex = Some("__meta_kubernetes_pod_label_(.+)".into());
        let meta = map(&[
            ("__meta_kubernetes_pod_label_team", "payments"),
            ("__meta_kubernetes_pod_label_tier", "gold"),
            ("other", "x"),
        ]);
        let got = Relabeler::new(&[r]).unwrap().apply(&meta).unwrap();
        assert_eq!(
            got,
            map(&[("team", "payments"), ("tier", "gold"), ("other", "x")])
        );
    }

    #[test]
    fn labeldrop_and_labelkeep_match_names() {
        let meta = map(&[("a1", "x"), ("a2", "y"), ("b", "z")]);
        let mut drop = rule(RelabelAction::Labeldrop);
        drop.regex = Some("a.".into());
        assert_eq!(
            Relabeler::new(&[drop]).unwrap().apply(&meta).unwrap(),
            map(&[("b", "z")])
        );
        let mut keep = rule(RelabelAction::Labelkeep);
        keep.regex = Some("a.".into());
        assert_eq!(
            Relabeler::new(&[keep]).unwrap().apply(&meta).unwrap(),
            map(&[("a1", "x"), ("a2", "y")])
        );
    }

    #[test]
    fn hashmod_matches_prometheus() {
        // The expected values are Prometheus' own relabel_test.go cases.
        let mut r = rule(RelabelAction::Hashmod);
        r.source_labels = vec!["a".into()];
        r.target_label = Some("shard".into());
        r.modulus = Some(1000);
        let relabeler = Relabeler::new(&[r]).unwrap();
        for (value, shard) in [("baz", "976"), ("foo\nbar", "734")] {
            let got = relabeler.apply(&map(&[("a", value)])).unwrap();
            assert_eq!(got["shard"], shard, "{value:?}");
        }
    }

    #[test]
    fn lowercase_and_uppercase() {
        let mut lower = rule(RelabelAction::Lowercase);
        lower.source_labels = vec!["a".into(), "b".into()];
        lower.target_label = Some("l".into());
        let mut upper = rule(RelabelAction::Uppercase);
        upper.source_labels = vec!["a".into()];
        upper.target_label = Some("u".into());
        let got = Relabeler::new(&[lower, upper])
            .unwrap()
            .apply(&map(&[("a", "MiX"), ("b", "Ed")]))
            .unwrap();
        assert_eq!(got["l"], "mix;ed");
        assert_eq!(got["u"], "MIX");
    }

    #[test]
    fn custom_separator() {
        let mut r = rule(RelabelAction::Replace);
        r.source_labels = vec!["a".into(), "b".into()];
        r.separator = Some("/".into());
        r.target_label = Some("t".into());
        let got = Relabeler::new(&[r])
            .unwrap()
            .apply(&map(&[("a", "x"), ("b", "y")]));
        assert_eq!(got.unwrap()["t"], "x/y");
    }

    #[test]
    fn double_underscore_labels_are_removed_after_all_rules() {
        let mut first = rule(RelabelAction::Replace);
        first.source_labels = vec!["a".into()];
        first.target_label = Some("__tmp".into());
        let mut second = rule(RelabelAction::Replace);
        second.source_labels = vec!["__tmp".into()];
        second.target_label = Some("b".into());
        let got = Relabeler::new(&[first, second])
            .unwrap()
            .apply(&map(&[("a", "x")]));
        assert_eq!(got.unwrap(), map(&[("a", "x"), ("b", "x")]));
    }

    #[test]
    fn bad_regex_names_its_field() {
        let mut ok = rule(RelabelAction::Replace);
        ok.target_label = Some("t".into());
        let mut bad = rule(RelabelAction::Keep);
        bad.regex = Some("(unclosed".into());
        let err = Relabeler::new(&[ok, bad]).unwrap_err().to_string();
        assert!(
            err.starts_with("relabel[1].regex: invalid regex \"(unclosed\""),
            "{err}"
        );
    }

    #[test]
    fn invalid_rules_name_their_field() {
        let cases: Vec<(RelabelRule, &str)> = vec![
            (rule(RelabelAction::Replace), "relabel[0].targetLabel"),
            (
                RelabelRule {
                    target_label: Some("1x".into()),
                    ..rule(RelabelAction::Replace)
                },
                "relabel[0].targetLabel",
            ),
            (
                RelabelRule {
                    target_label: Some("t".into()),
                    ..rule(RelabelAction::Hashmod)
                },
                "relabel[0].modulus",
            ),
            (
                RelabelRule {
                    target_label: Some("t".into()),
                    replacement: Some("x".into()),
                    ..rule(RelabelAction::Lowercase)
                },
                "relabel[0].replacement",
            ),
            (
                RelabelRule {
                    source_labels: vec!["a".into()],
                    ..rule(RelabelAction::Labeldrop)
                },
                "relabel[0].action",
            ),
        ];
        for (rule, field) in cases {
            let err = Relabeler::new(&[rule]).unwrap_err().to_string();
            assert!(err.starts_with(field), "{err} should name {field}");
        }
    }

    #[test]
    fn go_expand_edge_cases() {
        let re = Regex::new("^(?:(?P<n>a)(b)?)$").unwrap();
        let caps = re.captures("a").unwrap();
        assert_eq!(expand(&caps, "$"), "$");
        assert_eq!(expand(&caps, "${"), "${");
        assert_eq!(expand(&caps, "${n"), "${n");
        assert_eq!(expand(&caps, "x$2y"), "x");
        assert_eq!(expand(&caps, "x${2}y"), "xy");
        assert_eq!(expand(&caps, "$01"), "a");
        assert_eq!(expand(&caps, "$n.$n"), "a.a");
        assert_eq!(expand(&caps, "$999999999999"), "");
    }
}
