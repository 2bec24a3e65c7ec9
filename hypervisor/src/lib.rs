//! Drover's VMM: one `drover-vmm` process per VM, on KVM through the rust-vmm crates.
//!
//! - `config`: the VM configuration (shared with the agent)
//! - `arch`: x86-64 layout, CPUID, registers, ACPI, PVH
//! - `boot`: loads the kernel and boot structures
//! - `vstate`: the KVM VM and its vCPU threads; `memory`: guest RAM (NUMA binding,
//!   page bitmaps, copying pages out of a running guest)
//! - `devices`: serial, i8042, exit device; `exit`: how a VM ends
//! - `affinity`: host CPUs of the vCPU threads; `priority`: their CPU shares
//! - `control`: the running VM (the vCPU park/save protocol, live CPU and priority
//!   changes, the outgoing migration's bookkeeping, the exit channel)
//! - `migration`: live migration (wire format, channel, source, target)
//! - `state`: VM state outside memory; `restore`: where a VM's first state comes
//!   from; `snapshot`: state + memory to files and back
//! - `vmm`: puts it together and starts the VM
//! - `api`: the control API on a Unix socket, served on a started VM's control
//!   (by `main.rs`; nothing in the VMM depends on it)
//! - `kvm_probe`: what the host's KVM offers

pub mod affinity;
pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod control;
pub mod devices;
mod error;
pub mod exit;
pub mod kvm_probe;
pub mod memory;
pub mod migration;
pub mod priority;
pub mod restore;
pub mod snapshot;
pub mod state;
pub mod vmm;
pub mod vstate;

pub use error::Error;

/// The test guest image built with this crate (see `guest/`), for tests and benchmarks.
pub const TEST_GUEST: &[u8] = include_bytes!(env!("DROVER_TEST_GUEST"));
