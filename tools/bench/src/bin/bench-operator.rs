//! `logpipe-bench-operator`: the operator's phased rollout on a KWOK test bed with many
//! nodes against a native DaemonSet RollingUpdate (issue 7, operator side), run by
//! `make bench-operator`. Writes `target/bench/operator.json` and merges it into
//! `results.json` / `results.md` when they exist.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use logpipe_bench::BenchError;
use logpipe_bench::operator::{self, Options};

#[derive(Debug, Parser)]
#[command(
    name = "logpipe-bench-operator",
    about = "logpipe-operator on a KWOK test bed: phased rollout vs native RollingUpdate, API requests, RSS, reconcile durations"
)]
struct Args {
    /// The test-bed cluster to use.
    #[arg(long, default_value = "ops")]
    cluster: String,
    /// Nodes the test bed must have (make bench-operator passes NODES); unset: whatever it has.
    #[arg(long, env = "BENCH_OPERATOR_NODES")]
    nodes: Option<usize>,
    /// rollout.maxUnavailable, and the native DaemonSet's; default: 10% of the nodes.
    #[arg(long, env = "BENCH_MAX_UNAVAILABLE")]
    max_unavailable: Option<i32>,
    /// The operator binary; default target/release/logpipe-operator.
    #[arg(long)]
    operator: Option<PathBuf>,
    /// Output directory; default target/bench.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seconds of steady state measured after the rollout.
    #[arg(long, default_value_t = 30)]
    steady_seconds: u64,
    /// Bound on the first install and on each rollout, seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_seconds: u64,
    /// N LogPipelines in N namespaces on every node, rolled out at once (issue 15): their
    /// overlap, reconcile p99, RSS; writes operator-fleet.json (no native run).
    #[arg(long)]
    pipelines: Option<usize>,
    /// Only merge an existing operator.json into results.json / results.md.
    #[arg(long)]
    merge_only: bool,
}

async fn main_async(args: Args) -> Result<(), BenchError> {
    let out = args
        .out
        .unwrap_or_else(|| logpipe_e2e::target_dir().join("bench"));
    if args.merge_only {
        for path in operator::merge_into_results(&out)? {
            eprintln!("[bench-operator] merged into {}", path.display());
        }
        return Ok(());
    }
    let testbed_dir = logpipe_e2e::testbed_dir();
    let options = Options {
        testbed_dir,
        cluster: args.cluster.clone(),
        operator: args
            .operator
            .unwrap_or_else(|| logpipe_e2e::target_dir().join("release/logpipe-operator")),
        out: out.clone(),
        expected_nodes: args.nodes,
        max_unavailable: args.max_unavailable,
        steady: Duration::from_secs(args.steady_seconds),
        install_timeout: Duration::from_secs(args.timeout_seconds),
        rollout_timeout: Duration::from_secs(args.timeout_seconds),
        command: format!(
            "make bench-operator NODES={}",
            args.nodes
                .map_or_else(|| "<as the bed>".to_string(), |n| n.to_string())
        ),
    };
    if let Some(pipelines) = args.pipelines {
        let section = operator::fleet::run_and_write(&options, pipelines, &out).await?;
        eprintln!("[bench-operator] {}", operator::fleet::headline(&section));
        return Ok(());
    }
    let section = operator::run(&options).await?;
    let written = operator::write(&out, &section)?;
    eprintln!("[bench-operator] {}", operator::headline(&section));
    for path in written {
        eprintln!("[bench-operator] wrote {}", path.display());
    }
    let errors: Vec<&str> = ["error", "native_error"]
        .iter()
        .filter_map(|k| section.get(*k).and_then(|v| v.as_str()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(BenchError::Other(format!(
            "part of the run failed (the figures it could not measure are null): {}",
            errors.join("; ")
        )))
    }
}

fn main() -> ExitCode {
    logpipe_bench::run_main("logpipe-bench-operator", main_async(Args::parse()))
}
