//! Drover's VMM: one `drover-vmm` process per VM, on KVM through the rust-vmm crates.
//!
//! - `config`: the VM configuration (shared with the agent)
//! - `arch`: x86-64 layout, CPUID, registers, ACPI, PVH
//! - `boot`: loads the kernel and boot structures
//! - `vstate`: the KVM VM and its vCPU threads; `memory`: NUMA binding of guest RAM
//! - `devices`: serial, i8042, exit device; `exit`: how a VM ends
//! - `affinity`: host CPUs of the vCPU threads; `priority`: their CPU shares
//! - `control`: the running VM (pause, resume, live CPU and priority changes)
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

/// The test guest image built with this crate (see `guest/`), for tests and benchmarks.
pub const TEST_GUEST: &[u8] = include_bytes!(env!("DROVER_TEST_GUEST"));

/// Errors of the VMM. Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open {path}: {source} (is the kvm module loaded, and may this user open it?)")]
    KvmOpen { path: String, source: kvm_ioctls::Error },
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    /// The configuration is wrong; the message names the field.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The kernel cannot be loaded.
    #[error("kernel {path}: {why}")]
    Kernel { path: String, why: String },
    /// Guest memory cannot be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A live migration failed.
    #[error("migration: {0}")]
    Migration(String),
    /// Saving or restoring VM state failed.
    #[error("VM state: {0}")]
    State(String),
    /// Another I/O failure.
    #[error("{0}")]
    Io(String),
}

impl From<drover_vmm_api::Error> for Error {
    fn from(e: drover_vmm_api::Error) -> Self {
        match e {
            drover_vmm_api::Error::Config(why) => Error::Config(why),
            other => Error::Io(other.to_string()),
        }
    }
}
