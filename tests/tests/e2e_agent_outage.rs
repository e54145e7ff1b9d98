//! The agent through a 60-second outage of its log store, while lines keep coming: every
//! line is delivered once the store is back, and the agent's memory stays bounded meanwhile
//! (reading stops at `limits.maxBufferedBytes`: backpressure, not buffering).
//!
//! The store is VictoriaLogs (fed through its Loki push endpoint, a numeric tenant). The
//! test bed's shared store serves other tests, so this test runs its own: the test bed's
//! cached VictoriaLogs binary, started with the same flags as the shared one
//! (tests/testbed/up.sh `up_store`), on its own loopback port and `-storageDataPath`. It is
//! stopped with SIGTERM and started again on the same port and data directory, so what it
//! acknowledged before the outage stays queryable.
//!
//! The store keeps every copy of an entry (unlike Loki, which keeps one copy of identical
//! (timestamp, line) pairs), so a line sent twice is visible in it: every line is unique
//! (writer, sequence number) and each is asserted to be stored exactly once; re-sends are
//! also counted from the agent's own `promtail_sent_entries_total`.
//!
//! Needs `cargo build -p logpipe-agent` first and the VictoriaLogs binary of the test bed
//! (`make testbed-up` or `tests/testbed/build.sh victorialogs`); the shared test bed itself
//! need not be running.

// cfg(test) so clippy's allow-unwrap-in-tests covers the helpers too.
#[cfg(test)]
mod outage {
    use std::collections::BTreeMap;
    use std::fs;
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use logpipe_e2e::loggen::{Clock, rfc3339_nano};
    use logpipe_e2e::store;
    use logpipe_e2e::{testbed_dir, unique_suffix, workspace_binary};

    /// `limits.maxBufferedBytes` of the agent under test: small, so the outage's data
    /// (about ten times this) must be held back by backpressure, not buffered.
    const MAX_BUFFERED_BYTES: u64 = 2 * 1024 * 1024;
    /// `loki.batchBytes`.
    const BATCH_BYTES: u64 = 65_536;
    /// How long the store is down while the writers keep writing.
    const OUTAGE: Duration = Duration::from_secs(60);
    /// Container log files written concurrently.
    const WRITERS: usize = 4;
    /// Each writer appends this many lines every [`TICK`]: about 95 lines/s per writer.
    const LINES_PER_TICK: u64 = 5;
    const TICK: Duration = Duration::from_millis(50);
    /// Random text per line, plus up to 63 bytes more, plus the prefix: ~760 bytes a line.
    const PAYLOAD_BYTES: usize = 680;
    /// A writer never runs longer than this, whatever happens to the test.
    const WRITER_LIMIT: Duration = Duration::from_secs(400);
    /// The private store's port, when free (else any free port).
    const PREFERRED_PORT: u16 = 43300;
    /// How often RSS and readiness are sampled.
    const SAMPLE_EVERY: Duration = Duration::from_millis(500);

    // ---------------------------------------------------------------------------------------
    // Helpers

    /// The line with sequence number `seq` of writer `pod`: `<pod> seq <n> <text>`.
    fn line_text(pod: &str, seq: u64) -> String {
        // xorshift64 seeded by the sequence number: text that compresses like real logs
        // rather than like a run of one letter.
        let mut state = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let len = PAYLOAD_BYTES + (seq % 64) as usize;
        let mut payload = String::with_capacity(len);
        while payload.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let word = (state % 9) as usize + 2;
            for i in 0..word {
                payload.push(char::from(b'a' + ((state >> (i * 5)) % 26) as u8));
            }
            payload.push(' ');
        }
        format!("{pod} seq {seq:07} {payload}")
    }

    /// (writer, sequence number) of a line written by [`line_text`].
    fn parse_line(line: &str) -> Option<(String, u64)> {
        let mut words = line.split(' ');
        let pod = words.next()?;
        if words.next()? != "seq" {
            return None;
        }
        Some((pod.to_string(), words.next()?.parse().ok()?))
    }

    #[test]
    fn lines_parse_back() {
        let line = line_text("writer-2", 1234);
        assert!(line.len() >= PAYLOAD_BYTES);
        assert_eq!(parse_line(&line), Some(("writer-2".to_string(), 1234)));
        assert_ne!(line_text("writer-2", 1235)[20..], line[20..]);
    }

    /// One writer thread appending CRI lines to `<root>/<ns>_<pod>_<uid>/app/0.log` until
    /// `stop` (or [`WRITER_LIMIT`]); returns how many lines it wrote (sequence 0..n).
    fn spawn_writer(
        root: &Path,
        ns: &str,
        pod: String,
        clock: Arc<Clock>,
        stop: Arc<AtomicBool>,
        written: Arc<AtomicU64>,
    ) -> JoinHandle<u64> {
        let path = root
            .join(format!("{ns}_{pod}_uid-{pod}"))
            .join("app")
            .join("0.log");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::thread::spawn(move || {
            let mut file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            let started = Instant::now();
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) && started.elapsed() < WRITER_LIMIT {
                let mut text = String::new();
                for _ in 0..LINES_PER_TICK {
                    text.push_str(&format!(
                        "{} stdout F {}\n",
                        rfc3339_nano(clock.next()),
                        line_text(&pod, seq)
                    ));
                    seq += 1;
                }
                file.write_all(text.as_bytes()).unwrap();
                written.fetch_add(LINES_PER_TICK, Ordering::SeqCst);
                std::thread::sleep(TICK);
            }
            seq
        })
    }

    fn port_free(port: u16) -> bool {
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    }

    fn sigterm(child: &Child) {
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    }

    /// Wait for `child` to exit, up to `limit`.
    fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn tail(path: &Path, lines: usize) -> String {
        let text = fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Resident memory of a process, from `/proc/<pid>/status`.
    fn rss_bytes(pid: u32) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// Bytes in every log file under `root` (the writers' output so far).
    fn log_bytes(root: &Path) -> u64 {
        let mut total = 0;
        for pod in fs::read_dir(root).unwrap().flatten() {
            let file = pod.path().join("app").join("0.log");
            total += fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        }
        total
    }

    fn mib(bytes: u64) -> String {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }

    fn sum_metric(text: &str, prefix: &str) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |a, b| a + b)
    }

    /// A VictoriaLogs of this test only, started as the test bed's (tests/testbed/up.sh
    /// `up_store`: loopback only, `-retentionPeriod=100y -loki.disableMessageParsing`), on
    /// its own port and `-storageDataPath`. Killed when dropped.
    struct PrivateStore {
        binary: PathBuf,
        data: PathBuf,
        log: PathBuf,
        http_port: u16,
        child: Option<Child>,
    }

    impl PrivateStore {
        fn new(dir: &Path) -> Self {
            let binary = logpipe_e2e::cached_binary("VICTORIALOGS", "victoria-logs");
            let http_port = if port_free(PREFERRED_PORT) {
                PREFERRED_PORT
            } else {
                let port = logpipe_e2e::free_port().unwrap();
                println!("port {PREFERRED_PORT} is taken, the private store uses {port}");
                port
            };
            fs::create_dir_all(dir).unwrap();
            Self {
                binary,
                data: dir.join("data"),
                log: dir.join("victoria-logs.log"),
                http_port,
                child: None,
            }
        }

        fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.http_port)
        }

        fn start(&mut self) {
            assert!(self.child.is_none(), "the private store runs already");
            // After a stop the port may take a moment to be free again.
            let deadline = Instant::now() + Duration::from_secs(15);
            while !port_free(self.http_port) {
                assert!(
                    Instant::now() < deadline,
                    "127.0.0.1:{} is taken: the private store cannot start",
                    self.http_port
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            let child = Command::new(&self.binary)
                .arg(format!("-httpListenAddr=127.0.0.1:{}", self.http_port))
                .arg(format!("-storageDataPath={}", self.data.display()))
                .arg("-retentionPeriod=100y")
                .arg("-loki.disableMessageParsing")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            self.child = Some(child);
        }

        /// The Loki push endpoint's readiness answers 200; fails if the store exited.
        async fn is_ready(&mut self) -> bool {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "the private store exited ({status}); log {}:\n{}",
                    self.log.display(),
                    tail(&self.log, 25)
                );
            }
            logpipe_e2e::http_client()
                .get(format!("{}{}", self.url(), store::READY_PATH))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|resp| resp.status().is_success())
        }

        /// Poll readiness until it answers 200; fails if the store exits or `limit` passes.
        async fn wait_ready(&mut self, limit: Duration) -> Duration {
            let started = Instant::now();
            loop {
                if self.is_ready().await {
                    return started.elapsed();
                }
                assert!(
                    started.elapsed() < limit,
                    "the private store not ready after {limit:?}; log {}:\n{}",
                    self.log.display(),
                    tail(&self.log, 25)
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }

        /// SIGTERM (VictoriaLogs flushes what it took to its data directory and exits);
        /// returns how long it took.
        fn stop(&mut self) -> Duration {
            let mut child = self.child.take().expect("the private store is not running");
            let started = Instant::now();
            sigterm(&child);
            match wait_exit(&mut child, Duration::from_secs(60)) {
                Some(_) => started.elapsed(),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the private store did not exit within 60 s of SIGTERM");
                }
            }
        }
    }

    impl Drop for PrivateStore {
        fn drop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// The agent under test. Killed when dropped.
    struct Agent {
        child: Child,
        listen: String,
    }

    impl Agent {
        fn start(dir: &Path, push_url: &str, tenant: &str) -> Self {
            let config = dir.join("agent.yaml");
            fs::write(
                &config,
                format!(
                    "loki:\n  url: {push_url}\n  tenant: \"{tenant}\"\n  batchWait: 200ms\n  batchBytes: {BATCH_BYTES}\n  \
                     timeout: 5s\n  minBackoff: 100ms\n  maxBackoff: 2s\n\
                     limits:\n  maxBufferedBytes: {MAX_BUFFERED_BYTES}\n\
                     shutdownTimeout: 5s\n\
                     pipeline:\n- cri: {{}}\n- labelDrop: [filename]\n"
                ),
            )
            .unwrap();
            let listen = format!("127.0.0.1:{}", logpipe_e2e::free_port().unwrap());
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("agent.log"))
                .unwrap();
            let child = Command::new(workspace_binary("logpipe-agent"))
                .arg("--config")
                .arg(&config)
                .arg("--log-root")
                .arg(dir.join("pods"))
                .arg("--positions")
                .arg(dir.join("positions.json"))
                .arg("--listen")
                .arg(&listen)
                .arg("--node-name")
                .arg(format!("node-{}", unique_suffix()))
                .env_remove("KUBERNETES_SERVICE_HOST")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            Self { child, listen }
        }

        fn assert_running(&mut self) {
            assert!(self.child.try_wait().unwrap().is_none(), "the agent exited");
        }

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

        /// `/-/ready`: (status, body); `None` when the agent does not answer.
        async fn ready(&self) -> Option<(u16, String)> {
            let resp = logpipe_e2e::http_client()
                .get(format!("http://{}/-/ready", self.listen))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()?;
            let status = resp.status().as_u16();
            Some((status, resp.text().await.unwrap_or_default()))
        }

        fn sigterm(&mut self) -> ExitStatus {
            sigterm(&self.child);
            wait_exit(&mut self.child, Duration::from_secs(30))
                .expect("agent did not exit after SIGTERM")
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

    /// Stops the writers when dropped (a failing test must not leave them writing).
    struct StopOnDrop(Arc<AtomicBool>);

    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// Samples a process's RSS every [`SAMPLE_EVERY`] on its own thread (so no phase of
    /// the test goes unsampled), keeping the peak since the last [`RssSampler::take`].
    struct RssSampler {
        peak: Arc<AtomicU64>,
        samples: Arc<AtomicU64>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl RssSampler {
        fn start(pid: u32) -> Self {
            let peak = Arc::new(AtomicU64::new(0));
            let samples = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let (peak, samples, stop) = (peak.clone(), samples.clone(), stop.clone());
                std::thread::spawn(move || {
                    let started = Instant::now();
                    while !stop.load(Ordering::SeqCst) && started.elapsed() < WRITER_LIMIT {
                        if let Some(rss) = rss_bytes(pid) {
                            peak.fetch_max(rss, Ordering::SeqCst);
                            samples.fetch_add(1, Ordering::SeqCst);
                        }
                        std::thread::sleep(SAMPLE_EVERY);
                    }
                })
            };
            Self {
                peak,
                samples,
                stop,
                thread: Some(thread),
            }
        }

        /// (peak RSS, samples) since the last call.
        fn take(&self) -> (u64, u64) {
            (
                self.peak.swap(0, Ordering::SeqCst),
                self.samples.swap(0, Ordering::SeqCst),
            )
        }
    }

    impl Drop for RssSampler {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// Sequence numbers per writer found in the store, with how often each was found.
    async fn delivered(
        store_url: &str,
        tenant: &str,
        selector: &str,
        start_ns: i64,
    ) -> Result<BTreeMap<String, BTreeMap<u64, usize>>, store::StoreError> {
        let streams = store::query_range(
            store_url,
            tenant,
            selector,
            start_ns,
            store::now_ns() + 1_000_000_000,
        )
        .await?;
        let mut out: BTreeMap<String, BTreeMap<u64, usize>> = BTreeMap::new();
        for s in &streams {
            for (_, line) in &s.entries {
                let (pod, seq) =
                    parse_line(line).unwrap_or_else(|| panic!("a line nobody wrote: {:.80}", line));
                assert_eq!(
                    s.labels.get("pod"),
                    Some(&pod),
                    "line of {pod} in stream {:?}",
                    s.labels
                );
                *out.entry(pod).or_default().entry(seq).or_default() += 1;
            }
        }
        Ok(out)
    }

    // ---------------------------------------------------------------------------------------
    // Test

    /// Bound on the agent's RSS while the store is down and while the agent catches up after:
    /// baseline + 3 × maxBufferedBytes.
    ///
    /// The baseline is the peak RSS over 5 s of normal flow (code, runtime, HTTP client,
    /// read buffers, a batch being built and pushed). On top of it:
    /// - 1 × maxBufferedBytes: the unacknowledged entries, as the agent counts them (line
    ///   plus 64 bytes each); reading stops there;
    /// - 1 × for what that count leaves out: each entry's `Entry`/`Pending` structs in the
    ///   channel, string capacity rounding, the batch being retried (protobuf adapters and
    ///   its encoded body, at most batchBytes), one read pass over one file past the limit;
    /// - 1 × for allocator slack: entries are allocated on the tailer thread and freed on
    ///   the runtime's threads (separate malloc arenas).
    ///
    /// The outage's data is asserted to be well over 3 × maxBufferedBytes, so an agent that
    /// kept reading into memory would cross the bound.
    fn rss_bound(baseline: u64) -> u64 {
        baseline + 3 * MAX_BUFFERED_BYTES
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_down_60s_everything_delivered_after_and_memory_stays_bounded() {
        let run = unique_suffix();
        let dir = testbed_dir()
            .join("scratch")
            .join(format!("agent-outage-{run}"));
        fs::create_dir_all(dir.join("pods")).unwrap();
        let tenant = store::unique_tenant();
        let ns = format!("outage-{run}");
        let selector = format!("{{namespace=\"{ns}\"}}");
        let start_ns = store::now_ns() - 5_000_000_000;

        let mut store_proc = PrivateStore::new(&dir.join("victorialogs"));
        store_proc.start();
        let first_ready = store_proc.wait_ready(Duration::from_secs(120)).await;
        println!(
            "private store (VictoriaLogs) {} ready in {:.1} s, tenant {tenant} (log {})",
            store_proc.url(),
            first_ready.as_secs_f64(),
            store_proc.log.display()
        );
        let mut agent = Agent::start(
            &dir,
            &format!("{}{}", store_proc.url(), store::PUSH_PATH),
            &tenant,
        );

        // Writers: several files, a few hundred lines/s in all, until told to stop.
        let clock = Arc::new(Clock::new());
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_writers = StopOnDrop(stop.clone());
        let written = Arc::new(AtomicU64::new(0));
        let writers: Vec<(String, JoinHandle<u64>)> = (0..WRITERS)
            .map(|i| {
                let pod = format!("writer-{i}");
                let handle = spawn_writer(
                    &dir.join("pods"),
                    &ns,
                    pod.clone(),
                    clock.clone(),
                    stop.clone(),
                    written.clone(),
                );
                (pod, handle)
            })
            .collect();

        // Lines flow: some are queryable in the store and the agent says it is ready.
        let flowing = Instant::now();
        loop {
            let got = delivered(&store_proc.url(), &tenant, &selector, start_ns)
                .await
                .unwrap_or_default();
            let ready = agent.ready().await.map(|(s, _)| s);
            if got.len() == WRITERS && ready == Some(200) {
                break;
            }
            assert!(
                flowing.elapsed() < Duration::from_secs(60),
                "lines do not flow to the private store ({} writers seen, agent /-/ready {ready:?}); agent log {}:\n{}",
                got.len(),
                dir.join("agent.log").display(),
                tail(&dir.join("agent.log"), 15)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        // Baseline: peak RSS over 5 s of normal flow.
        let rss = RssSampler::start(agent.child.id());
        tokio::time::sleep(Duration::from_secs(5)).await;
        agent.assert_running();
        let (baseline, baseline_samples) = rss.take();
        assert!(baseline_samples >= 5, "cannot read the agent's VmRSS");
        let before = agent.metrics().await;
        let retries_before = sum_metric(&before, "promtail_batch_retries_total");
        let failed_before = sum_metric(
            &before,
            "promtail_request_duration_seconds_count{status_code=\"-1\"",
        );
        let bound = rss_bound(baseline);

        // The outage.
        let stopping = store_proc.stop();
        let outage_started = Instant::now();
        let written_at_outage = written.load(Ordering::SeqCst);
        let bytes_at_outage = log_bytes(&dir.join("pods"));
        println!(
            "store stopped (SIGTERM, exited in {:.1} s) after {written_at_outage} lines written; agent RSS baseline {}",
            stopping.as_secs_f64(),
            mib(baseline)
        );
        let mut peak_buffered = 0.0f64;
        let mut not_ready = 0;
        let mut not_ready_why = String::new();
        let mut samples = 0;
        while outage_started.elapsed() < OUTAGE {
            agent.assert_running();
            samples += 1;
            if let Some((status, body)) = agent.ready().await
                && status != 200
            {
                not_ready += 1;
                not_ready_why = body.trim().to_string();
            }
            if samples % 4 == 0 {
                let m = agent.metrics().await;
                peak_buffered = peak_buffered.max(sum_metric(&m, "logpipe_buffered_bytes "));
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        let during = agent.metrics().await;
        let written_in_outage = written.load(Ordering::SeqCst) - written_at_outage;
        let retries = sum_metric(&during, "promtail_batch_retries_total") - retries_before;
        let failed = sum_metric(
            &during,
            "promtail_request_duration_seconds_count{status_code=\"-1\"",
        ) - failed_before;
        let backpressure = sum_metric(&during, "logpipe_backpressure_passes_total");
        peak_buffered = peak_buffered.max(sum_metric(&during, "logpipe_buffered_bytes "));
        let outage_bytes = log_bytes(&dir.join("pods")) - bytes_at_outage;

        // The store back on the same port and data; the writers stop.
        let (peak_rss, rss_samples) = rss.take();
        store_proc.start();
        let restarted = Instant::now();
        stop.store(true, Ordering::SeqCst);
        let mut expected: BTreeMap<String, u64> = BTreeMap::new();
        for (pod, handle) in writers {
            expected.insert(pod, handle.join().unwrap());
        }
        let total: u64 = expected.values().sum();
        assert_eq!(total, written.load(Ordering::SeqCst));
        println!(
            "outage of {:.0} s: {written_in_outage} lines ({}) written meanwhile; agent not ready in {not_ready} ({not_ready_why:?}), \
             {retries} retries ({failed} without an answer), {backpressure} read passes held back, peak buffered {}",
            outage_started.elapsed().as_secs_f64(),
            mib(outage_bytes),
            mib(peak_buffered as u64),
        );
        println!(
            "agent RSS: baseline {} (peak of {baseline_samples} samples over 5 s of normal flow), peak during the outage {} \
             ({rss_samples} samples), bound {} (baseline + 3 x maxBufferedBytes {})",
            mib(baseline),
            mib(peak_rss),
            mib(bound),
            mib(MAX_BUFFERED_BYTES)
        );

        // Catch-up: the store ready and the agent has sent everything, then the store has it all.
        let mut ready_after = None;
        let mut peak_buffered_catch_up = 0.0f64;
        let mut sent = 0.0;
        let mut buffered = f64::NAN;
        let mut caught_up = None;
        let mut agent_ready_again = false;
        while restarted.elapsed() < Duration::from_secs(240) {
            agent.assert_running();
            if ready_after.is_none() && store_proc.is_ready().await {
                ready_after = Some(restarted.elapsed());
            }
            let m = agent.metrics().await;
            sent = sum_metric(&m, "promtail_sent_entries_total");
            buffered = sum_metric(&m, "logpipe_buffered_bytes ");
            peak_buffered_catch_up = peak_buffered_catch_up.max(buffered);
            agent_ready_again = agent.ready().await.map(|(s, _)| s) == Some(200);
            if caught_up.is_none() && sent as u64 >= total && buffered == 0.0 {
                caught_up = Some(restarted.elapsed());
            }
            if caught_up.is_some() && ready_after.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let ready_after = ready_after.unwrap_or_else(|| {
            panic!(
                "the private store not ready 240 s after its restart; log {}:\n{}",
                store_proc.log.display(),
                tail(&store_proc.log, 25)
            )
        });
        let mut got = BTreeMap::new();
        let mut queryable = None;
        while restarted.elapsed() < Duration::from_secs(300) {
            match delivered(&store_proc.url(), &tenant, &selector, start_ns).await {
                Ok(now) => {
                    let count: u64 = now.values().map(|s| s.len() as u64).sum();
                    got = now;
                    if count >= total {
                        queryable = Some(restarted.elapsed());
                        break;
                    }
                }
                Err(e) => println!("querying the private store: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let found: u64 = got.values().map(|s| s.len() as u64).sum();
        let (peak_rss_catch_up, _) = rss.take();
        drop(rss);
        let end = agent.metrics().await;
        let dropped = sum_metric(&end, "promtail_dropped_entries_total");
        let sent_total = sum_metric(&end, "promtail_sent_entries_total");
        println!(
            "store restarted, ready in {:.1} s; agent caught up (all sent, nothing buffered) {} after the restart, \
             all queryable {}; from the restart on: peak RSS {} (bound {}), peak buffered {}",
            ready_after.as_secs_f64(),
            caught_up.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64())),
            queryable.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64())),
            mib(peak_rss_catch_up),
            mib(bound),
            mib(peak_buffered_catch_up as u64)
        );
        println!(
            "lines written {total} ({written_at_outage} before the outage, {written_in_outage} during it), \
             delivered (queryable) {found}, sent {sent_total}, dropped {dropped}"
        );

        // Everything, exactly once.
        for (pod, &n) in &expected {
            let seen = got.get(pod).cloned().unwrap_or_default();
            let missing: Vec<u64> = (0..n).filter(|s| !seen.contains_key(s)).collect();
            assert!(
                missing.is_empty(),
                "{pod}: {} of {n} lines missing in the store, e.g. seq {:?} (agent sent {sent}, buffered {buffered}, dropped {dropped}); agent log {}",
                missing.len(),
                &missing[..missing.len().min(10)],
                dir.join("agent.log").display()
            );
            let twice: Vec<(&u64, &usize)> = seen.iter().filter(|(_, c)| **c > 1).collect();
            assert!(
                twice.is_empty(),
                "{pod}: lines found more than once: {twice:?}"
            );
            let unknown: Vec<&u64> = seen.keys().filter(|s| **s >= n).collect();
            assert!(unknown.is_empty(), "{pod}: lines nobody wrote: {unknown:?}");
        }
        assert_eq!(got.len(), expected.len(), "streams: {:?}", got.keys());
        assert_eq!(found, total);
        assert_eq!(dropped, 0.0, "entries dropped");
        assert_eq!(
            sent_total as u64, total,
            "each line sent once (the agent never restarted, so nothing is read twice)"
        );

        // Memory stayed bounded, and the outage was seen and held back by backpressure.
        assert!(
            peak_rss <= bound,
            "agent RSS peaked at {} during the outage, over the bound {} (baseline {})",
            mib(peak_rss),
            mib(bound),
            mib(baseline)
        );
        assert!(
            peak_rss_catch_up <= bound,
            "agent RSS peaked at {} after the store's restart, over the bound {} (baseline {})",
            mib(peak_rss_catch_up),
            mib(bound),
            mib(baseline)
        );
        assert!(
            not_ready > 0,
            "/-/ready never said not ready during a 60 s outage"
        );
        assert!(
            retries >= 5.0,
            "retries counted during the outage: {retries}"
        );
        assert!(
            failed >= 5.0,
            "pushes without an answer during the outage: {failed}"
        );
        assert!(
            outage_bytes > 3 * MAX_BUFFERED_BYTES,
            "the writers wrote only {} during the outage: not enough to test the bound",
            mib(outage_bytes)
        );
        assert!(
            backpressure > 0.0,
            "reading never paused although the outage's data exceeds maxBufferedBytes"
        );
        // The limit is checked before each file of a read pass: one pass of one file
        // (1 MiB) may go past it.
        for (when, peak) in [
            ("during the outage", peak_buffered),
            ("while catching up", peak_buffered_catch_up),
        ] {
            assert!(
                peak <= (MAX_BUFFERED_BYTES + 1024 * 1024 + 64 * 1024) as f64,
                "unacknowledged bytes reached {} {when} with maxBufferedBytes {}",
                mib(peak as u64),
                mib(MAX_BUFFERED_BYTES)
            );
        }
        assert!(
            caught_up.is_some(),
            "the agent did not catch up: sent {sent} of {total}, {buffered} bytes buffered"
        );
        assert!(
            agent_ready_again,
            "/-/ready is not ready once the store is back"
        );

        assert!(agent.sigterm().success(), "agent exit status");
        drop(store_proc);
        // Keep the logs; the data is large.
        let _ = fs::remove_dir_all(dir.join("victorialogs").join("data"));
        let _ = fs::remove_dir_all(dir.join("pods"));
    }
}
