//! `HostPolicy`: a pool of hosts (a vSphere cluster) and the capacity, HA and DRS
//! rules that govern it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, cpu_list_rule};
use crate::vm::{NumaPolicy, RestartPriority};

/// Settings for the hosts its nodeSelector picks: what they offer to VMs, how HA
/// protects the VMs on them, and how DRS balances them. A host should be picked by
/// one policy; the status reports hosts picked by several.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "drover.dev",
    version = "v1alpha1",
    kind = "HostPolicy",
    doc = "Capacity, HA and DRS settings for a pool of hosts (a vSphere cluster).",
    plural = "hostpolicies",
    status = "HostPolicyStatus",
    shortname = "hp",
    category = "drover",
    printcolumn(name = "Hosts", type_ = "integer", json_path = ".status.hostCount"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyHosts"),
    printcolumn(name = "HA", type_ = "boolean", json_path = ".spec.ha.enabled"),
    printcolumn(name = "DRS", type_ = "string", json_path = ".spec.drs.automationLevel"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Threshold", type_ = "integer", json_path = ".spec.drs.migrationThreshold", priority = "1"),
    printcolumn(name = "Failed", type_ = "string", json_path = ".status.ha.failedHosts", priority = "1"),
    printcolumn(name = "Failover OK", type_ = "boolean", json_path = ".status.ha.failoverCapacityOk", priority = "1"),
    printcolumn(
        name = "Failures Tolerated",
        type_ = "integer",
        json_path = ".spec.ha.hostFailuresToTolerate",
        priority = "1"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct HostPolicySpec {
    /// The hosts (Nodes) this policy governs.
    pub node_selector: LabelSelector,

    /// What each host offers to VMs.
    #[serde(default)]
    pub capacity: CapacitySpec,

    /// Default NUMA placement for VMs on these hosts.
    #[serde(default)]
    pub numa: HostNumaSpec,

    /// High availability (VMware HA): restart the VMs of a failed host elsewhere.
    #[serde(default)]
    pub ha: HaSpec,

    /// Distributed Resource Scheduler: keep host load balanced.
    #[serde(default)]
    pub drs: DrsSpec,
}

/// What each host offers to VMs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CapacitySpec {
    /// Host CPUs kept for the host itself and never given to VMs, as a CPU list (`0-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = cpu_list_rule())]
    pub reserved_cpus: Option<String>,

    /// Host memory kept for the host itself, a quantity (default 1Gi).
    #[serde(default = "default_reserved_memory")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('0')) >= 0").message("must be a non-negative quantity such as 1Gi"))]
    pub reserved_memory: String,

    /// vCPUs of Shared VMs per host CPU (1 to 32, default 4). 1 means no overcommit.
    /// Dedicated vCPUs are never overcommitted.
    #[serde(default = "default_cpu_overcommit")]
    #[x_kube(validation = Rule::new("self >= 1.0 && self <= 32.0").message("must be between 1 (no overcommit) and 32"))]
    pub cpu_overcommit_ratio: f64,

    /// Guest memory per byte of host memory (1 to 4, default 1: no overcommit).
    #[serde(default = "default_memory_overcommit")]
    #[x_kube(validation = Rule::new("self >= 1.0 && self <= 4.0").message("must be between 1 (no overcommit) and 4"))]
    pub memory_overcommit_ratio: f64,
}

fn default_reserved_memory() -> String {
    "1Gi".into()
}
fn default_cpu_overcommit() -> f64 {
    4.0
}
fn default_memory_overcommit() -> f64 {
    1.0
}

impl Default for CapacitySpec {
    fn default() -> Self {
        Self {
            reserved_cpus: None,
            reserved_memory: default_reserved_memory(),
            cpu_overcommit_ratio: default_cpu_overcommit(),
            memory_overcommit_ratio: default_memory_overcommit(),
        }
    }
}

/// NUMA defaults for VMs on these hosts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostNumaSpec {
    /// Policy for VMs that set none (default Preferred: memory from the node of their
    /// CPUs when it can).
    #[serde(default = "default_numa_policy")]
    pub default_policy: NumaPolicy,

    /// Let a VM span NUMA nodes when no single node fits it (default true).
    #[serde(default = "default_true")]
    pub allow_spanning: bool,
}

fn default_numa_policy() -> NumaPolicy {
    NumaPolicy::Preferred
}
fn default_true() -> bool {
    true
}

/// High availability.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.failureDetectionSeconds >= 3 * self.heartbeatIntervalSeconds")
    .message("failureDetectionSeconds must be at least 3 heartbeat intervals, or one late heartbeat fails a healthy host")
    .field_path(".failureDetectionSeconds"))]
pub struct HaSpec {
    /// Restart VMs of failed hosts (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Host failures the pool must survive: admission control keeps enough capacity
    /// free to restart the VMs of this many hosts (0 to 31, default 1).
    #[serde(default = "default_failures")]
    #[schemars(range(min = 0, max = 31))]
    pub host_failures_to_tolerate: u32,

    /// Refuse to place VMs that would eat into the capacity kept for failover
    /// (default true).
    #[serde(default = "default_true")]
    pub admission_control: bool,

    /// How often each host's agent renews its heartbeat Lease, in seconds (1 to 60,
    /// default 1).
    #[serde(default = "default_heartbeat")]
    #[schemars(range(min = 1, max = 60))]
    pub heartbeat_interval_seconds: u32,

    /// How long a host may miss heartbeats before it is declared failed and its VMs
    /// restarted elsewhere, in seconds (3 to 600, default 3). The agent of a host that
    /// cannot renew powers its VMs off before this runs out, so a VM never runs twice.
    #[serde(default = "default_detection")]
    #[schemars(range(min = 3, max = 600))]
    pub failure_detection_seconds: u32,

    /// What an isolated host does with its VMs: PowerOff (default, fastest) or
    /// Shutdown (ask the guest, then power off before the deadline).
    #[serde(default)]
    pub isolation_response: IsolationResponse,

    /// Restart priority of VMs that set none.
    #[serde(default)]
    pub default_restart_priority: RestartPriority,
}

fn default_failures() -> u32 {
    1
}
fn default_heartbeat() -> u32 {
    1
}
fn default_detection() -> u32 {
    3
}

impl Default for HaSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            host_failures_to_tolerate: default_failures(),
            admission_control: true,
            heartbeat_interval_seconds: default_heartbeat(),
            failure_detection_seconds: default_detection(),
            isolation_response: IsolationResponse::default(),
            default_restart_priority: RestartPriority::default(),
        }
    }
}

/// What an isolated host does with its VMs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IsolationResponse {
    #[default]
    PowerOff,
    Shutdown,
}

/// Distributed Resource Scheduler settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DrsSpec {
    /// Run DRS on these hosts (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Manual: recommendations only (in status). PartiallyAutomated: DRS places new
    /// VMs, migrations stay recommendations. FullyAutomated (default): DRS also
    /// migrates running VMs.
    #[serde(default)]
    pub automation_level: DrsAutomationLevel,

    /// How much imbalance DRS tolerates, 1 (conservative: only moves that fix a
    /// rule violation or a host over capacity) to 5 (aggressive: any gain). Default 3.
    #[serde(default = "default_threshold")]
    #[schemars(range(min = 1, max = 5))]
    pub migration_threshold: u32,

    /// Seconds between DRS passes (10 to 3600, default 300).
    #[serde(default = "default_interval")]
    #[schemars(range(min = 10, max = 3600))]
    pub interval_seconds: u32,

    /// Most migrations DRS runs at once in this pool (1 to 16, default 2).
    #[serde(default = "default_concurrent")]
    #[schemars(range(min = 1, max = 16))]
    pub max_concurrent_migrations: u32,
}

fn default_threshold() -> u32 {
    3
}
fn default_interval() -> u32 {
    300
}
fn default_concurrent() -> u32 {
    2
}

impl Default for DrsSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            automation_level: DrsAutomationLevel::default(),
            migration_threshold: default_threshold(),
            interval_seconds: default_interval(),
            max_concurrent_migrations: default_concurrent(),
        }
    }
}

/// DRS automation level.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DrsAutomationLevel {
    Manual,
    PartiallyAutomated,
    #[default]
    FullyAutomated,
}

/// Observed state of the pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostPolicyStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Conditions, keyed by type.
    #[serde(default, skip_serializing_if = "crate::common::is_empty_conditions")]
    pub conditions: Conditions,

    /// Hosts this policy picks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_count: Option<i32>,

    /// Hosts whose agent holds its heartbeat Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_hosts: Option<i32>,

    /// One entry per host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub hosts: Vec<HostSummary>,

    /// Migrations DRS recommends (Manual and PartiallyAutomated levels).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recommendations: Vec<DrsRecommendation>,

    /// When DRS last ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drs_run: Option<Time>,

    /// The pool's balance as DRS's last pass found it, and what it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drs: Option<DrsStatus>,

    /// HA: failed hosts and the failover capacity admission control keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<HaStatus>,
}

/// The pool's balance as DRS's last pass found it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrsStatus {
    /// Standard deviation of the hosts' loads (a host's load: its VMs' measured CPU
    /// demand over its CPUs, or their memory over its memory, the larger), e.g. `0.118`.
    pub imbalance: String,
    /// The imbalance the migration threshold tolerates (none at threshold 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Mean VM score, 0-100: the share of its CPU demand each VM gets on its host.
    pub score: String,
    /// The imbalance once the moves of the last pass are done.
    pub imbalance_after: String,
    /// What the last pass did, or why it did nothing.
    pub message: String,
}

/// HA as the operator sees it in this pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HaStatus {
    /// Hosts declared failed (no heartbeat for the failure detection time).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_hosts: Vec<String>,
    /// Host failures the pool is to survive (the spec's).
    #[serde(default)]
    pub host_failures_to_tolerate: i32,
    /// True when every protected VM could restart after the worst
    /// `hostFailuresToTolerate` hosts fail; false says which resource falls short.
    #[serde(default)]
    pub failover_capacity_ok: bool,
    /// What the worst failures would need and what the other hosts have free, per
    /// resource: `needed` is kept free (admission control refuses starts that eat
    /// into it), `free` is what the surviving hosts offer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<FailoverCapacity>,
    /// VMs restarted by HA, and VMs HA could not restart yet (with why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Failover capacity of one resource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailoverCapacity {
    /// `vcpus` (Shared vCPUs, in overcommitted units), `memoryMiB`, or `dedicatedCpus`.
    pub resource: String,
    /// What the protected VMs of the worst `hostFailuresToTolerate` hosts need.
    pub needed: f64,
    /// What the other hosts have free for them.
    pub free: f64,
    /// The hosts whose failure needs the most.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub worst_hosts: Vec<String>,
}

/// Capacity and use of one host.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostSummary {
    /// Node name.
    pub name: String,
    /// Whether its agent holds its Lease and KVM works there.
    pub ready: bool,
    /// Host CPUs offered to VMs.
    #[serde(default)]
    pub cpus: i32,
    /// vCPUs of VMs placed there.
    #[serde(default)]
    pub vcpus_allocated: i32,
    /// Memory offered to VMs.
    #[serde(default)]
    pub memory: String,
    /// Guest memory of VMs placed there.
    #[serde(default)]
    pub memory_allocated: String,
    /// VMs placed there.
    #[serde(default)]
    pub vms: i32,
}

/// A migration DRS recommends.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrsRecommendation {
    /// The VM, as namespace/name.
    pub vm: String,
    /// Host it runs on.
    pub from: String,
    /// Host it should move to.
    pub to: String,
    /// Priority of the move, 1 (most important) to 5, comparable with the threshold.
    pub priority: i32,
    /// Why.
    pub reason: String,
}
