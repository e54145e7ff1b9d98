//! Wiring: discovery, tailer (its own thread), pipeline, shipper, positions writer and the
//! metrics server, and the shutdown sequence.
//!
//! Shutdown (SIGTERM/SIGINT): stop reading; the shipper pushes what it holds and waits for
//! Loki's answers, up to `shutdownTimeout`; then positions are saved — committed offsets
//! only, so whatever Loki did not acknowledge (and any partial line still held) is read
//! again by the next agent. Exit 0.
//!
//! Labels of a file whose pod discovery does not know yet: while discovery has not
//! listed the node's pods the file waits (up to [`WAIT_FOR_SYNC`]); once listed, an unknown
//! pod waits [`WAIT_FOR_POD`]; then the file is read with labels derived from its path,
//! and re-labelled as soon as the pod becomes known.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ConfigError};
use crate::discovery::{self, DiscoveryError, PodIndex};
use crate::entry::{Entry, LabelSet, Tenant};
use crate::loki::client::{LokiClient, LokiError};
use crate::loki::{self, Shipper, ShipperConfig};
use crate::metrics::{Metrics, ReasonLabel};
use crate::positions::{self, FileFacts, Fingerprint, PositionsDoc, PositionsError, PositionsFile};
use crate::relabel::{self, RelabelError, Relabeler};
use crate::selection::{self, NamespaceIndex, Verdict};
use crate::server::{self, Health, ServerError};
use crate::stages::{Pipeline, PipelineStats, StageError, StreamState};
use crate::tail::ack::Ledger;
use crate::tail::{FileInfo, LineHandler, LineOutcome, TailConfig, Tailer, now_ms};
use crate::tenant::{self, FileTenant, TenantResolver};

/// Longest wait for discovery's first list before files are read with path labels.
pub const WAIT_FOR_SYNC: Duration = Duration::from_secs(30);
/// Longest wait for an unknown pod once discovery has listed the node.
pub const WAIT_FOR_POD: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid config: {0}")]
    Relabel(#[from] RelabelError),
    #[error("invalid config: {0}")]
    Stage(#[from] StageError),
    #[error(transparent)]
    Positions(#[from] PositionsError),
    #[error(transparent)]
    Loki(#[from] LokiError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("cannot start the tailer thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
    #[error("invalid config: selector needs pod discovery (run in a cluster or pass --kubeconfig)")]
    SelectorWithoutDiscovery,
    #[error("invalid config: loki.tenantFrom: {0}")]
    TenantFrom(String),
    #[error(
        "invalid config: loki.tenantFrom from a pod or namespace needs pod discovery (run in a cluster or pass --kubeconfig)"
    )]
    TenantFromWithoutDiscovery,
}

/// Settings that come from flags, not from the config document.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
    /// A Promtail `positions.yaml` to start from when there is no positions file yet.
    pub import_promtail_positions: Option<PathBuf>,
}

/// Per-file state of the pipeline handler.
pub struct FileStream {
    state: StreamState,
    /// `None`: a relabel keep/drop rule dropped this target; its lines are skipped.
    labels: Option<LabelSet>,
    /// Tenant of the file's entries (`None`: `loki.tenant`) and whether that is a fallback
    /// from an invalid value.
    tenant: Option<Tenant>,
    tenant_fallback: bool,
    seen_version: u64,
}

/// Which pods are shipped, and to which tenant: the config's selector and `tenantFrom`,
/// and, for a namespace selector or a namespace label tenant, the namespaces' labels.
pub struct Selection {
    pub selector: logpipe_api::selector::PodSelection,
    pub namespaces: Option<Arc<NamespaceIndex>>,
    pub tenants: TenantResolver,
}

/// The tailer's handler: labels from discovery (or the path), then the pipeline.
pub struct PipelineHandler {
    pipeline: Arc<Pipeline>,
    relabeler: Arc<Relabeler>,
    index: Arc<PodIndex>,
    selection: Selection,
    node: String,
    stats: PipelineStats,
    metrics: Arc<Metrics>,
    /// The clock, read once per visit of a file ([`LineHandler::refresh`]) rather than
    /// per line: a visit reads at most the per-file budget, a few milliseconds of work,
    /// and the lines a parser could not time, multiline waits and rate limits can take
    /// the visit's start for "now".
    now_ns: i64,
}

impl PipelineHandler {
    pub fn new(
        pipeline: Arc<Pipeline>,
        relabeler: Arc<Relabeler>,
        index: Arc<PodIndex>,
        selection: Selection,
        node: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            pipeline,
            relabeler,
            index,
            selection,
            node,
            stats: PipelineStats::default(),
            metrics,
            now_ns: now_ns(),
        }
    }

    /// Moves whenever a pod or a namespace changed (both counters only grow).
    fn version(&self) -> u64 {
        let namespaces = self
            .selection
            .namespaces
            .as_ref()
            .map_or(0, |n| n.version());
        self.index.version().wrapping_add(namespaces)
    }

    fn file_tenant(&mut self, uid: &str) -> FileTenant {
        let pod = self.index.get(uid);
        let selection = &mut self.selection;
        selection
            .tenants
            .for_pod(pod.as_ref(), selection.namespaces.as_deref())
    }

    /// Give each entry of `out` its tenant: a `field` value (checked), else the file's.
    fn assign_tenants(&mut self, stream: &FileStream, out: &mut [Entry]) {
        let mut fallbacks = 0;
        for entry in out {
            match entry.tenant.take() {
                Some(value) => {
                    entry.tenant = self.selection.tenants.checked(&value);
                    fallbacks += u64::from(entry.tenant.is_none());
                }
                None => {
                    entry.tenant = stream.tenant.clone();
                    fallbacks += u64::from(stream.tenant_fallback);
                }
            }
        }
        if fallbacks > 0 {
            self.metrics.tenant_fallback_entries.inc_by(fallbacks);
        }
    }

    fn verdict(&self, uid: &str) -> Verdict {
        let pod = self.index.get(uid);
        selection::decide(
            &self.selection.selector,
            pod.as_ref(),
            self.selection.namespaces.as_deref(),
        )
    }

    /// `None`: the file's lines are skipped (pod not selected, or dropped by relabeling).
    fn labels(&self, file: &FileInfo) -> Option<LabelSet> {
        let pod = file.pod.as_ref()?;
        if self.verdict(&pod.uid) != Verdict::Ship {
            return None;
        }
        let known = self.index.get(&pod.uid);
        let empty = BTreeMap::new();
        let meta = match &known {
            Some(p) => relabel::pod_meta_labels(
                &p.namespace,
                &p.name,
                &p.uid,
                &self.node,
                &pod.container,
                &p.labels,
                &p.annotations,
                p.controller.as_ref().map(|(k, n)| (k.as_str(), n.as_str())),
            ),
            None => relabel::pod_meta_labels(
                &pod.namespace,
                &pod.pod,
                &pod.uid,
                &self.node,
                &pod.container,
                &empty,
                &empty,
                None,
            ),
        };
        let mut labels = self.relabeler.apply(&meta)?;
        // Promtail's `filename`: the active file's name, so a rotated file stays in its stream.
        let filename = file
            .path
            .parent()
            .map(|dir| dir.join(format!("{}.log", pod.restart)))
            .unwrap_or_else(|| file.path.clone());
        labels.insert("filename".into(), filename.display().to_string());
        Some(Arc::new(labels))
    }

    fn publish_stats(&mut self) {
        let s = std::mem::take(&mut self.stats);
        if s.malformed_lines > 0 {
            self.metrics.malformed_lines.inc_by(s.malformed_lines);
        }
        if s.split_lines > 0 {
            self.metrics.split_lines.inc_by(s.split_lines);
        }
        if s.invalid_utf8_lines > 0 {
            self.metrics.invalid_utf8_lines.inc_by(s.invalid_utf8_lines);
        }
        for (reason, n) in s.dropped {
            self.metrics
                .pipeline_dropped
                .get_or_create(&ReasonLabel { reason })
                .inc_by(n);
        }
    }
}

fn now_ns() -> i64 {
    now_ms().saturating_mul(1_000_000)
}

impl LineHandler for PipelineHandler {
    type Stream = FileStream;

    fn open(&mut self, file: &FileInfo) -> Option<FileStream> {
        let pod = file.pod.as_ref()?;
        // A selector never ships on a guess: the file waits until the pod is known.
        if self.verdict(&pod.uid) == Verdict::Wait {
            return None;
        }
        // Nor to the default tenant on a guess.
        let FileTenant::Known {
            tenant,
            fallback: tenant_fallback,
        } = self.file_tenant(&pod.uid)
        else {
            return None;
        };
        if self.index.is_enabled() && self.index.get(&pod.uid).is_none() {
            let waited = file.first_seen.elapsed();
            let limit = if self.index.is_synced() {
                WAIT_FOR_POD
            } else {
                WAIT_FOR_SYNC
            };
            if waited < limit {
                return None;
            }
            tracing::info!(path = %file.path.display(), "pod unknown to discovery, using labels from the path");
        }
        Some(FileStream {
            state: self.pipeline.stream(),
            labels: self.labels(file),
            tenant,
            tenant_fallback,
            seen_version: self.version(),
        })
    }

    fn refresh(&mut self, file: &FileInfo, stream: &mut FileStream) {
        self.now_ns = now_ns();
        let version = self.version();
        if version != stream.seen_version {
            stream.seen_version = version;
            stream.labels = self.labels(file);
            // A namespace or pod relabelled: new entries go to its new tenant. While the
            // pod is unknown again (deleted), its remaining lines keep the last one.
            if let Some(pod) = file.pod.as_ref()
                && let FileTenant::Known { tenant, fallback } = self.file_tenant(&pod.uid)
            {
                stream.tenant = tenant;
                stream.tenant_fallback = fallback;
            }
        }
    }

    fn line(
        &mut self,
        stream: &mut FileStream,
        raw: &[u8],
        start: u64,
        end: u64,
        out: &mut Vec<Entry>,
    ) -> LineOutcome {
        // A target a relabel rule dropped: its lines are skipped on purpose.
        let Some(labels) = stream.labels.as_ref() else {
            return LineOutcome::DONE;
        };
        let before = out.len();
        let outcome = self.pipeline.push(
            &mut stream.state,
            raw,
            start,
            end,
            labels,
            self.now_ns,
            out,
            &mut self.stats,
        );
        if let Some(new) = out.get_mut(before..) {
            self.assign_tenants(stream, new);
        }
        LineOutcome {
            wait: outcome.wait,
            decided: outcome.decided,
        }
    }

    fn flush(&mut self, stream: &mut FileStream, force: bool, out: &mut Vec<Entry>) {
        let before = out.len();
        self.pipeline
            .flush(&mut stream.state, now_ns(), force, out, &mut self.stats);
        if let Some(new) = out.get_mut(before..) {
            self.assign_tenants(stream, new);
        }
        self.publish_stats();
    }

    fn held_from(&self, stream: &FileStream) -> Option<u64> {
        stream.state.held_from()
    }
}

/// What the positions file and an optional Promtail import give at start.
fn load_positions(
    file: &PositionsFile,
    import: Option<&PathBuf>,
) -> Result<(BTreeMap<String, positions::PositionRecord>, i64), RuntimeError> {
    let now = now_ms();
    let doc: Option<PositionsDoc> = match file.load() {
        Ok(doc) => doc,
        Err(PositionsError::Corrupt { path, message }) => {
            let aside = file.quarantine(now)?;
            tracing::error!(path, message, aside = %aside.display(), "positions file corrupt, moved aside; starting without positions");
            None
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(doc) = doc {
        tracing::info!(files = doc.files.len(), "positions loaded");
        return Ok((doc.files, doc.saved_at_ms));
    }
    let Some(import) = import else {
        return Ok((BTreeMap::new(), now));
    };
    let yaml = std::fs::read_to_string(import).map_err(|source| PositionsError::Read {
        path: import.display().to_string(),
        source,
    })?;
    let records = positions::import_promtail(&import.display().to_string(), &yaml, now, |path| {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        let mut prefix = Vec::new();
        std::fs::File::open(path)
            .ok()?
            .take(positions::FINGERPRINT_BYTES as u64)
            .read_to_end(&mut prefix)
            .ok()?;
        Some(FileFacts {
            dev: meta.dev(),
            inode: meta.ino(),
            size: meta.len(),
            fingerprint: Fingerprint::of(&prefix),
        })
    })?;
    tracing::info!(files = records.len(), from = %import.display(), "imported Promtail positions");
    Ok((records, now))
}

async fn save_positions(file: &PositionsFile, ledger: &Ledger, metrics: &Metrics) {
    let now = now_ms();
    let doc = PositionsDoc::new(now, ledger.snapshot(now));
    let file = file.clone();
    let result = tokio::task::spawn_blocking(move || file.save(&doc)).await;
    match result {
        Ok(Ok(())) => {
            metrics.positions_commits.inc();
            metrics.positions_last_commit.set(now as f64 / 1000.0);
        }
        Ok(Err(e)) => {
            metrics.positions_commit_errors.inc();
            tracing::error!(error = %e, "saving positions failed");
        }
        Err(e) => {
            metrics.positions_commit_errors.inc();
            tracing::error!(error = %e, "saving positions panicked");
        }
    }
}

/// Save after acknowledgements (so a crash repeats at most the batch in flight) and at
/// least every second while anything changed.
async fn positions_writer(
    file: PositionsFile,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    acked: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut saved = u64::MAX;
    loop {
        tokio::select! {
            _ = acked.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = cancel.cancelled() => return,
        }
        let generation = ledger.generation();
        if generation != saved {
            save_positions(&file, &ledger, &metrics).await;
            saved = generation;
        }
    }
}

async fn wait_for_signal() -> Result<&'static str, RuntimeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(RuntimeError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RuntimeError::Signal)?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Run the agent until SIGTERM/SIGINT.
pub async fn run(config: AgentConfig, options: Options) -> Result<(), RuntimeError> {
    config.validate()?;
    let metrics = Arc::new(Metrics::new());
    let tenant_source = tenant::Source::from_config(config.loki.tenant_from.as_ref())
        .map_err(RuntimeError::TenantFrom)?;
    let pipeline = Arc::new(Pipeline::with_tenant_field(
        &config.pipeline,
        &config.limits,
        tenant_source.as_ref().and_then(tenant::Source::field),
    )?);
    let relabeler = Arc::new(Relabeler::new(&config.relabel)?);
    let listen = server::parse_listen(&config.listen)?;

    let kube = discovery::client(options.kubeconfig.as_deref()).await?;
    let index = Arc::new(match kube {
        Some(_) => PodIndex::enabled(),
        None => PodIndex::disabled(),
    });
    if !config.selector.is_empty() && !index.is_enabled() {
        return Err(RuntimeError::SelectorWithoutDiscovery);
    }
    let by_pod = tenant_source
        .as_ref()
        .is_some_and(tenant::Source::needs_pods);
    if by_pod && !index.is_enabled() {
        return Err(RuntimeError::TenantFromWithoutDiscovery);
    }
    let by_namespace = matches!(tenant_source, Some(tenant::Source::NamespaceLabel(_)));
    let namespaces = (!config.selector.namespace_selector.is_empty() || by_namespace)
        .then(|| Arc::new(NamespaceIndex::default()));
    let health = Arc::new(Health::new(index.is_enabled()));
    metrics.discovery_synced.set(i64::from(!index.is_enabled()));
    let client = LokiClient::new(&config.loki, metrics.clone(), health.clone())?;

    let positions_file = PositionsFile::new(&config.positions_file);
    let (records, baseline_ms) =
        load_positions(&positions_file, options.import_promtail_positions.as_ref())?;
    let ledger = Arc::new(Ledger::new(records));

    let listener = server::bind(listen).await?;
    let cancel = CancellationToken::new();
    let server_task = tokio::spawn(server::serve(
        listener,
        metrics.clone(),
        health.clone(),
        cancel.clone(),
    ));
    let namespace_task = kube.clone().zip(namespaces.clone()).map(|(client, ns)| {
        tokio::spawn(selection::run_namespace_watch(client, ns, cancel.clone()))
    });
    let discovery_task = kube.map(|client| {
        tokio::spawn(discovery::run(
            client,
            options.node_name.clone(),
            index.clone(),
            metrics.clone(),
            health.clone(),
            cancel.clone(),
        ))
    });

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let acked = Arc::new(Notify::new());
    let ship_cancel = CancellationToken::new();
    let mut shipper_task = tokio::spawn(loki::run_shipper(
        Shipper {
            cfg: ShipperConfig {
                batch_wait: config.loki.batch_wait.0,
                batch_bytes: config.loki.batch_bytes,
                external_labels: config.loki.external_labels.clone(),
                max_pushes: loki::inflight::push_limit(
                    config.limits.max_buffered_bytes,
                    config.loki.batch_bytes,
                ),
            },
            client,
            ledger: ledger.clone(),
            metrics: metrics.clone(),
            acked: acked.clone(),
        },
        rx,
        ship_cancel.clone(),
    ));
    let writer_cancel = CancellationToken::new();
    let writer_task = tokio::spawn(positions_writer(
        positions_file.clone(),
        ledger.clone(),
        metrics.clone(),
        acked,
        writer_cancel.clone(),
    ));

    let mut tail_cfg = TailConfig::new(
        &config.log_root,
        config.limits.max_buffered_bytes,
        config.limits.max_line_bytes,
    );
    tail_cfg.baseline_ms = baseline_ms;
    if config.loki.tenant_from.is_some() {
        // A throttled tenant may fill half the buffer; the other half stays for the rest.
        tail_cfg.tenant_buffered_bytes = Some(config.limits.max_buffered_bytes / 2);
    }
    let handler = PipelineHandler::new(
        pipeline,
        relabeler,
        index.clone(),
        Selection {
            selector: config.selector.clone(),
            namespaces,
            tenants: TenantResolver::new(tenant_source),
        },
        options.node_name.clone(),
        metrics.clone(),
    );
    let tailer = Tailer::new(tail_cfg, handler, ledger.clone(), tx, metrics.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let tail_stop = stop.clone();
    let tail_thread = std::thread::Builder::new()
        .name("tailer".into())
        .spawn(move || tailer.run(&tail_stop))
        .map_err(RuntimeError::Thread)?;
    tracing::info!(
        node = %options.node_name,
        log_root = %config.log_root,
        listen = %listen,
        loki = %config.loki.url,
        tenant = %config.loki.tenant,
        discovery = index.is_enabled(),
        "logpipe-agent started"
    );

    let signal = tokio::select! {
        s = wait_for_signal() => s?,
        // The shipper ends on its own only if its input closed: the tailer died.
        _ = &mut shipper_task => "tailer stopped",
    };
    tracing::info!(signal, "shutting down: reading stopped, flushing to Loki");
    stop.store(true, Ordering::Relaxed);
    let joined = tokio::task::spawn_blocking(move || tail_thread.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        tracing::error!("the tailer thread panicked");
    }
    let deadline = config.shutdown_timeout.0;
    if !shipper_task.is_finished() {
        match tokio::time::timeout(deadline, &mut shipper_task).await {
            Ok(_) => tracing::info!("every buffered entry was answered by Loki"),
            Err(_) => {
                tracing::warn!(
                    timeout = %config.shutdown_timeout,
                    unacknowledged_bytes = ledger.buffered_bytes(),
                    "shutdown timeout: entries Loki did not acknowledge will be read again by the next start"
                );
                ship_cancel.cancel();
                let _ = shipper_task.await;
            }
        }
    }
    writer_cancel.cancel();
    let _ = writer_task.await;
    save_positions(&positions_file, &ledger, &metrics).await;
    cancel.cancel();
    for task in discovery_task.into_iter().chain(namespace_task) {
        let _ = task.await;
    }
    match server_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "metrics server"),
        Err(e) => tracing::warn!(error = %e, "metrics server task"),
        Ok(Ok(())) => {}
    }
    tracing::info!("positions saved, bye");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use super::*;
    use crate::podlogs;

    fn handler(source: tenant::Source) -> PipelineHandler {
        let stages = serde_yaml::from_str::<Vec<crate::config::Stage>>(
            "- cri: {}\n- regex: {expression: '^(?P<tenant>\\S*) '}\n",
        )
        .unwrap();
        let pipeline =
            Pipeline::with_tenant_field(&stages, &Default::default(), source.field()).unwrap();
        PipelineHandler::new(
            Arc::new(pipeline),
            Arc::new(Relabeler::new(&[]).unwrap()),
            Arc::new(PodIndex::disabled()),
            Selection {
                selector: Default::default(),
                namespaces: None,
                tenants: TenantResolver::new(Some(source)),
            },
            "node-1".into(),
            Arc::new(Metrics::new()),
        )
    }

    /// A `field` source: a valid value is the entry's tenant, a missing one the default
    /// (not counted), an invalid one the default, counted.
    #[test]
    fn field_tenants_are_checked_and_fallbacks_counted() {
        let mut handler = handler(tenant::Source::Field("tenant".into()));
        let root = Path::new("/var/log/pods");
        let path = root.join("shop_web-0_uid-1/main/0.log");
        let file = FileInfo {
            pod: podlogs::parse(root, &path),
            path,
            first_seen: Instant::now(),
        };
        let mut stream = handler.open(&file).expect("no discovery: opened at once");
        let mut out = Vec::new();
        let time = "2026-12-01T00:00:00.000000000Z";
        for (i, content) in ["12 ok", "a|b bad", " none", "12 again"].iter().enumerate() {
            let raw = format!("{time} stdout F {content}");
            let at = i as u64 * 100;
            handler.line(&mut stream, raw.as_bytes(), at, at + 100, &mut out);
        }
        let tenants: Vec<Option<&str>> = out.iter().map(|e| e.tenant.as_deref()).collect();
        assert_eq!(tenants, [Some("12"), None, None, Some("12")]);
        assert_eq!(handler.metrics.tenant_fallback_entries.get(), 1);
    }
}
