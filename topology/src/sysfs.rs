//! The host's CPUs, cores, packages and NUMA nodes, read from sysfs. The root is a
//! parameter (`/sys` on a host) so that tests can point it at fixture trees.

use std::path::{Path, PathBuf};

use crate::{CpuSet, Error};

/// One online host CPU (a hardware thread).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCpu {
    pub id: u32,
    /// Socket.
    pub package: u32,
    /// Core within the package.
    pub core: u32,
    /// Hyper-thread siblings, itself included.
    pub siblings: CpuSet,
    /// NUMA node.
    pub node: u32,
}

/// One NUMA node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNode {
    pub id: u32,
    pub cpus: CpuSet,
    /// MemTotal of the node, in KiB, when sysfs reports it.
    pub memory_kib: Option<u64>,
}

/// The host's CPU and NUMA layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostTopology {
    pub cpus: Vec<HostCpu>,
    pub nodes: Vec<NumaNode>,
}

impl HostTopology {
    /// Reads the topology of the host whose sysfs is mounted at `root` (`/sys`).
    pub fn read(root: &Path) -> Result<Self, Error> {
        let cpu_dir = root.join("devices/system/cpu");
        let online = CpuSet::parse(read(&cpu_dir.join("online"))?.trim())?;

        // NUMA nodes; a kernel without NUMA support has no node directory: one node.
        let node_dir = root.join("devices/system/node");
        let mut nodes = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&node_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_prefix("node").and_then(|n| n.parse::<u32>().ok()) else { continue };
                let cpus = CpuSet::parse(read(&entry.path().join("cpulist"))?.trim())?;
                let memory_kib =
                    std::fs::read_to_string(entry.path().join("meminfo")).ok().and_then(|m| parse_mem_total(&m));
                nodes.push(NumaNode { id, cpus, memory_kib });
            }
        }
        if nodes.is_empty() {
            nodes.push(NumaNode { id: 0, cpus: online.clone(), memory_kib: None });
        }
        nodes.sort_by_key(|n| n.id);

        let mut cpus = Vec::new();
        for id in online.iter() {
            let topo = cpu_dir.join(format!("cpu{id}/topology"));
            let number = |file: &str| -> Result<u32, Error> {
                let path = topo.join(file);
                let text = read(&path)?;
                text.trim().parse().map_err(|_| Error::Sysfs {
                    path: path.display().to_string(),
                    why: format!("not a number: {text:?}"),
                })
            };
            let siblings = CpuSet::parse(read(&topo.join("thread_siblings_list"))?.trim())?;
            let node = nodes.iter().find(|n| n.cpus.contains(id)).map(|n| n.id).unwrap_or(0);
            cpus.push(HostCpu {
                id,
                package: number("physical_package_id")?,
                core: number("core_id")?,
                siblings,
                node,
            });
        }
        Ok(Self { cpus, nodes })
    }

    /// The CPU with this id, if online.
    pub fn cpu(&self, id: u32) -> Option<&HostCpu> {
        self.cpus.iter().find(|c| c.id == id)
    }

    /// Every online CPU.
    pub fn online(&self) -> CpuSet {
        self.cpus.iter().map(|c| c.id).collect()
    }
}

fn read(path: &PathBuf) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::Sysfs { path: path.display().to_string(), why: e.to_string() })
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    meminfo.lines().find(|l| l.contains("MemTotal:"))?.split_whitespace().rev().nth(1)?.parse().ok()
}

/// Writes a sysfs fixture tree for tests: `sockets` packages of `cores` cores with
/// `threads` hyper-threads each, one NUMA node per socket. CPU numbering follows
/// Linux on x86: first thread of every core across all sockets, then the second.
#[doc(hidden)]
pub fn write_fixture(root: &Path, sockets: u32, cores: u32, threads: u32) -> std::io::Result<()> {
    let cpu_dir = root.join("devices/system/cpu");
    let per_thread = sockets * cores;
    let total = per_thread * threads;
    std::fs::create_dir_all(&cpu_dir)?;
    std::fs::write(cpu_dir.join("online"), format!("0-{}\n", total - 1))?;
    let mut node_cpus: Vec<Vec<u32>> = vec![Vec::new(); sockets as usize];
    for id in 0..total {
        let socket = (id % per_thread) / cores;
        let core = id % cores;
        let siblings: CpuSet = (0..threads).map(|t| t * per_thread + socket * cores + core).collect();
        let topo = cpu_dir.join(format!("cpu{id}/topology"));
        std::fs::create_dir_all(&topo)?;
        std::fs::write(topo.join("physical_package_id"), format!("{socket}\n"))?;
        std::fs::write(topo.join("core_id"), format!("{core}\n"))?;
        std::fs::write(topo.join("thread_siblings_list"), format!("{siblings}\n"))?;
        node_cpus[socket as usize].push(id);
    }
    for (node, cpus) in node_cpus.into_iter().enumerate() {
        let dir = root.join(format!("devices/system/node/node{node}"));
        std::fs::create_dir_all(&dir)?;
        let set: CpuSet = cpus.into_iter().collect();
        std::fs::write(dir.join("cpulist"), format!("{set}\n"))?;
        std::fs::write(
            dir.join("meminfo"),
            format!("Node {node} MemTotal:       16318312 kB\nNode {node} MemFree: 1 kB\n"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh fixture directory for one test.
    pub(crate) fn fixture(name: &str, sockets: u32, cores: u32, threads: u32) -> PathBuf {
        let root = std::env::temp_dir().join(format!("drover-topology-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        write_fixture(&root, sockets, cores, threads).expect("write fixture");
        root
    }

    #[test]
    fn reads_a_two_socket_hyperthreaded_host() {
        let root = fixture("2s", 2, 4, 2);
        let topo = HostTopology::read(&root).unwrap();
        assert_eq!(topo.cpus.len(), 16);
        assert_eq!(topo.nodes.len(), 2);
        assert_eq!(topo.nodes[0].cpus.to_string(), "0-3,8-11");
        assert_eq!(topo.nodes[1].memory_kib, Some(16318312));
        let cpu9 = topo.cpu(9).unwrap();
        assert_eq!((cpu9.package, cpu9.core, cpu9.node), (0, 1, 0));
        assert_eq!(cpu9.siblings.to_string(), "1,9");
        assert_eq!(topo.cpu(12).unwrap().node, 1);
    }

    #[test]
    fn reads_this_host() {
        // The real /sys: whatever it holds, every online CPU is in exactly one node.
        let topo = HostTopology::read(Path::new("/sys")).expect("read /sys");
        assert!(!topo.cpus.is_empty());
        for cpu in &topo.cpus {
            assert_eq!(topo.nodes.iter().filter(|n| n.cpus.contains(cpu.id)).count(), 1, "cpu {}", cpu.id);
            assert!(cpu.siblings.contains(cpu.id));
        }
    }

    #[test]
    fn missing_sysfs_names_the_file() {
        let err = HostTopology::read(Path::new("/nonexistent-sysfs")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent-sysfs/devices/system/cpu/online"), "{err}");
    }
}
