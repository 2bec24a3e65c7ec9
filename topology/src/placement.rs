//! Decisions that follow from the host topology: which host CPUs the vCPUs of a
//! Dedicated VM get, and which NUMA nodes its memory comes from.

use std::collections::BTreeSet;

use crate::{CpuSet, Error, HostTopology};

/// Picks one host CPU per vCPU from `allowed`, for Dedicated placement.
///
/// Without `allow_siblings`, no two vCPUs share a core (hyper-thread siblings): a
/// vCPU on a sibling gets roughly half a core when both are busy, which is not what
/// "dedicated" promises. The VM is kept in one NUMA node when one can hold it (the
/// node with the most usable cores first), else it spans nodes in order.
pub fn choose_dedicated(
    topo: &HostTopology,
    allowed: &CpuSet,
    vcpus: u32,
    allow_siblings: bool,
) -> Result<Vec<u32>, Error> {
    let usable: Vec<_> = topo.cpus.iter().filter(|c| allowed.contains(c.id)).collect();
    // Candidates per node, in CPU order, one per core unless siblings are allowed.
    let mut per_node: Vec<(u32, Vec<u32>)> = topo
        .nodes
        .iter()
        .map(|node| {
            let mut cores_taken = BTreeSet::new();
            let cpus = usable
                .iter()
                .filter(|c| c.node == node.id)
                .filter(|c| allow_siblings || cores_taken.insert((c.package, c.core)))
                .map(|c| c.id)
                .collect();
            (node.id, cpus)
        })
        .collect();
    let want = vcpus as usize;
    per_node.sort_by_key(|(id, cpus)| (std::cmp::Reverse(cpus.len()), *id));
    if let Some((_, cpus)) = per_node.iter().find(|(_, cpus)| cpus.len() >= want) {
        return Ok(cpus[..want].to_vec());
    }
    let all: Vec<u32> = per_node.iter().flat_map(|(_, cpus)| cpus.iter().copied()).collect();
    if all.len() >= want {
        let mut chosen = all[..want].to_vec();
        chosen.sort_unstable();
        return Ok(chosen);
    }
    Err(Error::Placement(format!(
        "Dedicated placement of {vcpus} vCPUs needs {vcpus} host CPUs{}, but the allowed CPUs {allowed} offer {}",
        if allow_siblings { "" } else { " on distinct cores (hyper-thread siblings excluded)" },
        all.len()
    )))
}

/// The NUMA nodes holding any of `cpus`, in order.
pub fn numa_nodes_for(topo: &HostTopology, cpus: &CpuSet) -> Vec<u32> {
    topo.nodes.iter().filter(|n| n.cpus.iter().any(|c| cpus.contains(c))).map(|n| n.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysfs::tests::fixture;

    fn host(name: &str, sockets: u32, cores: u32, threads: u32) -> HostTopology {
        HostTopology::read(&fixture(name, sockets, cores, threads)).unwrap()
    }

    #[test]
    fn dedicated_avoids_siblings_and_stays_in_one_node() {
        let topo = host("ded", 2, 4, 2); // node 0: 0-3,8-11; node 1: 4-7,12-15
        let chosen = choose_dedicated(&topo, &topo.online(), 4, false).unwrap();
        assert_eq!(chosen, vec![0, 1, 2, 3]);
        let cores: BTreeSet<_> = chosen.iter().map(|c| topo.cpu(*c).unwrap().core).collect();
        assert_eq!(cores.len(), 4, "no two vCPUs on one core");
        assert_eq!(numa_nodes_for(&topo, &chosen.into_iter().collect()), vec![0]);
    }

    #[test]
    fn dedicated_prefers_the_node_with_room() {
        let topo = host("room", 2, 4, 2);
        // Only 1 core free in node 0 (cpus 0 and 8 are siblings), 3 in node 1.
        let allowed = CpuSet::parse("0,8,5-7,13").unwrap();
        assert_eq!(choose_dedicated(&topo, &allowed, 3, false).unwrap(), vec![5, 6, 7]);
    }

    #[test]
    fn dedicated_spans_nodes_when_no_node_fits() {
        let topo = host("span", 2, 2, 1);
        assert_eq!(choose_dedicated(&topo, &topo.online(), 3, false).unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn siblings_only_when_asked() {
        let topo = host("sib", 1, 2, 2); // cores: {0,2}, {1,3}
        let err = choose_dedicated(&topo, &topo.online(), 3, false).unwrap_err().to_string();
        assert!(err.contains("distinct cores") && err.contains("offer 2"), "{err}");
        assert_eq!(choose_dedicated(&topo, &topo.online(), 4, true).unwrap(), vec![0, 1, 2, 3]);
    }
}
