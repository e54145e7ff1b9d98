//! The permissions the operator and its agents need: every API call in `operator/src`
//! (and the agent's `agent/src/discovery.rs`), as RBAC rules, each with the code that
//! makes it. The chart grants exactly these (`charts/logpipe/templates/rbac.yaml`, and the
//! agent's role in `charts/logpipe/files/agent-clusterrole.yaml`); a unit test below reads
//! the rendered chart (`charts/logpipe/tests/*.snap`, which `make chart-test` keeps equal to
//! `helm template`) and fails when the two differ. Add a call, add its rule here and in the
//! chart.
//!
//! Why the operator holds no ClusterRole verbs: it binds each LogPipeline's agent
//! ServiceAccount to the one ClusterRole the chart ships ([`AGENT_CLUSTER_ROLE`]), with
//! `bind` on that name alone. An operator that could create or patch ClusterRoles could
//! write itself any permission it holds, and bind it anywhere.

/// The agents' ClusterRole, created by the chart (`<release>-agent`, so `logpipe-agent` for
/// the release `logpipe`); the operator only binds it. `--agent-cluster-role` overrides it.
pub const AGENT_CLUSTER_ROLE: &str = "logpipe-agent";

/// The Lease the replicas elect their leader on (`--lease-name`).
pub const LEASE_NAME: &str = "logpipe-operator";

/// The CRD whose presence turns ServiceMonitors on (`cache::service_monitor_crd_trigger`).
pub const SERVICE_MONITOR_CRD: &str = "servicemonitors.monitoring.coreos.com";

/// One RBAC rule: an API group, its resources, verbs and (optionally) the only names.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub group: &'static str,
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
    /// `resourceNames`; empty: any.
    pub names: &'static [&'static str],
    /// The code that needs it.
    pub used_by: &'static str,
}

const fn rule(
    group: &'static str,
    resources: &'static [&'static str],
    verbs: &'static [&'static str],
    used_by: &'static str,
) -> Rule {
    Rule {
        group,
        resources,
        verbs,
        names: &[],
        used_by,
    }
}

/// The operator's ClusterRole.
pub const OPERATOR_CLUSTER_RULES: &[Rule] = &[
    rule(
        "logpipe.io",
        &["logpipelines"],
        &["list", "watch"],
        "controller::run: the LogPipeline watcher",
    ),
    rule(
        "logpipe.io",
        &["logpipelines"],
        &["patch"],
        "controller::reconcile: the finalizer (kube's finalizer(), a JSON patch); apply::clear_annotations",
    ),
    rule(
        "logpipe.io",
        &["logpipelines/status"],
        &["patch"],
        "apply::patch_status",
    ),
    rule(
        "logpipe.io",
        &["logpipelines/finalizers"],
        &["update"],
        "desired::owned_meta: owner references with blockOwnerDeletion (admission plugin OwnerReferencesPermissionEnforcement)",
    ),
    rule(
        "apps",
        &["daemonsets"],
        &["list", "watch", "create", "patch"],
        "cache::daemon_set_stream (list, watch); apply::apply_objects (server-side apply: patch, create)",
    ),
    rule(
        "",
        &["pods"],
        &["list", "watch", "delete"],
        "cache::pod_stream, the agent pod cache (list, watch); apply::delete_pods moves a node (delete)",
    ),
    rule(
        "",
        &["nodes"],
        &["list", "watch"],
        "cache::Caches::node_labels (canary steps that select nodes by labels)",
    ),
    rule(
        "",
        &["namespaces"],
        &["list", "watch"],
        "overlap::Observer (namespace labels, once two LogPipelines exist; pods: the rule above)",
    ),
    rule(
        "",
        &["configmaps"],
        &["list", "watch", "create", "patch", "delete"],
        "cache::config_map_stream (list, watch); apply::delete_config_maps (delete); apply::apply_objects, apply::save_stable (patch, create)",
    ),
    rule(
        "",
        &["services", "serviceaccounts"],
        &["create", "patch"],
        "apply::apply_objects (server-side apply)",
    ),
    rule(
        "",
        &["secrets"],
        &["get"],
        "controller::missing_secret (the Secrets a LogPipeline names); gate: rollout.gate.clusterSecretRef",
    ),
    rule(
        "events.k8s.io",
        &["events"],
        &["create", "patch"],
        "events::publish (kube's Recorder: create, patch for a series)",
    ),
    rule(
        "rbac.authorization.k8s.io",
        &["clusterrolebindings"],
        &["create", "patch", "delete"],
        "apply::apply_objects (the agent's binding); apply::delete_cluster_scoped (finalizer) and the roleRef migration (delete)",
    ),
    Rule {
        group: "rbac.authorization.k8s.io",
        resources: &["clusterroles"],
        verbs: &["bind"],
        names: &[AGENT_CLUSTER_ROLE],
        used_by: "desired::cluster_role_binding: the binding's roleRef (bind on that role only)",
    },
    rule(
        "monitoring.coreos.com",
        &["servicemonitors"],
        &["get", "create", "patch", "delete"],
        "apply::apply_objects (patch, create); apply::delete_if_ours (get, delete)",
    ),
    Rule {
        group: "apiextensions.k8s.io",
        resources: &["customresourcedefinitions"],
        verbs: &["list", "watch"],
        names: &[SERVICE_MONITOR_CRD],
        used_by: "cache::service_monitor_crd_trigger (a watch by metadata.name)",
    },
];

/// Only with the chart value `rbac.legacyClusterRoleCleanup`: earlier operators created a
/// ClusterRole per LogPipeline (`logpipe:<namespace>:<name>`); with this, the finalizer and
/// the roleRef migration delete it (`apply::delete_legacy_cluster_role`).
pub const LEGACY_CLEANUP_RULE: Rule = rule(
    "rbac.authorization.k8s.io",
    &["clusterroles"],
    &["delete"],
    "apply::delete_legacy_cluster_role",
);

/// The operator's Role in the lease namespace (`--lease-namespace`): leader election.
pub const OPERATOR_LEASE_RULES: &[Rule] = &[
    rule(
        "coordination.k8s.io",
        &["leases"],
        &["create"],
        "leader::start (kube-lease-manager creates the Lease when missing)",
    ),
    Rule {
        group: "coordination.k8s.io",
        resources: &["leases"],
        verbs: &["get", "patch"],
        names: &[LEASE_NAME],
        used_by: "leader::start (kube-lease-manager reads, takes, renews and releases the Lease)",
    },
];

/// The agents' ClusterRole (the chart's `files/agent-clusterrole.yaml`).
pub const AGENT_RULES: &[Rule] = &[
    rule(
        "",
        &["pods"],
        &["list", "watch"],
        "agent/src/discovery.rs: watches the pods of its own node (fieldSelector spec.nodeName)",
    ),
    rule(
        "",
        &["namespaces"],
        &["get", "list", "watch"],
        "agent/src/selection.rs: namespace labels, for a LogPipeline's spec.selector.namespaceSelector and spec.tenantFrom.namespaceLabel",
    ),
];

/// Every (group, resource, verb, name) a set of rules grants; `name` empty: any.
pub fn grants(rules: &[Rule]) -> std::collections::BTreeSet<(String, String, String, String)> {
    let mut out = std::collections::BTreeSet::new();
    for r in rules {
        for resource in r.resources {
            for verb in r.verbs {
                if r.names.is_empty() {
                    out.insert((
                        r.group.into(),
                        (*resource).into(),
                        (*verb).into(),
                        String::new(),
                    ));
                }
                for name in r.names {
                    out.insert((
                        r.group.into(),
                        (*resource).into(),
                        (*verb).into(),
                        (*name).into(),
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use k8s_openapi::api::rbac::v1::PolicyRule;
    use serde_json::Value;

    use super::*;

    type Grants = BTreeSet<(String, String, String, String)>;

    fn chart() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/logpipe")
    }

    fn policy_grants(rules: &[PolicyRule]) -> Grants {
        let mut out = Grants::new();
        for r in rules {
            let names = r.resource_names.clone().unwrap_or_default();
            for group in r.api_groups.iter().flatten() {
                for resource in r.resources.iter().flatten() {
                    for verb in &r.verbs {
                        let key =
                            |n: &str| (group.clone(), resource.clone(), verb.clone(), n.into());
                        if names.is_empty() {
                            out.insert(key(""));
                        }
                        out.extend(names.iter().map(|n| key(n)));
                    }
                }
            }
        }
        out
    }

    fn documents(text: &str) -> Vec<Value> {
        text.split("\n---")
            .filter_map(|doc| serde_yaml::from_str::<Value>(doc).ok())
            .filter(|v| v.is_object())
            .collect()
    }

    fn rules_of(docs: &[Value], kind: &str, name: &str) -> Grants {
        let doc = docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"));
        let rules: Vec<PolicyRule> = serde_json::from_value(doc["rules"].clone()).unwrap();
        policy_grants(&rules)
    }

    fn assert_same(what: &str, chart: &Grants, code: &Grants) {
        let extra: Vec<_> = chart.difference(code).collect();
        let missing: Vec<_> = code.difference(chart).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "{what}: the chart and operator/src/rbac.rs differ\n\
             granted by the chart, used by no code: {extra:?}\n\
             used by the code, not granted by the chart: {missing:?}"
        );
    }

    /// Each rendered snapshot (release `logpipe`, namespace `logpipe-system`) grants exactly
    /// what the code uses.
    #[test]
    fn chart_grants_exactly_what_the_code_uses() {
        let tests = chart().join("tests");
        let mut snapshots: Vec<PathBuf> = std::fs::read_dir(&tests)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "snap"))
            .collect();
        snapshots.sort();
        assert!(snapshots.len() >= 3, "no snapshots in {}", tests.display());
        for snap in snapshots {
            let stem = snap.file_stem().unwrap().to_string_lossy().into_owned();
            let values = tests.join(format!("values-{stem}.yaml"));
            let cleanup = std::fs::read_to_string(&values)
                .ok()
                .and_then(|t| serde_yaml::from_str::<Value>(&t).ok())
                .is_some_and(|v| v["rbac"]["legacyClusterRoleCleanup"] == true);
            let docs = documents(&std::fs::read_to_string(&snap).unwrap());
            let what = |s: &str| format!("{} ({s})", snap.display());

            let mut cluster = OPERATOR_CLUSTER_RULES.to_vec();
            if cleanup {
                cluster.push(LEGACY_CLEANUP_RULE);
            }
            assert_same(
                &what("operator ClusterRole"),
                &rules_of(&docs, "ClusterRole", "logpipe"),
                &grants(&cluster),
            );
            assert_same(
                &what("operator lease Role"),
                &rules_of(&docs, "Role", "logpipe"),
                &grants(OPERATOR_LEASE_RULES),
            );
            assert_same(
                &what("agent ClusterRole"),
                &rules_of(&docs, "ClusterRole", AGENT_CLUSTER_ROLE),
                &grants(AGENT_RULES),
            );
            let args = docs
                .iter()
                .find(|d| d["kind"] == "Deployment")
                .map(|d| d["spec"]["template"]["spec"]["containers"][0]["args"].clone())
                .unwrap();
            assert!(
                args.as_array()
                    .unwrap()
                    .iter()
                    .any(|a| a.as_str()
                        == Some(&format!("--agent-cluster-role={AGENT_CLUSTER_ROLE}"))),
                "{}: the operator is not told the agents' ClusterRole: {args}",
                snap.display()
            );
        }
    }

    /// The file the chart and the test bed both apply.
    #[test]
    fn agent_cluster_role_file_is_the_agents_rules() {
        let path = chart().join("files/agent-clusterrole.yaml");
        let docs = documents(&std::fs::read_to_string(&path).unwrap());
        assert_eq!(docs.len(), 1, "{}", path.display());
        assert_same(
            &path.display().to_string(),
            &rules_of(&docs, "ClusterRole", AGENT_CLUSTER_ROLE),
            &grants(AGENT_RULES),
        );
    }

    /// The comparison fails on a verb too many or too few.
    #[test]
    fn a_drift_is_seen() {
        let chart = grants(OPERATOR_CLUSTER_RULES);
        let mut more = chart.clone();
        more.insert(("".into(), "secrets".into(), "list".into(), String::new()));
        assert_ne!(more, chart);
        let result = std::panic::catch_unwind(|| assert_same("drift", &more, &chart));
        assert!(result.is_err());
    }
}
