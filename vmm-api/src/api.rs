//! The control API: HTTP/1.1 with JSON bodies on the VMM's Unix socket, one request
//! per connection. The paths, the bodies the VMM takes and the replies it gives.
//!
//! | request | body | reply |
//! | --- | --- | --- |
//! | `GET /vm` | | [`VmStatus`] |
//! | `PUT /vm/pause`, `PUT /vm/resume` | | |
//! | `PUT /vm/shutdown` | | (the VMM exits with status 0 after replying) |
//! | `PUT /vm/ctrl-alt-del` | | (the guest decides what follows; 409 during a migration, or while it has not read the keys typed before) |
//! | `PUT /vm/snapshot` | [`SnapshotRequest`] | [`SnapshotInfo`] |
//! | `PUT /vm/migrate` | [`MigrateRequest`] | (409 while one runs) |
//! | `GET /vm/migration` | | [`MigrationStatus`] |
//! | `PUT /vm/migration/cancel` | | (409 when none runs) |
//! | `PATCH /vm/cpus` | [`CpusPatch`] | |
//! | `PATCH /vm/priority` | [`PriorityPatch`] | |
//!
//! A refusal carries `{"error": "..."}` with 400 (bad request), 404 (no such
//! request), 409 (not in this state), 413 (body too large) or 500 (the VMM failed).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `GET`: the VM's status.
pub const VM: &str = "/vm";
/// `PUT`: stop every vCPU.
pub const PAUSE: &str = "/vm/pause";
/// `PUT`: let paused vCPUs run again.
pub const RESUME: &str = "/vm/resume";
/// `PUT`: power the VM off.
pub const SHUTDOWN: &str = "/vm/shutdown";
/// `PUT`: ask the guest to shut down, as a user would: Ctrl+Alt+Del on its
/// keyboard. The VM runs on; the guest decides (a shutdown, a reboot, nothing).
pub const CTRL_ALT_DEL: &str = "/vm/ctrl-alt-del";
/// `PUT`: write a snapshot.
pub const SNAPSHOT: &str = "/vm/snapshot";
/// `PUT`: start a live migration.
pub const MIGRATE: &str = "/vm/migrate";
/// `GET`: the migration's progress.
pub const MIGRATION: &str = "/vm/migration";
/// `PUT`: cancel the migration.
pub const MIGRATION_CANCEL: &str = "/vm/migration/cancel";
/// `PATCH`: move the running vCPUs.
pub const CPUS: &str = "/vm/cpus";
/// `PATCH`: change the running vCPUs' priority.
pub const PRIORITY: &str = "/vm/priority";

/// Largest request body the VMM accepts (the API's bodies are a few dozen bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// The most connections a migration may carry pages on.
pub const MAX_LANES: u32 = 16;

/// `PATCH /vm/cpus`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CpusPatch {
    /// Host CPUs for the vCPUs, a Linux CPU list.
    pub host_cpus: String,
}

/// `PATCH /vm/priority`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriorityPatch {
    /// CPU shares, 1 to 10000.
    pub shares: u32,
}

/// `PUT /vm/snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Directory to write `state.bin` and `memory.bin` to.
    pub path: PathBuf,
}

/// What a snapshot wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    pub state_bytes: u64,
    pub memory_bytes: u64,
    /// How long the guest was paused for it, in ms.
    pub paused_ms: u64,
}

/// Default downtime budget. A pass over the few pages a busy guest dirties while
/// the last ones travel takes milliseconds here; 30 ms keeps the pause well under
/// QEMU's 300 ms default while letting most guests converge without throttling.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 30;
/// Default limit on memory passes before a migration gives up.
pub const DEFAULT_MAX_PASSES: u32 = 30;
/// Default time limit of a migration, in seconds.
pub const DEFAULT_MIGRATION_TIMEOUT_SECONDS: u64 = 600;

/// `PUT /vm/migrate`: move the running VM to a `drover-vmm receive`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrateRequest {
    /// `host:port` of the target's `drover-vmm receive`.
    pub destination: String,
    /// The shared secret (give this or `secretFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// A file holding the shared secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Longest acceptable pause at switch-over, in ms.
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: u64,
    /// Give up (the VM keeps running here) after this many memory passes.
    #[serde(default = "default_passes")]
    pub max_passes: u32,
    /// Give up after this many seconds.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// Connections to carry pages on, 1 to [`MAX_LANES`], each with a thread at
    /// both ends (default: one per two host CPUs, 1 to 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lanes: Option<u32>,
    /// A file to write the final figures to (`GET /vm/migration`'s JSON) when the
    /// migration ends, before this VMM exits: on success it exits at once, and its
    /// caller may not have read them yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_file: Option<PathBuf>,
}

fn default_downtime() -> u64 {
    DEFAULT_MAX_DOWNTIME_MS
}
fn default_passes() -> u32 {
    DEFAULT_MAX_PASSES
}
fn default_timeout() -> u64 {
    DEFAULT_MIGRATION_TIMEOUT_SECONDS
}

impl MigrateRequest {
    /// A request to `destination` with the shared secret and every default.
    pub fn new(destination: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            destination: destination.into(),
            secret: Some(secret.into()),
            secret_file: None,
            max_downtime_ms: DEFAULT_MAX_DOWNTIME_MS,
            max_passes: DEFAULT_MAX_PASSES,
            timeout_seconds: DEFAULT_MIGRATION_TIMEOUT_SECONDS,
            lanes: None,
            status_file: None,
        }
    }
}

/// `GET /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    pub name: String,
    /// `running` or `paused`.
    pub state: String,
    pub memory_mib: u64,
    /// NUMA policy of guest memory, and the host nodes it is bound to.
    pub numa_policy: String,
    pub numa_nodes: String,
    pub uptime_ms: u64,
    /// From VMM start to the guest's first serial output.
    pub boot_time_ms: Option<u64>,
    pub shares: u32,
    pub priority_mechanism: String,
    /// When the host CPUs last changed (Unix ms), if they did.
    pub cpus_changed_at_ms: Option<u64>,
    /// When the priority last changed (Unix ms), if it did.
    pub priority_changed_at_ms: Option<u64>,
    pub vcpus: Vec<VcpuStatus>,
}

impl VmStatus {
    /// The host CPUs the vCPUs may run on, as one CPU list (the union over vCPUs).
    pub fn host_cpus(&self) -> drover_topology::CpuSet {
        let mut all = std::collections::BTreeSet::new();
        for set in self.vcpus.iter().filter_map(|v| drover_topology::CpuSet::parse(&v.host_cpus).ok()) {
            all.extend(set.iter());
        }
        all.into_iter().collect()
    }
}

/// One vCPU in [`VmStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VcpuStatus {
    pub index: u32,
    /// Host thread id.
    pub tid: i32,
    /// Host CPUs the thread may run on.
    pub host_cpus: String,
    /// Host CPU it ran on last.
    pub last_host_cpu: Option<u32>,
    /// NUMA node of that CPU.
    pub numa_node: Option<u32>,
    /// CPU time used, in ms.
    pub cpu_time_ms: u64,
}

/// Where a VMM's outgoing migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationPhase {
    #[default]
    None,
    Connecting,
    PreCopy,
    Switchover,
    /// The VM runs on the target; this VMM is about to exit.
    Completed,
    /// The VM still runs here; see `error`.
    Failed,
    /// Cancelled; the VM still runs here.
    Cancelled,
    /// `Go` was sent but the target never confirmed: the VM is paused here and may
    /// run there. Nothing resumes it here on its own (a VM never runs twice).
    Unknown,
}

impl MigrationPhase {
    /// Whether the migration has ended, one way or another.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled | Self::Unknown)
    }
}

/// `GET /vm/migration`: figures of the current (or last) migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    pub phase: MigrationPhase,
    pub destination: String,
    /// Memory passes so far (1 = the first full pass).
    pub pass: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    /// Zero pages skipped or sent as page numbers only.
    pub zero_pages: u64,
    /// Pages the guest dirtied during the last pass.
    pub dirty_pages: u64,
    /// Guest dirty rate during the last pass, bytes/s.
    pub dirty_rate_bps: u64,
    /// Measured link bandwidth, bytes/s.
    pub bandwidth_bps: u64,
    /// How long the guest would be paused if the switch-over came now: the
    /// remaining dirty pages at the measured bandwidth, plus the switch-over's
    /// fixed cost (about 1 ms).
    pub estimated_downtime_ms: u64,
    /// vCPU throttle (auto-converge), percent of time paused.
    pub throttle_percent: u32,
    /// How long the guest was paused at switch-over.
    pub downtime_ms: Option<u64>,
    /// The same in microseconds: most switch-overs take under a millisecond.
    pub downtime_us: Option<u64>,
    pub total_ms: u64,
    pub error: Option<String>,
}

/// The body of every refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migrate_request_with_only_a_destination_and_secret_takes_the_defaults() {
        let request: MigrateRequest =
            serde_json::from_str(r#"{"destination": "10.0.0.2:7070", "secret": "s"}"#).unwrap();
        assert_eq!(request, MigrateRequest::new("10.0.0.2:7070", "s"));
        let back: MigrateRequest = serde_json::from_str(&serde_json::to_string(&request).unwrap()).unwrap();
        assert_eq!(back, request);
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = serde_json::from_str::<MigrateRequest>(r#"{"destination": "a:1", "lane": 2}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `lane`"), "{e}");
    }

    #[test]
    fn status_replies_round_trip() {
        let status =
            MigrationStatus { phase: MigrationPhase::PreCopy, pass: 2, downtime_us: Some(900), ..Default::default() };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["phase"], "PreCopy");
        assert_eq!(json["downtimeUs"], 900);
        assert_eq!(serde_json::from_value::<MigrationStatus>(json).unwrap(), status);
        assert!(MigrationPhase::Unknown.is_final() && !MigrationPhase::Switchover.is_final());
    }
}
