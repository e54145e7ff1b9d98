//! logpipe-agent: tails container logs on its node, labels them with Kubernetes metadata,
//! pushes them to Grafana Loki, and commits a read position only after Loki acknowledged
//! every entry before it.
//!
//! ```text
//! discovery (own node's pods) -> tail (/var/log/pods) -> cri/docker parse -> stages
//!   -> loki batcher/client -> positions (after acknowledgement)
//! ```

pub use logpipe_api::config;
pub mod cri;
pub mod discovery;
pub mod entry;
pub mod loki;
pub mod metrics;
pub mod podlogs;
pub mod positions;
pub use logpipe_api::relabel;
pub mod runtime;
pub mod selection;
pub mod server;
pub mod stages;
pub mod tail;
pub mod tenant;
pub mod termination;
