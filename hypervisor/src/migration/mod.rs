//! Live migration (VMotion) between two `drover-vmm` processes: pre-copy of guest
//! memory with KVM dirty logging, then a short pause for the last pages and the VM
//! state. Parts: `wire` (the frame format), `channel` (authenticated encryption),
//! `dirty` (memory tracking), `send` (the source's pre-copy loop), `receive` (the
//! target).

pub mod channel;
pub mod receive;
pub mod send;
pub mod status;
pub mod wire;
