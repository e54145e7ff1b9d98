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
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use logpipe_e2e::{Testbed, unique_suffix};
use serde_json::{Value, json};

use bed::{Bed, Release, pipeline, publish};

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

/// Per cluster: sync status, revision (8 characters), health, health message.
type States = BTreeMap<String, (String, String, String, String)>;

/// Poll the Applications every second, print each change as Argo CD reports it, until
/// `done` holds (or panic after `timeout`).
async fn watch(
    apps: &Api<DynamicObject>,
    set: &str,
    timeout: Duration,
    done: impl Fn(&States) -> bool,
) -> Timeline {
    let started = Instant::now();
    let mut timeline = Timeline::default();
    let mut last: States = BTreeMap::new();
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

fn at(state: &States, cluster: &str, revision: &str, health: &str) -> bool {
    let short: String = revision.chars().take(8).collect();
    state
        .get(cluster)
        .is_some_and(|(sync, rev, h, _)| sync == "Synced" && *rev == short && h == health)
}

/// Every Application Synced and Healthy at `rev`.
fn all_healthy_at(rev: &str) -> impl Fn(&States) -> bool + use<> {
    let rev = rev.to_string();
    move |s| CLUSTERS.iter().all(|c| at(s, c, &rev, "Healthy"))
}

/// One test's three clusters (operator, real agents, workload logs each) in one namespace,
/// its git repository, and Argo CD's APIs in ops. Stopped by [`Fleet::down`] (the beds
/// clean up after a failed test themselves).
struct Fleet {
    testbed: Testbed,
    ns: String,
    suffix: String,
    beds: BTreeMap<&'static str, Bed>,
    repo: PathBuf,
    apps: Api<DynamicObject>,
    sets: Api<DynamicObject>,
    set_name: String,
    releases: Vec<Release>,
}

impl Fleet {
    async fn up(prefix: &str) -> Self {
        let testbed = Testbed::ensure(&CLUSTERS)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            testbed.dir.join("argocd-namespace").is_file(),
            "Argo CD is an add-on of the test bed: run `tests/testbed/addons.sh argocd` (or `make e2e-argocd`)"
        );
        let suffix = unique_suffix();
        let ns = format!("{prefix}-{suffix}");
        let mut beds = BTreeMap::new();
        for cluster in CLUSTERS {
            beds.insert(cluster, Bed::up(&testbed, cluster, &ns).await);
        }
        let repo = testbed.scratch_dir(&format!("{prefix}-git")).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        let ops = testbed.client("ops").await.unwrap();
        Self {
            apps: argo_api(&ops, "Application", "applications"),
            sets: argo_api(&ops, "ApplicationSet", "applicationsets"),
            set_name: ns.clone(),
            testbed,
            ns,
            suffix,
            beds,
            repo,
            releases: Vec::new(),
        }
    }

    /// Publish the built agent under a tag of this run; its image.
    fn release(&mut self, tag: &str) -> String {
        let release = publish(&self.testbed, &format!("e2e-{}-{tag}", self.suffix));
        let image = release.image.clone();
        self.releases.push(release);
        image
    }

    /// Commit `specs`, apply the ApplicationSet `set`, wait until all are Healthy there.
    async fn install(&self, set: &Value, specs: &BTreeMap<&str, Value>, message: &str) -> String {
        let rev = commit(&self.repo, specs, message);
        println!("commit {} ({message})", &rev[..8]);
        self.sets
            .patch(
                &self.set_name,
                &PatchParams::apply("e2e-argocd").force(),
                &Patch::Apply(set),
            )
            .await
            .unwrap();
        watch(
            &self.apps,
            &self.set_name,
            Duration::from_secs(600),
            all_healthy_at(&rev),
        )
        .await;
        rev
    }

    /// Commit `specs` and tell Argo CD; the commit's SHA.
    async fn push(&self, specs: &BTreeMap<&str, Value>, message: &str) -> String {
        let rev = commit(&self.repo, specs, message);
        println!("commit {} ({message})", &rev[..8]);
        refresh(&self.apps, &self.set_name).await;
        rev
    }

    /// [`Fleet::push`], then watch until every Application is Healthy at the new commit.
    async fn roll(&self, specs: &BTreeMap<&str, Value>, message: &str) -> (String, Timeline) {
        let rev = self.push(specs, message).await;
        let timeline = watch(
            &self.apps,
            &self.set_name,
            Duration::from_secs(600),
            all_healthy_at(&rev),
        )
        .await;
        (rev, timeline)
    }

    async fn down(self) {
        let _ = self
            .sets
            .delete(&self.set_name, &DeleteParams::default())
            .await;
        for (_, bed) in self.beds {
            bed.down().await;
        }
    }
}

#[tokio::test]
async fn rolling_sync_moves_a_commit_ops_then_dev_then_prod_and_stops_a_bad_one_at_ops() {
    let mut fleet = Fleet::up("argocd").await;
    let image1 = fleet.release("a1");
    let image2 = fleet.release("a2");
    let specs = |image: &str| -> BTreeMap<&str, Value> {
        CLUSTERS
            .iter()
            .map(|c| {
                let tenant = logpipe_e2e::store::unique_tenant();
                let store = &fleet.testbed.store_url;
                (
                    *c,
                    pipeline(&fleet.ns, &tenant, image, store, "5s", fleet.beds[c].nodes),
                )
            })
            .collect()
    };
    let set = application_set(&fleet.testbed, &fleet.repo, &fleet.ns, &fleet.set_name);
    fleet
        .install(
            &set,
            &specs(&image1),
            "agent release 1, installed by RollingSync",
        )
        .await;

    let (rev2, good) = fleet
        .roll(&specs(&image2), "agent release 2, a new agent image")
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

    let bad_image = format!(
        "reg.local/logpipe-agent:e2e-{}-never-published",
        fleet.suffix
    );
    let rev3 = fleet
        .push(
            &specs(&bad_image),
            "an agent image that was never published",
        )
        .await;
    let (apps, set_name) = (&fleet.apps, &fleet.set_name);
    watch(apps, set_name, Duration::from_secs(300), |s: &States| {
        at(s, "ops", &rev3, "Degraded")
    })
    .await;
    // Keep watching: RollingSync must not move on to dev or prod.
    let held_since = Instant::now();
    let after = watch(apps, set_name, Duration::from_secs(120), |_| {
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
    let set_status = fleet.sets.get(set_name).await.unwrap();
    println!(
        "ApplicationSet status.applicationStatus: {}",
        set_status.data["status"]["applicationStatus"]
    );
    fleet.down().await;
}

#[tokio::test]
async fn gate_mode_one_commit_synced_everywhere_the_operators_gate_orders_the_clusters() {
    let mut fleet = Fleet::up("argogate").await;
    gate_secret(&fleet.testbed, &fleet.beds["dev"], "ops").await;
    gate_secret(&fleet.testbed, &fleet.beds["prod"], "dev").await;
    let image1 = fleet.release("g1");
    let image2 = fleet.release("g2");
    let ns = fleet.ns.clone();
    let specs = |image: &str| -> BTreeMap<&str, Value> {
        CLUSTERS
            .iter()
            .zip([None, Some("ops"), Some("dev")])
            .map(|(c, upstream)| {
                let tenant = logpipe_e2e::store::unique_tenant();
                let store = &fleet.testbed.store_url;
                let mut lp = pipeline(&ns, &tenant, image, store, "5s", fleet.beds[c].nodes);
                if let Some(up) = upstream {
                    lp["spec"]["rollout"]["gate"] = json!({
                        "clusterSecretRef": {"name": format!("cluster-{up}"), "key": "kubeconfig"},
                        "namespace": ns, "name": "logpipe", "soak": "5s", "pollInterval": "5s"});
                }
                (*c, lp)
            })
            .collect()
    };
    let set = automated_set(&fleet.testbed, &fleet.repo, &ns, &fleet.set_name);
    fleet
        .install(
            &set,
            &specs(&image1),
            "agent release 1, automated sync everywhere, gated",
        )
        .await;

    let (rev2, t) = fleet
        .roll(&specs(&image2), "agent release 2, a new agent image")
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

    fleet.down().await;
}

/// Argo CD's components, Redis and the clusters listen on loopback only (build.sh moves the
/// one listener Argo CD v3.6.1 binds to 0.0.0.0 with no flag).
#[test]
fn argo_cd_and_the_test_bed_listen_on_loopback_only() {
    let required = [
        "argocd-application-controller",
        "argocd-repo-server",
        "argocd-redis",
        "ops-kube-apiserver",
    ];
    let checked =
        logpipe_e2e::listeners::check_loopback_only(&logpipe_e2e::testbed_dir(), &required);
    assert_eq!(checked, Ok(()));
}
