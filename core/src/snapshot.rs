//! What the core decides on: a plain copy of the cluster, made by the operator from
//! what it watches (Nodes with their host facts and Leases, VirtualMachines,
//! DRSRules with their selectors resolved, migrations in flight). Plain data, so a
//! test or a benchmark builds one by hand and a dump of a live cluster reads back.

use std::collections::{BTreeMap, BTreeSet};

use drover_topology::CpuSet;
use serde::{Deserialize, Serialize};

/// Memory a VM costs its host beyond guest RAM: the VMM process, its page tables,
/// the monitor. `drover-vmm` measures 3.5 MiB (README); 8 MiB leaves room for the
/// KVM structures of large guests and the serial buffers.
pub const VMM_OVERHEAD_MIB: u64 = 8;

/// A namespaced object's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

/// A VM's identity.
pub type VmKey = Key;

impl Key {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The cluster as the operator sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
    pub rules: Vec<Rule>,
    pub migrations: Vec<Migration>,
    /// HA settings of each HostPolicy, by name; a host without a policy (or with
    /// one not listed) gets [`HaSettings::default`].
    #[serde(default)]
    pub ha: BTreeMap<String, HaSettings>,
}

impl Snapshot {
    /// The HA settings of `host`'s pool.
    pub fn ha_of(&self, host: &Host) -> HaSettings {
        host.policy.as_ref().and_then(|p| self.ha.get(p)).copied().unwrap_or_default()
    }
}

/// A pool's HA settings (a HostPolicy's `spec.ha`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaSettings {
    /// Restart the VMs of failed hosts.
    pub enabled: bool,
    /// Keep capacity free for failover: refuse starts and moves that eat into it.
    pub admission_control: bool,
    /// Host failures the pool must survive.
    pub host_failures_to_tolerate: u32,
}

impl Default for HaSettings {
    /// Hosts no HostPolicy selects: HA restarts their VMs, best effort (there is no
    /// pool to keep failover capacity in).
    fn default() -> Self {
        Self { enabled: true, admission_control: false, host_failures_to_tolerate: 0 }
    }
}

/// One host (a Node with an agent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    /// The Node's labels (VM node selectors and VM-Host rules match them).
    pub labels: BTreeMap<String, String>,
    pub health: HostHealth,
    /// False when cordoned (`spec.unschedulable`): no new VMs, the ones there stay.
    pub schedulable: bool,
    /// Tainted `drover.dev/maintenance`: no new VMs, and the ones there leave.
    pub maintenance: bool,
    /// The HostPolicy that selects it, if one does.
    pub policy: Option<String>,
    pub capacity: Capacity,
    /// Whether a VM may span NUMA nodes here when no one node holds it (the
    /// HostPolicy's `numa.allowSpanning`; true without a policy).
    pub numa_spanning: bool,
}

/// Whether a host can take VMs now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostHealth {
    /// Its agent renews its Lease, published its facts, and KVM works there.
    Ready,
    /// Not, and why (for the reasons users read).
    NotReady(String),
    /// Failed: its Lease has not changed for the lease duration, on the operator's
    /// clock. Its agent has powered its VMs off by then (the fencing deadline comes
    /// first), so HA may start them elsewhere.
    Failed(String),
}

impl HostHealth {
    pub fn is_ready(&self) -> bool {
        matches!(self, HostHealth::Ready)
    }

    pub fn is_failed(&self) -> bool {
        matches!(self, HostHealth::Failed(_))
    }

    /// Why it takes no VMs, if it does not.
    pub fn problem(&self) -> Option<&str> {
        match self {
            HostHealth::Ready => None,
            HostHealth::NotReady(why) | HostHealth::Failed(why) => Some(why),
        }
    }
}

/// What a host offers to VMs (the agent's published facts, under its HostPolicy's
/// reservations and overcommit ratios).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Host CPUs VMs may use.
    pub cpus: CpuSet,
    /// vCPUs of Shared VMs that fit on all of `cpus` (CPUs × the overcommit ratio).
    pub vcpus: u64,
    /// Guest memory that fits, MiB, VMM overhead included.
    pub memory_mib: u64,
    /// NUMA nodes (their CPUs among `cpus`, their memory when known).
    pub numa: Vec<NumaNode>,
    /// Hyper-thread sibling groups of more than one CPU.
    pub siblings: Vec<CpuSet>,
}

impl Capacity {
    /// Shared vCPUs per host CPU.
    pub fn cpu_ratio(&self) -> f64 {
        if self.cpus.is_empty() { 1.0 } else { self.vcpus as f64 / self.cpus.len() as f64 }
    }
}

/// One NUMA node of a host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NumaNode {
    pub id: u32,
    pub cpus: CpuSet,
    pub memory_mib: Option<u64>,
}

/// One VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    pub key: VmKey,
    pub labels: BTreeMap<String, String>,
    pub vcpus: u32,
    /// Guest memory, MiB (the VMM's overhead is added where capacity is counted).
    pub memory_mib: u64,
    pub cpu: CpuRequest,
    pub numa: NumaRequest,
    /// Labels a host must carry.
    pub node_selector: BTreeMap<String, String>,
    /// The host it is placed on, if any.
    pub host: Option<String>,
    /// Whether it holds its resources on `host` now: it runs or is about to, or it
    /// stopped and its run strategy will start it there again.
    pub holds: bool,
    /// The host CPUs it holds there (Dedicated VMs: chosen by the operator).
    pub allocated_cpus: Option<CpuSet>,
    /// How HA treats it.
    #[serde(default)]
    pub ha: VmHa,
}

/// How HA treats a VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHa {
    /// Its restart priority (the VM's, else its pool's default).
    pub priority: RestartPriority,
    /// Its run strategy keeps it running (Always, RerunOnFailure): HA restarts it
    /// after a host failure and admission control keeps room for it.
    pub keeps_running: bool,
}

impl VmHa {
    /// HA would restart it: admission control keeps room for it.
    pub fn protected(&self) -> bool {
        self.keeps_running && self.priority != RestartPriority::Disabled
    }
}

/// HA restart priority: High VMs restart first; Disabled ones not at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RestartPriority {
    Disabled,
    Low,
    #[default]
    Medium,
    High,
}

impl Vm {
    /// Memory it costs a host.
    pub fn footprint_mib(&self) -> u64 {
        self.memory_mib + VMM_OVERHEAD_MIB
    }

    pub fn is_dedicated(&self) -> bool {
        matches!(self.cpu, CpuRequest::Dedicated { .. })
    }
}

/// Host CPUs a VM asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuRequest {
    /// vCPUs float over host CPUs shared with other Shared VMs (on `host_cpus` if given).
    Shared { host_cpus: Option<CpuSet> },
    /// One host CPU per vCPU, held by this VM alone: `host_cpus` if given, else
    /// chosen (whole cores, unless `allow_siblings`).
    Dedicated { host_cpus: Option<CpuSet>, allow_siblings: bool },
}

/// NUMA binding a VM asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaRequest {
    /// Strict: guest memory (and Dedicated CPUs) only from `nodes`, or from one node
    /// when none are named.
    pub strict: bool,
    pub nodes: Vec<u32>,
}

/// A DRS rule with its selectors resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub key: Key,
    pub kind: RuleKind,
    /// Required ("must") or Preferred ("should").
    pub required: bool,
    /// The VMs it governs.
    pub vms: BTreeSet<VmKey>,
    /// VM-Host rules: the hosts its node selector picks.
    pub hosts: BTreeSet<String>,
}

/// Kind of DRS rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuleKind {
    VmVmAffinity,
    VmVmAntiAffinity,
    VmHostAffinity,
    VmHostAntiAffinity,
}

/// A migration that has not ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub key: Key,
    pub vm: VmKey,
    /// Where the VM runs.
    pub source: String,
    /// Where it goes, once approved.
    pub target: Option<String>,
    /// Approved and not ended: it holds the VM's resources on `target` (and the VM
    /// still holds its own on `source`).
    pub approved: bool,
    /// What the target agent last said of its VMM.
    #[serde(default)]
    pub target_state: Option<TargetState>,
}

/// What a migration's target VMM does, as its agent says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetState {
    Receiving,
    /// It runs the guest: the VM is the target's.
    Running,
    /// Nothing of the migration runs there, nor will.
    Stopped,
}
