//! The runtime directory of one VM on this host, shared by the agent and the VM's
//! monitor process: `<runtime>/vms/<uid>/`. Everything the agent needs to find a
//! running VM again after its own restart lives here (the agent keeps no state of its
//! own); `<runtime>` models `/run` and is gone after a host power failure.
//!
//! | file | written by | what |
//! | --- | --- | --- |
//! | `vm.json` | agent | which VirtualMachine, and whether this VMM runs it or receives it |
//! | `config.json` | agent | the VMM's configuration |
//! | `secret` | agent | migration secret of a receiving VMM (mode 0600) |
//! | `monitor.pid` | agent | the monitor process |
//! | `vmm.pid` | monitor | the VMM process |
//! | `api.sock` | VMM | its control API |
//! | `console.sock` | monitor | live serial output for console clients |
//! | `vmm.log` | VMM | its log |
//! | `stop-reason` | agent or monitor | why the VMM was stopped from outside (fencing, request), or asked to shut down (the Shutdown isolation response) |
//! | `exit.json` | monitor | how the VMM ended |
//! | `migration.json` | VMM | final figures of its outgoing migration |
//! | `outgoing.json` | agent | where its outgoing migration sends the VM (migration, target host, CPUs) |

use std::path::{Path, PathBuf};

use drover_vmm_api::ExitStatus;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::files::{read_json, write_atomic};

/// The exit status the monitor records when the VMM program could not be started
/// at all (a shell's "command not found"; no drover-vmm exit code uses it).
pub const EXIT_NOT_STARTED: i32 = 127;

/// What a VMM does for its VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// Runs the VM (started from its boot source).
    Run,
    /// Waits for, then runs, the VM a migration brings here; becomes `Run` once the
    /// VM's status names this host.
    Receive { migration: String },
}

/// `vm.json`: which VM a directory belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub role: Role,
    /// When the agent started the VMM (Unix ms), for boot time.
    pub started_at_ms: u64,
}

/// `exit.json`: how the VMM process ended, as its monitor saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitRecord {
    /// Exit status, if it exited.
    pub code: Option<i32>,
    /// Signal that killed it, if one did.
    pub signal: Option<i32>,
    /// When (Unix ms).
    pub at_ms: u64,
}

impl ExitRecord {
    /// The VMM's exit status, if it exited with one of drover-vmm's codes.
    pub fn status(&self) -> Option<ExitStatus> {
        self.code.and_then(ExitStatus::from_code)
    }

    /// What the exit means, in words.
    pub fn describe(&self) -> String {
        match (self.status(), self.code, self.signal) {
            (Some(status), _, _) => status.describe().into(),
            (None, Some(EXIT_NOT_STARTED), _) => "the VMM program could not be started (see monitor.log)".into(),
            (None, Some(n), _) => format!("VMM exited with status {n}"),
            (None, None, Some(s)) => format!("VMM killed by signal {s}"),
            (None, None, None) => "VMM ended for an unknown reason".into(),
        }
    }

    /// The guest ended it cleanly (power off): not a failure.
    pub fn is_clean(&self) -> bool {
        self.status() == Some(ExitStatus::PoweredOff)
    }

    /// The guest asked for a reset (reboot).
    pub fn is_reset(&self) -> bool {
        self.status() == Some(ExitStatus::Reset)
    }

    /// The VM now runs on another host.
    pub fn is_migrated(&self) -> bool {
        self.status() == Some(ExitStatus::MigratedOut)
    }
}

/// `outgoing.json`: where a source's send goes, recorded before the VMM is asked to
/// send, so that a VMM that handed its VM over is accounted for even when the
/// migration is gone by then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outgoing {
    /// The VirtualMachineMigration.
    pub migration: String,
    /// Its target host.
    pub target_node: String,
    /// The host CPUs the operator reserved there (its `status.targetCpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_cpus: Option<String>,
}

/// Why a VMM was stopped from outside, as `stop-reason` records it; the VM's
/// `lastExit` shows the text after the exit's own description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The host's heartbeat deadline passed: the isolation response.
    Fenced,
    /// The host looked isolated and its isolation response is Shutdown: the guest
    /// was asked to shut down (Ctrl+Alt+Del). Only a request: whatever stops the
    /// VMM later (the deadline, a deletion) replaces it, and it is withdrawn from a
    /// VM still running when a renewal is accepted again.
    IsolationShutdown,
    /// The VirtualMachine was deleted.
    Deleted,
    /// `spec.runStrategy` is Halted.
    Halted,
    /// The VM is placed on another host, yet a VMM of it runs here.
    PlacedElsewhere,
    /// The migration this VMM was receiving failed; the VM runs on its source.
    MigrationFailed,
    /// The operator set `status.phase: Stopping` (a Manual `stop`/`restart`
    /// request, or the host's maintenance).
    Requested,
}

/// How the texts of stops someone asked for begin.
const REQUESTED: &str = "stopped on request";

impl StopReason {
    /// The text recorded (and read back, perhaps by a later agent).
    pub fn text(self) -> &'static str {
        match self {
            StopReason::Fenced => "powered off by the host's isolation response: its heartbeat deadline passed",
            StopReason::IsolationShutdown => {
                "asked to shut down by the host's isolation response (Shutdown): its heartbeat lease was not renewed"
            }
            StopReason::Deleted => "stopped on request: the VirtualMachine was deleted",
            StopReason::Halted => "stopped on request: spec.runStrategy is Halted",
            StopReason::PlacedElsewhere => "powered off: the VM is placed on another host",
            StopReason::MigrationFailed => "stopped: the migration failed; the VM runs on its source",
            StopReason::Requested => "stopped on request: the operator asked",
        }
    }
}

/// Whether a recorded stop reason is one someone asked for: the VM then ends
/// Stopped, not Failed. Reasons are kept as text (an agent that restarts reads what
/// an earlier one wrote), so this goes by the words such texts begin with.
pub fn stop_was_requested(recorded: &str) -> bool {
    recorded.starts_with(REQUESTED)
}

/// Paths of one VM's runtime directory.
#[derive(Clone, Debug)]
pub struct VmDir {
    pub path: PathBuf,
}

impl VmDir {
    pub fn new(runtime_dir: &Path, uid: &str) -> Self {
        Self { path: runtime_dir.join("vms").join(uid) }
    }
    pub fn meta(&self) -> PathBuf {
        self.path.join("vm.json")
    }
    pub fn config(&self) -> PathBuf {
        self.path.join("config.json")
    }
    pub fn secret(&self) -> PathBuf {
        self.path.join("secret")
    }
    pub fn monitor_pid(&self) -> PathBuf {
        self.path.join("monitor.pid")
    }
    pub fn vmm_pid(&self) -> PathBuf {
        self.path.join("vmm.pid")
    }
    pub fn api_socket(&self) -> PathBuf {
        self.path.join("api.sock")
    }
    pub fn console_socket(&self) -> PathBuf {
        self.path.join("console.sock")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.path.join("vmm.log")
    }
    pub fn stop_reason(&self) -> PathBuf {
        self.path.join("stop-reason")
    }
    pub fn exit(&self) -> PathBuf {
        self.path.join("exit.json")
    }
    pub fn migration_figures(&self) -> PathBuf {
        self.path.join("migration.json")
    }
    pub fn outgoing(&self) -> PathBuf {
        self.path.join("outgoing.json")
    }

    pub fn read_meta(&self) -> Result<VmMeta, Error> {
        read_json(&self.meta())
    }
    pub fn read_exit(&self) -> Option<ExitRecord> {
        read_json(&self.exit()).ok()
    }
    pub fn read_outgoing(&self) -> Option<Outgoing> {
        read_json(&self.outgoing()).ok()
    }
    pub fn write_outgoing(&self, outgoing: &Outgoing) -> Result<(), Error> {
        write_atomic(&self.outgoing(), &serde_json::to_vec_pretty(outgoing).map_err(|e| Error::Io(e.to_string()))?)
    }
    pub fn read_stop_reason(&self) -> Option<String> {
        std::fs::read_to_string(self.stop_reason()).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    }
    /// Records why the VMM is being stopped from outside, unless a reason is already
    /// recorded (the first reason is the true one: a fenced VM stays "fenced"). A
    /// request to shut down is the exception: the guest may not have acted on it, and
    /// what stops the VMM after it (the fencing deadline) is the truer reason.
    pub fn set_stop_reason(&self, reason: StopReason) {
        let recorded = self.read_stop_reason();
        if recorded.as_deref().is_none_or(|r| r == StopReason::IsolationShutdown.text() && r != reason.text()) {
            let _ = write_atomic(&self.stop_reason(), reason.text().as_bytes());
        }
    }

    /// Withdraws `reason` if it is the one recorded (a request the VMM did not take,
    /// or one the host no longer stands by); any other reason stays.
    pub fn withdraw_stop_reason(&self, reason: StopReason) {
        if self.read_stop_reason().as_deref() == Some(reason.text()) {
            let _ = std::fs::remove_file(self.stop_reason());
        }
    }
    pub fn read_pid(path: &Path) -> Option<i32> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_deletion_halting_and_the_operators_stop_are_stops_on_request() {
        use StopReason::*;
        for (reason, requested) in [
            (Fenced, false),
            (IsolationShutdown, false),
            (Deleted, true),
            (Halted, true),
            (PlacedElsewhere, false),
            (MigrationFailed, false),
            (Requested, true),
        ] {
            assert_eq!(stop_was_requested(reason.text()), requested, "{reason:?}");
        }
    }

    #[test]
    fn the_first_stop_reason_is_kept_unless_it_was_only_a_request_to_shut_down() {
        use StopReason::*;
        // (reasons recorded one after the other, the one that stays)
        let cases: [(&[StopReason], Option<StopReason>); 6] = [
            (&[], None),
            (&[Fenced, Deleted], Some(Fenced)),
            (&[Deleted, IsolationShutdown], Some(Deleted)),
            // The guest did not shut down in time: the deadline powered it off.
            (&[IsolationShutdown, Fenced], Some(Fenced)),
            (&[IsolationShutdown, Deleted, Fenced], Some(Deleted)),
            (&[IsolationShutdown, IsolationShutdown], Some(IsolationShutdown)),
        ];
        for (recorded, kept) in cases {
            let root = tempfile::tempdir().unwrap();
            let dir = VmDir { path: root.path().to_path_buf() };
            for reason in recorded {
                dir.set_stop_reason(*reason);
            }
            assert_eq!(dir.read_stop_reason().as_deref(), kept.map(StopReason::text), "{recorded:?}");
        }
    }

    #[test]
    fn only_the_named_reason_is_withdrawn() {
        let root = tempfile::tempdir().unwrap();
        let dir = VmDir { path: root.path().to_path_buf() };
        dir.set_stop_reason(StopReason::IsolationShutdown);
        dir.withdraw_stop_reason(StopReason::Fenced);
        assert_eq!(dir.read_stop_reason().as_deref(), Some(StopReason::IsolationShutdown.text()));
        dir.withdraw_stop_reason(StopReason::IsolationShutdown);
        assert_eq!(dir.read_stop_reason(), None);
        dir.withdraw_stop_reason(StopReason::IsolationShutdown);
        assert_eq!(dir.read_stop_reason(), None, "nothing to withdraw is fine");
    }

    #[test]
    fn the_outgoing_send_is_read_back() {
        let root = tempfile::tempdir().unwrap();
        let dir = VmDir { path: root.path().to_path_buf() };
        assert_eq!(dir.read_outgoing(), None);
        let outgoing =
            Outgoing { migration: "m".into(), target_node: "host-2".into(), target_cpus: Some("4-5".into()) };
        dir.write_outgoing(&outgoing).unwrap();
        assert_eq!(dir.read_outgoing(), Some(outgoing));
    }

    #[test]
    fn exits_are_described() {
        let record = |code, signal| ExitRecord { code, signal, at_ms: 0 };
        assert!(record(Some(EXIT_NOT_STARTED), None).describe().contains("could not be started"));
        assert_eq!(record(None, Some(9)).describe(), "VMM killed by signal 9");
        assert_eq!(record(None, None).describe(), "VMM ended for an unknown reason");
    }
}
