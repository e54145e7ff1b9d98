//! The agent against the test bed's real Loki: a generated `/var/log/pods` tree written
//! while the agent runs (partial lines, kubelet rotation with gzip, a container restart, a
//! pod deletion), kill -9 and restart, Loki answering 429, malformed input, and a start
//! from a Promtail positions file.
//!
//! Loki keeps one copy of identical (timestamp, line) pairs of a stream, so duplicates
//! cannot be seen by querying it: every line written is unique, completeness is checked
//! in Loki, and duplicates are counted from the agent's own `promtail_sent_entries_total`.
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

    use logpipe_e2e::loggen::{Clock, rfc3339_nano};
    use logpipe_e2e::loki::{self, Stream};
    use logpipe_e2e::{Testbed, unique_suffix, workspace_binary};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // ---------------------------------------------------------------------------------------
    // Helpers

    /// A container log file being written, and the lines Loki should get from it.
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

        /// `n` lines; every 7th is written as three CRI partial lines (P, P, F).
        fn write(&mut self, clock: &Clock, tag: &str, n: usize) {
            let mut text = String::new();
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
                self.expected.push(line);
            }
            self.append_raw(&text);
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
        fn new(testbed: &Testbed, name: &str, push_url: &str, tenant: &str, extra: &str) -> Self {
            let dir = testbed.scratch_dir(name).unwrap();
            let root = dir.join("pods");
            fs::create_dir_all(&root).unwrap();
            let config = dir.join("agent.yaml");
            fs::write(
                &config,
                format!(
                    "loki:\n  url: {push_url}\n  tenant: {tenant}\n  batchWait: 200ms\n  batchBytes: 65536\n  \
                     minBackoff: 100ms\n  maxBackoff: 2s\n{extra}pipeline:\n- cri: {{}}\n- labelDrop: [filename]\n"
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
            let listen = format!("127.0.0.1:{}", logpipe_e2e::free_port());
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

    /// Lines found in Loki for `selector`, as (labels, line), waiting until `expected` are there.
    async fn wait_for_lines(
        testbed: &Testbed,
        tenant: &str,
        selector: &str,
        start_ns: i64,
        expected: usize,
        timeout: Duration,
    ) -> Vec<Stream> {
        loki::wait_for(
            &testbed.loki_url,
            tenant,
            selector,
            start_ns,
            timeout,
            |s| loki::count(s) >= expected,
        )
        .await
        .unwrap()
    }

    fn lines_by_container(streams: &[Stream]) -> BTreeMap<(String, String), Vec<String>> {
        let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for s in streams {
            let key = (
                s.labels.get("pod").cloned().unwrap_or_default(),
                s.labels.get("container").cloned().unwrap_or_default(),
            );
            out.entry(key)
                .or_default()
                .extend(s.entries.iter().map(|(_, l)| l.clone()));
        }
        out
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

    fn push_url(testbed: &Testbed) -> String {
        format!("{}/loki/api/v1/push", testbed.loki_url)
    }

    // ---------------------------------------------------------------------------------------
    // Tests

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_line_once_through_partial_lines_rotation_restart_and_deletion() {
        let testbed = testbed().await;
        let run = unique_suffix();
        let tenant = format!("agent-{run}");
        let ns = format!("e2e-{run}");
        let setup = AgentSetup::new(&testbed, "agent-once", &push_url(&testbed), &tenant, "");
        let clock = Clock::new();
        let start_ns = loki::now_ns() - 5_000_000_000;
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

        let mut want: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        want.entry(("web-7d9f8c6b5d-abcde".into(), "app".into()))
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
        let streams = wait_for_lines(
            &testbed,
            &tenant,
            &selector,
            start_ns,
            total,
            Duration::from_secs(90),
        )
        .await;
        let got = lines_by_container(&streams);
        for (key, lines) in &want {
            let got_set: BTreeSet<&String> =
                got.get(key).map(|v| v.iter().collect()).unwrap_or_default();
            let missing: Vec<_> = lines
                .iter()
                .filter(|l| !got_set.contains(l))
                .take(5)
                .collect();
            assert!(
                missing.is_empty(),
                "{key:?}: missing {missing:?} (of {})",
                lines.len()
            );
        }
        let unexpected: Vec<_> = got
            .iter()
            .flat_map(|(k, v)| {
                let want_set: BTreeSet<&String> =
                    want.get(k).map(|w| w.iter().collect()).unwrap_or_default();
                v.iter()
                    .filter(move |l| !want_set.contains(l))
                    .map(move |l| (k.clone(), l.clone()))
            })
            .take(5)
            .collect();
        assert!(unexpected.is_empty(), "lines nobody wrote: {unexpected:?}");
        assert_eq!(loki::count(&streams), total);
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

        // Exactly once: what the agent sent equals what was written.
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
        assert_eq!(sum_metric(&metrics, "promtail_dropped_entries_total"), 0.0);
        assert_eq!(sum_metric(&metrics, "logpipe_malformed_lines_total"), 0.0);

        // The right tenant only.
        let other = loki::query_range(
            &testbed.loki_url,
            &format!("{tenant}-other"),
            &selector,
            start_ns,
            loki::now_ns() + 1_000_000_000,
        )
        .await
        .unwrap();
        assert_eq!(loki::count(&other), 0, "lines leaked to another tenant");

        // Graceful stop: exit 0, positions saved, nothing read again on restart.
        let status = agent.sigterm();
        assert!(status.success(), "agent exit status {status}");
        let mut again = setup.start(&[]);
        web.write(&clock, "web-after-restart", 20);
        let streams = wait_for_lines(
            &testbed,
            &tenant,
            &selector,
            start_ns,
            total + 20,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(loki::count(&streams), total + 20);
        tokio::time::sleep(Duration::from_millis(500)).await;
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
        let tenant = format!("agent-kill-{run}");
        let ns = format!("kill-{run}");
        let setup = AgentSetup::new(&testbed, "agent-kill", &push_url(&testbed), &tenant, "");
        let clock = Arc::new(Clock::new());
        let start_ns = loki::now_ns() - 5_000_000_000;
        let mut agent = setup.start(&[]);

        // Two writers, 40 lines every 10 ms for 4 s, bounded.
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
        let expected: Vec<String> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let total = expected.len();
        let selector = format!("{{namespace=\"{ns}\"}}");
        let streams = wait_for_lines(
            &testbed,
            &tenant,
            &selector,
            start_ns,
            total,
            Duration::from_secs(90),
        )
        .await;
        let got: BTreeSet<String> = streams
            .iter()
            .flat_map(|s| s.entries.iter().map(|(_, l)| l.clone()))
            .collect();
        let missing: Vec<_> = expected.iter().filter(|l| !got.contains(*l)).collect();
        assert!(
            missing.is_empty(),
            "{} lines missing after kill -9, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sent_after = agent2.sum("promtail_sent_entries_total").await;
        let duplicates = (sent_before + sent_after) as i64 - total as i64;
        // One batch: 64 KiB of lines of at least 50 bytes.
        let one_batch = 65_536 / 50;
        println!(
            "kill -9: {total} lines, sent {sent_before} before + {sent_after} after, duplicates {duplicates} (one batch <= {one_batch})"
        );
        assert!(
            duplicates >= 0,
            "fewer entries sent than written: counting is off"
        );
        assert!(
            duplicates <= one_batch,
            "{duplicates} duplicates is more than one in-flight batch"
        );
    }

    /// A loopback HTTP proxy in front of Loki answering 429 to the first `refuse` requests.
    async fn throttling_proxy(loki_url: String, refuse: u32) -> (String, Arc<AtomicU32>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicU32::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                let loki_url = loki_url.clone();
                tokio::spawn(async move {
                    let http = logpipe_e2e::http_client();
                    let mut buf = Vec::new();
                    loop {
                        // Read one request: headers, then Content-Length bytes.
                        let header_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 8192];
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
                        let header = |name: &str| {
                            head.lines().find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.trim()
                                    .eq_ignore_ascii_case(name)
                                    .then(|| v.trim().to_string())
                            })
                        };
                        let len: usize = header("content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        while buf.len() < header_end + len {
                            let mut chunk = [0u8; 65536];
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body = buf[header_end..header_end + len].to_vec();
                        buf.drain(..header_end + len);
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        let (status, reason) = if n < refuse {
                            (429, "Too Many Requests")
                        } else {
                            let mut req = http
                                .post(format!("{loki_url}/loki/api/v1/push"))
                                .body(body)
                                .timeout(Duration::from_secs(10));
                            for name in ["content-type", "content-encoding", "x-scope-orgid"] {
                                if let Some(v) = header(name) {
                                    req = req.header(name, v);
                                }
                            }
                            match req.send().await {
                                Ok(r) => (r.status().as_u16(), "Proxied"),
                                Err(_) => (502, "Bad Gateway"),
                            }
                        };
                        let response = format!(
                            "HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nretry-after: 0\r\n\r\n"
                        );
                        if conn.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}/loki/api/v1/push"), seen)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loki_answering_429_is_retried_and_nothing_is_lost() {
        let testbed = testbed().await;
        let run = unique_suffix();
        let tenant = format!("agent-429-{run}");
        let ns = format!("throttled-{run}");
        let (proxy_url, requests) = throttling_proxy(testbed.loki_url.clone(), 8).await;
        let setup = AgentSetup::new(&testbed, "agent-429", &proxy_url, &tenant, "");
        let clock = Clock::new();
        let start_ns = loki::now_ns() - 5_000_000_000;
        let agent = setup.start(&[]);
        let mut w = LogWriter::new(&setup.root, &ns, "busy", "uid-busy", "app", 0);
        for _ in 0..10 {
            w.write(&clock, "throttled", 50);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let selector = format!("{{namespace=\"{ns}\"}}");
        let streams = wait_for_lines(
            &testbed,
            &tenant,
            &selector,
            start_ns,
            w.expected.len(),
            Duration::from_secs(60),
        )
        .await;
        let got: BTreeSet<String> = streams
            .iter()
            .flat_map(|s| s.entries.iter().map(|(_, l)| l.clone()))
            .collect();
        assert!(
            w.expected.iter().all(|l| got.contains(l)),
            "lines lost behind 429s: {} of {}",
            got.len(),
            w.expected.len()
        );
        let metrics = agent.metrics().await;
        let retries = sum_metric(&metrics, "promtail_batch_retries_total");
        println!(
            "429s answered: 8, requests seen {}, retries counted {retries}",
            requests.load(Ordering::SeqCst)
        );
        // The readiness probe (an empty push before the first batch) may take one of the 429s.
        assert!(retries >= 7.0, "retries counted: {retries}");
        assert_eq!(sum_metric(&metrics, "promtail_dropped_entries_total"), 0.0);
        assert!(
            sum_metric(
                &metrics,
                "promtail_request_duration_seconds_count{status_code=\"429\""
            ) >= 8.0
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_input_is_counted_and_never_fatal() {
        let testbed = testbed().await;
        let run = unique_suffix();
        let tenant = format!("agent-bad-{run}");
        let ns = format!("malformed-{run}");
        let setup = AgentSetup::new(
            &testbed,
            "agent-malformed",
            &push_url(&testbed),
            &tenant,
            "",
        );
        let clock = Clock::new();
        let start_ns = loki::now_ns() - 5_000_000_000;
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
        let streams = wait_for_lines(
            &testbed,
            &tenant,
            &selector,
            start_ns,
            50,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(loki::count(&streams), 50);
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
        let tenant = format!("agent-promtail-{run}");
        let ns = format!("promtail-{run}");
        let setup = AgentSetup::new(&testbed, "agent-promtail", &push_url(&testbed), &tenant, "");
        let clock = Clock::new();
        let start_ns = loki::now_ns() - 5_000_000_000;
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
        let streams = wait_for_lines(
            &testbed,
            &tenant,
            &selector,
            start_ns,
            60,
            Duration::from_secs(60),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let got: BTreeSet<String> = streams
            .iter()
            .flat_map(|s| s.entries.iter().map(|(_, l)| l.clone()))
            .collect();
        assert!(
            w.expected.iter().all(|l| got.contains(l)),
            "a gap after Promtail's position"
        );
        assert!(
            already.iter().all(|l| !got.contains(l)),
            "lines Promtail had shipped were sent again"
        );
        assert_eq!(agent.sum("promtail_sent_entries_total").await as usize, 60);
        assert!(agent.sigterm().success());
    }
}
