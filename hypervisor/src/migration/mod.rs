//! Live migration (VMotion) between two `drover-vmm` processes: pre-copy of guest
//! memory with KVM dirty logging, then a short pause for the last pages and the VM
//! state. Parts: `wire` (the frame format), `channel` (authenticated encryption),
//! `send` (the source: connections, lanes, pre-copy, the convergence decision,
//! the throttle, the switch-over), `receive` (the target). Dirty-page
//! tracking lives with guest memory (`crate::memory`, `crate::vstate::vm`); the
//! progress figures the control API reports are `drover_vmm_api::MigrationStatus`.

pub mod channel;
pub mod receive;
pub mod send;
pub mod wire;
