//! What one agent is: its host, its directories and programs, its timings.

use std::net::IpAddr;
use std::path::PathBuf;

use crate::timing::Timing;

/// The agent's settings, from its command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This host's `Node` name.
    pub node: String,
    /// This host's address: migration targets listen on it, the console is served on it.
    pub address: IpAddr,
    /// Namespace of the heartbeat Leases.
    pub namespace: String,
    /// Runtime state (VMM sockets, pids): `/run/drover`; gone after a power failure.
    pub runtime_dir: PathBuf,
    /// Persistent state (serial logs): `/var/lib/drover`.
    pub state_dir: PathBuf,
    /// The `drover-vmm` program.
    pub vmm: PathBuf,
    /// The `drover-monitor` program.
    pub monitor: PathBuf,
    /// Port of the agent's HTTP endpoint (health, console logs).
    pub http_port: u16,
    /// Ports migration targets listen on, inclusive.
    pub migration_ports: (u16, u16),
    /// Root of the sysfs tree the topology is read from (`/sys`, or a fixture).
    pub sysfs_root: PathBuf,
    /// The KVM device (`/dev/kvm`; another path in tests of a host without KVM).
    pub kvm_device: PathBuf,
    /// Heartbeat and fencing timings.
    pub timing: Timing,
    /// Size at which a VM's serial log rotates.
    pub serial_log_bytes: u64,
}

impl Settings {
    /// Where the serial log of a VM is kept (by namespace and name, so it survives
    /// restarts and migrations back to this host).
    pub fn serial_log(&self, namespace: &str, name: &str) -> PathBuf {
        self.state_dir.join("console").join(format!("{namespace}_{name}.log"))
    }

    /// Field manager name for this agent's writes.
    pub fn field_manager(&self) -> String {
        format!("drover-agent-{}", self.node)
    }

    /// Base URL of this agent's HTTP endpoint.
    pub fn http_url(&self) -> String {
        format!("http://{}", std::net::SocketAddr::new(self.address, self.http_port))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Settings for unit tests, with directories under `root`.
    pub(crate) fn settings(root: &std::path::Path) -> Settings {
        Settings {
            node: "host-1".into(),
            address: "10.77.0.11".parse().unwrap(),
            namespace: "drover-system".into(),
            runtime_dir: root.join("run"),
            state_dir: root.join("lib"),
            vmm: "drover-vmm".into(),
            monitor: "drover-monitor".into(),
            http_port: 7445,
            migration_ports: (49200, 49299),
            sysfs_root: root.to_path_buf(),
            kvm_device: "/dev/kvm".into(),
            timing: Timing::DEFAULT,
            serial_log_bytes: 1 << 20,
        }
    }
}
