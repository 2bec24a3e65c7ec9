//! What the operator, the node agents and users exchange through the API server
//! besides the kinds' own fields: Node labels and annotations, the host facts, the
//! heartbeat Lease, finalizers, condition types and reasons, the migration Secret,
//! the maintenance taint, and who moves a VM or migration from phase to phase.
//! Defined once, here; every part reads and writes them through these names.
//!
//! # The phase protocol
//!
//! A `VirtualMachine`'s `status.phase`, and who sets it:
//!
//! | phase | set by | means |
//! | --- | --- | --- |
//! | `Pending` | operator | no host yet; the `Scheduled` condition says why |
//! | (`status.allocatedCpus`) | operator | host CPUs held for it; the agent pins the vCPUs there unless the spec names CPUs |
//! | `Scheduled` | operator | placed (`status.nodeName`); the agent there is to start it |
//! | `Starting` | agent | its VMM is starting (recorded before the start, with the resourceVersion decided on) |
//! | `Running` | agent | the guest runs on `status.nodeName` |
//! | `Migrating` | agent (source) | a migration moves it; it keeps running on the source |
//! | `Stopping` | operator | a stop was asked for (a Manual `stop`/`restart` request, a host's maintenance); the agent powers the VM off and reports `Stopped` |
//! | `Stopped`, `Failed` | agent | its VMM ended (`lastExit`, the `Ready` condition say how); what next is the operator's call |
//! | `Unknown` | operator | its host failed (no Lease renewal for the failure detection time) and HA has not placed it elsewhere yet (no room; a migration's target may run it), or HA is off for that host's policy (left as it is) |
//! | `Scheduled` (again) | operator | HA: its host failed; placed on another host (`restartCount` + 1) |
//! | `Failed` | operator | HA: its host failed and HA does not restart it (`restartPriority: Disabled`, or a run strategy that does not keep it running) |
//!
//! A `VirtualMachineMigration`'s `status.phase`:
//!
//! | phase | set by | means |
//! | --- | --- | --- |
//! | `Pending` | operator | waiting for a target (a condition says why) |
//! | `Scheduled` | operator | `sourceNode`, `targetNode` and `secretName` set: approved; the target agent starts a receiving VMM and publishes `targetAddress` |
//! | `Running` | agent (source) | memory pre-copy, recorded before the send starts |
//! | `Switchover` | agent (source) | the guest is paused for the last pages |
//! | `Succeeded` | agent (source) | the VM runs on the target; the source moved its `status.nodeName` there first |
//! | `Failed` | agent (either) or operator | the VM keeps running on the source; `failureMessage` says why. Exception: when the operator fails one (Cancelled, TimedOut, SourceHostFailed) after the source VMM had already handed the VM over, the VM's status moves to the target (by the source agent, or the target agent) and the migration stays Failed |
//!
//! A migration's `status.targetState` is the target agent's: `Receiving` once its
//! receiving VMM runs, `Running` once that VMM runs the guest (the agent then moves
//! the VM's status to its host if the source has not: whoever sees the hand-over
//! first records it), `Stopped` once no VMM of the migration runs there or will
//! (after a failure). The operator fails a migration whose source or target host
//! failed (`SourceHostFailed`, `TargetHostFailed`), and HA restarts a VM whose
//! source host failed mid-move only once the target said `Stopped` (or its host
//! failed too): until then the target may run it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::CpuSet;

/// Labels the agent sets on its Node, for node selectors and users.
pub mod labels {
    /// `true` when this host can run Drover VMs (KVM usable and an agent runs).
    pub const KVM: &str = "drover.dev/kvm";
    /// Online host CPUs.
    pub const CPUS: &str = "drover.dev/cpus";
    /// NUMA nodes.
    pub const NUMA_NODES: &str = "drover.dev/numa-nodes";
    /// `true` when cores have more than one hardware thread.
    pub const SMT: &str = "drover.dev/smt";
    /// Every label the agent owns (its own output, never an input to selectors it evaluates).
    pub const AGENT_OWNED: [&str; 4] = [KVM, CPUS, NUMA_NODES, SMT];
}

/// Annotations the agent sets on its Node.
pub mod annotations {
    /// [`super::HostFacts`], as JSON.
    pub const HOST_FACTS: &str = "drover.dev/host-facts";
    /// The address migration targets on this host listen on.
    pub const MIGRATION_ADDRESS: &str = "drover.dev/migration-address";
    /// The agent's HTTP endpoint (console logs, health).
    pub const AGENT_URL: &str = "drover.dev/agent-url";
    /// On a VirtualMachine, set by users: `start`, `stop` or `restart` (Manual run
    /// strategy; `kubectl annotate vm NAME drover.dev/request=start`). The operator
    /// carries it out and removes it.
    pub const REQUEST: &str = "drover.dev/request";
    /// On a Node, set by the operator: where the host's maintenance stands
    /// (`in maintenance: no VM runs here`, or what the evacuation waits for).
    pub const MAINTENANCE_STATUS: &str = "drover.dev/maintenance-status";
    /// On a Node, set by the operator: `Ready`, or why the host takes no VMs (its
    /// heartbeat Lease, its facts, its KVM), as the operator judges it.
    pub const HOST_HEALTH: &str = "drover.dev/host-health";
    /// On a VirtualMachine, set by the operator when it stops the VM for its
    /// host's maintenance: `<host>/Restart` (start it elsewhere) or `<host>/Stop`
    /// (keep it stopped until the maintenance ends). Removed when that is done.
    pub const STOPPED_FOR_MAINTENANCE: &str = "drover.dev/stopped-for-maintenance";
    /// On a VirtualMachine, set by the operator when HA did not restart it after
    /// its host failed (`restartPriority: Disabled`): the host's name. While it is
    /// there the run strategy does not start the VM again, even once the host is
    /// back; remove it (`kubectl annotate vm NAME drover.dev/ha-not-restarted-`)
    /// and the run strategy takes over.
    pub const HA_NOT_RESTARTED: &str = "drover.dev/ha-not-restarted";
    /// On a VM: DRS's last move of it, as JSON ([`crate::contract::DrsMove`]). DRS
    /// does not move it again within its cooldown, nor back where it came from
    /// soon after; a new leader reads it from here.
    pub const DRS_MOVED: &str = "drover.dev/drs-moved";
    /// On a migration DRS made: why (the imbalance before and the predicted after).
    pub const DRS_REASON: &str = "drover.dev/drs-reason";
}

/// Labels the operator sets on the VirtualMachineMigrations it makes.
pub mod migration_labels {
    /// The VM a migration moves (on every migration; old ones are pruned by it).
    pub const VM: &str = "drover.dev/vm";
    /// The host whose maintenance made the migration.
    pub const MAINTENANCE_HOST: &str = "drover.dev/maintenance-host";
}

/// The field manager of every operator write (leader or not: one replica writes at a time).
pub const OPERATOR_FIELD_MANAGER: &str = "drover-operator";

/// Finalizers, each held by the part that must clean up before the object goes.
pub mod finalizers {
    /// On every VM an agent has started, until its VMM has stopped.
    pub const VM_AGENT: &str = "drover.dev/vm-agent";
    /// On every migration the operator approved, until it has ended and its
    /// Secret is gone; deleting a running migration cancels it first.
    pub const MIGRATION_OPERATOR: &str = "drover.dev/migration-operator";
}

/// Condition types.
pub mod conditions {
    /// VM: the guest runs (True), or why not.
    pub const READY: &str = "Ready";
    /// VM: placed on a host (True), or why not (the reason a Pending VM waits).
    pub const SCHEDULED: &str = "Scheduled";
    /// VM: its host CPUs and priority as the spec asks are applied to the running VM.
    pub const CPU_CONFIG_APPLIED: &str = "CpuConfigApplied";
    /// Migration: the target's receiving VMM listens.
    pub const TARGET_READY: &str = "TargetReady";
    /// Migration: the VM runs on the target (True), is on its way (False, Running),
    /// or stays on the source (False, with the reason).
    pub const SUCCEEDED: &str = "Succeeded";
    /// VM: the spec changed in a way only a restart applies (the message names the fields).
    pub const RESTART_REQUIRED: &str = "RestartRequired";
    /// Migration: the operator approved it (True) or why not yet (False).
    pub const APPROVED: &str = "Approved";
}

/// Condition and Event reasons.
pub mod reasons {
    /// VM Ready: the guest runs.
    pub const RUNNING: &str = "Running";
    /// VM Ready: the agent starts the VMM.
    pub const STARTING: &str = "Starting";
    /// VM Ready, CpuConfigApplied: the spec cannot run (the message says why).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// VM Ready: the host cannot run VMs (no usable KVM).
    pub const HOST_CANNOT_RUN_VMS: &str = "HostCannotRunVMs";
    /// VM Ready: stopped as asked (guest power-off, a request, the run strategy).
    pub const STOPPED: &str = "Stopped";
    /// VM Ready: the VMM ended on its own (`lastExit` says how).
    pub const VMM_EXITED: &str = "VmmExited";
    /// VM Ready: the agent lost its VMM (gone without an exit record).
    pub const VMM_LOST: &str = "VmmLost";
    /// VM Ready, migration Succeeded, Event: the VM moved to the target.
    pub const MIGRATED: &str = "Migrated";
    /// Migration Succeeded=False: memory is being copied.
    pub const MIGRATION_RUNNING: &str = "Running";
    /// Migration TargetReady: the receiving VMM listens.
    pub const LISTENING: &str = "Listening";
    /// Migration failed before its target was ready.
    pub const TARGET_NOT_READY: &str = "TargetNotReady";
    /// Migration failed while or after the source sent.
    pub const MIGRATION_FAILED: &str = "Failed";
    /// VM Scheduled: placed on a host (the message has the score and the runner-up).
    pub const PLACED: &str = "Placed";
    /// VM Scheduled: no host can take it (the message says why, host by host).
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// VM Scheduled: waiting to restart after failures (the restart backoff).
    pub const BACK_OFF: &str = "BackOff";
    /// VM Ready: stopped as its run strategy (Manual, Halted) wants.
    pub const NOT_REQUESTED: &str = "NotRequested";
    /// VM RestartRequired.
    pub const SPEC_CHANGED: &str = "SpecChanged";
    /// Migration Approved: target reserved.
    pub const APPROVED: &str = "Approved";
    /// Migration Approved=False: waiting for a slot or a target.
    pub const WAITING: &str = "Waiting";
    /// Migration failed: the request cannot work (the message says why; nothing moved).
    pub const REFUSED: &str = "Refused";
    /// Migration failed: deleted, or stopped on request, before it finished.
    pub const CANCELLED: &str = "Cancelled";
    /// Migration failed: `spec.timeoutSeconds` passed.
    pub const TIMED_OUT: &str = "TimedOut";
    /// VM CpuConfigApplied: the running VM's host CPUs and priority are what the spec asks.
    pub const CPU_CONFIG_IN_EFFECT: &str = "Applied";
    /// VM CpuConfigApplied=False: the VMM refused the change (the message says why).
    pub const CPU_CONFIG_REFUSED: &str = "Refused";
    /// Migration failed: its source host failed (no heartbeat) before it finished.
    pub const SOURCE_HOST_FAILED: &str = "SourceHostFailed";
    /// Migration failed: its target host failed (no heartbeat) before it finished.
    pub const TARGET_HOST_FAILED: &str = "TargetHostFailed";
    /// Node Event: the host's heartbeat Lease was not renewed for its duration.
    pub const HOST_FAILED: &str = "HostFailed";
    /// Node Event: a failed host renews its heartbeat again.
    pub const HOST_RECOVERED: &str = "HostRecovered";
    /// VM Scheduled, Event: HA placed the VM of a failed host on another one.
    pub const HA_RESTARTED: &str = "HARestarted";
    /// VM Scheduled=False: HA waits to restart it (capacity, a migration's outcome).
    pub const HA_WAITING: &str = "HAWaiting";
    /// VM Ready=False, Event: its host failed and HA does not restart it.
    pub const HA_NOT_RESTARTED: &str = "HANotRestarted";
    /// VM Ready=Unknown: its host failed; HA is off there, so it is left as it is.
    pub const HOST_FAILED_HA_OFF: &str = "HostFailedHAOff";
    /// VM Scheduled=False: starting it would eat into the capacity HA keeps for
    /// failover (the message gives the figures).
    pub const HA_ADMISSION_CONTROL: &str = "HAAdmissionControl";
    /// Event on a VM: DRS started a migration of it.
    pub const DRS_MIGRATION: &str = "DRSMigration";
}

/// The heartbeat: one `coordination.k8s.io/v1` Lease per host, renewed by its agent.
pub mod heartbeat {
    /// Namespace of the Leases unless the agent is told another.
    pub const DEFAULT_NAMESPACE: &str = "drover-system";

    /// The Lease of a host: named after its Node.
    pub fn lease_name(node: &str) -> &str {
        node
    }
}

/// Key of the migration Secret (`status.secretName`) that holds the shared secret.
pub const MIGRATION_SECRET_KEY: &str = "key";

/// The taint that puts a host in maintenance: `drover.dev/maintenance:NoExecute`
/// evacuates it by live migration; a cordoned host only gets no new VMs.
pub const MAINTENANCE_TAINT: &str = "drover.dev/maintenance";

/// What a host offers, published by its agent on its Node ([`annotations::HOST_FACTS`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostFacts {
    pub kvm: KvmFact,
    pub topology: TopologyFact,
    pub offered: Offered,
    /// The HostPolicy that selects this host, if any.
    #[serde(default)]
    pub policy: Option<String>,
    /// Heartbeat interval and failure detection time (the Lease duration) from that
    /// HostPolicy's `ha`, in seconds; without a policy the agent's flags apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<HeartbeatFact>,
}

/// The HostPolicy's heartbeat settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatFact {
    pub interval_seconds: u32,
    pub lease_duration_seconds: u32,
}

/// Whether VMs can run here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KvmFact {
    pub usable: bool,
    /// Why not, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub max_vcpus: usize,
}

/// CPUs and NUMA nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopologyFact {
    /// Online host CPUs, a CPU list.
    pub cpus: String,
    pub cores: usize,
    pub threads_per_core: usize,
    pub numa_nodes: Vec<NumaFact>,
    pub memory_mib: u64,
    /// Hyper-thread sibling groups of more than one CPU, as CPU lists; empty
    /// without SMT (and in facts from agents older than this field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sibling_groups: Vec<String>,
}

/// One NUMA node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NumaFact {
    pub id: u32,
    /// Its CPUs, a CPU list.
    pub cpus: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
}

/// What VMs get here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Offered {
    /// Host CPUs VMs may run on (online minus reserved), a CPU list.
    pub cpus: String,
    /// vCPUs of Shared VMs that fit (CPUs × overcommit ratio).
    pub vcpus: u64,
    /// Guest memory that fits, MiB ((total − reserved) × overcommit ratio).
    pub memory_mib: u64,
    /// Guest memory per byte of host memory (1: none overcommitted).
    pub memory_overcommit_ratio: f64,
}

impl HostFacts {
    /// The host CPUs offered to VMs, parsed (empty if the list is malformed).
    pub fn offered_cpus(&self) -> CpuSet {
        CpuSet::parse(&self.offered.cpus).unwrap_or_default()
    }

    /// The facts a Node carries, if its agent published them and they parse.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Option<Result<Self, serde_json::Error>> {
        annotations.get(annotations::HOST_FACTS).map(|json| serde_json::from_str(json))
    }
}

/// DRS's last move of a VM (the `drover.dev/drs-moved` annotation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrsMove {
    /// When, in milliseconds since the Unix epoch (the operator's clock).
    pub at_ms: i64,
    pub from: String,
    pub to: String,
    /// The migration that carries it.
    pub migration: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            kvm: KvmFact { usable: false, reason: Some("/dev/kvm: not found".into()), max_vcpus: 0 },
            topology: TopologyFact {
                cpus: "0-15".into(),
                cores: 8,
                threads_per_core: 2,
                numa_nodes: vec![
                    NumaFact { id: 0, cpus: "0-7".into(), memory_mib: Some(32768) },
                    NumaFact { id: 1, cpus: "8-15".into(), memory_mib: None },
                ],
                memory_mib: 65536,
                sibling_groups: vec!["0,8".into(), "1,9".into()],
            },
            offered: Offered { cpus: "2-15".into(), vcpus: 28, memory_mib: 95232, memory_overcommit_ratio: 1.5 },
            policy: Some("prod".into()),
            heartbeat: Some(HeartbeatFact { interval_seconds: 1, lease_duration_seconds: 3 }),
        }
    }

    #[test]
    fn a_drs_move_round_trips_through_its_annotation() {
        let m =
            DrsMove { at_ms: 1, from: "h1".into(), to: "h2".into(), migration: "m".into(), reason: "balance".into() };
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"atMs\":1"), "{text}");
        assert_eq!(serde_json::from_str::<DrsMove>(&text).unwrap(), m);
    }

    #[test]
    fn host_facts_round_trip_through_the_node_annotation() {
        let facts = facts();
        let annotations: BTreeMap<String, String> =
            [(annotations::HOST_FACTS.to_string(), serde_json::to_string(&facts).unwrap())].into();
        let back = HostFacts::from_annotations(&annotations).unwrap().unwrap();
        assert_eq!(back, facts);
        assert_eq!(back.offered_cpus().len(), 14);
    }

    #[test]
    fn facts_without_the_optional_fields_still_parse() {
        // What an agent publishes on a host without a HostPolicy, written by hand.
        let json = r#"{"kvm":{"usable":true,"maxVcpus":254},
            "topology":{"cpus":"0-1","cores":2,"threadsPerCore":1,"numaNodes":[{"id":0,"cpus":"0-1"}],"memoryMib":4096},
            "offered":{"cpus":"0-1","vcpus":2,"memoryMib":3072,"memoryOvercommitRatio":1.0}}"#;
        let facts: HostFacts = serde_json::from_str(json).unwrap();
        assert_eq!((facts.policy, facts.heartbeat, facts.topology.sibling_groups.len()), (None, None, 0));
    }

    #[test]
    fn no_annotation_is_no_facts_and_a_bad_one_is_an_error() {
        assert!(HostFacts::from_annotations(&BTreeMap::new()).is_none());
        let bad: BTreeMap<String, String> = [(annotations::HOST_FACTS.to_string(), "{".to_string())].into();
        assert!(HostFacts::from_annotations(&bad).unwrap().is_err());
    }
}
