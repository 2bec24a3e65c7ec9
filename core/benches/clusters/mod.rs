//! Clusters built for the core's benchmarks: hosts of 64 CPUs (two NUMA nodes,
//! 256 vCPUs at 4:1, 512 GiB), VMs of 1-8 vCPUs (10 % Dedicated), anti-affinity
//! groups of 10 over every tenth VM and Preferred affinity pairs; the existing VMs
//! placed by the core itself. The same cluster every run.
#![allow(dead_code)]

use drover_core::Cluster;
use drover_core::placement::schedule;
use drover_core::snapshot::{
    Capacity, CpuRequest, Host, HostHealth, Key, NumaNode, NumaRequest, Rule, RuleKind, Snapshot, Vm,
};
use drover_topology::CpuSet;

/// A small deterministic generator (the same cluster every run).
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

pub fn host(i: usize) -> Host {
    let cpus: CpuSet = (0..64).collect();
    Host {
        name: format!("host-{i:05}"),
        labels: [("drover.dev/rack".to_string(), format!("r{}", i % 20))].into(),
        health: HostHealth::Ready,
        schedulable: true,
        maintenance: false,
        policy: Some("prod".into()),
        capacity: Capacity {
            cpus: cpus.clone(),
            vcpus: 256,
            memory_mib: 512 * 1024,
            numa: vec![
                NumaNode { id: 0, cpus: (0..32).collect(), memory_mib: Some(256 * 1024) },
                NumaNode { id: 1, cpus: (32..64).collect(), memory_mib: Some(256 * 1024) },
            ],
            siblings: vec![],
        },
        numa_spanning: true,
    }
}

pub fn vm(i: usize, rng: &mut Lcg) -> Vm {
    let vcpus = [1, 2, 2, 4, 4, 8][rng.next(6) as usize];
    let dedicated = rng.next(10) == 0 && std::env::var_os("DROVER_BENCH_SHARED_ONLY").is_none();
    Vm {
        key: Key::new("bench", format!("vm-{i:06}")),
        labels: Default::default(),
        vcpus,
        memory_mib: u64::from(vcpus) * 2048,
        cpu: if dedicated {
            CpuRequest::Dedicated { host_cpus: None, allow_siblings: false }
        } else {
            CpuRequest::Shared { host_cpus: None }
        },
        numa: NumaRequest::default(),
        node_selector: Default::default(),
        host: None,
        holds: false,
        allocated_cpus: None,
        ha: Default::default(),
    }
}

/// `hosts` hosts holding 10 VMs each, and `new` VMs of the same mix not placed.
pub fn cluster(hosts: usize, new: usize, rng: &mut Lcg) -> (Snapshot, Vec<Vm>) {
    let hosts: Vec<Host> = (0..hosts).map(host).collect();
    let existing = hosts.len() * 10;
    let mut all: Vec<Vm> = (0..existing + new).map(|i| vm(i, rng)).collect();
    // Rules: anti-affinity groups of 10 over every tenth VM; Preferred affinity pairs.
    let mut rules = Vec::new();
    for g in 0..(all.len() / 100) {
        let members = (0..10).map(|k| all[g * 100 + k * 10].key.clone()).collect();
        rules.push(Rule {
            key: Key::new("bench", format!("spread-{g}")),
            kind: RuleKind::VmVmAntiAffinity,
            required: true,
            vms: members,
            hosts: Default::default(),
        });
        let pair = [all[g * 100 + 3].key.clone(), all[g * 100 + 4].key.clone()].into_iter().collect();
        rules.push(Rule {
            key: Key::new("bench", format!("pair-{g}")),
            kind: RuleKind::VmVmAffinity,
            required: false,
            vms: pair,
            hosts: Default::default(),
        });
    }
    let mut snapshot = Snapshot { hosts, vms: vec![], rules, ..Default::default() };
    // Place the existing VMs through the core itself, so the cluster is realistic.
    let pending: Vec<Vm> = all.drain(..existing).collect();
    {
        let mut c = Cluster::new(&snapshot);
        let refs: Vec<&Vm> = pending.iter().collect();
        let placed = schedule(&mut c, &refs);
        for (mut vm, p) in pending.into_iter().zip(placed) {
            if let Ok(p) = p {
                vm.host = Some(p.host);
                vm.allocated_cpus = p.cpus;
                vm.holds = true;
            }
            snapshot.vms.push(vm);
        }
    }
    (snapshot, all)
}
