//! `logpipe-agent --config FILE [overrides]`: the node log agent. See the crate docs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use logpipe_agent::config::AgentConfig;
use logpipe_agent::runtime::{self, Options};
use logpipe_agent::termination;
use logpipe_api::process;

#[derive(Debug, Parser)]
#[command(
    name = "logpipe-agent",
    version,
    about = "Tails container logs on this node and ships them to Grafana Loki"
)]
struct Args {
    /// The agent configuration (YAML or JSON), as rendered by the operator.
    #[arg(long = process::FLAG_CONFIG, value_name = "FILE")]
    config: PathBuf,
    /// This node's name (discovery watches its pods only). Default: $NODE_NAME, then
    /// $HOSTNAME, then the system host name.
    #[arg(long = process::FLAG_NODE_NAME)]
    node_name: Option<String>,
    /// Overrides `logRoot` (kubelet pod log tree, default /var/log/pods).
    #[arg(long)]
    log_root: Option<String>,
    /// Overrides `positionsFile`.
    #[arg(long)]
    positions: Option<String>,
    /// Kubeconfig for discovery. Without it, the in-cluster config when in a pod; else no
    /// discovery (labels from paths only).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Overrides `listen` (metrics and health), e.g. `:12345` or `127.0.0.1:12345`.
    #[arg(long)]
    listen: Option<String>,
    /// A Promtail positions.yaml to start from when there is no positions file yet.
    #[arg(long, value_name = "FILE")]
    import_promtail_positions: Option<PathBuf>,
    /// Log format: `json` (default) or `text`.
    #[arg(long, default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
    /// On a fatal error, write its message here (the container's termination message;
    /// first 4 KiB). Default /dev/termination-log, written only if it exists; an empty
    /// value disables it.
    #[arg(long = termination::FLAG, value_name = "PATH")]
    termination_log: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Config(#[from] logpipe_agent::config::ConfigError),
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    #[error("cannot start the async runtime: {0}")]
    Tokio(std::io::Error),
    #[error("no node name: pass --node-name or set NODE_NAME")]
    NodeName,
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "text" {
        builder.init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    }
}

fn node_name(flag: Option<String>) -> Result<String, MainError> {
    let from_env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    flag.or_else(|| from_env(process::ENV_NODE_NAME))
        .or_else(|| from_env("HOSTNAME"))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .ok_or(MainError::NodeName)
}

fn load(args: &Args) -> Result<AgentConfig, MainError> {
    let path = args.config.display().to_string();
    let text = std::fs::read_to_string(&args.config).map_err(|source| {
        logpipe_agent::config::ConfigError::Read {
            path: path.clone(),
            source,
        }
    })?;
    let mut config = AgentConfig::from_yaml(&text)?;
    if let Some(root) = &args.log_root {
        config.log_root = root.clone();
    }
    if let Some(positions) = &args.positions {
        config.positions_file = positions.clone();
    }
    if let Some(listen) = &args.listen {
        config.listen = listen.clone();
    }
    config.validate()?;
    Ok(config)
}

fn run(args: Args) -> Result<(), MainError> {
    let config = load(&args)?;
    let options = Options {
        node_name: node_name(args.node_name.clone())?,
        kubeconfig: args.kubeconfig.clone(),
        import_promtail_positions: args.import_promtail_positions.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(MainError::Tokio)?;
    rt.block_on(runtime::run(config, options))?;
    Ok(())
}

/// glibc gives every thread that allocates an arena of its own, up to 8 per core, and an
/// arena keeps what was freed in it. Here the tailer thread allocates the lines, the
/// runtime's workers free them and encode the batches, and each arena's high-water mark
/// adds up: measured on the bench corpus, two arenas instead of one per thread lower the
/// peak RSS by about 1.5 MiB at no measurable CPU cost (the threads rarely allocate at
/// the same instant). `MALLOC_ARENA_MAX` in the environment, when set, is left to rule.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only sets an allocator parameter; it is called first thing in main,
    // before any other thread exists, and its failure (0) leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> ExitCode {
    tune_malloc();
    let args = Args::parse();
    init_logging(&args.log_format);
    let last_words = termination::Target::from_flag(args.termination_log.as_deref());
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "logpipe-agent failed");
            eprintln!("logpipe-agent: {e}");
            termination::write_message(&last_words, &e.to_string());
            ExitCode::FAILURE
        }
    }
}
