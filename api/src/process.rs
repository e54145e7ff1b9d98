//! How the operator runs the agent: its flags, probe paths, port, and the paths and
//! defaults both sides assume. The agent's command line and server and the operator's
//! DaemonSet read them from here.

/// The agent config file flag (`--config FILE`).
pub const FLAG_CONFIG: &str = "config";
/// The node name flag (`--node-name NAME`); the DaemonSet passes `$(NODE_NAME)`.
pub const FLAG_NODE_NAME: &str = "node-name";
/// The environment variable the DaemonSet fills from `spec.nodeName`.
pub const ENV_NODE_NAME: &str = "NODE_NAME";
/// The termination message flag (`--termination-log PATH`); empty disables it.
pub const FLAG_TERMINATION_LOG: &str = "termination-log";

/// Prometheus exposition.
pub const METRICS_PATH: &str = "/metrics";
/// Ready once discovery synced and the positions file loaded.
pub const READY_PATH: &str = "/-/ready";
/// Alive while the process serves.
pub const HEALTHY_PATH: &str = "/-/healthy";
/// The metrics and health port (the reference pipeline's).
pub const DEFAULT_PORT: u16 = 12345;

/// Where the kubelet writes pod logs, on the node and in the agent's container.
pub const DEFAULT_LOG_ROOT: &str = "/var/log/pods";
/// The container directory of the positions hostPath.
pub const POSITIONS_DIR: &str = "/var/lib/logpipe";
/// The positions file inside [`POSITIONS_DIR`].
pub const POSITIONS_FILE: &str = "/var/lib/logpipe/positions.json";
/// How long SIGTERM may wait for the store's answers before positions are saved.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECONDS: u64 = 20;
/// Where the kubelet reads a container's termination message (`terminationMessagePath`).
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
