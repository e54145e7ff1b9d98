//! The Helm chart: `helm lint`, `helm template` snapshots for each values file in
//! charts/logpipe/tests/, and the rendered output accepted by the test bed's real API
//! server (server-side dry run). Run with `make chart-test`. (The chart's CRDs being
//! identical to crds/ needs no helm: tests/static_checks.rs.)
//! `UPDATE_SNAPSHOTS=1` rewrites the snapshots after an intended change.

use std::path::{Path, PathBuf};
use std::process::Command;

use logpipe_e2e::{Testbed, cached_binary, repo_root};

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
