//! `VirtualMachine`: one guest, its virtual hardware, and how Drover keeps it running.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{CEL_CPU_LIST_COUNT, CEL_CPU_LIST_VALID, Conditions, MAX_VCPUS, cel, cpu_list_rule};

/// A virtual machine: its vCPUs (Virtual SMP), memory, boot source and disks, and
/// what Drover does when its host fails or enters maintenance. The operator places it
/// on a host (`status.nodeName`); the agent there runs it in its own VMM process.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "drover.dev",
    version = "v1alpha1",
    kind = "VirtualMachine",
    doc = "A Drover virtual machine: declared here, placed by the operator, run by the agent of its host in its own KVM-based VMM process.",
    plural = "virtualmachines",
    namespaced,
    status = "VirtualMachineStatus",
    shortname = "vm",
    shortname = "dvm",
    category = "drover",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Lifecycle phase"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName", description = "Host the VM runs on"),
    printcolumn(name = "vCPUs", type_ = "integer", json_path = ".spec.cpu.vcpus", description = "Virtual CPUs"),
    printcolumn(name = "Memory", type_ = "string", json_path = ".spec.memory.size", description = "Guest memory"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Placement",
        type_ = "string",
        json_path = ".spec.cpu.placement",
        priority = "1",
        description = "Shared or Dedicated host CPUs"
    ),
    printcolumn(
        name = "Host CPUs",
        type_ = "string",
        json_path = ".status.hostCpus",
        priority = "1",
        description = "Host CPUs the vCPUs run on"
    ),
    printcolumn(
        name = "Priority",
        type_ = "string",
        json_path = ".spec.cpu.priority",
        priority = "1",
        description = "vCPU priority"
    ),
    printcolumn(name = "Run Strategy", type_ = "string", json_path = ".spec.runStrategy", priority = "1"),
    printcolumn(
        name = "Scheduled",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Scheduled\")].reason",
        priority = "1",
        description = "Placed, Unschedulable or BackOff (kubectl describe vm says why)"
    ),
    printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restartCount", priority = "1"),
    printcolumn(
        name = "CPU Usage",
        type_ = "string",
        json_path = ".status.cpuUsage",
        priority = "1",
        description = "Host CPU the VM used lately, in cores"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// When the VM should run: Always (restart it whenever it stops), RerunOnFailure
    /// (restart it only after a failure, not after the guest shut itself down),
    /// Manual (start and stop only on request), Halted (keep it stopped).
    #[serde(default)]
    pub run_strategy: RunStrategy,

    /// Virtual CPUs: how many (Virtual SMP), their topology, which host CPUs they run
    /// on, their priority, and the NUMA policy of guest memory.
    pub cpu: CpuSpec,

    /// Guest memory.
    pub memory: MemorySpec,

    /// What the VM boots: a kernel (and optional initrd and command line) on the host
    /// or on storage every host sees.
    pub boot: BootSpec,

    /// Block devices, attached as virtio-mmio disks in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub disks: Vec<Disk>,

    /// High availability: how this VM is treated when its host fails.
    #[serde(default)]
    pub ha: VmHaSpec,

    /// What happens to the VM when its host enters maintenance (is tainted
    /// `drover.dev/maintenance:NoExecute`): LiveMigrate (default), Restart elsewhere,
    /// or Stop.
    #[serde(default)]
    pub on_maintenance: MaintenanceAction,

    /// Labels a host must carry to run this VM (in addition to DRSRules).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// When the VM should run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RunStrategy {
    #[default]
    Always,
    RerunOnFailure,
    Manual,
    Halted,
}

/// Virtual CPUs and where they run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.topology) || self.topology.sockets * self.topology.cores * self.topology.threads == self.vcpus")
        .message("sockets × cores × threads must equal vcpus").field_path(".topology"),
    validation = Rule::new(format!(
        "self.placement != 'Dedicated' || !has(self.hostCpus) || !{} || {} >= self.vcpus",
        cel(CEL_CPU_LIST_VALID, "self.hostCpus"), cel(CEL_CPU_LIST_COUNT, "self.hostCpus")))
        .message("Dedicated placement needs at least one host CPU per vCPU: hostCpus lists fewer CPUs than vcpus").field_path(".hostCpus"),
    validation = Rule::new("self.priority == 'Custom' ? has(self.shares) : !has(self.shares)")
        .message("shares must be set when priority is Custom, and only then").field_path(".shares"),
)]
pub struct CpuSpec {
    /// Number of virtual CPUs (Virtual SMP), 1 to 254.
    #[schemars(range(min = 1, max = MAX_VCPUS))]
    pub vcpus: u32,

    /// How the vCPUs are presented to the guest (through CPUID, the MP table and ACPI).
    /// Defaults to one socket with one core per vCPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,

    /// Shared: vCPUs float over the allowed host CPUs with other VMs (default).
    /// Dedicated: each vCPU gets a host CPU of its own, pinned 1:1, and no two vCPUs
    /// of this VM share hyper-thread siblings unless allowSiblings is set.
    #[serde(default)]
    pub placement: CpuPlacement,

    /// Host CPUs the vCPUs may run on, in Linux CPU-list syntax (`0-3,8`). Optional:
    /// without it the operator chooses. Changing it applies to the running VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = cpu_list_rule())]
    pub host_cpus: Option<String>,

    /// With Dedicated placement, allow two vCPUs of this VM on hyper-thread siblings
    /// of one core (more vCPUs per host, less throughput per vCPU).
    #[serde(default)]
    pub allow_siblings: bool,

    /// vCPU priority relative to other VMs on the host, as in ESX: High (2000
    /// shares), Normal (1000, default), Low (500), or Custom (set shares). Changing it
    /// applies to the running VM.
    #[serde(default)]
    pub priority: CpuPriority,

    /// CPU shares when priority is Custom, 1 to 10000 (the range of cgroup v2
    /// `cpu.weight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub shares: Option<u32>,

    /// NUMA policy for guest memory.
    #[serde(default)]
    pub numa: NumaSpec,
}

/// Sockets, cores per socket and threads per core, as the guest sees them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CpuTopology {
    /// Number of sockets.
    #[schemars(range(min = 1, max = MAX_VCPUS))]
    pub sockets: u32,
    /// Cores per socket.
    #[schemars(range(min = 1, max = MAX_VCPUS))]
    pub cores: u32,
    /// Threads per core (1 to 4).
    #[schemars(range(min = 1, max = 4))]
    pub threads: u32,
}

/// Shared or Dedicated host CPUs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CpuPlacement {
    #[default]
    Shared,
    Dedicated,
}

/// vCPU priority (ESX shares).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuPriority {
    Low,
    #[default]
    Normal,
    High,
    Custom,
}

impl CpuPriority {
    /// The shares a level stands for, as in ESX; `None` for Custom.
    pub fn shares(self) -> Option<u32> {
        match self {
            CpuPriority::Low => Some(500),
            CpuPriority::Normal => Some(1000),
            CpuPriority::High => Some(2000),
            CpuPriority::Custom => None,
        }
    }
}

impl CpuSpec {
    /// The shares the vCPUs get: the level's, or the explicit number for Custom.
    pub fn effective_shares(&self) -> u32 {
        self.priority.shares().or(self.shares).unwrap_or(1000)
    }
}

/// How guest memory is placed on host NUMA nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.nodes) || size(self.nodes) == 0 || self.policy != 'None'")
        .message("nodes needs a policy: Strict, Preferred or Interleave").field_path(".policy"),
    validation = Rule::new("self.policy != 'Preferred' || !has(self.nodes) || size(self.nodes) <= 1")
        .message("Preferred takes a single node; use Interleave or Strict for several").field_path(".nodes"),
)]
pub struct NumaSpec {
    /// None: no binding (the kernel's default). Strict: memory only from the given
    /// nodes (mbind MPOL_BIND). Preferred: from the node if it can (MPOL_PREFERRED).
    /// Interleave: spread page by page over the nodes (MPOL_INTERLEAVE). Without
    /// nodes, the agent uses the nodes of the host CPUs the vCPUs run on.
    #[serde(default)]
    pub policy: NumaPolicy,

    /// Host NUMA node numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(range(max = 1023)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub nodes: Vec<u32>,
}

/// A NUMA memory policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NumaPolicy {
    #[default]
    None,
    Preferred,
    Strict,
    Interleave,
}

/// Guest memory.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemorySpec {
    /// Size of guest RAM, a quantity in whole MiB between 16Mi and 4Ti (e.g. 512Mi, 4Gi).
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = Rule::new("isQuantity(self)").message("must be a quantity such as 512Mi or 4Gi"),
        validation = Rule::new("!isQuantity(self) || quantity(self).compareTo(quantity('16Mi')) >= 0").message("must be at least 16Mi"),
        validation = Rule::new("!isQuantity(self) || quantity(self).compareTo(quantity('4Ti')) <= 0").message("must be at most 4Ti"),
        validation = Rule::new("!isQuantity(self) || quantity(self).compareTo(quantity('4Ti')) > 0 || (quantity(self).isInteger() && quantity(self).asInteger() % 1048576 == 0)")
            .message("must be a whole number of MiB (e.g. 1536Mi, not 1.5G)"),
    )]
    pub size: String,
}

/// The boot source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BootSpec {
    /// Absolute path of the guest kernel (bzImage, ELF vmlinux, or a PVH/multiboot
    /// image such as Drover's test guest).
    #[schemars(length(min = 2, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("must be an absolute path on the host"))]
    pub kernel: String,

    /// Absolute path of an initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("must be an absolute path on the host"))]
    pub initrd: Option<String>,

    /// Kernel command line (at most 2048 bytes, the x86 boot protocol's limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub cmdline: Option<String>,
}

/// A block device.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    /// Name of the disk, unique in the VM (a DNS label).
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,

    /// Absolute path of the disk image, on the host or on storage every host sees
    /// (live migration needs the latter).
    #[schemars(length(min = 2, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("must be an absolute path on the host"))]
    pub path: String,

    /// Attach the disk read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// High availability settings of one VM.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VmHaSpec {
    /// Order in which HA restarts VMs of a failed host: High first, then Medium,
    /// then Low; Disabled VMs are not restarted. Unset: the HostPolicy's
    /// `ha.defaultRestartPriority` (Medium by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_priority: Option<RestartPriority>,
}

/// HA restart priority (as in VMware HA).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum RestartPriority {
    Disabled,
    Low,
    #[default]
    Medium,
    High,
}

/// What to do with a VM whose host enters maintenance.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MaintenanceAction {
    #[default]
    LiveMigrate,
    Restart,
    Stop,
}

/// Observed state of a VirtualMachine.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Conditions: Scheduled, Ready, Migrating, and others; keyed by type.
    #[serde(default, skip_serializing_if = "crate::common::is_empty_conditions")]
    pub conditions: Conditions,

    /// Where the VM is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VmPhase>,

    /// The host the VM is placed on (set by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,

    /// Host CPUs the vCPU threads are allowed to run on now, as a CPU list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cpus: Option<String>,

    /// Host NUMA nodes guest memory is bound to, as a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_nodes: Option<String>,

    /// When the VMM process last started the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,

    /// How many times Drover restarted the VM (after crashes or host failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_count: Option<i32>,

    /// Failures in a row and when the next restart may come (the restart backoff);
    /// gone after a stable run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_failure: Option<StartFailure>,

    /// Host CPUs the operator holds for this VM on its host, as a CPU list: a
    /// Dedicated VM's own CPUs (whole cores unless it allows siblings), or for a
    /// Shared VM the CPUs no Dedicated VM holds. The agent runs the vCPUs on them
    /// when `spec.cpu.hostCpus` is not set; it changes while the VM runs when a
    /// Dedicated VM arrives on or leaves the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_cpus: Option<String>,

    /// The boot settings the running VM was started with, as the agent started it:
    /// a spec that differs in these needs a restart (the RestartRequired condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_with: Option<BootedWith>,

    /// The VirtualMachineMigration moving the VM now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,

    /// Why the VM last stopped (guest shutdown, guest fault, host failure...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,

    /// CPU shares the vCPU threads have now (from spec.cpu.priority and shares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<i32>,

    /// When the host CPUs or the priority now in effect were last applied to the
    /// running VM (changes apply without a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_changed_at: Option<Time>,

    /// Time from the agent starting the VMM to the guest's first serial output, in
    /// milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_millis: Option<i64>,

    /// Host CPU time the VM used over the agent's last sampling interval, in cores
    /// as a quantity (e.g. `1500m` is one and a half host CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usage: Option<String>,

    /// Where the agent serves the VM's serial console log (HTTP GET).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_url: Option<String>,
}

/// Restart backoff of a VM that keeps failing.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StartFailure {
    /// Failures in a row (each followed by a restart).
    pub consecutive_fail_count: i32,
    /// The restart waits until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<Time>,
}

/// What a running VM was started with that only a restart changes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BootedWith {
    /// spec.cpu.vcpus at start.
    pub vcpus: u32,
    /// spec.cpu.topology at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
    /// spec.cpu.placement at start.
    pub placement: CpuPlacement,
    /// spec.memory.size at start.
    pub memory: String,
    /// spec.boot.kernel at start.
    pub kernel: String,
    /// spec.boot.initrd at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// spec.boot.cmdline at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

impl BootedWith {
    /// The restart-only settings of `spec`.
    pub fn of(spec: &VirtualMachineSpec) -> Self {
        Self {
            vcpus: spec.cpu.vcpus,
            topology: spec.cpu.topology,
            placement: spec.cpu.placement,
            memory: spec.memory.size.clone(),
            kernel: spec.boot.kernel.clone(),
            initrd: spec.boot.initrd.clone(),
            cmdline: spec.boot.cmdline.clone(),
        }
    }

    /// The spec fields that differ from what the VM was started with.
    pub fn differences(&self, spec: &VirtualMachineSpec) -> Vec<&'static str> {
        let now = Self::of(spec);
        let mut fields = Vec::new();
        if self.vcpus != now.vcpus {
            fields.push("spec.cpu.vcpus");
        }
        if self.topology != now.topology {
            fields.push("spec.cpu.topology");
        }
        if self.placement != now.placement {
            fields.push("spec.cpu.placement");
        }
        if self.memory != now.memory {
            fields.push("spec.memory.size");
        }
        if self.kernel != now.kernel {
            fields.push("spec.boot.kernel");
        }
        if self.initrd != now.initrd {
            fields.push("spec.boot.initrd");
        }
        if self.cmdline != now.cmdline {
            fields.push("spec.boot.cmdline");
        }
        fields
    }
}

/// Lifecycle phase of a VirtualMachine.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmPhase {
    /// Waiting for a host.
    Pending,
    /// Placed on a host; the agent there has not started it yet.
    Scheduled,
    /// The VMM process is starting the guest.
    Starting,
    /// The guest runs.
    Running,
    /// Moving to another host; it keeps running.
    Migrating,
    /// Stopping on request.
    Stopping,
    /// Stopped, as the run strategy wants.
    Stopped,
    /// Stopped after a failure; see conditions and lastExit.
    Failed,
    /// Its host stopped reporting.
    Unknown,
}
