//! Drover's VMM: one `drover-vmm` process per VM, on KVM through the rust-vmm crates.
//!
//! This crate grows module by module (see docs/architecture.md); today it holds the
//! KVM probe the tests and the agent use to tell whether a host can run VMs.

pub mod kvm_probe;

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is the kvm module loaded, and may this user open /dev/kvm?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
}
