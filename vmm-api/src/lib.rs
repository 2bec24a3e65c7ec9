//! The contract between `drover-vmm` and whoever drives it (the node agent, tests,
//! `drover-vmm api`): the VM configuration the VMM takes, the control API's
//! requests, replies and paths, the VMM's exit statuses, and a small client.
//!
//! Serde types and a Unix-socket HTTP client only: a crate that drives VMMs links
//! this one and never the VMM itself (kvm-ioctls, the migration channel's crypto),
//! as cloud-hypervisor's `api_client` stands apart from its VMM.
//!
//! - [`config`]: [`VmConfig`], what `drover-vmm run --config` reads.
//! - [`api`]: the control API's paths, requests and replies.
//! - [`exit`]: [`ExitStatus`], the process exit statuses and what they mean.
//! - [`kvm`]: [`KvmFacts`], what `drover-vmm kvm-check` prints.
//! - [`client`]: [`Client`], one request per connection.

#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod config;
pub mod exit;
pub mod kvm;

pub use api::{MigrateRequest, MigrationPhase, MigrationStatus, SnapshotInfo, VcpuStatus, VmStatus};
pub use client::Client;
pub use config::VmConfig;
pub use exit::ExitStatus;
pub use kvm::KvmFacts;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration that breaks a rule; the message names the field.
    #[error("{0}")]
    Config(String),
    /// The control socket could not be reached or the exchange broke off.
    #[error("control socket {socket}: {source}")]
    Socket { socket: String, source: std::io::Error },
    /// The VMM's reply was not HTTP.
    #[error("control socket {socket}: malformed response {head:?}")]
    Malformed { socket: String, head: String },
    /// The VMM refused the request (a status other than 2xx); `message` is its
    /// `{"error": ...}`. Callers branch on `code` (409: not now, 400: bad request).
    #[error("{request}: {code} {message}")]
    Refused { request: String, code: u16, message: String },
    /// A reply that is not the JSON the request returns.
    #[error("{request}: reply is not the expected JSON: {source}")]
    Decode { request: String, source: serde_json::Error },
}
