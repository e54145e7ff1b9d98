//! `make bench` (issue 7, agent side): our agent against the OpenTelemetry Collector
//! (filelog receiver + otlphttp exporter, tests/otelcol) on the same logs.
//!
//! ```text
//! corpus (fixed seed, target/bench/corpus) -> page cache warmed
//!   -> for each run, alternating who goes first: agent | otelcol
//!        -> null receiver (Loki push and OTLP/HTTP; counts, 2xx) : wall, CPU s, peak RSS, lines/CPU-s
//!        -> proxy -> VictoriaLogs (test bed, numeric tenant per run, rows counted with
//!           LogsQL afterwards) : the same, at the store's pace
//!   -> steady state at fixed rates (null receiver): CPU share, RSS
//!   -> target/bench/results.{json,md,png}
//! ```
//!
//! Every loop is bounded (run timeout, stall timeout, drain timeout), every process is
//! killed when its run ends (see [`runner::Running`]), everything listens on 127.0.0.1.
//! CPU seconds are the headline (the machine's 2 cores are shared with other work, which
//! moves wall time much more than CPU time); each run records how much CPU the rest of
//! the machine used meanwhile.

pub mod corpus;
pub mod operator;
pub mod procstat;
pub mod receiver;
pub mod report;
pub mod rng;
pub mod runner;
pub mod steady;

use std::path::{Path, PathBuf};
use std::time::Duration;

use self::corpus::{Manifest, Shape};
use self::receiver::Receiver;
use self::runner::{Binaries, CorpusJob, CorpusRun, Sink, Subject};
use self::steady::{SteadyJob, SteadyRun};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Testbed(#[from] logpipe_e2e::TestbedError),
    #[error("{0}")]
    Other(String),
}

impl BenchError {
    /// `map_err(BenchError::io(path))`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Corpus size presets.
#[derive(Clone, Debug)]
pub struct Size {
    pub name: String,
    pub bytes: u64,
}

impl Size {
    /// `small` (96 MiB), `default`/`full`/empty (1 GiB), or a number of MiB.
    pub fn parse(text: &str) -> Result<Self, BenchError> {
        let bytes = match text {
            "small" => 96 << 20,
            "" | "default" | "full" => 1 << 30,
            mib => mib
                .trim_end_matches("MiB")
                .parse::<u64>()
                .map(|m| m << 20)
                .map_err(|_| {
                    BenchError::Other(format!(
                        "BENCH_SIZE {text:?}: expected small, default or a number of MiB"
                    ))
                })?,
        };
        Ok(Self {
            name: if text.is_empty() {
                "default".into()
            } else {
                text.into()
            },
            bytes,
        })
    }

    pub fn is_small(&self) -> bool {
        self.bytes <= 128 << 20
    }
}

/// Everything one `make bench` does.
#[derive(Clone, Debug)]
pub struct Options {
    pub size: Size,
    /// Corpus shapes, each read by every subject into every sink (long first).
    pub shapes: Vec<Shape>,
    pub seed: u64,
    pub runs: usize,
    pub out: PathBuf,
    pub bins: Binaries,
    /// Base URL of the test bed's VictoriaLogs; `None` skips the store runs (with the reason).
    pub store_url: Option<String>,
    pub store_skip_reason: Option<String>,
    pub steady_rates: Vec<u64>,
    pub steady_duration: Duration,
    pub steady_warmup: Duration,
    pub steady_containers: usize,
    /// Who is measured (all unless `--subjects` says otherwise).
    pub subjects: Vec<Subject>,
    pub command: String,
}

/// Everything measured.
#[derive(Debug)]
pub struct Outcome {
    /// The long shape's corpus (the headline figures since issue 7), or the first shape run.
    pub manifest: Manifest,
    /// Every shape's corpus, in run order.
    pub manifests: Vec<Manifest>,
    pub corpus_runs: Vec<CorpusRun>,
    pub steady_runs: Vec<SteadyRun>,
    pub store_version: Option<String>,
    pub load_before: Option<String>,
    pub load_after: Option<String>,
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn say(message: impl AsRef<str>) {
    eprintln!("[bench] {}", message.as_ref());
}

pub async fn run(options: &Options) -> Result<Outcome, BenchError> {
    std::fs::create_dir_all(&options.out).map_err(BenchError::io(&options.out))?;
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.trim().to_string());
    let mut corpora = Vec::new();
    for &shape in &options.shapes {
        let corpus_dir = options.out.join(shape.dir_name());
        say(format!(
            "corpus ({} shape): {} ({} MiB, seed {:#x})",
            shape.name(),
            corpus_dir.display(),
            options.size.bytes >> 20,
            options.seed
        ));
        let manifest = {
            let dir = corpus_dir.clone();
            let (seed, bytes) = (options.seed, options.size.bytes);
            tokio::task::spawn_blocking(move || corpus::ensure(&dir, seed, bytes, shape))
                .await
                .map_err(|e| BenchError::Other(format!("corpus task: {e}")))??
        };
        say(manifest.summary());
        corpora.push((corpus::pods_root(&corpus_dir), manifest));
    }
    let Some(first) = corpora.first().map(|(_, m)| m.clone()) else {
        return Err(BenchError::Other("no corpus shape to run".into()));
    };

    let null = Receiver::start(None).await?;
    let (proxy, store_version) = match &options.store_url {
        Some(url) => (
            Some(Receiver::start(Some(url)).await?),
            store_version(url).await,
        ),
        None => (None, None),
    };
    let stall = Duration::from_secs(60);
    let mut corpus_runs = Vec::new();
    let sinks: Vec<(Sink, &Receiver)> = std::iter::once((Sink::Null, &null))
        .chain(proxy.as_ref().map(|p| (Sink::Store, p)))
        .collect();
    for (pods_root, manifest) in &corpora {
        let shape = manifest.shape;
        warm_cache(pods_root, manifest)?;
        // Generous bounds: 60 s plus 1 s per MB, and a minute without progress is a failure.
        let timeout = Duration::from_secs(60 + manifest.bytes / 1_000_000);
        for (sink, receiver) in &sinks {
            for index in 0..options.runs {
                // Alternate who goes first, so a slow spell on the machine hits both.
                let mut order = Subject::ALL;
                if index % 2 == 1 {
                    order.reverse();
                }
                for subject in order {
                    if !options.subjects.contains(&subject) {
                        continue;
                    }
                    let run_dir = options.out.join("runs").join(
                        format!("{}-{}-{:?}-{index}", subject.name(), shape.name(), sink)
                            .to_lowercase(),
                    );
                    if run_dir.exists() {
                        std::fs::remove_dir_all(&run_dir).map_err(BenchError::io(&run_dir))?;
                    }
                    let run = runner::corpus_run(CorpusJob {
                        subject,
                        sink: *sink,
                        shape,
                        index,
                        bins: &options.bins,
                        pods_root,
                        receiver,
                        store_url: match sink {
                            Sink::Store => options.store_url.as_deref(),
                            Sink::Null => None,
                        },
                        expected_entries: manifest.entries,
                        corpus_bytes: manifest.bytes,
                        run_dir,
                        timeout,
                        stall,
                    })
                    .await;
                    say(format!(
                        "{:<8} {:<5} -> {:<5?} run {index}: {} wall {:.2}s cpu {:.2}s ({:.0} lines/cpu-s, {:.1} MB/cpu-s, {:.1} MB/s) peak rss {:.1} MiB, machine else {:.1} cpu-s{}",
                        subject.name(),
                        shape.name(),
                        sink,
                        if run.ok { "ok" } else { "FAILED" },
                        run.wall_s,
                        run.cpu_s,
                        run.lines_per_cpu_s,
                        run.mb_per_cpu_s,
                        run.mb_per_s,
                        run.peak_rss_bytes as f64 / 1048576.0,
                        run.other_cpu_s,
                        run.error
                            .as_deref()
                            .map(|e| format!(" — {e}"))
                            .unwrap_or_default()
                    ));
                    corpus_runs.push(run);
                }
            }
        }
    }

    let mut steady_runs = Vec::new();
    for &rate in &options.steady_rates {
        for subject in Subject::ALL {
            if !options.subjects.contains(&subject) {
                continue;
            }
            let run = steady::steady_run(SteadyJob {
                subject,
                rate,
                duration: options.steady_duration,
                warmup: options.steady_warmup,
                containers: options.steady_containers,
                bins: &options.bins,
                receiver: &null,
                dir: steady::dir(&options.out.join("runs"), subject, rate),
            })
            .await;
            say(format!(
                "{:<8} steady {rate} lines/s: {} cpu {:.3} cores, rss mean {:.1} MiB max {:.1} MiB (wrote {:.0}/s, received {}/{}){}",
                subject.name(),
                if run.ok { "ok" } else { "FAILED" },
                run.cpu_share,
                run.rss_mean_bytes as f64 / 1048576.0,
                run.rss_max_bytes as f64 / 1048576.0,
                run.written_lines_s,
                run.received,
                run.written,
                run.error
                    .as_deref()
                    .map(|e| format!(" — {e}"))
                    .unwrap_or_default()
            ));
            steady_runs.push(run);
        }
    }
    let load_after = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.trim().to_string());
    let manifest = corpora
        .iter()
        .map(|(_, m)| m)
        .find(|m| m.shape == Shape::Long)
        .cloned()
        .unwrap_or(first);
    Ok(Outcome {
        manifest,
        manifests: corpora.into_iter().map(|(_, m)| m).collect(),
        corpus_runs,
        steady_runs,
        store_version,
        load_before,
        load_after,
    })
}

/// Read every corpus file once so every subject starts from a warm page cache.
fn warm_cache(root: &Path, manifest: &Manifest) -> Result<(), BenchError> {
    let mut buf = vec![0u8; 1 << 20];
    for file in &manifest.files {
        let path = root.join(file.rel_path());
        let mut handle = std::fs::File::open(&path).map_err(BenchError::io(&path))?;
        while std::io::Read::read(&mut handle, &mut buf).map_err(BenchError::io(&path))? > 0 {}
    }
    Ok(())
}

/// The store's version from its `/metrics` (`vm_app_version{short_version=...}`; empty
/// for a `go install` build, whose version is then the pinned one).
async fn store_version(url: &str) -> Option<String> {
    let answer = logpipe_e2e::http_client()
        .get(format!("{}/metrics", url.trim_end_matches('/')))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()?;
    let text = answer.text().await.ok()?;
    let line = text.lines().find(|l| l.starts_with("vm_app_version{"))?;
    let tail = line.split("short_version=\"").nth(1)?;
    tail.split('"')
        .next()
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// Whether the VictoriaLogs at `url` answers its Loki and OTLP insert paths' readiness.
pub async fn store_ready(url: &str) -> bool {
    runner::wait_ready(
        &format!("{}/insert/loki/ready", url.trim_end_matches('/')),
        Duration::from_secs(3),
    )
    .await
}

/// First line of `<binary> <flag>` (a version banner).
pub fn version_of(binary: &Path, flag: &str) -> Option<String> {
    let output = std::process::Command::new(binary).arg(flag).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    text.lines().next().map(|l| l.trim().to_string())
}

/// A bench binary's `main`: run `work` on a two-worker runtime; print its error, prefixed
/// with `name`, and fail.
pub fn run_main<F>(name: &str, work: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), BenchError>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
