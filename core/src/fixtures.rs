//! Hosts and VMs for the core's unit tests, built once here (each test module
//! varies what it needs with struct update syntax).

use crate::snapshot::{Capacity, CpuRequest, Host, HostHealth, Key, Vm};

/// A ready host of pool `pool`: `cpus` CPUs (one NUMA node, no SMT) offering
/// `vcpus` Shared vCPUs and `memory_mib` of memory.
pub fn host(name: &str, cpus: u32, vcpus: u64, memory_mib: u64) -> Host {
    Host {
        name: name.into(),
        labels: Default::default(),
        health: HostHealth::Ready,
        schedulable: true,
        maintenance: false,
        policy: Some("pool".into()),
        capacity: Capacity { cpus: (0..cpus).collect(), vcpus, memory_mib, numa: vec![], siblings: vec![] },
        numa_spanning: true,
    }
}

/// A Shared VM `ns/<name>`, held on `on` when given.
pub fn vm(name: &str, vcpus: u32, memory_mib: u64, on: Option<&str>) -> Vm {
    Vm {
        key: Key::new("ns", name),
        labels: Default::default(),
        vcpus,
        memory_mib,
        cpu: CpuRequest::Shared { host_cpus: None },
        numa: Default::default(),
        node_selector: Default::default(),
        host: on.map(str::to_string),
        holds: on.is_some(),
        allocated_cpus: None,
        ha: Default::default(),
    }
}
