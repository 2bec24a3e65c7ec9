//! Host topology for Drover: CPU lists, the CPU / core / NUMA layout read from sysfs
//! (with a configurable root, so tests use fixture trees), and the decisions that
//! follow from it: which host CPUs a VM's vCPUs get, which NUMA nodes its memory.

#![forbid(unsafe_code)]

mod cpuset;
mod placement;
mod sysfs;

pub use cpuset::CpuSet;
pub use placement::{choose_dedicated, numa_nodes_for};
pub use sysfs::{HostCpu, HostTopology, NumaNode, write_fixture};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CPU list that does not parse.
    #[error("invalid CPU list {list:?}: {why}")]
    CpuList { list: String, why: String },
    /// A sysfs file that cannot be read or parsed.
    #[error("{path}: {why}")]
    Sysfs { path: String, why: String },
    /// A placement that cannot be made.
    #[error("{0}")]
    Placement(String),
}
