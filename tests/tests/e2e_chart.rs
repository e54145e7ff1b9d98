//! The Helm chart: `helm lint`, `helm template` snapshots for each values file in
//! charts/logpipe/tests/, the rendered output accepted by the test bed's real API server
//! (server-side dry run), and the operator reconciling a LogPipeline as the chart's
//! ServiceAccount, with the chart's RBAC and nothing more. Run with `make chart-test`.
//! (The chart's CRDs being identical to crds/ needs no helm: tests/static_checks.rs.)
//! `UPDATE_SNAPSHOTS=1` rewrites the snapshots after an intended change.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use logpipe_e2e::operator::Operator;
use logpipe_e2e::{Testbed, cached_binary, repo_root, unique_suffix, wait_for};
use serde_json::{Value, json};

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/logpipe")
}

fn values_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("tests"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("values-"))
        })
        .collect();
    files.sort();
    files
}

fn template(helm: &Path, values: Option<&Path>) -> String {
    let mut command = Command::new(helm);
    command
        .args(["template", "logpipe"])
        .arg(chart_dir())
        .args(["--namespace", "logpipe-system", "--kube-version", "1.36.3"]);
    if let Some(values) = values {
        command.arg("--values").arg(values);
    }
    run(&mut command)
}

#[test]
fn chart_lints_clean() {
    let helm = cached_binary("HELM", "helm");
    let out = run(Command::new(&helm)
        .args(["lint", "--strict"])
        .arg(chart_dir()));
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn chart_renders_as_the_snapshots_say() {
    let helm = cached_binary("HELM", "helm");
    let mut cases: Vec<(String, Option<PathBuf>)> = vec![("default".into(), None)];
    for file in values_files() {
        let name = file
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("values-")
            .to_string();
        cases.push((name, Some(file)));
    }
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
    for (name, values) in cases {
        let rendered = template(&helm, values.as_deref());
        let snapshot = chart_dir().join(format!("tests/{name}.snap"));
        if update {
            std::fs::write(&snapshot, &rendered).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&snapshot).unwrap_or_else(|_| {
            panic!(
                "{} is missing: run `UPDATE_SNAPSHOTS=1 make chart-test`",
                snapshot.display()
            )
        });
        assert!(
            rendered == expected,
            "helm template with {name} values differs from {}: review the change, then run `UPDATE_SNAPSHOTS=1 make chart-test`\n--- rendered ---\n{rendered}",
            snapshot.display()
        );
    }
}

/// The operator container's args of a rendered chart.
fn operator_args(rendered: &str) -> Vec<String> {
    for doc in rendered.split("\n---") {
        let Ok(value) = serde_yaml::from_str::<serde_json::Value>(doc) else {
            continue;
        };
        if value["kind"] == "Deployment" {
            let args = &value["spec"]["template"]["spec"]["containers"][0]["args"];
            return serde_json::from_value(args.clone()).unwrap();
        }
    }
    panic!("no Deployment in the rendered chart");
}

#[test]
fn operator_accepts_the_args_the_chart_gives_it() {
    let helm = cached_binary("HELM", "helm");
    let operator = logpipe_e2e::workspace_binary("logpipe-operator");
    let values: Vec<Option<PathBuf>> = std::iter::once(None)
        .chain(values_files().into_iter().map(Some))
        .collect();
    for values in values {
        let args = operator_args(&template(&helm, values.as_deref()));
        // clap refuses an unknown or malformed argument before it prints help.
        let output = Command::new(&operator)
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{values:?}: logpipe-operator refuses the chart's args {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[tokio::test]
async fn rendered_chart_is_accepted_by_the_api_server() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let helm = cached_binary("HELM", "helm");
    let kubectl = cached_binary("K8S", "kubectl");
    let kubeconfig = testbed.kubeconfig("ops");
    // The namespace must exist for a dry run of namespaced objects; it is harmless to keep.
    let namespace = run(Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "create",
            "namespace",
            "logpipe-system",
            "--dry-run=client",
            "-o",
            "yaml",
        ]));
    let mut apply_namespace = Command::new(&kubectl);
    apply_namespace.arg("--kubeconfig").arg(&kubeconfig).args([
        "apply",
        "--server-side",
        "-f",
        "-",
    ]);
    pipe(&mut apply_namespace, &namespace);

    let values: Vec<Option<PathBuf>> = std::iter::once(None)
        .chain(values_files().into_iter().map(Some))
        .collect();
    for values in values {
        let mut rendered = template(&helm, values.as_deref());
        // CRDs from the chart's crds/ directory are installed by helm before templates.
        let mut command = Command::new(&helm);
        command.args(["show", "crds"]).arg(chart_dir());
        rendered = format!("{}\n---\n{rendered}", run(&mut command));
        // ServiceMonitor needs the prometheus-operator CRD, absent from the test bed: the
        // server would answer "no matches for kind"; it is checked by the snapshot instead.
        let rendered: Vec<&str> = rendered
            .split("\n---")
            .filter(|doc| !doc.contains("kind: ServiceMonitor"))
            .collect();
        let mut command = Command::new(&kubectl);
        command.arg("--kubeconfig").arg(&kubeconfig).args([
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager",
            "helm",
            "-f",
            "-",
        ]);
        let out = pipe(&mut command, &rendered.join("\n---"));
        assert!(out.contains("deployment.apps/logpipe"), "{values:?}: {out}");
    }
}

fn pipe(command: &mut Command, input: &str) -> String {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The chart's RBAC for real: its ServiceAccount, (Cluster)Roles and bindings applied under a
/// release of their own, and the operator run here with a kubeconfig that impersonates that
/// ServiceAccount (the chart's args; the Deployment's pods would only be KWOK's). It must
/// hold its Lease, reconcile a LogPipeline to Healthy (DaemonSet, binding to the chart's
/// agent role, Events) and delete it through its finalizer, with no request refused.
#[tokio::test]
async fn operator_works_as_the_charts_service_account() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = testbed.client("ops").await.unwrap();
    logpipe_e2e::cluster::install_crd(&client).await.unwrap();
    let helm = cached_binary("HELM", "helm");
    let kubectl = cached_binary("K8S", "kubectl");
    let kubeconfig = testbed.kubeconfig("ops");
    let suffix = unique_suffix();
    // The release name contains "logpipe", so it is the chart's fullname too.
    let release = format!("logpipe-rbac-{suffix}");
    let release_ns = format!("lprbac-system-{suffix}");
    let ns = format!("lprbac-{suffix}");
    for n in [&release_ns, &ns] {
        logpipe_e2e::cluster::ensure_namespace(&client, n)
            .await
            .unwrap();
    }
    let rendered = run(Command::new(&helm)
        .args(["template", &release])
        .arg(chart_dir())
        .args(["--namespace", &release_ns, "--kube-version", "1.36.3"])
        .args(["--set", &format!("watchNamespace={ns}")]));
    let docs: Vec<Value> = rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<Value>(doc).ok())
        .filter(|v| v.is_object())
        .collect();
    let rbac: Vec<String> = docs
        .iter()
        .filter(|d| {
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .contains(&d["kind"].as_str().unwrap_or_default())
        })
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect();
    assert_eq!(rbac.len(), 6, "the chart's RBAC objects: {rbac:?}");
    let rbac = rbac.join("---\n");
    let mut apply = Command::new(&kubectl);
    apply.arg("--kubeconfig").arg(&kubeconfig).args([
        "apply",
        "--server-side",
        "--field-manager",
        "helm",
        "-f",
        "-",
    ]);
    pipe(&mut apply, &rbac);

    // The test bed's admin, impersonating the chart's ServiceAccount.
    let account = format!("system:serviceaccount:{release_ns}:{release}");
    let mut config: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&kubeconfig).unwrap()).unwrap();
    for user in config["users"].as_array_mut().unwrap() {
        user["user"]["as"] = json!(account);
        user["user"]["as-groups"] = json!([
            "system:serviceaccounts",
            format!("system:serviceaccounts:{release_ns}"),
            "system:authenticated"
        ]);
    }
    let scratch = testbed.scratch_dir("chart-rbac").unwrap();
    let impersonating = scratch.join("kubeconfig");
    std::fs::write(&impersonating, serde_yaml::to_string(&config).unwrap()).unwrap();
    // Who asks is the ServiceAccount: it may get a Secret, not list them.
    for (verb, expected) in [("get", "yes"), ("list", "no")] {
        let output = Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(&impersonating)
            .args(["auth", "can-i", verb, "secrets", "-n", &ns])
            .output()
            .unwrap();
        let answer = String::from_utf8_lossy(&output.stdout);
        assert_eq!(answer.trim(), expected, "can {account} {verb} secrets?");
    }

    // The chart's args, but the agent image (KWOK runs these pods) and what start_with sets.
    let args: Vec<String> = operator_args(&rendered)
        .into_iter()
        .filter(|a| {
            !["--metrics-addr=", "--log-format=", "--agent-image="]
                .iter()
                .any(|p| a.starts_with(p))
        })
        .chain(["--agent-image=reg.local/logpipe-agent:e2e".to_string()])
        .collect();
    assert!(
        args.contains(&format!("--agent-cluster-role={release}-agent")),
        "{args:?}"
    );
    let mut operator = Operator::start_with(
        &testbed,
        &impersonating,
        &args,
        "chart-sa",
        &format!("operator-chart-rbac-{suffix}.log"),
    )
    .await;

    // The ops example, verified briefly (KWOK's pods ship nothing), as e2e_operator does.
    let mut lp = logpipe_e2e::cluster::ops_example_on_kwok(&ns, &testbed.push_url());
    let name = lp["metadata"]["name"].as_str().unwrap().to_string();
    let lps = logpipe_e2e::cluster::logpipelines(&client, &ns);
    let apply = |lp: serde_json::Value| {
        let (lps, name) = (lps.clone(), name.clone());
        async move {
            let params = PatchParams::apply("e2e-chart").force();
            lps.patch(&name, &params, &Patch::Apply(&lp)).await.unwrap();
        }
    };
    apply(lp.clone()).await;
    let first = healthy(&lps, &name, 1).await;
    // A new revision: agent pods deleted node by node, the old ConfigMap collected.
    lp["spec"]["pipeline"]
        .as_array_mut()
        .unwrap()
        .push(json!({"staticLabels": {"cluster": "ops"}}));
    apply(lp).await;
    let second = healthy(&lps, &name, 2).await;
    assert_ne!(first, second, "a new ConfigMap");
    Api::<DaemonSet>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .unwrap();
    let bindings = Api::<ClusterRoleBinding>::all(client.clone());
    let binding_name = format!("logpipe:{ns}:{name}");
    let binding = bindings.get(&binding_name).await.unwrap();
    assert_eq!(binding.role_ref.name, format!("{release}-agent"));

    lps.delete(&name, &DeleteParams::default()).await.unwrap();
    wait_for(
        "the LogPipeline and its binding deleted",
        Duration::from_secs(60),
        || async {
            let lp = lps.get_opt(&name).await.map_err(|e| e.to_string())?;
            let binding = bindings
                .get_opt(&binding_name)
                .await
                .map_err(|e| e.to_string())?;
            (lp.is_none() && binding.is_none())
                .then_some(())
                .ok_or_else(|| {
                    format!(
                        "LogPipeline left: {}, binding left: {}",
                        lp.is_some(),
                        binding.is_some()
                    )
                })
        },
    )
    .await;
    operator.kill().await;

    let log = std::fs::read_to_string(&operator.log).unwrap();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .collect();
    assert!(
        refused.is_empty(),
        "requests the chart's RBAC refused ({}):\n{}",
        operator.log.display(),
        refused.join("\n")
    );
    let mut delete = Command::new(&kubectl);
    delete.arg("--kubeconfig").arg(&kubeconfig).args([
        "delete",
        "--ignore-not-found",
        "--wait=false",
        "-f",
        "-",
    ]);
    pipe(&mut delete, &rbac);
    run(Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["delete", "namespace", "--wait=false", &ns, &release_ns]));
}

/// Wait until the LogPipeline is Healthy at `generation`; its ConfigMap.
async fn healthy(lps: &Api<kube::api::DynamicObject>, name: &str, generation: i64) -> Value {
    wait_for(
        "the LogPipeline Healthy",
        Duration::from_secs(90),
        || async {
            let lp = lps.get(name).await.map_err(|e| e.to_string())?;
            let s = &lp.data["status"];
            (s["phase"] == "Healthy" && s["observedGeneration"].as_i64() >= Some(generation))
                .then(|| s["configMap"].clone())
                .ok_or_else(|| s.to_string())
        },
    )
    .await
}
