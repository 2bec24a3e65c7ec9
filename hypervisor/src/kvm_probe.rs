//! What the host's KVM offers: whether it opens, its API version, vCPU limits and
//! the capabilities Drover relies on (in-kernel irqchip, dirty logging, ...).

pub use drover_vmm_api::KvmFacts;
use kvm_ioctls::{Cap, Kvm};

use crate::Error;

/// Capabilities the VMM needs, named as in the KVM API documentation.
const REQUIRED: [(Cap, &str); 6] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::Xsave, "KVM_CAP_XSAVE"),
];

/// Opens `/dev/kvm` and reads what it offers.
pub fn probe() -> Result<KvmFacts, Error> {
    probe_device(std::path::Path::new("/dev/kvm"))
}

/// Opens the KVM device at `path` (`/dev/kvm` but for tests) and reads what it offers.
pub fn probe_device(path: &std::path::Path) -> Result<KvmFacts, Error> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Config(format!("{}: a device path cannot contain NUL", path.display())))?;
    let kvm =
        Kvm::new_with_path(&c_path).map_err(|source| Error::KvmOpen { path: path.display().to_string(), source })?;
    Ok(KvmFacts {
        api_version: kvm.get_api_version(),
        recommended_vcpus: kvm.get_nr_vcpus(),
        max_vcpus: kvm.get_max_vcpus(),
        capabilities: REQUIRED.iter().map(|(cap, name)| (name.to_string(), kvm.check_extension(*cap))).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs `/dev/kvm` (any KVM, PVM included); fails saying so when it is absent.
    #[test]
    fn probe_reads_the_host_kvm() {
        let facts = probe().expect("this test needs a readable and writable /dev/kvm");
        assert_eq!(facts.api_version, 12, "KVM API version");
        assert!(facts.max_vcpus >= facts.recommended_vcpus && facts.recommended_vcpus >= 1, "{facts:?}");
        assert!(facts.usable(), "missing KVM capabilities: {:?}", facts.capabilities);
    }
}
