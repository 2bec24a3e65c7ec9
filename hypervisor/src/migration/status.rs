//! Progress and figures of a migration, as the control API reports them (and the
//! node agent reads them).

use serde::{Deserialize, Serialize};

/// Where a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
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

/// Figures of the current (or last) migration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    pub phase: Phase,
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
