//! Drover's Kubernetes API, group `drover.dev`, version `v1alpha1`:
//! [`VirtualMachine`], [`VirtualMachineMigration`], [`HostPolicy`] and [`DRSRule`].
//!
//! The CRD YAML in `crds/` and `charts/drover/crds/` is generated from these types
//! (`cargo run -p drover-crds --bin crdgen`); a test fails when it is stale. Every
//! rule a user can break is checked by the API server (OpenAPI and CEL in the
//! schema), so `kubectl apply` refuses a bad spec with a message naming the field.

// kube's derive macros repeat `#[serde(...)]` attributes on the generated types.
#![allow(clippy::duplicated_attributes)]
#![forbid(unsafe_code)]

pub mod common;
pub mod contract;
pub mod drs_rule;
pub mod generate;
pub mod host_policy;
pub mod migration;
pub mod quantity;
pub mod vm;

pub use common::{Conditions, GROUP, MAX_VCPUS, VERSION};
pub use contract::HostFacts;
pub use drover_topology::CpuSet;
pub use drs_rule::{DRSRule, DRSRuleSpec, DRSRuleStatus};
pub use host_policy::{HostPolicy, HostPolicySpec, HostPolicyStatus};
pub use migration::{VirtualMachineMigration, VirtualMachineMigrationSpec, VirtualMachineMigrationStatus};
pub use vm::{VirtualMachine, VirtualMachineSpec, VirtualMachineStatus};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CRD that could not be turned into YAML.
    #[error("cannot serialize CRD {name}: {source}")]
    Serialize { name: String, source: serde_norway::Error },
    /// Reading or writing generated files.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}
