//! One measured run: start an agent (ours or a comparator) on a log tree, pushing to a
//! receiver under a fresh numeric tenant, and watch it until the receiver holds every
//! entry.
//!
//! Every subject gets the same work: read every `<root>/<pod dir>/<container>/*.log` from
//! the start (fresh positions), parse CRI (joining partial lines), label each stream with
//! the pod's namespace, pod and container (from the path), the node and the CRI stream,
//! batch up to 1 MiB or 1 s, push snappy-compressed protobuf. Ours pushes Loki's protocol
//! (`X-Scope-OrgID`), derives the labels from the path (no `--kubeconfig`). The
//! OpenTelemetry Collector (tests/otelcol) uses the filelog receiver with its `container`
//! operator (CRI, partial lines joined, `add_metadata_from_filepath`: k8s.* resource
//! attributes from the path) and pushes OTLP/HTTP (`AccountID`, `compression: snappy`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::BenchError;
use super::corpus::Shape;
use super::procstat::{self, Sample};
use super::receiver::{Protocol, Receiver, label_names};

pub const NODE_NAME: &str = "bench-node";
pub const BATCH_BYTES: u64 = 1024 * 1024;
pub const BATCH_WAIT: &str = "1s";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Subject {
    Agent,
    Otelcol,
}

impl Subject {
    /// Every comparator, in report order. (vlagent is not one: it reads Kubernetes logs
    /// only with an API server; see README "Benchmarks".)
    pub const COMPARATORS: [Subject; 1] = [Subject::Otelcol];
    pub const ALL: [Subject; 2] = [Subject::Agent, Subject::Otelcol];

    /// Short name: file names, flags, JSON keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Otelcol => "otelcol",
        }
    }

    /// Name for people: tables and charts.
    pub fn title(self) -> &'static str {
        match self {
            Self::Agent => "logpipe-agent",
            Self::Otelcol => "OpenTelemetry Collector",
        }
    }

    pub fn protocol(self) -> Protocol {
        match self {
            Self::Agent => Protocol::Loki,
            Self::Otelcol => Protocol::Otlp,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sink {
    Null,
    /// The test bed's VictoriaLogs, through the counting proxy.
    Store,
}

/// Binaries under test.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub agent: PathBuf,
    pub otelcol: PathBuf,
}

impl Binaries {
    pub fn of(&self, subject: Subject) -> &Path {
        match subject {
            Subject::Agent => &self.agent,
            Subject::Otelcol => &self.otelcol,
        }
    }
}

/// A started agent process; killed (and reaped) when dropped.
pub struct Running {
    pub child: Child,
    pub pid: u32,
    pub started: Instant,
    pub log: PathBuf,
    pub http: String,
}

impl Running {
    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("exited early ({status}):\n{}", self.log_tail())),
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait for it: {e}")),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The measurement is over when this runs: no graceful shutdown to wait for.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::Other(format!("cannot find a free loopback port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| BenchError::Other(format!("cannot find a free loopback port: {e}")))
}

/// Start `subject` reading `pods_root`, pushing to `receiver` as the numeric `tenant`;
/// its config, positions and log go to `run_dir`.
pub fn start(
    subject: Subject,
    bins: &Binaries,
    pods_root: &Path,
    receiver: &Receiver,
    tenant: &str,
    run_dir: &Path,
) -> Result<Running, BenchError> {
    std::fs::create_dir_all(run_dir).map_err(BenchError::io(run_dir))?;
    let port = free_port()?;
    let log = run_dir.join(format!("{}.log", subject.name()));
    let push_url = receiver.push_url(subject.protocol());
    let config_path = run_dir.join(format!("{}.yaml", subject.name()));
    let mut command = Command::new(bins.of(subject));
    let (config, http) = match subject {
        Subject::Agent => {
            command
                .arg("--config")
                .arg(&config_path)
                .arg("--node-name")
                .arg(NODE_NAME)
                .arg("--log-format")
                .arg("text")
                .env("RUST_LOG", "warn");
            (
                agent_config(
                    &push_url,
                    tenant,
                    pods_root,
                    &run_dir.join("positions.json"),
                    port,
                ),
                format!("http://127.0.0.1:{port}/-/ready"),
            )
        }
        Subject::Otelcol => {
            command.arg("--config").arg(&config_path);
            (
                otelcol_config(&push_url, tenant, pods_root, port),
                // The telemetry's Prometheus reader answers once the service is up.
                format!("http://127.0.0.1:{port}/metrics"),
            )
        }
    };
    std::fs::write(&config_path, config).map_err(BenchError::io(&config_path))?;
    let out = std::fs::File::create(&log).map_err(BenchError::io(&log))?;
    let err = out.try_clone().map_err(BenchError::io(&log))?;
    let started = Instant::now();
    let child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| BenchError::Other(format!("cannot start {}: {e}", subject.name())))?;
    let pid = child.id();
    Ok(Running {
        child,
        pid,
        started,
        log,
        http,
    })
}

/// Our agent's config: the `cri` stage and the default (path-derived) labels.
pub fn agent_config(
    push_url: &str,
    tenant: &str,
    pods_root: &Path,
    positions: &Path,
    port: u16,
) -> String {
    format!(
        "loki:\n  url: {push_url}\n  tenant: \"{tenant}\"\n  batchWait: {BATCH_WAIT}\n  batchBytes: {BATCH_BYTES}\n\
         logRoot: {root}\npositionsFile: {positions}\nlisten: 127.0.0.1:{port}\npipeline:\n  - cri: {{}}\n",
        root = pods_root.display(),
        positions = positions.display(),
    )
}

/// The collector's config: filelog (CRI via the `container` operator, k8s.* resource
/// attributes from the path, the node as a resource attribute) -> otlphttp (protobuf,
/// snappy, batches of 1 MiB or 1 s in the exporter's queue, which blocks rather than drops
/// when full). Offsets are kept in memory (no storage extension): each run starts fresh.
pub fn otelcol_config(push_url: &str, tenant: &str, pods_root: &Path, port: u16) -> String {
    format!(
        r#"receivers:
  filelog:
    include: ["{root}/*/*/*.log"]
    start_at: beginning
    include_file_path: true
    include_file_name: false
    resource:
      k8s.node.name: {NODE_NAME}
    operators:
      - type: container
        format: containerd
        add_metadata_from_filepath: true
exporters:
  otlphttp:
    logs_endpoint: {push_url}
    encoding: proto
    compression: snappy
    headers:
      AccountID: "{tenant}"
      ProjectID: "0"
    sending_queue:
      enabled: true
      sizer: bytes
      queue_size: 67108864
      block_on_overflow: true
      batch:
        flush_timeout: {BATCH_WAIT}
        sizer: bytes
        min_size: {BATCH_BYTES}
        max_size: {BATCH_BYTES}
service:
  telemetry:
    logs:
      level: warn
    metrics:
      level: basic
      readers:
        - pull:
            exporter:
              prometheus:
                host: 127.0.0.1
                port: {port}
  pipelines:
    logs:
      receivers: [filelog]
      exporters: [otlphttp]
"#,
        root = pods_root.display(),
    )
}

/// Figures of one run over the corpus.
#[derive(Clone, Debug, Serialize)]
pub struct CorpusRun {
    pub subject: Subject,
    pub sink: Sink,
    pub shape: Shape,
    pub index: usize,
    pub ok: bool,
    pub error: Option<String>,
    pub expected_entries: u64,
    pub received_entries: u64,
    /// Entries received after the expected count was reached (duplicates), in a grace
    /// period of two batch waits.
    pub extra_entries: u64,
    pub wall_s: f64,
    pub cpu_s: f64,
    pub peak_rss_bytes: u64,
    pub lines_per_s: f64,
    pub lines_per_cpu_s: f64,
    pub mb_per_cpu_s: f64,
    /// MB of the corpus per second of wall time (draining a backlog).
    pub mb_per_s: f64,
    pub streams: usize,
    pub label_names: Vec<String>,
    /// Store runs: the rows LogsQL counts under the run's tenant once the proxy had
    /// every entry acknowledged (`None`: null sink, or the store could not be asked).
    pub store_rows: Option<u64>,
    /// The run's numeric tenant (VictoriaLogs `AccountID`; Loki `X-Scope-OrgID`).
    pub tenant: String,
    /// CPU seconds the whole machine spent during the run besides this process: how much
    /// the measurement was contended (2 shared cores).
    pub other_cpu_s: f64,
}

pub struct CorpusJob<'a> {
    pub subject: Subject,
    pub sink: Sink,
    pub shape: Shape,
    pub index: usize,
    pub bins: &'a Binaries,
    pub pods_root: &'a Path,
    pub receiver: &'a Receiver,
    /// The store's base URL (store runs): its rows are counted after the run.
    pub store_url: Option<&'a str>,
    pub expected_entries: u64,
    pub corpus_bytes: u64,
    pub run_dir: PathBuf,
    pub timeout: Duration,
    /// Abort when no entry arrived for this long.
    pub stall: Duration,
}

pub async fn corpus_run(job: CorpusJob<'_>) -> CorpusRun {
    // Numeric (VictoriaLogs' tenants are) and fresh: runs never see each other's rows.
    let tenant = logpipe_e2e::store::unique_tenant();
    let mut run = CorpusRun {
        subject: job.subject,
        sink: job.sink,
        shape: job.shape,
        index: job.index,
        ok: false,
        error: None,
        expected_entries: job.expected_entries,
        received_entries: 0,
        extra_entries: 0,
        wall_s: 0.0,
        cpu_s: 0.0,
        peak_rss_bytes: 0,
        lines_per_s: 0.0,
        lines_per_cpu_s: 0.0,
        mb_per_cpu_s: 0.0,
        mb_per_s: 0.0,
        streams: 0,
        label_names: Vec::new(),
        store_rows: None,
        tenant: tenant.clone(),
        other_cpu_s: 0.0,
    };
    let tally = job.receiver.tally(&tenant);
    let busy_before = procstat::machine_busy_s();
    let mut process = match start(
        job.subject,
        job.bins,
        job.pods_root,
        job.receiver,
        &tenant,
        &job.run_dir,
    ) {
        Ok(p) => p,
        Err(e) => {
            run.error = Some(e.to_string());
            return run;
        }
    };
    let mut last = Sample::default();
    let mut last_count = 0;
    let mut last_progress = Instant::now();
    let outcome: Result<(), String> = loop {
        // Sample first, then look at the count: the CPU figure may include up to one
        // interval of work after the last entry, never miss work before it.
        if let Ok(s) = procstat::sample(process.pid) {
            last = s;
        }
        let count = tally.entries();
        if count >= job.expected_entries {
            if let Ok(s) = procstat::sample(process.pid) {
                last = s;
            }
            break Ok(());
        }
        if count != last_count {
            last_count = count;
            last_progress = Instant::now();
        }
        if let Some(why) = process.exited() {
            break Err(why);
        }
        if process.started.elapsed() > job.timeout {
            break Err(format!("timed out after {:?}", job.timeout));
        }
        if last_progress.elapsed() > job.stall {
            break Err(format!("no entry for {:?} (stalled)", job.stall));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    run.wall_s = process.started.elapsed().as_secs_f64();
    run.cpu_s = last.cpu_s;
    run.peak_rss_bytes = last.hwm;
    if let (Some(before), Some(after)) = (busy_before, procstat::machine_busy_s()) {
        run.other_cpu_s = (after - before - run.cpu_s).max(0.0);
    }
    match outcome {
        Ok(()) => {
            // Anything arriving now is a duplicate (or a count we got wrong).
            tokio::time::sleep(Duration::from_secs(2)).await;
            run.received_entries = tally.entries();
            run.extra_entries = run.received_entries.saturating_sub(job.expected_entries);
            run.ok = run.extra_entries == 0;
            if !run.ok {
                run.error = Some(format!(
                    "{} entries more than the corpus holds",
                    run.extra_entries
                ));
            }
            if let Some(url) = job.store_url {
                match store_rows(url, &tenant, run.received_entries).await {
                    Ok(rows) => {
                        run.store_rows = Some(rows);
                        if rows != run.received_entries && run.ok {
                            run.ok = false;
                            run.error = Some(format!(
                                "the store acknowledged {} entries but LogsQL counts {rows} rows under tenant {tenant}",
                                run.received_entries
                            ));
                        }
                    }
                    Err(e) => {
                        run.ok = false;
                        run.error = Some(format!("cannot count the rows in the store: {e}"));
                    }
                }
            }
        }
        Err(why) => {
            run.received_entries = tally.entries();
            run.error = Some(format!(
                "{} received {} of {} entries: {why}",
                job.subject.name(),
                run.received_entries,
                job.expected_entries
            ));
        }
    }
    if let Ok(s) = procstat::sample(process.pid) {
        run.peak_rss_bytes = run.peak_rss_bytes.max(s.hwm);
    }
    drop(process);
    let (streams, sample) = tally.streams();
    run.streams = streams;
    run.label_names = sample.as_deref().map(label_names).unwrap_or_default();
    if run.cpu_s > 0.0 {
        run.lines_per_cpu_s = job.expected_entries as f64 / run.cpu_s;
        run.mb_per_cpu_s = job.corpus_bytes as f64 / 1e6 / run.cpu_s;
    }
    if run.wall_s > 0.0 {
        run.lines_per_s = job.expected_entries as f64 / run.wall_s;
        run.mb_per_s = job.corpus_bytes as f64 / 1e6 / run.wall_s;
    }
    job.receiver.forget(&tenant);
    run
}

/// Wait until `url` answers 200 (the agent is up), at most `limit`.
pub async fn wait_ready(url: &str, limit: Duration) -> bool {
    let http = logpipe_e2e::http_client();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(answer) = http.get(url).timeout(Duration::from_secs(1)).send().await
            && answer.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Rows under `tenant` in the VictoriaLogs at `base` (LogsQL `* | stats count()` with
/// the `AccountID` header), asked until it reaches `want` or 30 s pass: freshly
/// acknowledged rows become searchable within a few seconds.
pub async fn store_rows(base: &str, tenant: &str, want: u64) -> Result<u64, String> {
    let http = logpipe_e2e::http_client();
    let (account, project) =
        logpipe_e2e::store::tenant_headers(tenant).map_err(|e| e.to_string())?;
    let url = format!("{}/select/logsql/stats_query", base.trim_end_matches('/'));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = http
            .post(&url)
            .header("AccountID", account.to_string())
            .header("ProjectID", project.to_string())
            .query(&[("query", "* | stats count() rows")])
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = answer.status();
        let body: serde_json::Value = answer.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {body}"));
        }
        let rows = stats_rows(&body).ok_or_else(|| format!("unexpected answer {body}"))?;
        if rows >= want || Instant::now() > deadline {
            return Ok(rows);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The `rows` value of a `/select/logsql/stats_query` answer (0 when no row matched).
pub fn stats_rows(body: &serde_json::Value) -> Option<u64> {
    let result = body.pointer("/data/result")?.as_array()?;
    match result.first() {
        None => Some(0),
        Some(sample) => sample.pointer("/value/1")?.as_str()?.parse().ok(),
    }
}

/// Labels both agents give a stream, for the report.
pub fn expected_label_names() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        (
            "container",
            "path; collector: k8s.container.name (resource, from the path)",
        ),
        (
            "filename",
            "path; collector: log.file.path (record attribute)",
        ),
        (
            "namespace",
            "path; collector: k8s.namespace.name (resource, from the path)",
        ),
        (
            "node_name",
            "flag; collector: k8s.node.name (static resource attribute)",
        ),
        (
            "pod",
            "path; collector: k8s.pod.name (resource, from the path)",
        ),
        (
            "stream",
            "cri stage; collector: log.iostream (record attribute)",
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_answers_count_rows() {
        let some = serde_json::json!({"status":"success","data":{"resultType":"vector","result":[{"metric":{"__name__":"rows"},"value":[1796167083.6,"1234"]}]}});
        assert_eq!(stats_rows(&some), Some(1234));
        let none =
            serde_json::json!({"status":"success","data":{"resultType":"vector","result":[]}});
        assert_eq!(stats_rows(&none), Some(0));
        assert_eq!(stats_rows(&serde_json::json!({})), None);
    }

    #[test]
    fn the_collector_config_names_the_tenant_and_the_batch() {
        let config = otelcol_config("http://127.0.0.1:9/v1/logs", "4242", Path::new("/p"), 7);
        assert!(config.contains(r#"include: ["/p/*/*/*.log"]"#));
        assert!(config.contains(r#"AccountID: "4242""#));
        assert!(config.contains("compression: snappy"));
        assert!(config.contains("min_size: 1048576"));
        assert!(config.contains("port: 7"));
    }
}
