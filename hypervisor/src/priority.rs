//! vCPU priority (ESX shares: Low 500, Normal 1000, High 2000), applied to the vCPU
//! threads through the CPU controller of a cgroup of the VM's own when one can be
//! made (cgroup v1 `cpu.shares`; v2 `cpu.weight`), otherwise through thread nice
//! values. Changeable while the VM runs.

use std::path::{Path, PathBuf};

use crate::Error;

/// How priority is applied on this host.
#[derive(Debug)]
pub enum Priority {
    /// A cgroup v1 `cpu` group holding the vCPU threads.
    CgroupV1 { dir: PathBuf },
    /// A cgroup v2 group holding the whole VMM process (v2 puts threads of a process
    /// in one domain group; the VM as a whole has the weight, as ESX shares do).
    CgroupV2 { dir: PathBuf },
    /// Nice values of the vCPU threads.
    Nice,
}

/// cgroup v1 `cpu.shares` for ESX shares (Normal 1000 is the kernel's default 1024).
pub fn v1_shares(shares: u32) -> u64 {
    (u64::from(shares) * 1024 / 1000).max(2)
}

/// cgroup v2 `cpu.weight` (1-10000, default 100) for ESX shares.
pub fn v2_weight(shares: u32) -> u64 {
    (u64::from(shares) / 10).clamp(1, 10_000)
}

/// A nice value with about the same CPU ratio as `shares` against Normal: CFS gives
/// each nice step about 1.25 times the weight of the next.
pub fn nice_for(shares: u32) -> i32 {
    let ratio = f64::from(shares.max(1)) / 1000.0;
    (-(ratio.ln() / 1.25f64.ln())).round().clamp(-20.0, 19.0) as i32
}

impl Priority {
    /// Makes the VM's cgroup (named after `name` and this process) where the host
    /// allows, else falls back to nice values. Leftover groups of VMMs that are gone
    /// are removed on the way.
    pub fn create(name: &str) -> Priority {
        let group = format!("drover-vm-{}-{}", sanitize(name), std::process::id());
        if let Some(base) = v1_cpu_base() {
            sweep(&base);
            let dir = base.join(&group);
            if std::fs::create_dir(&dir).is_ok() {
                return Priority::CgroupV1 { dir };
            }
        }
        if let Some(base) = v2_base() {
            sweep(&base);
            let dir = base.join(&group);
            if std::fs::create_dir(&dir).is_ok() {
                if std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).is_ok() {
                    return Priority::CgroupV2 { dir };
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
        Priority::Nice
    }

    /// Puts thread `tid` under this priority (v1: into the group; nice: renice).
    pub fn add_thread(&self, tid: i32, shares: u32) -> Result<(), Error> {
        match self {
            Priority::CgroupV1 { dir } => write(&dir.join("tasks"), &tid.to_string()),
            Priority::CgroupV2 { .. } => Ok(()),
            Priority::Nice => renice(tid, nice_for(shares)),
        }
    }

    /// Sets the shares of the VM (every vCPU thread in `tids`).
    pub fn set_shares(&self, shares: u32, tids: &[i32]) -> Result<(), Error> {
        match self {
            Priority::CgroupV1 { dir } => write(&dir.join("cpu.shares"), &v1_shares(shares).to_string()),
            Priority::CgroupV2 { dir } => write(&dir.join("cpu.weight"), &v2_weight(shares).to_string()),
            Priority::Nice => tids.iter().try_for_each(|tid| renice(*tid, nice_for(shares))),
        }
    }

    /// A short description for status and logs.
    pub fn describe(&self) -> String {
        match self {
            Priority::CgroupV1 { dir } => format!("cgroup v1 cpu.shares in {}", dir.display()),
            Priority::CgroupV2 { dir } => format!("cgroup v2 cpu.weight in {}", dir.display()),
            Priority::Nice => "thread nice values".into(),
        }
    }

    /// Removes the VM's cgroup, moving whatever it holds back to the parent group.
    pub fn remove(&self) {
        let (dir, file) = match self {
            Priority::CgroupV1 { dir } => (dir, "tasks"),
            Priority::CgroupV2 { dir } => (dir, "cgroup.procs"),
            Priority::Nice => return,
        };
        if let (Some(parent), Ok(members)) = (dir.parent(), std::fs::read_to_string(dir.join(file))) {
            for id in members.lines() {
                let _ = std::fs::write(parent.join(file), id);
            }
        }
        if let Err(e) = std::fs::remove_dir(dir) {
            tracing::debug!("removing {}: {e}", dir.display());
        }
    }
}

impl Drop for Priority {
    /// A VMM that fails during set-up leaves no group behind.
    fn drop(&mut self) {
        self.remove();
    }
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).take(40).collect()
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    std::fs::write(path, value).map_err(|e| Error::io(format!("writing {value} to {}", path.display()), e))
}

fn renice(tid: i32, nice: i32) -> Result<(), Error> {
    // SAFETY: setpriority takes plain integers; `tid` names a thread of this process.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc != 0 {
        return Err(Error::last_os_error(format!("setting nice {nice} on thread {tid}")));
    }
    Ok(())
}

/// This process's group in the cgroup v1 `cpu` hierarchy, if mounted and writable.
fn v1_cpu_base() -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "cpu").then(|| path.to_string())
    })?;
    ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"]
        .iter()
        .map(|mount| Path::new(mount).join(path.trim_start_matches('/')))
        .find(|dir| dir.join("cpu.shares").exists())
}

/// This process's parent group in cgroup v2, if the cpu controller is enabled there.
fn v2_base() -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let controllers = std::fs::read_to_string(dir.join("cgroup.subtree_control")).ok()?;
    controllers.split_whitespace().any(|c| c == "cpu").then_some(dir)
}

/// Removes empty groups of VMMs that no longer run (killed before they could clean up).
fn sweep(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("drover-vm-")
            .and_then(|rest| rest.rsplit('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esx_levels_map_to_kernel_weights() {
        assert_eq!(v1_shares(1000), 1024);
        assert_eq!(v1_shares(2000), 2048);
        assert_eq!(v1_shares(500), 512);
        assert_eq!(v2_weight(1000), 100);
        assert_eq!(v2_weight(2000), 200);
        assert_eq!(nice_for(1000), 0);
        assert_eq!(nice_for(2000), -3);
        assert_eq!(nice_for(500), 3);
        assert!(nice_for(1) <= 19 && nice_for(10_000) >= -20);
    }
}
