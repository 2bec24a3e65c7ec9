//! Which host CPUs each vCPU thread may run on, and putting threads there.

use drover_topology::{CpuSet, HostTopology};

use crate::Error;
use crate::config::VmConfig;

/// The sysfs root the VMM reads the host topology from.
pub const SYSFS_ROOT: &str = "/sys";

/// Host CPUs per vCPU: one CPU each for Dedicated placement, the whole allowed set
/// for Shared. `hostCpus` must name online CPUs this process may use.
pub fn plan(config: &VmConfig) -> Result<Vec<CpuSet>, Error> {
    // Only Dedicated placement needs the topology; reading sysfs costs start-up time.
    let topo = if config.cpus.dedicated { Some(host_topology()?) } else { None };
    plan_on(config, topo.as_ref(), &current_affinity()?)
}

/// The host topology, read from sysfs.
pub fn host_topology() -> Result<HostTopology, Error> {
    HostTopology::read(std::path::Path::new(SYSFS_ROOT)).map_err(Error::Topology)
}

/// `plan` for a given host topology and process affinity (testable on fixtures).
pub fn plan_on(config: &VmConfig, topo: Option<&HostTopology>, usable: &CpuSet) -> Result<Vec<CpuSet>, Error> {
    let allowed = match &config.cpus.host_cpus {
        Some(list) => {
            let wanted = CpuSet::parse(list).map_err(|e| Error::Config(format!("cpus.hostCpus: {e}")))?;
            let absent: CpuSet = wanted.iter().filter(|c| !usable.contains(*c)).collect();
            if !absent.is_empty() {
                return Err(Error::Config(format!(
                    "cpus.hostCpus: CPU {absent} is not available on this host (usable CPUs: {usable})"
                )));
            }
            wanted
        }
        None => usable.clone(),
    };
    if let (true, Some(topo)) = (config.cpus.dedicated, topo) {
        let chosen = drover_topology::choose_dedicated(topo, &allowed, config.vcpus, config.cpus.allow_siblings)
            .map_err(|e| Error::Config(format!("cpus: {e}")))?;
        Ok(chosen.into_iter().map(|c| [c].into_iter().collect()).collect())
    } else {
        Ok(vec![allowed; config.vcpus as usize])
    }
}

/// The CPUs this process may run on.
pub fn current_affinity() -> Result<CpuSet, Error> {
    thread_affinity(0)
}

/// The CPUs thread `tid` may run on.
pub fn thread_affinity(tid: i32) -> Result<CpuSet, Error> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, which outlives the call.
    let rc = unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(Error::last_os_error(format!("sched_getaffinity({tid})")));
    }
    // SAFETY: CPU_ISSET reads `set` within CPU_SETSIZE.
    Ok((0..libc::CPU_SETSIZE as u32).filter(|c| unsafe { libc::CPU_ISSET(*c as usize, &set) }).collect())
}

/// Restricts thread `tid` (0: the calling thread) to `cpus`.
pub fn pin_thread(tid: i32, cpus: &CpuSet) -> Result<(), Error> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in cpus.iter().filter(|c| (*c as i32) < libc::CPU_SETSIZE) {
        // SAFETY: the index is below CPU_SETSIZE, so CPU_SET stays within `set`.
        unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    }
    // SAFETY: the pointer and size describe `set`, which outlives the call.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(Error::last_os_error(format!("pinning thread {tid} to CPUs {cpus}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CpuPlacement;

    fn config(vcpus: u32, cpus: CpuPlacement) -> VmConfig {
        serde_json::from_value(serde_json::json!({"vcpus": vcpus, "memoryMib": 64, "kernel": "/k"}))
            .map(|c: VmConfig| VmConfig { cpus, ..c })
            .unwrap()
    }

    fn fixture(name: &str) -> HostTopology {
        let root = std::env::temp_dir().join(format!("drover-affinity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        drover_topology::write_fixture(&root, 2, 4, 2).unwrap();
        HostTopology::read(&root).unwrap()
    }

    #[test]
    fn dedicated_gets_one_cpu_per_vcpu_without_siblings() {
        let topo = fixture("ded");
        let plan =
            plan_on(&config(4, CpuPlacement { dedicated: true, ..Default::default() }), Some(&topo), &topo.online())
                .unwrap();
        assert_eq!(plan.iter().map(|s| s.to_string()).collect::<Vec<_>>(), vec!["0", "1", "2", "3"]);
    }

    #[test]
    fn shared_gets_the_whole_set() {
        let topo = fixture("shared");
        let placement = CpuPlacement { host_cpus: Some("4-7".into()), ..Default::default() };
        let plan = plan_on(&config(2, placement), Some(&topo), &topo.online()).unwrap();
        assert_eq!(plan, vec![CpuSet::parse("4-7").unwrap(); 2]);
    }

    #[test]
    fn absent_cpus_are_refused_by_name() {
        let topo = fixture("absent");
        let placement = CpuPlacement { host_cpus: Some("14-17".into()), ..Default::default() };
        let err = plan_on(&config(2, placement), Some(&topo), &topo.online()).unwrap_err().to_string();
        assert!(err.contains("cpus.hostCpus: CPU 16-17 is not available"), "{err}");
    }

    #[test]
    fn pinning_the_calling_thread_shows_in_proc() {
        let mine = current_affinity().unwrap();
        let first: CpuSet = mine.iter().take(1).collect();
        let handle = std::thread::spawn(move || {
            pin_thread(0, &first).unwrap();
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap().to_string();
            (line, first)
        });
        let (line, first) = handle.join().unwrap();
        assert_eq!(line.split_whitespace().nth(1), Some(first.to_string().as_str()));
    }
}
