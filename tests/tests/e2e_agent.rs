//! The agent against the test bed's real log store (VictoriaLogs, fed through its Loki
//! push endpoint, numeric tenants): a generated `/var/log/pods` tree written while the
//! agent runs (partial lines, kubelet rotation with gzip, a container restart, a pod
//! deletion), kill -9 and restart, malformed input, a start from a Promtail positions
//! file, and — through a fault proxy in front of the store ([`FaultProxy`]) — the answers
//! a production Loki gives: a 429 storm with `Retry-After`, 500s, a 400 "entry too far
//! behind", dropped connections and slow answers.
//!
//! The store keeps every copy of an entry (Loki kept one copy of identical
//! (timestamp, line) pairs), so a duplicate sent by the agent is visible in it. Every
//! line written is unique, and the tests count each line in the store: exactly once where
//! the agent promises it; where a duplicate is legitimate (kill -9 repeats the one batch
//! in flight; a request that timed out on the agent's side may still have reached the
//! store) exactly that much is allowed. The agent's own counters
//! (`promtail_sent_entries_total`, retries, drops) are checked against the store.
//!
//! Needs `cargo build -p logpipe-agent` first (`make e2e-agent` does it).

// cfg(test) so clippy's allow-unwrap-in-tests covers the helpers too.
#[cfg(test)]
mod agent {
    use std::collections::{BTreeMap, BTreeSet};
    use std::fs;
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use logpipe_e2e::faultproxy::{Budget, Fault, FaultProxy, Rejection};
    use logpipe_e2e::loggen::{Clock, rfc3339_nano};
    use logpipe_e2e::store::{self, Stream};
    use logpipe_e2e::{Testbed, unique_suffix, workspace_binary};

    /// `loki.batchBytes` of every agent here.
    const BATCH_BYTES: usize = 65_536;

    // ---------------------------------------------------------------------------------------
    // Helpers

    /// A container log file being written, and the lines the store should get from it.
    struct LogWriter {
        path: PathBuf,
        expected: Vec<String>,
    }

    impl LogWriter {
        fn new(root: &Path, ns: &str, pod: &str, uid: &str, container: &str, restart: u32) -> Self {
            let path = root
                .join(format!("{ns}_{pod}_{uid}"))
                .join(container)
                .join(format!("{restart}.log"));
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            Self {
                path,
                expected: Vec::new(),
            }
        }

        fn append_raw(&self, text: &str) {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }

        /// `n` lines in one append; every 7th is written as three CRI partial lines
        /// (P, P, F). Lines are unique as long as `tag` is.
        fn write(&mut self, clock: &Clock, tag: &str, n: usize) -> Vec<String> {
            let mut text = String::new();
            let mut lines = Vec::with_capacity(n);
            for i in 0..n {
                let line = format!("{tag} line {i:05} payload {}", "x".repeat(i % 40));
                if i % 7 == 3 {
                    let (a, rest) = line.split_at(5);
                    let (b, c) = rest.split_at(5);
                    let ts = rfc3339_nano(clock.next());
                    text.push_str(&format!(
                        "{ts} stdout P {a}\n{ts} stdout P {b}\n{ts} stdout F {c}\n"
                    ));
                } else {
                    text.push_str(&format!("{} stdout F {line}\n", rfc3339_nano(clock.next())));
                }
                lines.push(line);
            }
            self.append_raw(&text);
            self.expected.extend(lines.iter().cloned());
            lines
        }
    }

    /// One agent process.
    struct Agent {
        child: Child,
        listen: String,
    }

    struct AgentSetup {
        dir: PathBuf,
        config: PathBuf,
        root: PathBuf,
        node: String,
    }

    impl AgentSetup {
        /// `loki_extra`: more `loki:` fields, each as `  key: value\n`.
        fn new(
            testbed: &Testbed,
            name: &str,
            push_url: &str,
            tenant: &str,
            loki_extra: &str,
        ) -> Self {
            let dir = testbed.scratch_dir(name).unwrap();
            let root = dir.join("pods");
            fs::create_dir_all(&root).unwrap();
            let config = dir.join("agent.yaml");
            fs::write(
                &config,
                format!(
                    "loki:\n  url: {push_url}\n  tenant: \"{tenant}\"\n  batchWait: 200ms\n  batchBytes: {BATCH_BYTES}\n  \
                     minBackoff: 100ms\n  maxBackoff: 2s\n{loki_extra}pipeline:\n- cri: {{}}\n- labelDrop: [filename]\n"
                ),
            )
            .unwrap();
            Self {
                dir,
                config,
                root,
                node: format!("node-{}", unique_suffix()),
            }
        }

        fn start(&self, extra_args: &[&str]) -> Agent {
            let listen = format!("127.0.0.1:{}", logpipe_e2e::free_port().unwrap());
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("agent.log"))
                .unwrap();
            let child = Command::new(workspace_binary("logpipe-agent"))
                .arg("--config")
                .arg(&self.config)
                .arg("--log-root")
                .arg(&self.root)
                .arg("--positions")
                .arg(self.dir.join("positions.json"))
                .arg("--listen")
                .arg(&listen)
                .arg("--node-name")
                .arg(&self.node)
                .args(extra_args)
                .env_remove("KUBERNETES_SERVICE_HOST")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            Agent { child, listen }
        }
    }

    impl Agent {
        async fn metrics(&self) -> String {
            let url = format!("http://{}/metrics", self.listen);
            for _ in 0..50 {
                if let Ok(resp) = logpipe_e2e::http_client()
                    .get(&url)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    && let Ok(text) = resp.text().await
                {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("agent metrics at {url} never answered");
        }

        /// Sum of a metric's samples whose line starts with `prefix`.
        async fn sum(&self, prefix: &str) -> f64 {
            sum_metric(&self.metrics().await, prefix)
        }

        fn sigterm(&mut self) -> std::process::ExitStatus {
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status()
                .unwrap();
            assert!(status.success());
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status;
                }
                assert!(
                    Instant::now() < deadline,
                    "agent did not exit after SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        fn kill9(&mut self) {
            self.child.kill().unwrap();
            self.child.wait().unwrap();
        }
    }

    impl Drop for Agent {
        fn drop(&mut self) {
            if matches!(self.child.try_wait(), Ok(None)) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }

    fn sum_metric(text: &str, prefix: &str) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sum of the samples of the metric `name` whose labels include every `(key, value)`
    /// of `labels`, whatever their order.
    fn sum_labelled(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
                let matches = metric == name
                    && labels.iter().all(|(k, v)| {
                        let label = format!("{k}=\"{v}\"");
                        rest.starts_with(&label) || rest.contains(&format!(",{label}"))
                    });
                if matches {
                    value.parse::<f64>().ok()
                } else {
                    None
                }
            })
            .sum()
    }

    /// Streams found in the store for `selector`, waiting until at least `expected`
    /// entries are there (or `timeout` passes; the caller's assertions tell what is missing).
    async fn wait_for_lines(
        testbed: &Testbed,
        tenant: &str,
        selector: &str,
        start_ns: i64,
        expected: usize,
        timeout: Duration,
    ) -> Vec<Stream> {
        store::wait_for(
            &testbed.store_url,
            tenant,
            selector,
            start_ns,
            timeout,
            |s| store::count(s) >= expected,
        )
        .await
        .unwrap()
    }

    /// Everything the store has for `selector` now.
    async fn query_now(
        testbed: &Testbed,
        tenant: &str,
        selector: &str,
        start_ns: i64,
    ) -> Vec<Stream> {
        store::query_range(
            &testbed.store_url,
            tenant,
            selector,
            start_ns,
            store::now_ns() + 1_000_000_000,
        )
        .await
        .unwrap()
    }

    type Key = (String, String);

    /// How often each line was found, by (pod, container).
    fn counts_by_container(streams: &[Stream]) -> BTreeMap<Key, BTreeMap<String, usize>> {
        let mut out: BTreeMap<Key, BTreeMap<String, usize>> = BTreeMap::new();
        for s in streams {
            let key = (
                s.labels.get("pod").cloned().unwrap_or_default(),
                s.labels.get("container").cloned().unwrap_or_default(),
            );
            let lines = out.entry(key).or_default();
            for (_, line) in &s.entries {
                *lines.entry(line.clone()).or_default() += 1;
            }
        }
        out
    }

    /// How often each line was found, over all streams.
    fn line_counts(streams: &[Stream]) -> BTreeMap<String, usize> {
        let mut out: BTreeMap<String, usize> = BTreeMap::new();
        for s in streams {
            for (_, line) in &s.entries {
                *out.entry(line.clone()).or_default() += 1;
            }
        }
        out
    }

    /// Each wanted line is in the store exactly once, under its (pod, container), and
    /// nothing else is.
    fn assert_each_exactly_once(want: &BTreeMap<Key, Vec<String>>, streams: &[Stream]) {
        let got = counts_by_container(streams);
        let empty = BTreeMap::new();
        for (key, lines) in want {
            let found = got.get(key).unwrap_or(&empty);
            let missing: Vec<_> = lines.iter().filter(|l| !found.contains_key(*l)).collect();
            assert!(
                missing.is_empty(),
                "{key:?}: {} of {} lines missing, e.g. {:?}",
                missing.len(),
                lines.len(),
                &missing[..missing.len().min(5)]
            );
            let twice: Vec<_> = found.iter().filter(|(_, n)| **n > 1).collect();
            assert!(
                twice.is_empty(),
                "{key:?}: {} lines stored more than once, e.g. {:?}",
                twice.len(),
                &twice[..twice.len().min(5)]
            );
        }
        let unexpected: Vec<_> = got
            .iter()
            .flat_map(|(k, v)| {
                let wanted: BTreeSet<&String> =
                    want.get(k).map(|w| w.iter().collect()).unwrap_or_default();
                v.keys()
                    .filter(move |l| !wanted.contains(l))
                    .map(move |l| (k.clone(), l.clone()))
            })
            .take(5)
            .collect();
        assert!(unexpected.is_empty(), "lines nobody wrote: {unexpected:?}");
        let total: usize = want.values().map(Vec::len).sum();
        assert_eq!(store::count(streams), total, "entries in the store");
    }

    fn gzip_like_kubelet(rotated: &Path) {
        let gz = PathBuf::from(format!("{}.gz", rotated.display()));
        let tmp = PathBuf::from(format!("{}.gz.tmp", rotated.display()));
        let out = fs::File::create(&tmp).unwrap();
        let status = Command::new("gzip")
            .arg("-c")
            .arg(rotated)
            .stdout(out)
            .status()
            .unwrap();
        assert!(status.success());
        fs::rename(&tmp, &gz).unwrap();
        fs::remove_file(rotated).unwrap();
    }

    async fn testbed() -> Testbed {
        match Testbed::ensure(&[]).await {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    // ---------------------------------------------------------------------------------------
    // An agent pushing through a fault proxy

    /// One agent tailing one container file, pushing through a [`FaultProxy`] to the
    /// store, already past its first delivery (so the readiness probe, which the agent
    /// sends only before its first success, never meets an injected fault).
    struct FaultBed {
        testbed: Testbed,
        proxy: FaultProxy,
        agent: Agent,
        tenant: String,
        selector: String,
        start_ns: i64,
        clock: Clock,
        writer: LogWriter,
        rounds: usize,
        /// The agent's metrics once warmed up: counters are compared with these.
        baseline: String,
    }

    impl FaultBed {
        async fn start(name: &str, loki_extra: &str) -> Self {
            let testbed = testbed().await;
            let proxy = FaultProxy::start(&testbed.store_url).await.unwrap();
            let tenant = store::unique_tenant();
            let ns = format!("{name}-{}", unique_suffix());
            let setup = AgentSetup::new(&testbed, name, &proxy.push_url(), &tenant, loki_extra);
            let start_ns = store::now_ns() - 5_000_000_000;
            let agent = setup.start(&[]);
            let writer = LogWriter::new(&setup.root, &ns, "busy", "uid-busy", "app", 0);
            let mut bed = Self {
                testbed,
                proxy,
                agent,
                tenant,
                selector: format!("{{namespace=\"{ns}\"}}"),
                start_ns,
                clock: Clock::new(),
                writer,
                rounds: 0,
                baseline: String::new(),
            };
            bed.write(1, 20, Duration::ZERO).await;
            let streams = bed.wait_all(Duration::from_secs(60)).await;
            bed.assert_exactly_once(&streams);
            assert!(
                bed.proxy.stats().0.keys().all(|k| *k == "forwarded"),
                "no fault before injection: {:?}",
                bed.proxy.stats()
            );
            bed.baseline = bed.agent.metrics().await;
            bed
        }

        /// `rounds` appends of `lines` lines each, `pause` apart; every round has its own tag.
        async fn write(&mut self, rounds: usize, lines: usize, pause: Duration) -> Vec<String> {
            let mut written = Vec::new();
            for _ in 0..rounds {
                let tag = format!("round-{:03}", self.rounds);
                self.rounds += 1;
                written.extend(self.writer.write(&self.clock, &tag, lines));
                tokio::time::sleep(pause).await;
            }
            written
        }

        /// Wait until the store holds at least as many entries as were written.
        async fn wait_all(&self, timeout: Duration) -> Vec<Stream> {
            wait_for_lines(
                &self.testbed,
                &self.tenant,
                &self.selector,
                self.start_ns,
                self.writer.expected.len(),
                timeout,
            )
            .await
        }

        fn assert_exactly_once(&self, streams: &[Stream]) {
            let want = BTreeMap::from([(
                ("busy".to_string(), "app".to_string()),
                self.writer.expected.clone(),
            )]);
            assert_each_exactly_once(&want, streams);
        }

        /// How much a counter grew since the bed was warmed up.
        async fn delta(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
            sum_labelled(&self.agent.metrics().await, name, labels)
                - sum_labelled(&self.baseline, name, labels)
        }

        /// Pushes the proxy saw (answered by a fault or forwarded).
        fn pushes(&self) -> u64 {
            self.proxy.stats().0.values().sum()
        }
    }

    const RETRIES: &str = "promtail_batch_retries_total";
    const REQUESTS: &str = "promtail_request_duration_seconds_count";
    const DROPPED: &str = "promtail_dropped_entries_total";

    // ---------------------------------------------------------------------------------------
    // Tests

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_line_once_through_partial_lines_rotation_restart_and_deletion() {
        let testbed = testbed().await;
        let run = unique_suffix();
        let tenant = store::unique_tenant();
        let ns = format!("e2e-{run}");
        let setup = AgentSetup::new(&testbed, "agent-once", &testbed.push_url(), &tenant, "");
        let clock = Clock::new();
        let start_ns = store::now_ns() - 5_000_000_000;
        let root = setup.root.clone();

        // Written before the agent starts: read from the beginning.
        let mut web = LogWriter::new(&root, &ns, "web-7d9f8c6b5d-abcde", "uid-web", "app", 0);
        web.write(&clock, "web-before", 150);
        let mut agent = setup.start(&[]);
        let mut api = LogWriter::new(&root, &ns, "api-0", "uid-api", "server", 0);
        let mut sidecar = LogWriter::new(&root, &ns, "api-0", "uid-api", "sidecar", 0);
        api.write(&clock, "api", 200);
        sidecar.write(&clock, "sidecar", 100);
        web.write(&clock, "web", 200);
        tokio::time::sleep(Duration::from_secs(1)).await;

        // Kubelet rotation: rename, late writes to the renamed file, new file, then gzip.
        let rotated = web.path.with_file_name("0.log.20260101-000000");
        fs::rename(&web.path, &rotated).unwrap();
        let mut late = LogWriter {
            path: rotated.clone(),
            expected: Vec::new(),
        };
        late.write(&clock, "web-late", 30);
        web.write(&clock, "web-after-rotation", 100);
        tokio::time::sleep(Duration::from_secs(1)).await;
        gzip_like_kubelet(&rotated);
        web.write(&clock, "web-after-gzip", 50);

        // Container restart: a new file beside the old one, which gets a last line.
        api.write(&clock, "api-last-words", 5);
        let mut api1 = LogWriter::new(&root, &ns, "api-0", "uid-api", "server", 1);
        api1.write(&clock, "api-restarted", 120);

        // Pod deletion while lines remain unread (the agent holds the files open).
        tokio::time::sleep(Duration::from_millis(500)).await;
        sidecar.write(&clock, "sidecar-final", 300);
        api1.write(&clock, "api-final", 10);
        fs::remove_dir_all(root.join(format!("{ns}_api-0_uid-api"))).unwrap();

        let web_key = ("web-7d9f8c6b5d-abcde".to_string(), "app".to_string());
        let mut want: BTreeMap<Key, Vec<String>> = BTreeMap::new();
        want.entry(web_key.clone())
            .or_default()
            .extend(web.expected.iter().chain(&late.expected).cloned());
        want.entry(("api-0".into(), "server".into()))
            .or_default()
            .extend(api.expected.iter().chain(&api1.expected).cloned());
        want.entry(("api-0".into(), "sidecar".into()))
            .or_default()
            .extend(sidecar.expected.iter().cloned());
        let total: usize = want.values().map(Vec::len).sum();

        let selector = format!("{{namespace=\"{ns}\"}}");
        wait_for_lines(
            &testbed,
            &tenant,
            &selector,
            start_ns,
            total,
            Duration::from_secs(90),
        )
        .await;
        // A late duplicate would land after the count is reached: look again a moment later.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let streams = query_now(&testbed, &tenant, &selector, start_ns).await;
        // The store keeps duplicates, so this is exactly once in the store itself.
        assert_each_exactly_once(&want, &streams);
        for s in &streams {
            assert_eq!(s.labels.get("namespace"), Some(&ns));
            assert_eq!(s.labels.get("node_name"), Some(&setup.node));
            assert!(
                !s.labels.contains_key("filename"),
                "filename is dropped: {:?}",
                s.labels
            );
            assert!(s.labels.contains_key("pod") && s.labels.contains_key("container"));
        }

        // Exactly once by the agent's own count too: what it sent equals what was written.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = 0.0;
        while Instant::now() < deadline {
            sent = agent.sum("promtail_sent_entries_total").await;
            if sent as usize >= total {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("lines written {total}, entries sent {sent}");
        assert_eq!(sent as usize, total, "every line sent exactly once");
        let metrics = agent.metrics().await;
        assert_eq!(sum_metric(&metrics, DROPPED), 0.0);
        assert_eq!(sum_metric(&metrics, "logpipe_malformed_lines_total"), 0.0);

        // The right tenant only: another numeric tenant sees nothing.
        let other = store::query_range(
            &testbed.store_url,
            &store::unique_tenant(),
            &selector,
            start_ns,
            store::now_ns() + 1_000_000_000,
        )
        .await
        .unwrap();
        assert_eq!(store::count(&other), 0, "lines leaked to another tenant");

        // Graceful stop: exit 0, positions saved, nothing read again on restart.
        let status = agent.sigterm();
        assert!(status.success(), "agent exit status {status}");
        let mut again = setup.start(&[]);
        let after = web.write(&clock, "web-after-restart", 20);
        want.entry(web_key).or_default().extend(after);
        wait_for_lines(
            &testbed,
            &tenant,
            &selector,
            start_ns,
            total + 20,
            Duration::from_secs(60),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let streams = query_now(&testbed, &tenant, &selector, start_ns).await;
        assert_each_exactly_once(&want, &streams);
        let sent_again = again.sum("promtail_sent_entries_total").await;
        println!("after a graceful restart: {sent_again} entries sent (20 new lines)");
        assert_eq!(
            sent_again as usize, 20,
            "nothing re-sent after a graceful restart"
        );
        assert!(again.sigterm().success());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_9_mid_stream_loses_nothing_and_repeats_at_most_a_batch() {
        let testbed = testbed().await;
        let run = unique_suffix();
        let tenant = store::unique_tenant();
        let ns = format!("kill-{run}");
        let setup = AgentSetup::new(&testbed, "agent-kill", &testbed.push_url(), &tenant, "");
        let clock = Arc::new(Clock::new());
        let start_ns = store::now_ns() - 5_000_000_000;
        let mut agent = setup.start(&[]);

        // Two writers, 10 lines every 10 ms each, 400 rounds (bounded).
        let written = Arc::new(AtomicU32::new(0));
        let mut handles = Vec::new();
        for (pod, container) in [("writer-a", "app"), ("writer-b", "app")] {
            let mut w = LogWriter::new(&setup.root, &ns, pod, &format!("uid-{pod}"), container, 0);
            let clock = clock.clone();
            let written = written.clone();
            handles.push(std::thread::spawn(move || {
                for round in 0..400 {
                    w.write(&clock, &format!("{pod}-r{round:03}"), 10);
                    written.fetch_add(10, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                }
                w.expected
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let sent_before = agent.sum("promtail_sent_entries_total").await;
        agent.kill9();
        println!(
            "killed with -9 after {} lines written, {sent_before} sent",
            written.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let agent2 = setup.start(&[]);
        let by_writer: Vec<Vec<String>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let total: usize = by_writer.iter().map(Vec::len).sum();
        let selector = format!("{{namespace=\"{ns}\"}}");
        wait_for_lines(
            &testbed,
            &tenant,
            &selector,
            start_ns,
            total,
            Duration::from_secs(90),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let streams = query_now(&testbed, &tenant, &selector, start_ns).await;
        let got = line_counts(&streams);
        let missing: Vec<_> = by_writer
            .iter()
            .flatten()
            .filter(|l| !got.contains_key(*l))
            .collect();
        assert!(
            missing.is_empty(),
            "{} lines missing after kill -9, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        let expected: BTreeSet<&String> = by_writer.iter().flatten().collect();
        let unknown: Vec<_> = got
            .keys()
            .filter(|l| !expected.contains(l))
            .take(5)
            .collect();
        assert!(unknown.is_empty(), "lines nobody wrote: {unknown:?}");

        // The store keeps duplicates: they are the lines of the batch in flight at the kill
        // (sent again from the last saved position). Each is there twice, no more, and per
        // file they are one run of consecutive lines.
        let thrice: Vec<_> = got.iter().filter(|(_, n)| **n > 2).take(5).collect();
        assert!(
            thrice.is_empty(),
            "lines stored three times or more: {thrice:?}"
        );
        for lines in &by_writer {
            let twice: Vec<usize> = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| got.get(*l).copied() == Some(2))
                .map(|(i, _)| i)
                .collect();
            if let (Some(first), Some(last)) = (twice.first(), twice.last()) {
                assert_eq!(
                    last - first + 1,
                    twice.len(),
                    "the repeated lines of one file are not one run: lines {first}..={last}, {} repeated",
                    twice.len()
                );
            }
        }
        let stored_duplicates = store::count(&streams) - total;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sent_after = agent2.sum("promtail_sent_entries_total").await;
        let counted_duplicates = (sent_before + sent_after) as i64 - total as i64;
        // One batch: 64 KiB of lines of at least 50 bytes.
        let one_batch = BATCH_BYTES / 50;
        println!(
            "kill -9: {total} lines, sent {sent_before} before + {sent_after} after; duplicates: {stored_duplicates} in the store, \
             {counted_duplicates} by the agent's counters (one batch <= {one_batch})"
        );
        assert!(
            counted_duplicates >= 0,
            "fewer entries sent than written: counting is off"
        );
        // The agent's count misses what it delivered between the sample and the kill (and
        // the batch the store took but whose answer the kill cut off): never more.
        assert!(
            stored_duplicates as i64 >= counted_duplicates,
            "the agent counted {counted_duplicates} entries sent twice, the store has {stored_duplicates}"
        );
        assert!(
            stored_duplicates <= one_batch,
            "{stored_duplicates} duplicates is more than one in-flight batch"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_429_storm_is_retried_honouring_retry_after_and_nothing_is_lost() {
        let mut bed = FaultBed::start("agent-429", "").await;
        const STORM: u32 = 8;
        let retry_after = Duration::from_secs(1);
        bed.proxy
            .inject(Fault::RateLimited { retry_after }, Budget::Requests(STORM));
        let injected = Instant::now();
        let pushes_before = bed.pushes();
        let rounds = 10;
        bed.write(rounds, 50, Duration::from_millis(100)).await;
        let streams = bed.wait_all(Duration::from_secs(60)).await;
        let delivered_after = injected.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let streams_again = query_now(&bed.testbed, &bed.tenant, &bed.selector, bed.start_ns).await;
        bed.assert_exactly_once(&streams_again);
        let stats = bed.proxy.stats();
        let retries = bed.delta(RETRIES, &[]).await;
        let answered_429 = bed.delta(REQUESTS, &[("status_code", "429")]).await;
        let pushes = bed.pushes() - pushes_before;
        println!(
            "429 storm: {} answered 429 (Retry-After {retry_after:?}), {pushes} pushes in all, retries counted {retries}, \
             all {} lines stored {:.1} s after the storm began",
            stats.get("429"),
            store::count(&streams),
            delivered_after.as_secs_f64()
        );
        assert_eq!(
            stats.get("429"),
            u64::from(STORM),
            "the storm was met in full"
        );
        assert_eq!(retries, f64::from(STORM), "each 429 retried once");
        assert_eq!(
            answered_429,
            f64::from(STORM),
            "429 answers counted by status_code"
        );
        assert!(
            sum_labelled(
                &bed.agent.metrics().await,
                REQUESTS,
                &[("status_code", "429")]
            ) >= f64::from(STORM)
        );
        assert_eq!(bed.delta(DROPPED, &[]).await, 0.0, "nothing dropped");
        // One batch in flight: the storm holds it for STORM sleeps of at least Retry-After.
        assert!(
            delivered_after >= retry_after * STORM,
            "everything stored {delivered_after:?} after the storm began: Retry-After {retry_after:?} x {STORM} was not honoured"
        );
        // Bounded: the storm's answers plus the batches (a few per round at most).
        assert!(
            pushes <= u64::from(STORM) + 3 * rounds as u64,
            "{pushes} pushes for {rounds} rounds and {STORM} 429s"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_errors_for_a_few_requests_are_retried_and_nothing_is_lost() {
        let mut bed = FaultBed::start("agent-500", "").await;
        const ERRORS: u32 = 6;
        bed.proxy
            .inject(Fault::ServerError, Budget::Requests(ERRORS));
        let pushes_before = bed.pushes();
        let rounds = 10;
        bed.write(rounds, 40, Duration::from_millis(100)).await;
        bed.wait_all(Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let streams = query_now(&bed.testbed, &bed.tenant, &bed.selector, bed.start_ns).await;
        bed.assert_exactly_once(&streams);
        let stats = bed.proxy.stats();
        let retries = bed.delta(RETRIES, &[]).await;
        let answered_500 = bed.delta(REQUESTS, &[("status_code", "500")]).await;
        let pushes = bed.pushes() - pushes_before;
        println!(
            "500s: {} answered, {pushes} pushes in all, retries counted {retries}, {} lines stored once each",
            stats.get("500"),
            store::count(&streams)
        );
        assert_eq!(stats.get("500"), u64::from(ERRORS));
        assert_eq!(retries, f64::from(ERRORS), "each 500 retried once");
        assert_eq!(
            answered_500,
            f64::from(ERRORS),
            "500 answers counted by status_code"
        );
        assert_eq!(bed.delta(DROPPED, &[]).await, 0.0, "nothing dropped");
        assert!(
            pushes <= u64::from(ERRORS) + 3 * rounds as u64,
            "{pushes} pushes for {rounds} rounds and {ERRORS} 500s"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_400_entry_too_far_behind_drops_that_batch_counts_it_and_the_next_lines_arrive() {
        let mut bed = FaultBed::start("agent-400", "").await;
        let warm: Vec<String> = bed.writer.expected.clone();
        bed.proxy.inject(
            Fault::Rejected(Rejection::EntryTooFarBehind),
            Budget::Requests(1),
        );
        // One append, so one batch as a rule (the tailer may split it in two: then only the
        // first is refused; the accounting below holds either way).
        let refused = bed.write(1, 60, Duration::ZERO).await;
        let metrics = {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let m = bed.agent.metrics().await;
                if sum_metric(&m, DROPPED) > 0.0 || Instant::now() >= deadline {
                    break m;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        assert_eq!(bed.proxy.stats().get("400"), 1, "the 400 was answered");
        let tenant = bed.tenant.clone();
        let labels = [("tenant", tenant.as_str()), ("reason", "ingester_error")];
        let dropped = sum_labelled(&metrics, DROPPED, &labels);
        let dropped_bytes = sum_labelled(&metrics, "promtail_dropped_bytes_total", &labels);
        assert!(
            dropped >= 1.0,
            "the refused batch is counted in {DROPPED}{{reason=\"ingester_error\"}}; metrics:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("dropped"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(
            sum_metric(&metrics, DROPPED),
            dropped,
            "no drop under another reason"
        );
        assert!(dropped_bytes > 0.0, "dropped bytes counted");

        // The agent goes on: the next lines arrive.
        let next = bed.write(5, 40, Duration::from_millis(100)).await;
        let want = warm.len() + next.len();
        wait_for_lines(
            &bed.testbed,
            &bed.tenant,
            &bed.selector,
            bed.start_ns,
            want + (refused.len() - dropped as usize),
            Duration::from_secs(60),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let streams = query_now(&bed.testbed, &bed.tenant, &bed.selector, bed.start_ns).await;
        let got = line_counts(&streams);
        for line in warm.iter().chain(&next) {
            assert_eq!(
                got.get(line),
                Some(&1),
                "{line:?} after the 400: stored once"
            );
        }
        let refused_stored = refused.iter().filter(|l| got.contains_key(*l)).count();
        let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(twice.is_empty(), "stored more than once: {twice:?}");
        let written: BTreeSet<&String> = bed.writer.expected.iter().collect();
        assert!(
            got.keys().all(|l| written.contains(l)),
            "lines nobody wrote"
        );
        println!(
            "400: {} lines in the refused write, {dropped} counted dropped ({dropped_bytes} bytes), {refused_stored} of them stored \
             (a second batch of that write); {} later lines all stored",
            refused.len(),
            next.len()
        );
        assert_eq!(
            refused_stored + dropped as usize,
            refused.len(),
            "each line of the refused write is either stored or counted dropped"
        );
        assert_eq!(bed.delta(RETRIES, &[]).await, 0.0, "a 400 is not retried");
        assert_eq!(bed.delta(REQUESTS, &[("status_code", "400")]).await, 1.0);
        assert_eq!(bed.proxy.stats().get("400"), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_connections_are_retried_and_nothing_is_lost() {
        let mut bed = FaultBed::start("agent-drop", "").await;
        const DROPS: u32 = 6;
        bed.proxy.inject(
            Fault::DropConnection,
            Budget::Share {
                every: 2,
                total: DROPS,
            },
        );
        let pushes_before = bed.pushes();
        // Rounds further apart than batchWait: a batch each, so the share is met in full.
        let rounds = 14;
        bed.write(rounds, 30, Duration::from_millis(400)).await;
        bed.wait_all(Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let streams = query_now(&bed.testbed, &bed.tenant, &bed.selector, bed.start_ns).await;
        bed.assert_exactly_once(&streams);
        let stats = bed.proxy.stats();
        let retries = bed.delta(RETRIES, &[]).await;
        let unanswered = bed.delta(REQUESTS, &[("status_code", "-1")]).await;
        let pushes = bed.pushes() - pushes_before;
        println!(
            "dropped connections: {} dropped, {pushes} pushes in all, retries counted {retries} ({unanswered} without an answer), \
             {} lines stored once each",
            stats.get("drop"),
            store::count(&streams)
        );
        assert_eq!(
            stats.get("drop"),
            u64::from(DROPS),
            "the drops were met in full"
        );
        assert_eq!(retries, f64::from(DROPS), "each dropped push retried once");
        assert_eq!(unanswered, f64::from(DROPS), "counted as status_code -1");
        assert_eq!(bed.delta(DROPPED, &[]).await, 0.0, "nothing dropped");
        assert!(
            pushes <= u64::from(DROPS) + 3 * rounds as u64,
            "{pushes} pushes for {rounds} rounds and {DROPS} drops"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_answers_are_waited_for_and_timeouts_retried_and_nothing_is_lost() {
        let timeout = Duration::from_secs(3);
        let mut bed = FaultBed::start("agent-delay", "  timeout: 3s\n").await;

        // Slower than usual but within the agent's timeout: waited for, not retried.
        const SLOW: u32 = 3;
        bed.proxy.inject(
            Fault::Delay(Duration::from_millis(1500)),
            Budget::Requests(SLOW),
        );
        // A round at a time, each stored before the next, until every slow answer was met
        // (rounds written during a slow push would share one batch and leave some unmet).
        for _ in 0..3 * SLOW {
            bed.write(1, 40, Duration::ZERO).await;
            bed.wait_all(Duration::from_secs(30)).await;
            if bed.proxy.stats().get("delay") >= u64::from(SLOW) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let streams = query_now(&bed.testbed, &bed.tenant, &bed.selector, bed.start_ns).await;
        bed.assert_exactly_once(&streams);
        assert_eq!(bed.proxy.stats().get("delay"), u64::from(SLOW));
        assert_eq!(
            bed.delta(RETRIES, &[]).await,
            0.0,
            "a slow answer is not retried"
        );

        // Slower than the timeout: the agent gives up on the attempt and retries. The
        // proxy may still forward the abandoned attempt after its delay, so the store may
        // hold that one batch more than once: at-least-once, as any Loki client.
        const TIMED_OUT: u32 = 2;
        let before = store::count(&streams);
        let retries_before = bed.delta(RETRIES, &[]).await;
        let unanswered_before = bed.delta(REQUESTS, &[("status_code", "-1")]).await;
        bed.proxy
            .inject(Fault::Delay(timeout * 2), Budget::Requests(TIMED_OUT));
        let late = bed.write(3, 40, Duration::from_millis(300)).await;
        bed.wait_all(Duration::from_secs(90)).await;
        // Let abandoned attempts (delayed 2 x timeout) reach the store, if they do.
        tokio::time::sleep(timeout * 2 + Duration::from_secs(2)).await;
        let streams = query_now(&bed.testbed, &bed.tenant, &bed.selector, bed.start_ns).await;
        let got = line_counts(&streams);
        let missing: Vec<_> = bed
            .writer
            .expected
            .iter()
            .filter(|l| !got.contains_key(*l))
            .take(5)
            .collect();
        assert!(
            missing.is_empty(),
            "lines lost behind timeouts: {missing:?}"
        );
        let written: BTreeSet<&String> = bed.writer.expected.iter().collect();
        assert!(
            got.keys().all(|l| written.contains(l)),
            "lines nobody wrote"
        );
        let repeated: Vec<(&String, &usize)> = got.iter().filter(|(_, n)| **n > 1).collect();
        let retries = bed.delta(RETRIES, &[]).await - retries_before;
        let unanswered = bed.delta(REQUESTS, &[("status_code", "-1")]).await - unanswered_before;
        println!(
            "delays: {} delayed in all; {TIMED_OUT} past the {timeout:?} timeout: retries {retries} ({unanswered} without an \
             answer); {} entries stored for {} lines ({before} before), {} lines stored more than once",
            bed.proxy.stats().get("delay"),
            store::count(&streams),
            bed.writer.expected.len(),
            repeated.len()
        );
        assert_eq!(bed.proxy.stats().get("delay"), u64::from(SLOW + TIMED_OUT));
        assert_eq!(
            retries,
            f64::from(TIMED_OUT),
            "each timed-out push retried once"
        );
        assert_eq!(
            unanswered,
            f64::from(TIMED_OUT),
            "timeouts counted as status_code -1"
        );
        assert_eq!(bed.delta(DROPPED, &[]).await, 0.0, "nothing dropped");
        // Duplicates only of the late lines, each at most once per abandoned attempt, and
        // no more than the one batch that timed out.
        let late_set: BTreeSet<&String> = late.iter().collect();
        assert!(
            repeated
                .iter()
                .all(|(l, n)| late_set.contains(l) && **n <= 1 + TIMED_OUT as usize),
            "repeated lines outside the timed-out batch: {:?}",
            &repeated[..repeated.len().min(5)]
        );
        assert!(
            repeated.len() <= BATCH_BYTES / 50,
            "{} lines repeated: more than one batch",
            repeated.len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_input_is_counted_and_never_fatal() {
        let testbed = testbed().await;
        let run = unique_suffix();
        let tenant = store::unique_tenant();
        let ns = format!("malformed-{run}");
        let setup = AgentSetup::new(
            &testbed,
            "agent-malformed",
            &testbed.push_url(),
            &tenant,
            "",
        );
        let clock = Clock::new();
        let start_ns = store::now_ns() - 5_000_000_000;
        let mut agent = setup.start(&[]);
        let ts = || rfc3339_nano(clock.next());
        let file =
            |pod: &str| LogWriter::new(&setup.root, &ns, pod, &format!("uid-{pod}"), "app", 0);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", format!("{} stdout\n", ts()).into_bytes()),
            (
                "bad-timestamp",
                b"2024-13-45T99:99:99Z stdout F bad time\n".to_vec(),
            ),
            (
                "bad-stream",
                format!("{} stdweird F what\n", ts()).into_bytes(),
            ),
            ("bad-tag", format!("{} stdout X what\n", ts()).into_bytes()),
            (
                "invalid-utf8",
                [
                    format!("{} stdout F ", ts()).into_bytes(),
                    vec![0xff, 0xfe, b'o', b'k', b'\n'],
                ]
                .concat(),
            ),
            (
                "nul-bytes",
                [
                    format!("{} stdout F a", ts()).into_bytes(),
                    vec![0, 0, b'b', b'\n'],
                ]
                .concat(),
            ),
            ("not-cri", b"just some text\n".to_vec()),
            ("empty-lines", b"\n\n\n".to_vec()),
            (
                "huge-line",
                [
                    format!("{} stdout F ", ts()).into_bytes(),
                    vec![b'y'; 5 * 1024 * 1024],
                    vec![b'\n'],
                ]
                .concat(),
            ),
            (
                "unterminated-partial",
                format!("{} stdout P never finished\n", ts()).into_bytes(),
            ),
            ("empty-file", Vec::new()),
        ];
        for (pod, bytes) in &cases {
            let w = file(pod);
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&w.path)
                .unwrap();
            f.write_all(bytes).unwrap();
        }
        // Deleted while open.
        let mut gone = file("deleted-while-open");
        gone.write(&clock, "soon-gone", 20);
        tokio::time::sleep(Duration::from_millis(600)).await;
        fs::remove_dir_all(gone.path.parent().unwrap().parent().unwrap()).unwrap();
        // A healthy file after all that still flows.
        let mut ok = file("healthy");
        ok.write(&clock, "healthy", 50);
        let selector = format!("{{namespace=\"{ns}\", pod=\"healthy\"}}");
        wait_for_lines(
            &testbed,
            &tenant,
            &selector,
            start_ns,
            50,
            Duration::from_secs(60),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let streams = query_now(&testbed, &tenant, &selector, start_ns).await;
        let want = BTreeMap::from([(
            ("healthy".to_string(), "app".to_string()),
            ok.expected.clone(),
        )]);
        assert_each_exactly_once(&want, &streams);
        let metrics = agent.metrics().await;
        let malformed = sum_metric(&metrics, "logpipe_malformed_lines_total");
        let split = sum_metric(&metrics, "logpipe_split_lines_total");
        let invalid = sum_metric(&metrics, "logpipe_invalid_utf8_lines_total");
        println!("malformed {malformed}, split {split}, invalid utf-8 {invalid}");
        assert!(malformed >= 5.0, "malformed lines counted: {malformed}");
        assert!(split >= 1.0, "the 5 MiB line is split and counted");
        assert!(invalid >= 1.0, "invalid UTF-8 counted");
        assert!(
            agent.child.try_wait().unwrap().is_none(),
            "the agent is still running"
        );
        assert!(agent.sigterm().success());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn starts_exactly_where_promtail_stopped() {
        let testbed = testbed().await;
        let run = unique_suffix();
        let tenant = store::unique_tenant();
        let ns = format!("promtail-{run}");
        let setup = AgentSetup::new(&testbed, "agent-promtail", &testbed.push_url(), &tenant, "");
        let clock = Clock::new();
        let start_ns = store::now_ns() - 5_000_000_000;
        let mut w = LogWriter::new(&setup.root, &ns, "migrating", "uid-m", "app", 0);
        w.write(&clock, "shipped-by-promtail", 100);
        let promtail_offset = fs::metadata(&w.path).unwrap().len();
        let already: Vec<String> = std::mem::take(&mut w.expected);
        w.write(&clock, "after-promtail", 60);
        let promtail_positions = setup.dir.join("promtail-positions.yaml");
        fs::write(
            &promtail_positions,
            format!(
                "positions:\n  {}: \"{promtail_offset}\"\n",
                w.path.display()
            ),
        )
        .unwrap();
        let mut agent = setup.start(&[
            "--import-promtail-positions",
            promtail_positions.to_str().unwrap(),
        ]);
        let selector = format!("{{namespace=\"{ns}\"}}");
        wait_for_lines(
            &testbed,
            &tenant,
            &selector,
            start_ns,
            60,
            Duration::from_secs(60),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let streams = query_now(&testbed, &tenant, &selector, start_ns).await;
        let got = line_counts(&streams);
        assert!(
            already.iter().all(|l| !got.contains_key(l)),
            "lines Promtail had shipped were sent again"
        );
        let want = BTreeMap::from([(
            ("migrating".to_string(), "app".to_string()),
            w.expected.clone(),
        )]);
        // No gap after Promtail's position, and nothing twice.
        assert_each_exactly_once(&want, &streams);
        assert_eq!(agent.sum("promtail_sent_entries_total").await as usize, 60);
        assert!(agent.sigterm().success());
    }
}
