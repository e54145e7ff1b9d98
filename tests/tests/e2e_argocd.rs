//! Argo CD syncs LogPipelines from git to three clusters (`make e2e-argocd`): a real Argo CD
//! (`tests/testbed/addons.sh argocd`: application-controller, repo-server,
//! applicationset-controller built from its Go module, ops as the management cluster, ops,
//! dev and prod registered as cluster Secrets, our health check in argocd-cm) runs
//! `examples/argocd/applicationset-rollingsync.yaml` against a git repository this test
//! writes (a `file://` URL, as Argo CD's own end-to-end tests use). Each cluster runs its
//! operator and real agents (the node simulator), as in `e2e_rollout`.
//!
//! Shown, by Argo CD's own status (`status.sync`, `status.health` of each Application, as
//! printed in the timeline): a commit that changes the agent is synced to ops first; dev is
//! synced only once ops is `Healthy` by our health check (the operator verified and soaked
//! the release), then prod; a bad commit stops at ops, `Degraded` after the operator's
//! rollback, and dev and prod are never synced to it.
//!
//! Gate mode, the other way (`rollout.gate` in dev and prod, no RollingSync): Argo CD syncs
//! each commit to the three clusters at once (automated sync); the operators' gate orders
//! the rollout, and each Application's health follows its LogPipeline (`Suspended` while
//! the gate holds it, `Progressing` while it rolls, `Healthy` once verified).
//!
//! ```text
//! cargo build --bins && make testbed-up CLUSTERS="ops dev prod" && tests/testbed/addons.sh argocd
//! cargo test -p logpipe-e2e --features e2e --test e2e_argocd -- --nocapture --test-threads 1
//! ```

#[path = "e2e_rollout/bed.rs"]
#[allow(dead_code)] // shared with e2e_rollout, which uses all of it
mod bed;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use logpipe_e2e::{Testbed, unique_suffix};
use serde_json::{Value, json};

use bed::{Bed, pipeline, publish};

const CLUSTERS: [&str; 3] = ["ops", "dev", "prod"];

fn argo_api(client: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("argoproj.io", "v1alpha1", kind),
        plural,
    );
    Api::namespaced_with(client.clone(), "argocd", &resource)
}

/// `git` in the test's repository; panics with its output when it fails.
fn git(repo: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "-c",
            "user.name=logpipe-e2e",
            "-c",
            "user.email=e2e@logpipe.invalid",
        ])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run git: {e}"));
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Write each cluster's LogPipeline under `logpipe/<cluster>/` and commit; the commit's SHA.
fn commit(repo: &Path, specs: &BTreeMap<&str, Value>, message: &str) -> String {
    for (cluster, lp) in specs {
        let dir = repo.join("logpipe").join(cluster);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("logpipeline.yaml"),
            serde_yaml::to_string(lp).unwrap(),
        )
        .unwrap();
    }
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-q", "-m", message]);
    git(repo, &["rev-parse", "HEAD"])
}

/// The example ApplicationSet, pointed at the test bed: the test's repository, the
/// clusters' loopback API servers, the test's namespace, names unique to the run.
fn application_set(testbed: &Testbed, repo: &Path, ns: &str, name: &str) -> Value {
    let path = logpipe_e2e::repo_root().join("examples/argocd/applicationset-rollingsync.yaml");
    let mut set = logpipe_e2e::yaml_documents(&path)
        .into_iter()
        .find(|d| d["kind"] == "ApplicationSet")
        .expect("the example has an ApplicationSet");
    set["metadata"]["name"] = json!(name);
    for element in set["spec"]["generators"][0]["list"]["elements"]
        .as_array_mut()
        .unwrap()
    {
        let env = element["env"].as_str().unwrap().to_string();
        let kubeconfig: Value =
            serde_yaml::from_str(&std::fs::read_to_string(testbed.kubeconfig(&env)).unwrap())
                .unwrap();
        element["server"] = kubeconfig["clusters"][0]["cluster"]["server"].clone();
    }
    let template = &mut set["spec"]["template"];
    template["metadata"]["name"] = json!(format!("{name}-{{{{.env}}}}"));
    template["spec"]["source"]["repoURL"] = json!(format!("file://{}", repo.display()));
    template["spec"]["destination"]["namespace"] = json!(ns);
    set
}

/// [`application_set`] for gate mode: no RollingSync, every Application synced on its own.
fn automated_set(testbed: &Testbed, repo: &Path, ns: &str, name: &str) -> Value {
    let mut set = application_set(testbed, repo, ns, name);
    if let Some(spec) = set["spec"].as_object_mut() {
        spec.remove("strategy");
    }
    set["spec"]["template"]["spec"]["syncPolicy"]["automated"] = json!({});
    set
}

/// A Secret in `ns` of `bed`'s cluster with `upstream`'s kubeconfig, for `rollout.gate`.
async fn gate_secret(testbed: &Testbed, bed: &Bed, upstream: &str) {
    let kubeconfig = std::fs::read_to_string(testbed.kubeconfig(upstream)).unwrap();
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("cluster-{upstream}"), "namespace": bed.ns},
        "stringData": {"kubeconfig": kubeconfig}});
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(bed.client.clone(), &bed.ns)
        .patch(
            &format!("cluster-{upstream}"),
            &PatchParams::apply("e2e-argocd").force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
}

/// One look at an Application: (sync status, synced revision, health, health message).
fn app_state(app: &Value) -> (String, String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let status = &app["status"];
    (
        s(&status["sync"]["status"]),
        s(&status["sync"]["revision"]).chars().take(8).collect(),
        s(&status["health"]["status"]),
        s(&status["resources"][0]["health"]["message"]),
    )
}

/// What the timeline saw: per cluster, the first time (s) each (sync, revision, health) held.
#[derive(Default)]
struct Timeline {
    seen: Vec<(f64, String, String, String, String)>,
}

impl Timeline {
    /// First time `cluster` was Synced at `revision` with health `health`.
    fn first(&self, cluster: &str, revision: &str, health: &str) -> Option<f64> {
        let short: String = revision.chars().take(8).collect();
        self.seen
            .iter()
            .find(|(_, c, sync, rev, h)| {
                c == cluster && sync == "Synced" && *rev == short && h == health
            })
            .map(|(t, ..)| *t)
    }

    /// First time `cluster` was synced to `revision`, whatever its health.
    fn synced(&self, cluster: &str, revision: &str) -> Option<f64> {
        let short: String = revision.chars().take(8).collect();
        self.seen
            .iter()
            .find(|(_, c, sync, rev, _)| c == cluster && sync == "Synced" && *rev == short)
            .map(|(t, ..)| *t)
    }
}

/// Poll the Applications every second, print each change as Argo CD reports it, until
/// `done` holds (or panic after `timeout`).
async fn watch(
    apps: &Api<DynamicObject>,
    set: &str,
    timeout: Duration,
    done: impl Fn(&BTreeMap<String, (String, String, String, String)>) -> bool,
) -> Timeline {
    let started = Instant::now();
    let mut timeline = Timeline::default();
    let mut last: BTreeMap<String, (String, String, String, String)> = BTreeMap::new();
    loop {
        for cluster in CLUSTERS {
            let Ok(app) = apps.get(&format!("{set}-{cluster}")).await else {
                continue;
            };
            let state = app_state(&serde_json::to_value(&app).unwrap());
            if last.get(cluster) != Some(&state) {
                let t = started.elapsed().as_secs_f64();
                println!(
                    "  {t:>6.1}s  {cluster:<5} sync {:<10} rev {:<8}  health {:<12} {}",
                    state.0, state.1, state.2, state.3
                );
                timeline.seen.push((
                    t,
                    cluster.to_string(),
                    state.0.clone(),
                    state.1.clone(),
                    state.2.clone(),
                ));
                last.insert(cluster.to_string(), state);
            }
        }
        if done(&last) {
            return timeline;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?}; last {last:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Ask Argo CD to look at git now, as a push webhook would.
async fn refresh(apps: &Api<DynamicObject>, set: &str) {
    for cluster in CLUSTERS {
        let patch = json!({"metadata": {"annotations": {"argocd.argoproj.io/refresh": "normal"}}});
        let _ = apps
            .patch(
                &format!("{set}-{cluster}"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await;
    }
}

fn at(
    state: &BTreeMap<String, (String, String, String, String)>,
    cluster: &str,
    revision: &str,
    health: &str,
) -> bool {
    let short: String = revision.chars().take(8).collect();
    state
        .get(cluster)
        .is_some_and(|(sync, rev, h, _)| sync == "Synced" && *rev == short && h == health)
}

#[tokio::test]
async fn rolling_sync_moves_a_commit_ops_then_dev_then_prod_and_stops_a_bad_one_at_ops() {
    let testbed = Testbed::ensure(&CLUSTERS)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        testbed.dir.join("argocd-namespace").is_file(),
        "Argo CD is an add-on of the test bed: run `tests/testbed/addons.sh argocd` (or `make e2e-argocd`)"
    );
    let suffix = unique_suffix();
    let ns = format!("argocd-{suffix}");
    let mut beds = BTreeMap::new();
    for cluster in CLUSTERS {
        beds.insert(cluster, Bed::up(&testbed, cluster, &ns).await);
    }
    let release1 = publish(&testbed, &format!("e2e-{suffix}-a1"));
    let release2 = publish(&testbed, &format!("e2e-{suffix}-a2"));
    let specs = |image: &str| -> BTreeMap<&str, Value> {
        CLUSTERS
            .iter()
            .map(|c| {
                let tenant = logpipe_e2e::store::unique_tenant();
                (
                    *c,
                    pipeline(&ns, &tenant, image, &testbed.store_url, "5s", beds[c].nodes),
                )
            })
            .collect()
    };
    let repo = testbed.scratch_dir("argocd-git").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let rev1 = commit(&repo, &specs(&release1.image), "logpipe: agent release 1");

    let ops = testbed.client("ops").await.unwrap();
    let apps = argo_api(&ops, "Application", "applications");
    let sets = argo_api(&ops, "ApplicationSet", "applicationsets");
    let set_name = format!("lp-{suffix}");
    let set = application_set(&testbed, &repo, &ns, &set_name);
    sets.patch(
        &set_name,
        &PatchParams::apply("e2e-argocd").force(),
        &Patch::Apply(&set),
    )
    .await
    .unwrap();

    println!(
        "commit {} (release 1): installed by RollingSync",
        &rev1[..8]
    );
    let all_at = |rev: String| {
        move |s: &BTreeMap<String, _>| CLUSTERS.iter().all(|c| at(s, c, &rev, "Healthy"))
    };
    watch(
        &apps,
        &set_name,
        Duration::from_secs(600),
        all_at(rev1.clone()),
    )
    .await;

    let rev2 = commit(&repo, &specs(&release2.image), "logpipe: agent release 2");
    println!("commit {} (release 2, a new agent image)", &rev2[..8]);
    refresh(&apps, &set_name).await;
    let good = watch(
        &apps,
        &set_name,
        Duration::from_secs(600),
        all_at(rev2.clone()),
    )
    .await;
    let healthy = |c: &str| good.first(c, &rev2, "Healthy").unwrap();
    let synced = |c: &str| good.synced(c, &rev2).unwrap();
    println!(
        "release 2: ops synced {:.1}s Healthy {:.1}s; dev synced {:.1}s Healthy {:.1}s; prod synced {:.1}s Healthy {:.1}s",
        synced("ops"),
        healthy("ops"),
        synced("dev"),
        healthy("dev"),
        synced("prod"),
        healthy("prod")
    );
    assert!(
        synced("ops") < healthy("ops"),
        "ops is not Healthy at once: the operator verifies first"
    );
    assert!(
        healthy("ops") <= synced("dev"),
        "dev is synced only once ops is Healthy"
    );
    assert!(
        healthy("dev") <= synced("prod"),
        "prod is synced only once dev is Healthy"
    );

    let bad_image = format!("reg.local/logpipe-agent:e2e-{suffix}-never-published");
    let rev3 = commit(
        &repo,
        &specs(&bad_image),
        "logpipe: a release nobody published",
    );
    println!(
        "commit {} (an agent image that was never published)",
        &rev3[..8]
    );
    refresh(&apps, &set_name).await;
    let degraded_at = |rev: String| move |s: &BTreeMap<String, _>| at(s, "ops", &rev, "Degraded");
    watch(
        &apps,
        &set_name,
        Duration::from_secs(300),
        degraded_at(rev3.clone()),
    )
    .await;
    // Keep watching: RollingSync must not move on to dev or prod.
    let held_since = Instant::now();
    let after = watch(&apps, &set_name, Duration::from_secs(120), |_| {
        held_since.elapsed() > Duration::from_secs(60)
    })
    .await;
    for cluster in ["dev", "prod"] {
        assert_eq!(
            after.synced(cluster, &rev3),
            None,
            "{cluster} never synced the bad commit"
        );
        let app = serde_json::to_value(apps.get(&format!("{set_name}-{cluster}")).await.unwrap())
            .unwrap();
        let (sync, rev, health, _) = app_state(&app);
        println!("{cluster}: sync {sync} (at {rev}), health {health}");
        assert_eq!(
            sync, "OutOfSync",
            "{cluster} waits with the bad commit unsynced"
        );
    }
    let set_status = sets.get(&set_name).await.unwrap();
    println!(
        "ApplicationSet status.applicationStatus: {}",
        set_status.data["status"]["applicationStatus"]
    );

    let _ = sets.delete(&set_name, &DeleteParams::default()).await;
    for (_, bed) in beds {
        bed.down().await;
    }
}

#[tokio::test]
async fn gate_mode_one_commit_synced_everywhere_the_operators_gate_orders_the_clusters() {
    let testbed = Testbed::ensure(&CLUSTERS)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        testbed.dir.join("argocd-namespace").is_file(),
        "Argo CD is an add-on of the test bed: run `tests/testbed/addons.sh argocd` (or `make e2e-argocd`)"
    );
    let suffix = unique_suffix();
    let ns = format!("argogate-{suffix}");
    let mut beds = BTreeMap::new();
    for cluster in CLUSTERS {
        beds.insert(cluster, Bed::up(&testbed, cluster, &ns).await);
    }
    gate_secret(&testbed, &beds["dev"], "ops").await;
    gate_secret(&testbed, &beds["prod"], "dev").await;
    let release1 = publish(&testbed, &format!("e2e-{suffix}-g1"));
    let release2 = publish(&testbed, &format!("e2e-{suffix}-g2"));
    let specs = |image: &str| -> BTreeMap<&str, Value> {
        CLUSTERS
            .iter()
            .zip([None, Some("ops"), Some("dev")])
            .map(|(c, upstream)| {
                let tenant = logpipe_e2e::store::unique_tenant();
                let mut lp = pipeline(&ns, &tenant, image, &testbed.store_url, "5s", beds[c].nodes);
                if let Some(up) = upstream {
                    lp["spec"]["rollout"]["gate"] = json!({
                        "clusterSecretRef": {"name": format!("cluster-{up}"), "key": "kubeconfig"},
                        "namespace": ns, "name": "logpipe", "soak": "5s", "pollInterval": "5s"});
                }
                (*c, lp)
            })
            .collect()
    };
    let repo = testbed.scratch_dir("argocd-gate-git").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let rev1 = commit(
        &repo,
        &specs(&release1.image),
        "logpipe: agent release 1, gated",
    );
    let ops = testbed.client("ops").await.unwrap();
    let apps = argo_api(&ops, "Application", "applications");
    let sets = argo_api(&ops, "ApplicationSet", "applicationsets");
    let set_name = format!("gate-{suffix}");
    let set = automated_set(&testbed, &repo, &ns, &set_name);
    sets.patch(
        &set_name,
        &PatchParams::apply("e2e-argocd").force(),
        &Patch::Apply(&set),
    )
    .await
    .unwrap();
    println!(
        "commit {} (release 1), automated sync everywhere, gated by the operators",
        &rev1[..8]
    );
    let all_at = |rev: String| {
        move |s: &BTreeMap<String, _>| CLUSTERS.iter().all(|c| at(s, c, &rev, "Healthy"))
    };
    watch(
        &apps,
        &set_name,
        Duration::from_secs(600),
        all_at(rev1.clone()),
    )
    .await;

    let rev2 = commit(
        &repo,
        &specs(&release2.image),
        "logpipe: agent release 2, gated",
    );
    println!("commit {} (release 2, a new agent image)", &rev2[..8]);
    refresh(&apps, &set_name).await;
    let t = watch(
        &apps,
        &set_name,
        Duration::from_secs(600),
        all_at(rev2.clone()),
    )
    .await;
    let synced = |c: &str| t.synced(c, &rev2).unwrap();
    let healthy = |c: &str| t.first(c, &rev2, "Healthy").unwrap();
    println!(
        "release 2: synced ops {:.1}s dev {:.1}s prod {:.1}s; Healthy ops {:.1}s dev {:.1}s prod {:.1}s",
        synced("ops"),
        synced("dev"),
        synced("prod"),
        healthy("ops"),
        healthy("dev"),
        healthy("prod")
    );
    assert!(
        synced("dev") < healthy("ops") && synced("prod") < healthy("ops"),
        "one commit synced everywhere at once"
    );
    assert!(
        healthy("ops") < healthy("dev"),
        "the gate holds dev until ops is Healthy"
    );
    assert!(
        healthy("dev") < healthy("prod"),
        "the gate holds prod until dev is Healthy"
    );
    // Synced at release 2 and not yet Healthy: held by the gate, then rolling.
    let short: String = rev2.chars().take(8).collect();
    for cluster in ["dev", "prod"] {
        let before: Vec<&str> = t
            .seen
            .iter()
            .filter(|(time, c, sync, rev, _)| {
                c == cluster && sync == "Synced" && *rev == short && *time < healthy(cluster)
            })
            .map(|(.., health)| health.as_str())
            .collect();
        println!("{cluster} at release 2 before Healthy: {before:?}");
        assert!(
            !before.is_empty(),
            "{cluster} was synced before it was Healthy"
        );
        assert!(
            before
                .iter()
                .all(|h| ["Suspended", "Progressing"].contains(h)),
            "{cluster}: {before:?}"
        );
    }

    let _ = sets.delete(&set_name, &DeleteParams::default()).await;
    for (_, bed) in beds {
        bed.down().await;
    }
}
