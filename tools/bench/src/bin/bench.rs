//! `logpipe-bench`: our agent against the OpenTelemetry Collector on the same corpus
//! (issue 7), run by `make bench`. Results go to `target/bench/results.{json,md,png}`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use logpipe_bench::corpus::Shape;
use logpipe_bench::runner::{Binaries, Subject};
use logpipe_bench::{self as bench, BenchError, Options, Size, report};

#[derive(Debug, Parser)]
#[command(
    name = "logpipe-bench",
    about = "logpipe-agent vs the OpenTelemetry Collector: throughput per CPU-second, memory, steady state"
)]
struct Args {
    /// `small` (96 MiB, 1 run, short steady state: a few minutes), `default` (1 GiB) or MiB.
    #[arg(long, env = "BENCH_SIZE", default_value = "default")]
    size: String,
    /// Runs per case (median); default 1 for small, 3 otherwise.
    #[arg(long, env = "BENCH_RUNS")]
    runs: Option<usize>,
    /// Corpus seed.
    #[arg(long, default_value_t = 0x10_9919e)]
    seed: u64,
    /// Output directory (corpus, runs, results).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The agent binary (release build).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The collector binary built by the test bed (tests/testbed/build.sh otelcol).
    #[arg(long)]
    otelcol: Option<PathBuf>,
    /// VictoriaLogs base URL; default: the test bed's (target/testbed/store-url).
    #[arg(long)]
    store_url: Option<String>,
    /// Skip the runs into the real store.
    #[arg(long)]
    no_store: bool,
    /// Steady-state rates (lines/s), comma-separated; default 1000,10000,50000 (small: 1000,10000).
    #[arg(long, value_delimiter = ',')]
    steady_rates: Option<Vec<u64>>,
    /// Steady-state seconds per rate, warm-up included; default 40 (small 15).
    #[arg(long)]
    steady_seconds: Option<u64>,
    /// Who is measured, comma-separated (`agent`, `otelcol`); default all. Measuring one
    /// alone is for quick comparisons of a change: the ratios need both.
    #[arg(long, value_delimiter = ',', value_parser = ["agent", "otelcol"])]
    subjects: Option<Vec<String>>,
    /// Corpus shapes, comma-separated (`long`: about 890 B per entry, `short`: about
    /// 200 B, issue 16); default both, in the same run.
    #[arg(long, env = "BENCH_SHAPES", value_delimiter = ',', value_parser = ["long", "short"])]
    shapes: Option<Vec<String>>,
    /// Only write (or check) the corpora under `--out` and print where they are: for
    /// profiling an agent by hand on the bench's input.
    #[arg(long)]
    corpus_only: bool,
    /// Skip the steady-state runs.
    #[arg(long)]
    no_steady: bool,
}

fn home_cache_bin(name: &str) -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/logpipe/bin")
        .join(name)
}

fn otelcol_version() -> String {
    report::pinned("OTELCOL_VERSION").unwrap_or_else(|| "v0.165.0".into())
}

async fn options(args: Args) -> Result<Options, BenchError> {
    let size = Size::parse(&args.size)?;
    let small = size.is_small();
    let out = args
        .out
        .unwrap_or_else(|| logpipe_e2e::target_dir().join("bench"));
    let agent = args
        .agent
        .unwrap_or_else(|| logpipe_e2e::target_dir().join("release/logpipe-agent"));
    let otelcol = args
        .otelcol
        .unwrap_or_else(|| home_cache_bin(&format!("otelcol-{}", otelcol_version())));
    for (what, path, how) in [
        ("agent", &agent, "cargo build --release -p logpipe-agent"),
        ("otelcol", &otelcol, "tests/testbed/build.sh otelcol"),
    ] {
        if !path.is_file() {
            return Err(BenchError::Other(format!(
                "{what} binary {} is missing: run `{how}`",
                path.display()
            )));
        }
    }
    let (store_url, store_skip_reason) = if args.no_store {
        (None, Some("--no-store given".to_string()))
    } else {
        let url = match args.store_url {
            Some(url) => Some(url),
            None => std::fs::read_to_string(logpipe_e2e::testbed_dir().join("store-url"))
                .ok()
                .map(|s| s.trim().to_string()),
        };
        match url {
            Some(url) if bench::store_ready(&url).await => (Some(url), None),
            Some(url) => (
                None,
                Some(format!(
                    "VictoriaLogs at {url} does not answer /insert/loki/ready (make testbed-up)"
                )),
            ),
            None => (
                None,
                Some(
                    "no target/testbed/store-url: the test bed is not up (make testbed-up)".into(),
                ),
            ),
        }
    };
    let steady_seconds = args.steady_seconds.unwrap_or(if small { 15 } else { 40 });
    Ok(Options {
        command: format!(
            "make bench{}",
            if args.size == "default" {
                String::new()
            } else {
                format!(" BENCH_SIZE={}", args.size)
            }
        ),
        runs: args.runs.unwrap_or(if small { 1 } else { 3 }).max(1),
        size,
        shapes: match args.shapes {
            None => Shape::ALL.to_vec(),
            Some(names) => Shape::ALL
                .into_iter()
                .filter(|s| names.iter().any(|n| n == s.name()))
                .collect(),
        },
        seed: args.seed,
        out,
        bins: Binaries { agent, otelcol },
        store_url,
        store_skip_reason,
        steady_rates: if args.no_steady {
            Vec::new()
        } else {
            args.steady_rates.unwrap_or_else(|| {
                if small {
                    vec![1_000, 10_000]
                } else {
                    vec![1_000, 10_000, 50_000]
                }
            })
        },
        subjects: match args.subjects {
            None => Subject::ALL.to_vec(),
            Some(names) => Subject::ALL
                .into_iter()
                .filter(|s| names.iter().any(|n| n == s.name()))
                .collect(),
        },
        steady_duration: Duration::from_secs(steady_seconds),
        steady_warmup: Duration::from_secs((steady_seconds / 5).clamp(2, 8)),
        steady_containers: 16,
    })
}

async fn main_async(args: Args) -> Result<(), BenchError> {
    if args.corpus_only {
        let size = Size::parse(&args.size)?;
        let out = args
            .out
            .unwrap_or_else(|| logpipe_e2e::target_dir().join("bench"));
        for shape in Shape::ALL {
            if args
                .shapes
                .as_ref()
                .is_some_and(|names| !names.iter().any(|n| n == shape.name()))
            {
                continue;
            }
            let dir = out.join(shape.dir_name());
            let (seed, bytes) = (args.seed, size.bytes);
            let manifest = tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || bench::corpus::ensure(&dir, seed, bytes, shape)
            })
            .await
            .map_err(|e| BenchError::Other(format!("corpus task: {e}")))??;
            eprintln!(
                "[bench] {}: {}",
                bench::corpus::pods_root(&dir).display(),
                manifest.summary()
            );
        }
        return Ok(());
    }
    let options = options(args).await?;
    if let Some(reason) = &options.store_skip_reason {
        eprintln!("[bench] store runs skipped: {reason}");
    }
    let outcome = bench::run(&options).await?;
    let with_text = report::write_all(&outcome, &options)?;
    let results = report::results_json(&outcome, &options);
    for line in report::headline(&results) {
        eprintln!("[bench] {line}");
    }
    eprintln!(
        "[bench] wrote {}/results.{{json,md,png}}{}",
        options.out.display(),
        if with_text {
            ""
        } else {
            " (no font found: the chart has no text)"
        }
    );
    // A comparator not keeping up (at 50k lines/s it may not) is a finding, written down
    // with its numbers; only our agent failing, or the harness, fails the bench.
    let ours = |subject: &Subject| *subject == Subject::Agent;
    let failed = outcome
        .corpus_runs
        .iter()
        .filter(|r| !r.ok && ours(&r.subject))
        .count()
        + outcome
            .steady_runs
            .iter()
            .filter(|r| !r.ok && ours(&r.subject))
            .count();
    for run in outcome
        .steady_runs
        .iter()
        .filter(|r| !r.ok && !ours(&r.subject))
    {
        eprintln!(
            "[bench] {} at {} lines/s: {}",
            run.subject.name(),
            run.rate_lines_s,
            run.error.as_deref().unwrap_or("failed")
        );
    }
    if failed > 0 {
        return Err(BenchError::Other(format!(
            "{failed} run(s) of logpipe-agent failed; see results.md"
        )));
    }
    Ok(())
}

fn main() -> ExitCode {
    logpipe_bench::run_main("logpipe-bench", main_async(Args::parse()))
}
