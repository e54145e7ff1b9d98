//! One measured run: start an agent (ours or Promtail) on a log tree, pushing to a
//! receiver under a fresh tenant, and watch it until the receiver holds every entry.
//!
//! Both agents get the same work: read every `<root>/<pod dir>/<container>/*.log` from the
//! start (fresh positions), parse CRI (joining partial lines), label each stream with
//! `node_name`, `namespace`, `pod`, `container`, `filename` and `stream`, batch up to
//! 1 MiB of lines or 1 s, push snappy protobuf. Ours derives the labels from the path
//! (no `--kubeconfig`); Promtail gets one static target per container directory whose
//! `__path__` a relabel rule turns into the same labels, computed once per target as its
//! Kubernetes discovery would, not once per line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::BenchError;
use super::corpus::ContainerFile;
use super::procstat::{self, Sample};
use super::receiver::{Receiver, label_names};

pub const NODE_NAME: &str = "bench-node";
pub const BATCH_BYTES: u64 = 1024 * 1024;
pub const BATCH_WAIT: &str = "1s";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Subject {
    Agent,
    Promtail,
}

impl Subject {
    pub fn name(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Promtail => "promtail",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sink {
    Null,
    Loki,
}

/// Binaries under test.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub agent: PathBuf,
    pub promtail: PathBuf,
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

/// Start `subject` reading `pods_root` (whose container files are `files`), pushing to
/// `push_url` as `tenant`; its config, positions and log go to `run_dir`.
pub fn start(
    subject: Subject,
    bins: &Binaries,
    pods_root: &Path,
    files: &[ContainerFile],
    push_url: &str,
    tenant: &str,
    run_dir: &Path,
) -> Result<Running, BenchError> {
    std::fs::create_dir_all(run_dir).map_err(BenchError::io(run_dir))?;
    let port = free_port()?;
    let log = run_dir.join(format!("{}.log", subject.name()));
    let (config, mut command, http) = match subject {
        Subject::Agent => {
            let config = agent_config(
                push_url,
                tenant,
                pods_root,
                &run_dir.join("positions.json"),
                port,
            );
            let mut command = Command::new(&bins.agent);
            command
                .arg("--config")
                .arg(run_dir.join("agent.yaml"))
                .arg("--node-name")
                .arg(NODE_NAME)
                .arg("--log-format")
                .arg("text")
                .env("RUST_LOG", "warn");
            (config, command, format!("http://127.0.0.1:{port}/-/ready"))
        }
        Subject::Promtail => {
            let config = promtail_config(
                push_url,
                tenant,
                pods_root,
                files,
                &run_dir.join("positions.yaml"),
                port,
            );
            let mut command = Command::new(&bins.promtail);
            command
                .arg("-config.file")
                .arg(run_dir.join("promtail.yaml"));
            (config, command, format!("http://127.0.0.1:{port}/ready"))
        }
    };
    let config_path = run_dir.join(match subject {
        Subject::Agent => "agent.yaml",
        Subject::Promtail => "promtail.yaml",
    });
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
        "loki:\n  url: {push_url}\n  tenant: {tenant}\n  batchWait: {BATCH_WAIT}\n  batchBytes: {BATCH_BYTES}\n\
         logRoot: {root}\npositionsFile: {positions}\nlisten: 127.0.0.1:{port}\npipeline:\n  - cri: {{}}\n",
        root = pods_root.display(),
        positions = positions.display(),
    )
}

/// Promtail's config: one static target per container directory, labels from `__path__`.
pub fn promtail_config(
    push_url: &str,
    tenant: &str,
    pods_root: &Path,
    files: &[ContainerFile],
    positions: &Path,
    port: u16,
) -> String {
    let mut targets = String::new();
    for file in files {
        targets.push_str(&format!(
            "      - targets: [localhost]\n        labels:\n          __path__: {}/*.log\n",
            pods_root.join(file.rel_dir()).display()
        ));
    }
    format!(
        r#"server:
  http_listen_address: 127.0.0.1
  http_listen_port: {port}
  grpc_listen_address: 127.0.0.1
  grpc_listen_port: 0
  log_level: warn
positions:
  filename: {positions}
clients:
  - url: {push_url}
    tenant_id: {tenant}
    batchwait: {BATCH_WAIT}
    batchsize: {BATCH_BYTES}
scrape_configs:
  - job_name: kubernetes-pods
    pipeline_stages:
      - cri: {{}}
    relabel_configs:
      - source_labels: [__path__]
        regex: '.*/([^/_]+)_([^/_]+)_[^/_]+/([^/]+)/\*\.log'
        target_label: namespace
        replacement: $1
      - source_labels: [__path__]
        regex: '.*/([^/_]+)_([^/_]+)_[^/_]+/([^/]+)/\*\.log'
        target_label: pod
        replacement: $2
      - source_labels: [__path__]
        regex: '.*/([^/_]+)_([^/_]+)_[^/_]+/([^/]+)/\*\.log'
        target_label: container
        replacement: $3
      - target_label: node_name
        replacement: {NODE_NAME}
    static_configs:
{targets}"#,
        positions = positions.display(),
    )
}

/// Figures of one run over the corpus.
#[derive(Clone, Debug, Serialize)]
pub struct CorpusRun {
    pub subject: Subject,
    pub sink: Sink,
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
    pub streams: usize,
    pub label_names: Vec<String>,
    /// CPU seconds the whole machine spent during the run besides this process: how much
    /// the measurement was contended (2 shared cores).
    pub other_cpu_s: f64,
}

pub struct CorpusJob<'a> {
    pub subject: Subject,
    pub sink: Sink,
    pub index: usize,
    pub bins: &'a Binaries,
    pub pods_root: &'a Path,
    pub files: &'a [ContainerFile],
    pub receiver: &'a Receiver,
    pub expected_entries: u64,
    pub corpus_bytes: u64,
    pub run_dir: PathBuf,
    pub timeout: Duration,
    /// Abort when no entry arrived for this long.
    pub stall: Duration,
}

pub async fn corpus_run(job: CorpusJob<'_>) -> CorpusRun {
    let tenant = format!(
        "bench-{}-{}-{}",
        job.subject.name(),
        job.index,
        crate::unique_suffix()
    );
    let mut run = CorpusRun {
        subject: job.subject,
        sink: job.sink,
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
        streams: 0,
        label_names: Vec::new(),
        other_cpu_s: 0.0,
    };
    let tally = job.receiver.tally(&tenant);
    let busy_before = procstat::machine_busy_s();
    let mut process = match start(
        job.subject,
        job.bins,
        job.pods_root,
        job.files,
        &job.receiver.push_url(),
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
    }
    job.receiver.forget(&tenant);
    run
}

/// Wait until `url` answers 200 (the agent is up), at most `limit`.
pub async fn wait_ready(url: &str, limit: Duration) -> bool {
    let http = crate::http_client();
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

/// Labels both agents give a stream, for the report.
pub fn expected_label_names() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("container", "path"),
        ("filename", "path"),
        ("namespace", "path"),
        ("node_name", "flag / static"),
        ("pod", "path"),
        ("stream", "cri stage"),
    ])
}
