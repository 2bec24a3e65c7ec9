//! The configuration of one VM, as `drover-vmm run` takes it (a JSON file or flags).
//! The node agent builds the same type from a `VirtualMachine` spec.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Everything `drover-vmm` needs to run one VM. (No `skip_serializing_if` here: the
/// config also travels inside snapshots and migration streams in postcard, a
/// positional format that needs every field.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmConfig {
    /// Name, for logs and thread names.
    #[serde(default = "default_name")]
    pub name: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Topology the guest sees; default: one socket, one core per vCPU.
    #[serde(default)]
    pub topology: Option<Topology>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Kernel image: an ELF with a PVH note (Drover's test guest), an ELF vmlinux or a bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Where the guest's serial console (COM1) goes.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Host CPUs for the vCPU threads.
    #[serde(default)]
    pub cpus: CpuPlacement,
    /// NUMA policy of guest memory.
    #[serde(default)]
    pub numa: NumaConfig,
    /// CPU shares of the vCPU threads (ESX: Low 500, Normal 1000, High 2000).
    #[serde(default = "default_shares")]
    pub shares: u32,
    /// Path of the control API's Unix socket.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
}

fn default_name() -> String {
    "vm".into()
}
fn default_shares() -> u32 {
    1000
}

/// Sockets × cores × threads, as the guest sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

/// Where serial output goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Null,
    /// Streamed to every client connected to a Unix socket the VMM listens on
    /// (what a console attaches to); output with no client connected is dropped.
    Socket(PathBuf),
}

/// Host CPUs for vCPU threads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CpuPlacement {
    /// Host CPUs the vCPUs may use (Linux CPU list); default: every CPU the process may use.
    #[serde(default)]
    pub host_cpus: Option<String>,
    /// Pin each vCPU to a host CPU of its own (1:1).
    #[serde(default)]
    pub dedicated: bool,
    /// With `dedicated`, allow two vCPUs on hyper-thread siblings.
    #[serde(default)]
    pub allow_siblings: bool,
}

/// NUMA binding of guest memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NumaConfig {
    #[serde(default)]
    pub policy: NumaPolicy,
    /// Host NUMA nodes; empty: the nodes of the vCPUs' host CPUs.
    #[serde(default)]
    pub nodes: Vec<u32>,
}

/// A NUMA memory policy (mbind).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NumaPolicy {
    #[default]
    None,
    Preferred,
    Strict,
    Interleave,
}

/// Limits the VMM enforces before touching KVM.
pub const MIN_MEMORY_MIB: u64 = 16;
/// The largest guest: what the test guest's page tables map (64 GiB).
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;
/// xAPIC IDs are 8 bits and 255 is broadcast.
pub const MAX_VCPUS: u32 = 254;
/// The x86 boot protocol's command line buffer, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;

impl VmConfig {
    /// Reads a JSON config file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, Error> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The topology, defaulting to one socket with one core per vCPU.
    pub fn topology(&self) -> Topology {
        self.topology.unwrap_or(Topology { sockets: 1, cores: self.vcpus, threads: 1 })
    }

    /// Checks what can be checked without KVM, with messages naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!("vcpus: {} is out of range 1-{MAX_VCPUS}", self.vcpus));
        }
        let t = self.topology();
        if t.sockets == 0 || t.cores == 0 || t.threads == 0 || t.sockets * t.cores * t.threads != self.vcpus {
            return bad(format!(
                "topology: {} sockets × {} cores × {} threads does not make {} vCPUs",
                t.sockets, t.cores, t.threads, self.vcpus
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return bad(format!("memoryMib: {} is out of range {MIN_MEMORY_MIB}-{MAX_MEMORY_MIB}", self.memory_mib));
        }
        if self.cmdline.len() > CMDLINE_MAX_SIZE - 1 {
            return bad(format!("cmdline: {} bytes, more than {}", self.cmdline.len(), CMDLINE_MAX_SIZE - 1));
        }
        if !(1..=10_000).contains(&self.shares) {
            return bad(format!("shares: {} is out of range 1-10000", self.shares));
        }
        if let Some(list) = &self.cpus.host_cpus {
            drover_topology::CpuSet::parse(list).map_err(|e| Error::Config(format!("cpus.hostCpus: {e}")))?;
        }
        if self.numa.policy == NumaPolicy::None && !self.numa.nodes.is_empty() {
            return bad("numa.nodes: set a policy (Preferred, Strict or Interleave) to use nodes".into());
        }
        Ok(())
    }
}
