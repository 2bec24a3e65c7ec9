//! `VirtualMachineMigration`: a request to move a running VM to another host
//! (VMotion), made by a user, by DRS or by maintenance mode, and its outcome.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, NAME_PATTERN};

/// A live migration of one VirtualMachine of the same namespace. The spec is a
/// request and cannot change once made; to move the VM again, create another.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "drover.dev",
    version = "v1alpha1",
    kind = "VirtualMachineMigration",
    doc = "A live migration (VMotion) of a running VirtualMachine to another host.",
    plural = "virtualmachinemigrations",
    namespaced,
    status = "VirtualMachineMigrationStatus",
    shortname = "vmim",
    shortname = "dvmim",
    category = "drover",
    printcolumn(name = "VM", type_ = "string", json_path = ".spec.vmName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.sourceNode"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.targetNode"),
    printcolumn(name = "Downtime ms", type_ = "integer", json_path = ".status.downtimeMillis"),
    printcolumn(name = "Downtime us", type_ = "integer", json_path = ".status.downtimeMicros", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Total ms", type_ = "integer", json_path = ".status.totalMillis", priority = "1"),
    printcolumn(name = "Bytes", type_ = "integer", json_path = ".status.bytesTransferred", priority = "1"),
    printcolumn(name = "Passes", type_ = "integer", json_path = ".status.iterations", priority = "1"),
    printcolumn(name = "Trigger", type_ = "string", json_path = ".spec.trigger", priority = "1")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: create a new VirtualMachineMigration instead"))]
pub struct VirtualMachineMigrationSpec {
    /// Name of the VirtualMachine to move (same namespace).
    #[schemars(length(min = 1, max = 253), pattern(NAME_PATTERN))]
    pub vm_name: String,

    /// Host to move to. Without it the operator picks one, as DRS would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(NAME_PATTERN))]
    pub target_node: Option<String>,

    /// Longest the guest may be paused at switch-over, in milliseconds (1 to 60000).
    /// Defaults to the VMM's budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60000))]
    pub max_downtime_millis: Option<u32>,

    /// Give up (the VM keeps running on the source) after this many seconds (10 to 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub timeout_seconds: Option<u32>,

    /// Connections that carry the guest's memory at once (1 to 16), each with a CPU
    /// busy at both ends while memory flows. Defaults to one per two CPUs of the
    /// source host, up to 8; fewer leave more CPU to the hosts' other VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub lanes: Option<u32>,

    /// Who asked for the migration: User (default), DRS or Maintenance.
    #[serde(default)]
    pub trigger: MigrationTrigger,
}

/// Who asked for a migration.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MigrationTrigger {
    #[default]
    User,
    #[serde(rename = "DRS")]
    Drs,
    Maintenance,
}

/// Progress and outcome of a migration.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineMigrationStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Conditions, keyed by type.
    #[serde(default, skip_serializing_if = "crate::common::is_empty_conditions")]
    pub conditions: Conditions,

    /// Where the migration is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,

    /// Host the VM ran on when the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,

    /// Host the VM moves to (reserved by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,

    /// When the transfer started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the migration succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// Memory pre-copy passes made so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<i32>,

    /// Bytes sent to the target so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_transferred: Option<i64>,

    /// How long the guest was paused at switch-over, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_millis: Option<i64>,

    /// The same in microseconds: most switch-overs take under a millisecond.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_micros: Option<i64>,

    /// Time from start to completion, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_millis: Option<i64>,

    /// Secret (same namespace) whose key `key` holds the migration secret both
    /// VMMs prove they know; set by the operator when it approves the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Host CPUs the operator holds for the VM on the target (Dedicated VMs); the
    /// target agent runs the received vCPUs there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_cpus: Option<String>,
    /// `address:port` the target's receiving VMM listens on (set by the target agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_address: Option<String>,
    /// Guest memory dirty rate during the last pass, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_rate_bytes_per_second: Option<i64>,
    /// Why the migration failed (the VM keeps running on the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_message: Option<String>,
    /// What the target's VMM of this migration does, as the target agent last saw
    /// it: HA reads it before restarting a VM whose source host failed mid-move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_state: Option<MigrationTargetState>,
}

/// What a migration's target VMM does (set by the target agent).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationTargetState {
    /// A receiving VMM listens or receives; it does not run the guest.
    Receiving,
    /// The receiving VMM runs the guest (the source handed it over): the VM is the
    /// target's, and its agent moves the VM's status there if the source has not.
    Running,
    /// No VMM of this migration runs on the target, nor will: it never started, or
    /// it ended, or was powered off (nothing of the VM runs there).
    Stopped,
}

/// Phase of a migration.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationPhase {
    /// Waiting for the operator to pick and reserve a target.
    Pending,
    /// Target chosen; the target agent prepares a receiving VMM.
    Scheduled,
    /// Memory is being copied while the VM runs on the source.
    Running,
    /// Paused, last pages and device state in flight.
    Switchover,
    /// The VM runs on the target.
    Succeeded,
    /// The VM still runs on the source; see failureMessage.
    Failed,
}
