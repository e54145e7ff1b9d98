//! Prometheus scrapes the agents (`make e2e-prometheus`): on the ops cluster, with
//! prometheus-operator's own ServiceMonitor CRD installed (`tests/testbed/addons.sh
//! prometheus`), a LogPipeline with `monitoring.serviceMonitor.enabled` gets its
//! ServiceMonitor from the operator, created and validated by the API server. The scrape
//! config prometheus-operator would render from it (`role: pod` instead of `endpoints`:
//! see `logpipe_e2e::prometheus`) is loaded into a real Prometheus, which scrapes the real
//! agents on their pod IPs. Asserted through Prometheus' HTTP API: `up == 1` for every
//! agent pod, and every metric the rollout verification reads
//! (`logpipe_api::metrics::READ_BY_OPERATOR`, `promtail_sent_entries_total` among them)
//! there for every pod, labelled with its pod and node.
//!
//! ```text
//! cargo build --bins && make testbed-up && tests/testbed/addons.sh prometheus
//! cargo test -p logpipe-e2e --features e2e --test e2e_prometheus -- --nocapture
//! ```

#[path = "e2e_rollout/bed.rs"]
#[allow(dead_code)] // shared with e2e_rollout, which uses all of it
mod bed;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use logpipe_api::metrics::{DROPPED_ENTRIES_TOTAL, READ_BY_OPERATOR, SENT_ENTRIES_TOTAL};
use logpipe_e2e::prometheus::{Prometheus, scrape_config};
use logpipe_e2e::{Testbed, unique_suffix};
use serde_json::{Value, json};

use bed::{Bed, apply, pipeline, publish, wait_for, wait_healthy};

fn service_monitors(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let resource = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    );
    Api::namespaced_with(client.clone(), ns, &resource)
}

/// (pod, node) of each running agent pod.
async fn agent_pods(client: &kube::Client, ns: &str) -> BTreeSet<(String, String)> {
    logpipe_e2e::cluster::live_agent_pods(client, ns)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|p| Some((p.metadata.name?, p.spec?.node_name?)))
        .collect()
}

/// (pod, node) of each sample, and whether every value satisfies `ok`.
fn labelled(
    samples: &[(Value, f64)],
    ok: impl Fn(f64) -> bool,
) -> (BTreeSet<(String, String)>, bool) {
    let pods = samples
        .iter()
        .map(|(m, _)| {
            let label = |k: &str| m[k].as_str().unwrap_or_default().to_string();
            (label("pod"), label("node"))
        })
        .collect();
    (pods, samples.iter().all(|(_, v)| ok(*v)))
}

#[tokio::test]
async fn prometheus_scrapes_every_agent_through_the_operators_service_monitor() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let prometheus = Prometheus::running(&testbed).await.unwrap_or_else(|e| {
        panic!("{e}\nPrometheus is an add-on of the test bed: run `tests/testbed/addons.sh prometheus` (or `make e2e-prometheus`)")
    });
    let suffix = unique_suffix();
    let ns = format!("prom-{suffix}");
    let bed = Bed::up(&testbed, "ops", &ns).await;
    let release = publish(&testbed, &format!("e2e-{suffix}-prom"));
    let tenant = logpipe_e2e::store::unique_tenant();
    let mut lp = pipeline(
        &ns,
        &tenant,
        &release.image,
        &testbed.store_url,
        "5s",
        bed.nodes,
    );
    // A drop rule for 1% of the lines, so the drop counter (labelled by reason) has series.
    lp["spec"]["pipeline"]
        .as_array_mut()
        .unwrap()
        .push(json!({"drop": {"expression": "seq=[0-9]*00$", "dropCounterReason": "sampled"}}));
    lp["spec"]["monitoring"] = json!({"serviceMonitor": {"enabled": true, "interval": "2s",
                                                         "labels": {"release": "kube-prometheus-stack"}}});
    apply(&bed.client, &ns, &lp).await;
    wait_healthy(&bed.client, &ns, bed.nodes, Duration::from_secs(240)).await;

    // The operator's ServiceMonitor, as the API server stored it under the real CRD.
    let monitors = service_monitors(&bed.client, &ns);
    let sm = wait_for(
        "the operator's ServiceMonitor",
        Duration::from_secs(60),
        || async {
            monitors
                .get_opt("logpipe")
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "absent".to_string())
        },
    )
    .await;
    let sm = serde_json::to_value(&sm).unwrap();
    println!("ServiceMonitor {ns}/logpipe: {}", sm["spec"]);
    assert_eq!(sm["metadata"]["labels"]["release"], "kube-prometheus-stack");
    // The CRD's schema is enforced: a scheme prometheus-operator does not know is refused.
    let mut bad = sm.clone();
    bad["metadata"] = json!({"name": "invalid", "namespace": ns});
    bad["spec"]["endpoints"][0]["scheme"] = json!("gopher");
    let refused = monitors
        .patch(
            "invalid",
            &PatchParams::apply("e2e-prometheus"),
            &Patch::Apply(&bad),
        )
        .await;
    let refused =
        refused.expect_err("the API server validates ServiceMonitors by the CRD's schema");
    println!("invalid ServiceMonitor refused: {refused}");
    assert!(refused.to_string().contains("scheme"), "{refused}");

    // The scrape config prometheus-operator would render, from the Services it selects.
    let selector = sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
        .collect::<Vec<_>>()
        .join(",");
    let services: Vec<Value> = Api::<Service>::namespaced(bed.client.clone(), &ns)
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| serde_json::to_value(s).unwrap())
        .collect();
    let config = scrape_config(&sm, &services, 0, &testbed.kubeconfig("ops")).unwrap();
    let job = config["job_name"].as_str().unwrap().to_string();
    // prometheus-operator's `job` label: the Service's name.
    let service = services[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let scrape_name = format!("e2e-{ns}");
    prometheus.load(&scrape_name, &config).await.unwrap();

    let pods = agent_pods(&bed.client, &ns).await;
    assert_eq!(pods.len(), bed.nodes, "one agent per node: {pods:?}");
    let up = format!("up{{namespace=\"{ns}\"}}");
    wait_for(
        "up == 1 for every agent pod",
        Duration::from_secs(60),
        || async {
            let samples = prometheus.query(&up).await.map_err(|e| e.to_string())?;
            let (seen, all_up) = labelled(&samples, |v| v == 1.0);
            (seen == pods && all_up)
                .then_some(())
                .ok_or_else(|| format!("{samples:?}"))
        },
    )
    .await;
    println!("{up}: 1 for {} pods: {pods:?}", pods.len());

    let mut names: Vec<&str> = READ_BY_OPERATOR.to_vec();
    names.push(SENT_ENTRIES_TOTAL);
    // Labelled by the refusal (`reason`): no series until the store refuses a batch for
    // good, which a healthy store never does. The operator reads absent as 0.
    names.retain(|name| *name != DROPPED_ENTRIES_TOTAL);
    names.sort();
    names.dedup();
    for name in names {
        let promql = format!(
            "count by (pod, node) ({{__name__=\"{name}\", job=\"{service}\", namespace=\"{ns}\"}})"
        );
        let samples = wait_for(
            &format!("{name} for every agent pod"),
            Duration::from_secs(30),
            || async {
                let samples = prometheus.query(&promql).await.map_err(|e| e.to_string())?;
                let (seen, _) = labelled(&samples, |_| true);
                (seen == pods)
                    .then_some(samples.clone())
                    .ok_or_else(|| format!("{samples:?}"))
            },
        )
        .await;
        println!("{name}: series for {} pods", samples.len());
    }
    let sent = prometheus
        .query(&format!("sum({SENT_ENTRIES_TOTAL}{{namespace=\"{ns}\"}})"))
        .await
        .unwrap();
    println!("{SENT_ENTRIES_TOTAL} summed over the agents: {sent:?} (job {job})");
    assert!(
        sent.first().is_some_and(|s| s.1 > 0.0),
        "the agents sent entries: {sent:?}"
    );

    prometheus.unload(&scrape_name).await.unwrap();
    bed.down().await;
}

/// Prometheus and the clusters it scrapes listen on loopback only.
#[test]
fn prometheus_and_the_test_bed_listen_on_loopback_only() {
    let required = ["prometheus", "ops-kube-apiserver"];
    let checked =
        logpipe_e2e::listeners::check_loopback_only(&logpipe_e2e::testbed_dir(), &required);
    assert_eq!(checked, Ok(()));
}
