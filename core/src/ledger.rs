//! What each host has given out, and what it has left: Shared vCPUs, memory, the
//! host CPUs Dedicated VMs hold, and the CPUs Shared VMs are pinned to. The
//! placement filters ask it; committing a placement charges it.

use drover_topology::CpuSet;

use crate::mask::CpuMask;
use crate::snapshot::{Capacity, CpuRequest, Vm};

/// A host's CPUs as placement counts them, worked out once per snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostShape {
    pub offered: CpuMask,
    pub offered_count: usize,
    pub ratio: f64,
    /// Its cores (sibling groups; a CPU in no group is a core alone), each with
    /// its NUMA node, in CPU order.
    pub cores: Vec<Core>,
    /// NUMA node ids, in order.
    pub nodes: Vec<u32>,
    /// CPUs in the largest core.
    pub max_core: usize,
}

/// One core: the offered CPUs of one sibling group.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Core {
    pub node: Option<u32>,
    pub cpus: Vec<u32>,
}

impl HostShape {
    pub fn new(cap: &Capacity) -> Self {
        let offered = CpuMask::from(&cap.cpus);
        let node_of = |cpu: u32| cap.numa.iter().find(|n| n.cpus.contains(cpu)).map(|n| n.id);
        let mut group_of = std::collections::HashMap::new();
        for group in &cap.siblings {
            for cpu in group.iter() {
                group_of.insert(cpu, group);
            }
        }
        let mut seen = CpuMask::default();
        let mut cores = Vec::new();
        for cpu in cap.cpus.iter() {
            if seen.contains(cpu) {
                continue;
            }
            let cpus: Vec<u32> = match group_of.get(&cpu) {
                Some(group) => group.iter().filter(|c| offered.contains(*c)).collect(),
                None => vec![cpu],
            };
            cpus.iter().for_each(|c| seen.insert(*c));
            cores.push(Core { node: node_of(cpu), cpus });
        }
        Self {
            max_core: cores.iter().map(|c: &Core| c.cpus.len()).max().unwrap_or(1).max(1),
            offered_count: offered.len(),
            offered,
            ratio: cap.cpu_ratio(),
            cores,
            nodes: cap.numa.iter().map(|n| n.id).collect(),
        }
    }
}

/// One host's allocations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostLedger {
    /// vCPUs of the Shared VMs it holds.
    pub shared_vcpus: u64,
    /// Memory of every VM it holds, VMM overhead included.
    pub memory_mib: u64,
    /// Host CPUs Dedicated VMs hold (whole cores, unless a VM allows siblings).
    pub dedicated: CpuMask,
    /// Host CPUs Shared VMs are pinned to by their spec: Dedicated VMs keep off them.
    pub pinned_shared: CpuMask,
    /// VMs it holds.
    pub vms: u32,
}

impl HostLedger {
    /// Shared vCPUs that fit: the offered CPUs no Dedicated VM holds, times the ratio.
    pub fn shared_capacity(&self, shape: &HostShape) -> f64 {
        shape.offered.count_without(&self.dedicated) as f64 * shape.ratio
    }

    /// Shared vCPUs still free (negative when over capacity).
    pub fn free_vcpus(&self, shape: &HostShape) -> f64 {
        self.shared_capacity(shape) - self.shared_vcpus as f64
    }

    /// Memory still free, MiB (0 when over).
    pub fn free_memory_mib(&self, cap: &Capacity) -> u64 {
        cap.memory_mib.saturating_sub(self.memory_mib)
    }

    /// Whether a Dedicated VM may take `cpu`.
    pub fn is_free(&self, shape: &HostShape, cpu: u32) -> bool {
        shape.offered.contains(cpu) && !self.dedicated.contains(cpu) && !self.pinned_shared.contains(cpu)
    }

    /// Takes `vm` (with the Dedicated CPUs `cpus`, if it is Dedicated).
    pub fn charge(&mut self, vm: &Vm, cpus: Option<&CpuSet>) {
        self.memory_mib += vm.footprint_mib();
        self.vms += 1;
        match &vm.cpu {
            CpuRequest::Shared { host_cpus } => {
                self.shared_vcpus += u64::from(vm.vcpus);
                if let Some(pinned) = host_cpus {
                    self.pinned_shared.add(&CpuMask::from(pinned));
                }
            }
            CpuRequest::Dedicated { .. } => {
                if let Some(cpus) = cpus {
                    self.dedicated.add(&CpuMask::from(cpus));
                }
            }
        }
    }

    /// Gives back what [`HostLedger::charge`] took. Pins of Shared VMs are not
    /// given back (others may share them; the next snapshot recounts them).
    pub fn discharge(&mut self, vm: &Vm, cpus: Option<&CpuSet>) {
        self.memory_mib = self.memory_mib.saturating_sub(vm.footprint_mib());
        self.vms = self.vms.saturating_sub(1);
        match &vm.cpu {
            CpuRequest::Shared { .. } => self.shared_vcpus = self.shared_vcpus.saturating_sub(u64::from(vm.vcpus)),
            CpuRequest::Dedicated { .. } => {
                if let Some(cpus) = cpus {
                    self.dedicated.remove(&CpuMask::from(cpus));
                }
            }
        }
    }

    /// Room for Dedicated vCPUs: per NUMA node (of `nodes` only, when given) and in
    /// all, in slots (a whole free core each, or a free CPU each with siblings allowed).
    pub fn dedicated_room(&self, shape: &HostShape, allow_siblings: bool, nodes: Option<&[u32]>) -> Room {
        let mut room = Room::default();
        for core in &shape.cores {
            if !nodes.is_none_or(|allowed| core.node.is_some_and(|n| allowed.contains(&n))) {
                continue;
            }
            let slots = if allow_siblings {
                core.cpus.iter().filter(|c| self.is_free(shape, **c)).count()
            } else {
                usize::from(core.cpus.iter().all(|c| self.is_free(shape, *c)))
            };
            if slots == 0 {
                continue;
            }
            room.total += slots;
            match room.per_node.iter_mut().find(|(n, _)| *n == core.node) {
                Some((_, s)) => *s += slots,
                None => room.per_node.push((core.node, slots)),
            }
        }
        room
    }

    /// Chooses `vcpus` Dedicated CPUs: whole free cores (one vCPU per core, the
    /// siblings held idle) unless `allow_siblings` (then cores are filled thread by
    /// thread). One NUMA node when one can hold them, the node with the most room
    /// first (of `nodes` only, when the VM binds to them); across nodes only when
    /// `spanning` allows. Lowest CPU numbers first, so the choice is reproducible.
    pub fn choose_dedicated(
        &self,
        shape: &HostShape,
        vcpus: u32,
        allow_siblings: bool,
        nodes: Option<&[u32]>,
        spanning: bool,
    ) -> Option<DedicatedChoice> {
        let want = vcpus as usize;
        let room = self.dedicated_room(shape, allow_siblings, nodes);
        let node = room.best_node(want);
        if node.is_none() && (!spanning || room.total < want) {
            return None;
        }
        let mut held = Vec::new();
        let mut given = 0;
        for core in &shape.cores {
            if given >= want {
                break;
            }
            let in_scope = match node {
                Some(n) => core.node == n,
                None => nodes.is_none_or(|allowed| core.node.is_some_and(|c| allowed.contains(&c))),
            };
            if !in_scope {
                continue;
            }
            if allow_siblings {
                for cpu in core.cpus.iter().filter(|c| self.is_free(shape, **c)).take(want - given) {
                    held.push(*cpu);
                    given += 1;
                }
            } else if core.cpus.iter().all(|c| self.is_free(shape, *c)) {
                held.extend(core.cpus.iter().copied());
                given += 1;
            }
        }
        (given >= want).then(|| DedicatedChoice { cpus: held.into_iter().collect(), node: node.flatten() })
    }
}

/// Dedicated room on a host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Room {
    /// Slots per NUMA node (`None`: CPUs of no known node).
    pub per_node: Vec<(Option<u32>, usize)>,
    pub total: usize,
}

impl Room {
    /// The node with the most room that holds `want` slots (lowest id on ties).
    pub fn best_node(&self, want: usize) -> Option<Option<u32>> {
        self.per_node
            .iter()
            .filter(|(_, slots)| *slots >= want)
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .map(|(node, _)| *node)
    }
}

/// Dedicated host CPUs chosen for a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DedicatedChoice {
    /// What the VM holds: whole cores unless it allows siblings.
    pub cpus: CpuSet,
    /// The NUMA node they all lie in, when they do.
    pub node: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::NumaNode;

    fn set(list: &str) -> CpuSet {
        CpuSet::parse(list).unwrap()
    }

    /// 2 nodes × 4 cores × 2 threads: node 0 holds 0-3 and their siblings 8-11.
    fn smt_host() -> Capacity {
        Capacity {
            cpus: set("0-15"),
            vcpus: 64,
            memory_mib: 65536,
            numa: vec![
                NumaNode { id: 0, cpus: set("0-3,8-11"), memory_mib: Some(32768) },
                NumaNode { id: 1, cpus: set("4-7,12-15"), memory_mib: Some(32768) },
            ],
            siblings: (0..8).map(|c| set(&format!("{c},{}", c + 8))).collect(),
        }
    }

    /// A ledger whose Dedicated VMs hold every CPU but `free`.
    fn holding_all_but(cap: &Capacity, free: &str) -> HostLedger {
        let free = set(free);
        HostLedger { dedicated: cap.cpus.iter().filter(|c| !free.contains(*c)).collect(), ..Default::default() }
    }

    #[test]
    fn dedicated_takes_whole_cores_in_one_node() {
        let cap = smt_host();
        let shape = HostShape::new(&cap);
        let ledger = HostLedger::default();
        let choice = ledger.choose_dedicated(&shape, 2, false, None, true).unwrap();
        assert_eq!(choice, DedicatedChoice { cpus: set("0-1,8-9"), node: Some(0) });
        let siblings = ledger.choose_dedicated(&shape, 2, true, None, true).unwrap();
        assert_eq!(siblings.cpus, set("0,8"), "with siblings allowed a core holds two vCPUs");
    }

    #[test]
    fn dedicated_prefers_the_node_with_room_and_spans_only_when_allowed() {
        let cap = smt_host();
        let shape = HostShape::new(&cap);
        let ledger = holding_all_but(&cap, "0,8,4-7,12-15"); // one core left on node 0, four on node 1
        assert_eq!(ledger.choose_dedicated(&shape, 3, false, None, true).unwrap().node, Some(1));
        assert_eq!(ledger.choose_dedicated(&shape, 5, false, None, false), None);
        let spanned = ledger.choose_dedicated(&shape, 5, false, None, true).unwrap();
        assert_eq!((spanned.cpus.len(), spanned.node), (10, None));
        assert_eq!(ledger.choose_dedicated(&shape, 2, false, Some(&[0]), false), None, "node 0 has one free core");
    }

    #[test]
    fn a_core_with_a_busy_sibling_is_not_free_for_a_whole_core_vm() {
        let cap = smt_host();
        let shape = HostShape::new(&cap);
        let ledger = holding_all_but(&cap, "1-3,8-11"); // CPU 0 is taken, so core {0,8} is not whole
        assert_eq!(ledger.choose_dedicated(&shape, 3, false, None, false).unwrap().cpus, set("1-3,9-11"));
        assert_eq!(ledger.dedicated_room(&shape, true, None).total, 7);
    }

    #[test]
    fn charge_and_discharge_balance() {
        let cap = smt_host();
        let shape = HostShape::new(&cap);
        let mut ledger = HostLedger::default();
        let vm = Vm {
            key: crate::snapshot::Key::new("ns", "vm"),
            labels: Default::default(),
            vcpus: 2,
            memory_mib: 1024,
            cpu: CpuRequest::Dedicated { host_cpus: None, allow_siblings: false },
            numa: Default::default(),
            node_selector: Default::default(),
            host: None,
            holds: false,
            allocated_cpus: None,
            ha: Default::default(),
        };
        let cpus = set("0-1,8-9");
        ledger.charge(&vm, Some(&cpus));
        assert_eq!(ledger.free_vcpus(&shape), (16.0 - 4.0) * 4.0);
        assert!(!ledger.is_free(&shape, 8) && ledger.is_free(&shape, 2));
        ledger.discharge(&vm, Some(&cpus));
        assert_eq!(ledger.shared_vcpus, 0);
        assert!(ledger.dedicated.is_empty());
    }
}
