//! The configuration of one VM: defined in `drover-vmm-api` (the node agent builds
//! it too), re-exported here where the VMM's modules look for it.

pub use drover_vmm_api::config::*;
