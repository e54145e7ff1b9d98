//! logpipe-api: the contract between the logpipe operator and its node agent. The
//! operator renders what is defined here and the agent runs it; neither types a name of
//! the contract a second time.
//!
//! - [`config`]: the agent config document (embedded in the `LogPipeline` CRD);
//! - [`validate`]: its full validation, run by the agent at start, by the operator before
//!   any node moves, and by `logpipe-operator validate` in CI;
//! - [`relabel`], [`timeformat`]: the parts of the config whose checking is building them;
//! - [`selector`]: which pods a pipeline ships (label selectors), matched once for both;
//! - [`metrics`]: the agent's metric names that rollout verification reads;
//! - [`process`]: flags, probe paths, port, paths and defaults of the agent process.
//!
//! No I/O: parsing and checking only.

pub mod config;
pub mod metrics;
pub mod process;
pub mod relabel;
pub mod selector;
pub mod timeformat;
pub mod validate;
