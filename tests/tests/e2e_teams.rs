//! Many teams, one cluster: real agents with pod discovery against the test bed's
//! kube-apiserver (namespaces and pods created there, on node names of their own), log
//! files written where the kubelet writes them, and the real store (VictoriaLogs, one
//! fresh numeric tenant per pipeline).
//!
//! - Two pipelines partition the namespaces of a 5-node cluster by label
//!   (`spec.selector.namespaceSelector`), each with an agent per node (10 agents): every
//!   line is in the store exactly once, in its pipeline's tenant.
//! - A `limit` stage keyed by `[namespace, app]` drops a noisy app's excess (counted in
//!   `logentry_dropped_lines_total{reason="rate_limited"}`, and stored + dropped = written)
//!   while a quiet app of the same namespace loses nothing.
//!
//! - An overlapping pair (one pipeline ships everything, the other one app): the operator
//!   reports the shared pod in both statuses (`overlappingPods`, `overlapsWith`).
//! - `tenantFrom` a namespace label: three namespaces land in three tenants; while the fault
//!   proxy answers 429 to one tenant for 60 s, the other two keep receiving lines, and
//!   afterwards every line of all three is stored exactly once.
//! - A namespace relabelled with another tenant sends the lines written after the change
//!   there, and the earlier ones stay in the old tenant.
//! - `tenantFrom` a field extracted per line: each line in the tenant it names, lines
//!   without one or with an invalid one in the default tenant (the invalid ones counted).
//!
//! Needs `cargo build -p logpipe-agent -p logpipe-operator` first (`make e2e-teams` does it). One test bed
//! (cluster `ops`) for all six tests; each takes well under a minute but the 429 one
//! (about 80 s: its fault window is a minute).

#[cfg(test)]
mod teams {
    use std::collections::BTreeMap;
    use std::fs;
    use std::io::Write;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
    use logpipe_agent::metrics::names::PIPELINE_DROPPED_LINES_TOTAL;
    use logpipe_e2e::faultproxy::{Budget, Fault, FaultProxy};
    use logpipe_e2e::loggen::{Clock, rfc3339_nano};
    use logpipe_e2e::operator::Operator;
    use logpipe_e2e::store::{self, Stream};
    use logpipe_e2e::{Testbed, unique_suffix, wait_for, workspace_binary};

    const CLUSTER: &str = "ops";
    /// Nodes of the partition test, each with one agent per pipeline.
    const NODES: usize = 5;

    async fn testbed() -> Testbed {
        match Testbed::ensure(&[CLUSTER]).await {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    /// Namespaces and pods made for one test, deleted when it ends.
    struct Cluster {
        client: kube::Client,
        /// Node names of this test (no Node objects: only pods' `spec.nodeName`).
        nodes: Vec<String>,
        namespaces: Vec<String>,
    }

    impl Cluster {
        async fn new(testbed: &Testbed) -> Self {
            Self {
                client: testbed.client(CLUSTER).await.unwrap(),
                nodes: (0..NODES)
                    .map(|i| format!("teams-node-{i}-{}", unique_suffix()))
                    .collect(),
                namespaces: Vec::new(),
            }
        }

        async fn namespace(&mut self, name: &str, labels: &[(&str, &str)]) {
            let ns: Namespace = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": to_map(labels)}
            }))
            .unwrap();
            Api::<Namespace>::all(self.client.clone())
                .create(&PostParams::default(), &ns)
                .await
                .unwrap();
            self.namespaces.push(name.to_string());
        }

        /// A pod bound to this test's node `node`; its uid (the log directory needs it).
        async fn pod(&self, ns: &str, name: &str, node: usize, labels: &[(&str, &str)]) -> String {
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": to_map(labels)},
                "spec": {"nodeName": self.nodes[node], "containers": [{"name": "app", "image": "app:1"}]}
            }))
            .unwrap();
            let created = Api::<Pod>::namespaced(self.client.clone(), ns)
                .create(&PostParams::default(), &pod)
                .await
                .unwrap();
            created.metadata.uid.unwrap()
        }
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            let client = self.client.clone();
            let names = std::mem::take(&mut self.namespaces);
            // Best effort, off the test's runtime (Drop cannot await).
            std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Runtime::new() else {
                    return;
                };
                rt.block_on(async {
                    let api = Api::<Namespace>::all(client);
                    for name in names {
                        let _ = api.delete(&name, &DeleteParams::default()).await;
                    }
                });
            })
            .join()
            .ok();
        }
    }

    fn to_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Write `n` unique CRI lines into the pod's container log, as the kubelet would.
    fn write_lines(root: &Path, ns: &str, pod: &str, uid: &str, n: usize) -> Vec<String> {
        append_lines(root, ns, pod, uid, 0, n)
    }

    /// Append lines `from..from + n` (numbered, so each is unique) to the pod's log.
    fn append_lines(
        root: &Path,
        ns: &str,
        pod: &str,
        uid: &str,
        from: usize,
        n: usize,
    ) -> Vec<String> {
        let path = root
            .join(format!("{ns}_{pod}_{uid}"))
            .join("app")
            .join("0.log");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let clock = Clock::new();
        let mut text = String::new();
        let lines: Vec<String> = (from..from + n)
            .map(|i| format!("{ns}/{pod} line {i:05}"))
            .collect();
        for line in &lines {
            text.push_str(&format!("{} stdout F {line}\n", rfc3339_nano(clock.next())));
        }
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
        lines
    }

    /// One agent process (one LogPipeline's agent on one of the test's nodes).
    struct Agent {
        child: Child,
        listen: String,
    }

    impl Agent {
        /// `stages`: pipeline stages after `cri`; `selector`: the pods it ships.
        fn start(
            testbed: &Testbed,
            node: &str,
            name: &str,
            root: &Path,
            tenant: &str,
            stages: &str,
            selector: &str,
        ) -> Self {
            let config = format!(
                "loki:\n  url: {}\n  tenant: \"{tenant}\"\n  batchWait: 200ms\n  minBackoff: 100ms\n  maxBackoff: 2s\n\
                 pipeline:\n- cri: {{}}\n- labelDrop: [filename]\n{stages}selector: {selector}\n",
                testbed.push_url()
            );
            Self::with_config(testbed, node, name, root, &config)
        }

        /// An agent with its whole config document given.
        fn with_config(testbed: &Testbed, node: &str, name: &str, root: &Path, text: &str) -> Self {
            let dir = testbed.scratch_dir(name).unwrap();
            let config = dir.join("agent.yaml");
            fs::write(&config, text).unwrap();
            let listen = format!("127.0.0.1:{}", logpipe_e2e::free_port().unwrap());
            let log = fs::File::create(dir.join("agent.log")).unwrap();
            let child = Command::new(workspace_binary("logpipe-agent"))
                .arg("--config")
                .arg(&config)
                .arg("--log-root")
                .arg(root)
                .arg("--positions")
                .arg(dir.join("positions.json"))
                .arg("--listen")
                .arg(&listen)
                .arg("--node-name")
                .arg(node)
                .arg("--kubeconfig")
                .arg(testbed.kubeconfig(CLUSTER))
                .env_remove("KUBERNETES_SERVICE_HOST")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            Self { child, listen }
        }

        /// Sum of the samples of `name` with `label` (e.g. `reason="rate_limited"`; empty: the
        /// sample of a metric without labels); waits
        /// for the metrics server of an agent just started.
        async fn counter(&self, name: &str, label: &str) -> f64 {
            let url = format!("http://{}/metrics", self.listen);
            let get = || async {
                let response = logpipe_e2e::http_client()
                    .get(&url)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await?;
                response.text().await
            };
            let text = logpipe_e2e::wait_for("agent metrics", Duration::from_secs(10), || async {
                get().await.map_err(|e| e.to_string())
            })
            .await;
            text.lines()
                .filter(|l| {
                    let labelled = l.starts_with(&format!("{name}{{")) && l.contains(label);
                    labelled || label.is_empty() && l.starts_with(&format!("{name} "))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        }
    }

    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// How often each line is in `streams`.
    fn stored(streams: &[Stream]) -> BTreeMap<String, usize> {
        let mut out: BTreeMap<String, usize> = BTreeMap::new();
        for s in streams {
            for (_, line) in &s.entries {
                *out.entry(line.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    /// What `tenant` holds since `start_ns` once it holds `lines` entries or more, or when
    /// `timeout` has passed (the caller's assertions say which).
    async fn at_least(
        testbed: &Testbed,
        tenant: &str,
        start_ns: i64,
        lines: usize,
        timeout: Duration,
    ) -> Vec<Stream> {
        let enough = |s: &[Stream]| store::count(s) >= lines;
        store::wait_for(&testbed.store_url, tenant, "*", start_ns, timeout, enough)
            .await
            .unwrap()
    }

    /// Everything `tenant` holds since `start_ns`, now.
    async fn everything(testbed: &Testbed, tenant: &str, start_ns: i64) -> Vec<Stream> {
        let now = store::now_ns() + 1_000_000_000;
        store::query_range(&testbed.store_url, tenant, "*", start_ns, now)
            .await
            .unwrap()
    }

    fn assert_exactly(want: &[String], streams: &[Stream], tenant: &str) {
        let got = stored(streams);
        let missing = want.iter().filter(|l| !got.contains_key(*l)).count();
        let twice = got.values().filter(|n| **n > 1).count();
        let foreign: Vec<&String> = got.keys().filter(|l| !want.contains(l)).take(3).collect();
        assert_eq!(
            (missing, twice, foreign.len()),
            (0, 0, 0),
            "tenant {tenant}: missing, stored twice, not this pipeline's (e.g. {foreign:?})"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_pipelines_partition_the_namespaces_each_line_once_in_its_tenant() {
        let testbed = testbed().await;
        let mut cluster = Cluster::new(&testbed).await;
        let s = unique_suffix();
        let (sys, shop, web) = (format!("sys-{s}"), format!("shop-{s}"), format!("web-{s}"));
        cluster.namespace(&sys, &[("tier", "platform")]).await;
        cluster.namespace(&shop, &[("team", "shop")]).await;
        cluster.namespace(&web, &[("team", "web")]).await;
        let (ops_tenant, teams_tenant) = (store::unique_tenant(), store::unique_tenant());
        let start_ns = store::now_ns() - 5_000_000_000;
        let mut agents = Vec::new();
        let mut want_ops = Vec::new();
        let mut want_teams = Vec::new();
        for (i, node) in cluster.nodes.iter().enumerate() {
            let root = testbed
                .scratch_dir(&format!("teams-partition-pods-{i}"))
                .unwrap();
            agents.push(Agent::start(
                &testbed,
                node,
                &format!("teams-partition-ops-{i}"),
                &root,
                &ops_tenant,
                "",
                "{namespaceSelector: {matchLabels: {tier: platform}}}",
            ));
            agents.push(Agent::start(
                &testbed,
                node,
                &format!("teams-partition-teams-{i}"),
                &root,
                &teams_tenant,
                "",
                "{namespaceSelector: {matchExpressions: [{key: team, operator: Exists}]}}",
            ));
            for (ns, app) in [
                (&sys, "dns"),
                (&shop, "cart"),
                (&shop, "pay"),
                (&web, "front"),
            ] {
                let pod = format!("{app}-{i}");
                let uid = cluster.pod(ns, &pod, i, &[("app", app)]).await;
                let lines = write_lines(&root, ns, &pod, &uid, 100);
                if *ns == sys {
                    &mut want_ops
                } else {
                    &mut want_teams
                }
                .extend(lines);
            }
        }
        for (tenant, want) in [(&ops_tenant, &want_ops), (&teams_tenant, &want_teams)] {
            at_least(
                &testbed,
                tenant,
                start_ns,
                want.len(),
                Duration::from_secs(60),
            )
            .await;
            // Let a duplicate, if any, arrive before judging.
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_exactly(want, &everything(&testbed, tenant, start_ns).await, tenant);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_limit_keyed_by_app_drops_the_noisy_app_only() {
        let testbed = testbed().await;
        let mut cluster = Cluster::new(&testbed).await;
        let ns = format!("limit-{}", unique_suffix());
        cluster.namespace(&ns, &[]).await;
        let root = testbed.scratch_dir("teams-limit-pods").unwrap();
        let tenant = store::unique_tenant();
        let start_ns = store::now_ns() - 5_000_000_000;
        let agent = Agent::start(
            &testbed,
            &cluster.nodes[0],
            "teams-limit",
            &root,
            &tenant,
            "- limit: {rate: 5, burst: 50, drop: true, byLabels: [namespace, app]}\n",
            "{podSelector: {matchExpressions: [{key: app, operator: In, values: [noisy, quiet]}]}}",
        );
        let mut quiet = Vec::new();
        let mut noisy = Vec::new();
        for (pod, app, n) in [
            ("noisy-1", "noisy", 500),
            ("noisy-2", "noisy", 500),
            ("quiet-1", "quiet", 40),
        ] {
            let uid = cluster.pod(&ns, pod, 0, &[("app", app)]).await;
            let lines = write_lines(&root, &ns, pod, &uid, n);
            if app == "quiet" {
                &mut quiet
            } else {
                &mut noisy
            }
            .extend(lines);
        }
        let reason = "reason=\"rate_limited\"";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let streams = loop {
            let streams = everything(&testbed, &tenant, start_ns).await;
            let dropped = agent.counter(PIPELINE_DROPPED_LINES_TOTAL, reason).await as usize;
            let accounted = store::count(&streams) + dropped;
            if accounted >= quiet.len() + noisy.len() || tokio::time::Instant::now() > deadline {
                break streams;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let got = stored(&streams);
        let quiet_stored: Vec<String> = quiet
            .iter()
            .filter(|l| got.contains_key(*l))
            .cloned()
            .collect();
        assert_eq!(
            quiet_stored.len(),
            quiet.len(),
            "the quiet app loses nothing"
        );
        let noisy_stored = noisy.iter().filter(|l| got.contains_key(*l)).count();
        let dropped = agent.counter(PIPELINE_DROPPED_LINES_TOTAL, reason).await as usize;
        println!(
            "noisy app: {noisy_stored} stored, {dropped} dropped of {}",
            noisy.len()
        );
        assert_eq!(
            noisy_stored + dropped,
            noisy.len(),
            "every noisy line is stored or counted"
        );
        // One bucket for both noisy pods: the burst of 50 plus a few seconds at 5/s (the
        // files are read in well under a second); a bucket per pod would pass 100 at once.
        assert!(
            (50..95).contains(&noisy_stored),
            "noisy lines stored: {noisy_stored}, dropped: {dropped}"
        );
        assert!(got.values().all(|n| *n == 1), "nothing stored twice");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overlapping_pair_reports_the_shared_pod_in_both_statuses() {
        let testbed = testbed().await;
        let mut cluster = Cluster::new(&testbed).await;
        let ns = format!("overlap-{}", unique_suffix());
        logpipe_e2e::cluster::install_crd(&cluster.client)
            .await
            .unwrap();
        cluster.namespace(&ns, &[]).await;
        let app = format!("shop-{}", unique_suffix());
        cluster.pod(&ns, "shared", 0, &[("app", &app)]).await;
        let mut operator = Operator::start(&testbed, CLUSTER, &ns, "overlap").await;
        let api = logpipe_e2e::cluster::logpipelines(&cluster.client, &ns);
        let base = logpipe_e2e::cluster::ops_example_on_kwok(&ns, &testbed.push_url());
        let mut shop = base.clone();
        shop["metadata"]["name"] = serde_json::json!("shop");
        shop["spec"]["selector"] =
            serde_json::json!({"podSelector": {"matchLabels": {"app": app}}});
        for lp in [&base, &shop] {
            let name = lp["metadata"]["name"].as_str().unwrap();
            api.patch(
                name,
                &PatchParams::apply("e2e-teams").force(),
                &Patch::Apply(lp),
            )
            .await
            .unwrap();
        }
        let everything = base["metadata"]["name"].as_str().unwrap().to_string();
        for (name, other) in [
            (&everything, "shop"),
            (&"shop".to_string(), everything.as_str()),
        ] {
            let status = wait_for("overlap in status", Duration::from_secs(90), || async {
                let lp = api.get(name).await.map_err(|e| e.to_string())?;
                let s = lp.data["status"].clone();
                (s["overlappingPods"] == 1)
                    .then_some(s.clone())
                    .ok_or(s.to_string())
            })
            .await;
            assert_eq!(
                status["overlapsWith"],
                serde_json::json!([format!("{ns}/{other}")]),
                "{name}"
            );
        }
        operator.kill().await;
    }

    /// `tenantFrom: {namespaceLabel: logpipe.io/tenant}`: three namespaces, three tenants,
    /// on 2 nodes (an agent each, both pushing through the fault proxy). Each namespace's
    /// lines land in its own tenant; then the first tenant's store answers 429 for
    /// [`FAULT`] while lines keep being written to all three: the other two tenants
    /// receive new lines during the window, the throttled one none; after it, every line
    /// of all three is in its tenant exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tenant_from_a_namespace_label_keeps_the_others_flowing_while_one_gets_429() {
        const FAULT: Duration = Duration::from_secs(60);
        const KEY: &str = "logpipe.io/tenant";
        let testbed = testbed().await;
        let mut cluster = Cluster::new(&testbed).await;
        let s = unique_suffix();
        let tenants = [
            store::unique_tenant(),
            store::unique_tenant(),
            store::unique_tenant(),
        ];
        let default_tenant = store::unique_tenant();
        let namespaces = [
            format!("red-{s}"),
            format!("green-{s}"),
            format!("blue-{s}"),
        ];
        for (ns, tenant) in namespaces.iter().zip(&tenants) {
            cluster.namespace(ns, &[(KEY, tenant)]).await;
        }
        let proxy = FaultProxy::start(&testbed.store_url).await.unwrap();
        let start_ns = store::now_ns() - 5_000_000_000;
        let mut agents = Vec::new();
        // (tenant index, node root, namespace, pod, uid)
        let mut pods = Vec::new();
        for (i, node) in cluster.nodes.iter().take(2).enumerate() {
            let root = testbed
                .scratch_dir(&format!("teams-tenants-pods-{i}"))
                .unwrap();
            let config = format!(
                "loki:\n  url: {}\n  tenant: \"{default_tenant}\"\n  tenantFrom: {{namespaceLabel: {KEY}}}\n  \
                 batchWait: 200ms\n  minBackoff: 100ms\n  maxBackoff: 2s\npipeline:\n- cri: {{}}\n",
                proxy.push_url()
            );
            let name = format!("teams-tenants-{i}");
            agents.push(Agent::with_config(&testbed, node, &name, &root, &config));
            for (t, ns) in namespaces.iter().enumerate() {
                let pod = format!("app-{i}");
                let uid = cluster.pod(ns, &pod, i, &[("app", "app")]).await;
                pods.push((t, root.clone(), ns.clone(), pod, uid));
            }
        }
        let mut want: [Vec<String>; 3] = Default::default();
        for (t, root, ns, pod, uid) in &pods {
            want[*t].extend(write_lines(root, ns, pod, uid, 50));
        }
        for (tenant, lines) in tenants.iter().zip(&want) {
            let streams = at_least(
                &testbed,
                tenant,
                start_ns,
                lines.len(),
                Duration::from_secs(60),
            )
            .await;
            assert_exactly(lines, &streams, tenant);
        }

        // The first tenant's store refuses every push for a minute; lines keep coming.
        let fault_started = tokio::time::Instant::now();
        proxy.inject_for(
            &tenants[0],
            Fault::RateLimited {
                retry_after: Duration::from_secs(1),
            },
            Budget::For(FAULT),
        );
        let before: Vec<usize> = counts(&testbed, &tenants, start_ns).await;
        let mut written = 50;
        let mut during = Vec::new();
        while fault_started.elapsed() < FAULT - Duration::from_secs(5) {
            for (t, root, ns, pod, uid) in &pods {
                want[*t].extend(append_lines(root, ns, pod, uid, written, 5));
            }
            written += 5;
            tokio::time::sleep(Duration::from_millis(500)).await;
            if during.is_empty() && fault_started.elapsed() > Duration::from_secs(30) {
                during = counts(&testbed, &tenants, start_ns).await;
            }
        }
        let late = counts(&testbed, &tenants, start_ns).await;
        let in_window = fault_started.elapsed();
        println!(
            "in the 429 window ({in_window:?}): stored per tenant at its start {before:?}, \
             after 30 s {during:?}, near its end {late:?}; written per tenant {}; proxy {:?}",
            want[0].len(),
            proxy.stats()
        );
        assert!(in_window < FAULT, "still inside the fault window");
        assert!(proxy.stats().get("429") > 0, "the fault was met");
        assert_eq!(
            late[0], before[0],
            "the throttled tenant got nothing meanwhile"
        );
        for t in 1..3 {
            assert!(
                during[t] > before[t] && late[t] > during[t],
                "tenant {t} kept flowing during the window: {before:?} {during:?} {late:?}"
            );
        }

        // After the window: everything, exactly once, in its own tenant.
        let drained = tokio::time::Instant::now();
        for (tenant, lines) in tenants.iter().zip(&want) {
            at_least(
                &testbed,
                tenant,
                start_ns,
                lines.len(),
                FAULT + Duration::from_secs(60),
            )
            .await;
        }
        println!(
            "all {} lines stored {:?} after the last write ({:?} after the fault began)",
            want.iter().map(Vec::len).sum::<usize>(),
            drained.elapsed(),
            fault_started.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        for (tenant, lines) in tenants.iter().zip(&want) {
            assert_exactly(lines, &everything(&testbed, tenant, start_ns).await, tenant);
        }
        let default = everything(&testbed, &default_tenant, start_ns).await;
        assert_eq!(
            store::count(&default),
            0,
            "nothing fell back to the default tenant"
        );
        drop(agents);
    }

    /// A namespace relabelled with another tenant: lines written after the change go to
    /// the new tenant, those before stay in the old one, each exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relabelled_namespace_sends_new_lines_to_its_new_tenant() {
        const KEY: &str = "logpipe.io/tenant";
        let testbed = testbed().await;
        let mut cluster = Cluster::new(&testbed).await;
        let ns = format!("relabel-{}", unique_suffix());
        let (old, new, default) = (
            store::unique_tenant(),
            store::unique_tenant(),
            store::unique_tenant(),
        );
        cluster.namespace(&ns, &[(KEY, &old)]).await;
        let root = testbed.scratch_dir("teams-relabel-pods").unwrap();
        let config = format!(
            "loki:\n  url: {}\n  tenant: \"{default}\"\n  tenantFrom: {{namespaceLabel: {KEY}}}\n  \
             batchWait: 200ms\npipeline:\n- cri: {{}}\n",
            testbed.push_url()
        );
        let _agent =
            Agent::with_config(&testbed, &cluster.nodes[0], "teams-relabel", &root, &config);
        let start_ns = store::now_ns() - 5_000_000_000;
        let uid = cluster.pod(&ns, "app-0", 0, &[("app", "app")]).await;
        let before = write_lines(&root, &ns, "app-0", &uid, 20);
        at_least(&testbed, &old, start_ns, 20, Duration::from_secs(60)).await;
        let patch = serde_json::json!({"metadata": {"labels": {KEY: new}}});
        Api::<Namespace>::all(cluster.client.clone())
            .patch(&ns, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        // The agent's namespace watch sees the change within milliseconds; lines written
        // before it arrives would rightly still go to the old tenant.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = append_lines(&root, &ns, "app-0", &uid, 20, 20);
        at_least(&testbed, &new, start_ns, 20, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_exactly(&before, &everything(&testbed, &old, start_ns).await, &old);
        assert_exactly(&after, &everything(&testbed, &new, start_ns).await, &new);
        let fallback = everything(&testbed, &default, start_ns).await;
        assert_eq!(store::count(&fallback), 0, "nothing in the default tenant");
    }

    /// `tenantFrom: {field: tenant}` (Promtail's `tenant` stage): each line names its
    /// tenant; a line without one, or with a value that is not a tenant ID, goes to the
    /// default tenant, and only the invalid ones are counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tenant_from_a_field_places_each_line() {
        let testbed = testbed().await;
        let mut cluster = Cluster::new(&testbed).await;
        let ns = format!("field-{}", unique_suffix());
        cluster.namespace(&ns, &[]).await;
        let (a, b, default) = (
            store::unique_tenant(),
            store::unique_tenant(),
            store::unique_tenant(),
        );
        let root = testbed.scratch_dir("teams-field-pods").unwrap();
        let config = format!(
            "loki:\n  url: {}\n  tenant: \"{default}\"\n  tenantFrom: {{field: tenant}}\n  batchWait: 200ms\n\
             pipeline:\n- cri: {{}}\n- regex: {{expression: '^tenant=(?P<tenant>\\S*) '}}\n",
            testbed.push_url()
        );
        let agent = Agent::with_config(&testbed, &cluster.nodes[0], "teams-field", &root, &config);
        let start_ns = store::now_ns() - 5_000_000_000;
        let uid = cluster.pod(&ns, "app-0", 0, &[("app", "app")]).await;
        let lines: Vec<String> = (0..40)
            .map(|i| match i % 4 {
                0 => format!("tenant={a} line {i}"),
                1 => format!("tenant={b} line {i}"),
                2 => format!("tenant=not|valid line {i}"),
                _ => format!("no tenant line {i}"),
            })
            .collect();
        let path = root
            .join(format!("{ns}_app-0_{uid}"))
            .join("app")
            .join("0.log");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let clock = Clock::new();
        let text: String = lines
            .iter()
            .map(|l| format!("{} stdout F {l}\n", rfc3339_nano(clock.next())))
            .collect();
        fs::write(&path, text).unwrap();
        let want = |k: usize| -> Vec<String> {
            lines
                .iter()
                .enumerate()
                .filter(|(i, _)| k == 2 && i % 4 >= 2 || k < 2 && i % 4 == k)
                .map(|(_, l)| l.clone())
                .collect()
        };
        for (k, tenant) in [(0, &a), (1, &b), (2, &default)] {
            let want = want(k);
            at_least(
                &testbed,
                tenant,
                start_ns,
                want.len(),
                Duration::from_secs(60),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for (k, tenant) in [(0, &a), (1, &b), (2, &default)] {
            assert_exactly(
                &want(k),
                &everything(&testbed, tenant, start_ns).await,
                tenant,
            );
        }
        let fallbacks = agent
            .counter("logpipe_tenant_fallback_entries_total", "")
            .await;
        assert_eq!(fallbacks, 10.0, "the invalid values, not the missing ones");
    }

    /// Entries stored in each tenant since `start_ns`.
    async fn counts(testbed: &Testbed, tenants: &[String], start_ns: i64) -> Vec<usize> {
        let mut out = Vec::new();
        for tenant in tenants {
            out.push(store::count(&everything(testbed, tenant, start_ns).await));
        }
        out
    }
}
