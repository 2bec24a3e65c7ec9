//! What `drover-vmm kvm-check` reports about the host's KVM (as JSON on stdout).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// KVM facts of a host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KvmFacts {
    /// `KVM_GET_API_VERSION` (12 on every Linux since 2.6.22).
    pub api_version: i32,
    /// Recommended vCPU count (`KVM_CAP_NR_VCPUS`).
    pub recommended_vcpus: usize,
    /// Hard vCPU limit (`KVM_CAP_MAX_VCPUS`).
    pub max_vcpus: usize,
    /// Capabilities Drover uses, with whether each is present.
    pub capabilities: BTreeMap<String, bool>,
}

impl KvmFacts {
    /// Whether every capability Drover needs is present.
    pub fn usable(&self) -> bool {
        self.capabilities.values().all(|present| *present)
    }

    /// The capabilities that are missing, by name.
    pub fn missing(&self) -> Vec<&str> {
        self.capabilities.iter().filter(|(_, ok)| !**ok).map(|(name, _)| name.as_str()).collect()
    }
}
