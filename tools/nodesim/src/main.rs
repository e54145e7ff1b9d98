//! `logpipe-nodesim`: runs the test bed's agent pods as real processes on simulated
//! nodes (see the library, `logpipe_nodesim`). One per cluster:
//!
//! ```text
//! logpipe-nodesim --kubeconfig target/testbed/ops/kubeconfig --cluster ops
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use logpipe_nodesim::{self as nodesim, Options};

#[derive(Debug, Parser)]
#[command(
    name = "logpipe-nodesim",
    version,
    about = "Kubelet of the test bed's agent pods: real agent processes on KWOK nodes"
)]
struct Cli {
    /// Kubeconfig of the cluster (`target/testbed/<cluster>/kubeconfig`); also handed to
    /// every agent as `--kubeconfig`.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Cluster name (`ops`, `dev`, `prod`): names the node trees and log directories.
    #[arg(long)]
    cluster: String,
    /// Test bed directory [default: the kubeconfig's grandparent, `target/testbed`].
    #[arg(long, env = "LOGPIPE_TESTBED")]
    testbed_dir: Option<PathBuf>,
    /// Released images: `<dir>/<tag>/<name>` runs for image `<repo>/<name>:<tag>`
    /// [default: `<testbed>/images`].
    #[arg(long, env = "LOGPIPE_NODESIM_IMAGES")]
    images_dir: Option<PathBuf>,
    /// Optional file of exact overrides, lines `IMAGE PATH`, read on every lookup.
    #[arg(long, env = "LOGPIPE_NODESIM_IMAGE_MAP")]
    image_map: Option<PathBuf>,
    /// First crash back-off (a kubelet uses 10s; the test bed is impatient).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    backoff_initial: Duration,
    /// Crash back-off cap.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    backoff_max: Duration,
    /// Retry interval for pods that cannot start (unpublished image, missing ConfigMap).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    retry_interval: Duration,
    /// Bound on stopping all agents at SIGTERM.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
}

/// `500ms`, `2s`, `1m`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = number.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration {s:?} (use ms, s or m)")),
    }
}

fn absolute(path: &Path) -> PathBuf {
    // Agents run with their pod's rootfs as working directory: every path handed to them
    // must be absolute.
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Plain text in log files (up.sh redirects stderr), colours on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let kubeconfig = absolute(&cli.kubeconfig);
    let testbed_dir = absolute(&cli.testbed_dir.clone().unwrap_or_else(|| {
        kubeconfig
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("target/testbed"))
    }));
    let images_dir = absolute(
        &cli.images_dir
            .clone()
            .unwrap_or_else(|| testbed_dir.join("images")),
    );
    let options = Options {
        kubeconfig,
        cluster: cli.cluster,
        testbed_dir,
        images_dir,
        image_map: cli.image_map.as_deref().map(absolute),
        backoff_initial: cli.backoff_initial,
        backoff_max: cli.backoff_max,
        retry_interval: cli.retry_interval,
        shutdown_timeout: cli.shutdown_timeout,
    };
    match nodesim::run(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
