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
    /// virtio-blk disks, in the order the guest finds them (`/dev/vda`, `vdb`, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs, after the disks on the MMIO bus.
    #[serde(default)]
    pub nics: Vec<NicConfig>,
}

/// A virtio-blk disk on a raw image file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskConfig {
    /// The image file (raw: the guest's sectors, byte for byte).
    pub path: PathBuf,
    /// The guest may read but not write it.
    #[serde(default)]
    pub read_only: bool,
    /// What the guest reads as the disk's serial (`/sys/block/vda/serial`), up to
    /// 20 bytes; default: the image's file name.
    #[serde(default)]
    pub id: String,
}

/// A virtio-net NIC on a tap device the caller created (and attached to a bridge).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NicConfig {
    /// The tap's interface name on this host.
    pub tap: String,
    /// The guest's MAC address, `52:54:00:12:34:56`.
    pub mac: String,
}

/// The most virtio devices (disks and NICs together) a VM can have: IOAPIC pins 5-23.
pub const MAX_DEVICES: usize = 19;
/// Longest interface name Linux takes (IFNAMSIZ less the NUL).
pub const MAX_IFNAME: usize = 15;
/// Longest disk ID (VIRTIO_BLK_ID_BYTES).
pub const MAX_DISK_ID: usize = 20;

/// Parses a MAC address, `aa:bb:cc:dd:ee:ff`; a guest NIC's must be unicast.
pub fn parse_mac(mac: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| if b.len() == 2 { u8::from_str_radix(b, 16).ok() } else { None })
        .collect::<Option<_>>()
        .filter(|b: &Vec<u8>| b.len() == 6)
        .ok_or_else(|| format!("{mac:?} is not a MAC address like 52:54:00:12:34:56"))?;
    let mut out = [0u8; 6];
    out.copy_from_slice(&bytes);
    if out[0] & 1 != 0 {
        return Err(format!("{mac:?} is a multicast address; a NIC needs a unicast one (first byte even)"));
    }
    Ok(out)
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
        if self.disks.len() + self.nics.len() > MAX_DEVICES {
            return bad(format!(
                "disks, nics: {} disks and {} NICs, more than the {MAX_DEVICES} devices a VM can have",
                self.disks.len(),
                self.nics.len()
            ));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            if disk.path.as_os_str().is_empty() {
                return bad(format!("disks[{i}].path: empty"));
            }
            if disk.id.len() > MAX_DISK_ID {
                return bad(format!("disks[{i}].id: {} bytes, more than {MAX_DISK_ID}", disk.id.len()));
            }
        }
        for (i, nic) in self.nics.iter().enumerate() {
            if nic.tap.is_empty() || nic.tap.len() > MAX_IFNAME || nic.tap.contains(['/', ' ', ':']) {
                return bad(format!("nics[{i}].tap: {:?} is not an interface name (1-{MAX_IFNAME} bytes)", nic.tap));
            }
            parse_mac(&nic.mac).map_err(|e| Error::Config(format!("nics[{i}].mac: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        serde_json::from_str(r#"{"vcpus": 1, "memoryMib": 64, "kernel": "/k"}"#).unwrap()
    }

    #[test]
    fn macs_parse_and_multicast_is_refused() {
        assert_eq!(parse_mac("52:54:00:12:34:5f").unwrap(), [0x52, 0x54, 0, 0x12, 0x34, 0x5f]);
        for bad in ["52:54:00:12:34", "52:54:00:12:34:5g", "52-54-00-12-34-56", "5:54:00:12:34:56:1", ""] {
            assert!(parse_mac(bad).unwrap_err().contains("not a MAC"), "{bad}");
        }
        assert!(parse_mac("01:00:5e:00:00:01").unwrap_err().contains("multicast"));
    }

    #[test]
    fn devices_are_checked_with_the_field_named() {
        let mut c = config();
        c.disks = vec![DiskConfig { path: "/d.img".into(), read_only: false, id: "x".repeat(21) }];
        assert!(c.validate().unwrap_err().to_string().contains("disks[0].id: 21 bytes"));
        c.disks[0].id.clear();
        c.nics = vec![NicConfig { tap: "tap-with-a-long-name".into(), mac: "52:54:00:00:00:01".into() }];
        assert!(c.validate().unwrap_err().to_string().contains("nics[0].tap"));
        c.nics[0].tap = "tap0".into();
        c.nics[0].mac = "ff:ff:ff:ff:ff:ff".into();
        assert!(c.validate().unwrap_err().to_string().contains("nics[0].mac"));
        c.nics[0].mac = "52:54:00:00:00:01".into();
        c.validate().unwrap();
        c.disks = vec![c.disks[0].clone(); MAX_DEVICES];
        assert!(c.validate().unwrap_err().to_string().contains("19 disks and 1 NICs"));
    }
}
