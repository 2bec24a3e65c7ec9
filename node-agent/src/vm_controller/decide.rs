//! What to do about one VirtualMachine, decided from what was observed: the object,
//! this host's VMM of it (if any), whether the host holds its lease, the host's
//! facts, and the time. No I/O, no clock, no client: the same observation always
//! gives the same [`Plan`], which `act` carries out.

use std::time::Duration;

use drover_crds::contract::{annotations, conditions, reasons};
use drover_crds::vm::{BootedWith, RunStrategy, VirtualMachine, VirtualMachineStatus, VmPhase};
use drover_topology::CpuSet;
use drover_vmm_api::VmConfig;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::conditions::condition;
use crate::events;
use crate::handover;
use crate::host_facts::HostFacts;
pub use crate::next::Next;
use crate::supervisor::VmmState;
use crate::vm_dir::{ExitRecord, Outgoing, Role, StopReason, stop_was_requested};
use crate::vmm_client::Phase;

/// How often a running VM's status is refreshed (and a receiving VMM looked at).
pub const POLL_RUNNING: Duration = Duration::from_secs(2);
/// How often a starting or stopping VM is looked at.
pub const POLL_BUSY: Duration = Duration::from_millis(250);
/// How soon a VM that may not start yet (no lease, no host facts) is looked at again.
pub const POLL_NOT_YET: Duration = Duration::from_millis(500);

/// Everything a decision rests on.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub vm: &'a VirtualMachine,
    /// This host's Node name.
    pub node: &'a str,
    /// The VMM of this VM on this host, if there is one.
    pub local: Option<LocalVmm>,
    /// Whether the host holds its heartbeat lease (no VM starts without it).
    pub leased: bool,
    /// The host's facts, once gathered.
    pub facts: Option<&'a HostFacts>,
    /// Stamped on the conditions the plan writes.
    pub now: Time,
}

/// A VMM of the VM on this host.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalVmm {
    pub role: Role,
    pub state: VmmState,
    /// Why it was stopped from outside (read once it has ended), if someone did.
    pub stop_reason: Option<String>,
    /// Whether it reports its outgoing migration completed; asked only of a running
    /// VMM whose VM is placed elsewhere.
    pub handed_over: bool,
    /// A send of it whose migration is gone, the VM still marked as moving in it.
    pub orphan: Option<Orphan>,
    /// It ended "migrated" while its VM is placed elsewhere, and its migration is
    /// still under way: the migration controller has yet to record the figures it
    /// left (the target moved the VM's status first). Asked only then.
    pub unrecorded_send: bool,
    /// A receiving VMM that still runs, left from a migration that is gone, while
    /// the VM (placed elsewhere) is not marked as moving in it. Asked only then.
    pub migration_gone: bool,
}

/// A send the local VMM made for a migration that no longer exists, while the VM
/// is still marked as moving in it (`status.migration`). The migration controller
/// settles a failed migration's send; this is for one that went before it could
/// (the agent was down then, say): the VM must not stay marked, nor vanish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Orphan {
    /// What the VMM says of its send, if it runs and answered.
    pub phase: Option<Phase>,
    /// Where the send went, as the source recorded it (for that migration).
    pub outgoing: Option<Outgoing>,
}

/// What to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Nothing now.
    Wait(Next),
    /// The VMM that received the VM in a migration runs it now that its status names
    /// this host: make it the VM's own (role Run), then carry out the rest.
    TakeOver(Box<Plan>),
    /// Power the local VMM off (SIGKILL), recording why; look again soon to see it end.
    PowerOff(StopReason),
    /// Cancel the local VMM's send (its migration is gone); look again soon.
    CancelSend,
    /// Forget the ended VMM of a VM placed elsewhere; nothing more to do here.
    Forget,
    /// The guest reset: forget its ended VMM, then the rest (a start, or why not yet).
    Reboot(Box<Plan>),
    /// Let the deletion of a VM that no host runs proceed (drop the agent's finalizer).
    ReleaseFinalizer,
    /// The deleted VM no longer runs here: forget its VMM, drop the finalizer.
    Deleted,
    /// Write a status, with a log line and an Event.
    Report(Box<Report>),
    /// Start a VMM on the `offered` host CPUs, recording `Starting` over `status` first.
    Start { status: Box<VirtualMachineStatus>, offered: CpuSet },
    /// The VMM runs the VM here: apply spec changes live, report it Running.
    Run { offered: CpuSet },
}

/// A status to write.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub status: VirtualMachineStatus,
    /// Logged before the write.
    pub log: Option<String>,
    /// Published after the write.
    pub event: Option<Event>,
    /// The local VMM has ended and is accounted for: forget it after the write.
    pub forget: bool,
    pub next: Next,
}

/// A Kubernetes Event on the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

/// What to do about the VM, as `o` finds it.
pub fn decide(o: &Observed) -> Plan {
    let status = o.vm.status.clone().unwrap_or_default();
    if status.node_name.as_deref() != Some(o.node) {
        return elsewhere(o, &status);
    }
    if o.vm.metadata.deletion_timestamp.is_some() {
        return match o.local.as_ref().map(|l| &l.state) {
            Some(VmmState::Running) => Plan::PowerOff(StopReason::Deleted),
            _ => Plan::Deleted,
        };
    }
    let Some(local) = &o.local else { return idle(o, status) };
    match &local.state {
        VmmState::Running => {
            let plan = if halted(o.vm) {
                Plan::PowerOff(StopReason::Halted)
            } else if stopping(&status) {
                // The operator asked for a stop: power off, and report nothing until
                // the VMM has ended (a Running report would undo the operator's word).
                Plan::PowerOff(StopReason::Requested)
            } else if let Some(orphan) = &local.orphan {
                orphaned(o, status, orphan)
            } else {
                Plan::Run { offered: offered(o) }
            };
            if matches!(local.role, Role::Receive { .. }) { Plan::TakeOver(Box::new(plan)) } else { plan }
        }
        // The migration controller moves the VM's status to the target; if its
        // migration is gone, the record of where the send went says where.
        VmmState::Ended(record) if record.is_migrated() => {
            match local.orphan.as_ref().and_then(|orphan| orphan.outgoing.as_ref()) {
                Some(outgoing) => handed_over(o, outgoing),
                None => Plan::Wait(Next::After(POLL_BUSY)),
            }
        }
        VmmState::Ended(record) => ended(o, status, record, local.stop_reason.as_deref()),
        VmmState::Lost => {
            let mut status = status;
            status.phase = Some(VmPhase::Failed);
            status.last_exit = Some("the VMM's monitor vanished without recording an exit".into());
            status.conditions.set(ready(o, reasons::VMM_LOST, format!("VMM lost on {}", o.node)));
            report(
                status,
                None,
                Some(warning(reasons::VMM_LOST, "Stop", format!("the VMM's monitor vanished on {}", o.node))),
            )
            .forgetting()
            .then(Next::After(POLL_BUSY))
        }
    }
}

/// The VM is placed elsewhere (or nowhere). A VMM of ours may still exist: a
/// migration target (left to the migration controller while its migration
/// exists), a source that has handed the VM over, or one that must not run (the VM
/// was moved while this host was cut off and has fenced; this is the belt to those
/// braces). Nothing is started and nothing is written: the VM's status is another
/// host's now (an HA restart, a migration); what is left here goes.
fn elsewhere(o: &Observed, status: &VirtualMachineStatus) -> Plan {
    match &o.local {
        Some(l @ LocalVmm { role: Role::Run, .. }) => match l.state {
            VmmState::Running if l.handed_over => Plan::Wait(Next::After(POLL_BUSY)),
            VmmState::Running => Plan::PowerOff(StopReason::PlacedElsewhere),
            // The migration controller reads the send's figures from its directory.
            _ if l.unrecorded_send => Plan::Wait(Next::After(POLL_BUSY)),
            _ => Plan::Forget,
        },
        Some(LocalVmm { role: Role::Receive { migration }, state, migration_gone, .. }) => {
            // While the VM is marked as moving in its migration the source may still
            // hand it over (then it is placed here, and a received VM's end is
            // reported from the VMM's record): the migration controller's.
            let marked = status.migration.as_deref() == Some(migration.as_str());
            match state {
                VmmState::Running if *migration_gone => Plan::PowerOff(StopReason::PlacedElsewhere),
                VmmState::Running => Plan::Wait(Next::After(POLL_RUNNING)),
                _ if marked => Plan::Wait(Next::After(POLL_RUNNING)),
                // Ended (fenced, say) without the VM ever being placed here: nothing
                // of it will run, and nothing of it is reported.
                _ => Plan::Forget,
            }
        }
        // A deleted VM that no host runs: nobody else will release it.
        None if o.vm.metadata.deletion_timestamp.is_some() && status.node_name.is_none() => Plan::ReleaseFinalizer,
        None => Plan::Wait(Next::Change),
    }
}

/// A running VMM whose send's migration is gone: cancel a send still going (nobody
/// wants it: a migration goes only once it has ended), wait for one that completed
/// to end "migrated", and otherwise drop the VM's mark: it stays here.
fn orphaned(o: &Observed, mut status: VirtualMachineStatus, orphan: &Orphan) -> Plan {
    match orphan.phase {
        Some(Phase::Connecting | Phase::PreCopy | Phase::Switchover) => Plan::CancelSend,
        Some(Phase::Completed) | None => Plan::Wait(Next::After(POLL_BUSY)),
        Some(Phase::None | Phase::Failed | Phase::Cancelled | Phase::Unknown) => {
            let migration = status.migration.take().unwrap_or_default();
            if status.phase == Some(VmPhase::Migrating) {
                status.phase = Some(VmPhase::Running);
            }
            let line = format!("migration {migration} is gone and its send ended: the VM stays on {}", o.node);
            Report { log: Some(line), ..report(status, None, None) }.then(Next::After(POLL_BUSY))
        }
    }
}

/// The local VMM handed the VM over to `outgoing`'s target, and the migration is
/// gone: the VM's status moves there as the migration controller would have moved it.
fn handed_over(o: &Observed, outgoing: &Outgoing) -> Plan {
    let target = &outgoing.target_node;
    let status = handover::moved(o.vm, o.node, target, outgoing.target_cpus.as_deref(), o.now.clone());
    let note = format!(
        "moved from {} to {target}: its VMM handed it over in migration {}, which is gone",
        o.node, outgoing.migration
    );
    report(status, Some(note.clone()), Some(warning(reasons::MIGRATED, "Migrate", note))).then(Next::Change)
}

/// The local VMM ended (not by migrating away).
fn ended(o: &Observed, mut status: VirtualMachineStatus, record: &ExitRecord, stop_reason: Option<&str>) -> Plan {
    let what = match stop_reason {
        Some(r) => format!("{} ({r})", record.describe()),
        None => record.describe(),
    };
    let stop_asked = stopping(&status);
    if record.is_reset() && !halted(o.vm) && !stop_asked && stop_reason.is_none() {
        // A guest reboot: the machine starts again where it is.
        status.last_exit = Some(what);
        return Plan::Reboot(Box::new(start(o, status)));
    }
    // A guest that resets while the operator stops it has stopped as asked: it is
    // not started again, and not a failure either.
    let clean = record.is_clean() || stop_reason.is_some_and(stop_was_requested) || (stop_asked && record.is_reset());
    let note = format!("{what} on {}", o.node);
    status.last_exit = Some(what.clone());
    status.cpu_usage = None;
    if left_down_by_ha(o, &status) {
        // This host failed and HA left the VM down (its run strategy or the
        // user's choice): that is why it stays Failed, and what `Ready` keeps
        // saying; how its VMM ended here, late, is in `lastExit` and the Event.
        status.phase = Some(VmPhase::Failed);
    } else {
        status.phase = Some(if clean { VmPhase::Stopped } else { VmPhase::Failed });
        status.conditions.set(ready(o, if clean { reasons::STOPPED } else { reasons::VMM_EXITED }, note.clone()));
    }
    let event =
        if clean { normal(reasons::STOPPED, "Stop", note) } else { warning(events::reasons::FAILED, "Stop", note) };
    report(status, Some(format!("VM ended: {what}")), Some(event)).forgetting().then(Next::After(POLL_BUSY))
}

/// Nothing runs here for a VM placed here: start it, or say why not.
fn idle(o: &Observed, mut status: VirtualMachineStatus) -> Plan {
    let invalid_spec_changed = status.phase == Some(VmPhase::Failed)
        && status.conditions.get(conditions::READY).is_some_and(|c| c.reason == reasons::INVALID_SPEC)
        && status.observed_generation < o.vm.metadata.generation;
    match status.phase {
        _ if halted(o.vm) => {
            if status.phase == Some(VmPhase::Stopped) {
                return Plan::Wait(Next::Change);
            }
            status.phase = Some(VmPhase::Stopped);
            status.conditions.set(ready(o, reasons::STOPPED, "spec.runStrategy is Halted"));
            report(status, None, None).then(Next::Change)
        }
        None | Some(VmPhase::Pending) | Some(VmPhase::Scheduled) => start(o, status),
        Some(VmPhase::Failed) if invalid_spec_changed => start(o, status),
        Some(VmPhase::Stopping) => {
            // The operator asked for a stop and nothing runs: it is stopped.
            let why = format!("stopped on request on {}: its VMM was not running", o.node);
            status.phase = Some(VmPhase::Stopped);
            status.cpu_usage = None;
            status.conditions.set(ready(o, reasons::STOPPED, why.clone()));
            report(status, None, Some(normal(reasons::STOPPED, "Stop", why))).then(Next::Change)
        }
        Some(VmPhase::Starting) | Some(VmPhase::Running) | Some(VmPhase::Migrating) => {
            // The status says it runs here, but nothing does: the host lost power
            // (its runtime directory is gone) or the VMM vanished.
            let why = format!("its VMM is gone from {} (host restarted or powered off)", o.node);
            status.phase = Some(VmPhase::Failed);
            status.last_exit = Some(why.clone());
            status.cpu_usage = None;
            status.conditions.set(ready(o, reasons::VMM_LOST, why.clone()));
            report(status, None, Some(warning(reasons::VMM_LOST, "Stop", why))).then(Next::Change)
        }
        Some(VmPhase::Stopped) | Some(VmPhase::Failed) | Some(VmPhase::Unknown) => Plan::Wait(Next::Change),
    }
}

/// A start, if the host may start VMs now; `status` is what the start builds on.
fn start(o: &Observed, mut status: VirtualMachineStatus) -> Plan {
    if !o.leased {
        // Not an error to report on the VM: the host will renew its lease or the
        // operator will place the VM elsewhere.
        return Plan::Wait(Next::After(POLL_NOT_YET));
    }
    let Some(facts) = o.facts else { return Plan::Wait(Next::After(POLL_NOT_YET)) };
    if !facts.kvm.usable {
        let why = format!("{} cannot run VMs: {}", o.node, facts.kvm.reason.as_deref().unwrap_or_default());
        status.phase = Some(VmPhase::Failed);
        status.conditions.set(ready(o, reasons::HOST_CANNOT_RUN_VMS, why.clone()));
        status.observed_generation = o.vm.metadata.generation;
        return report(status, None, Some(warning(reasons::HOST_CANNOT_RUN_VMS, "Start", why))).then(Next::Change);
    }
    Plan::Start { status: Box::new(status), offered: facts.offered_cpus() }
}

/// The status that refuses a spec this host cannot run (`why` names the field).
pub fn invalid_spec(
    vm: &VirtualMachine,
    mut status: VirtualMachineStatus,
    why: &str,
    now: Time,
) -> VirtualMachineStatus {
    let generation = vm.metadata.generation;
    status.phase = Some(VmPhase::Failed);
    status.conditions.set(condition(conditions::READY, false, reasons::INVALID_SPEC, why, generation, now));
    status.observed_generation = generation;
    status
}

/// The status recorded before the VMM starts, against the version of the VM the
/// start was decided on.
pub fn starting(
    vm: &VirtualMachine,
    mut status: VirtualMachineStatus,
    config: &VmConfig,
    node: &str,
    now: Time,
) -> VirtualMachineStatus {
    let generation = vm.metadata.generation;
    status.phase = Some(VmPhase::Starting);
    status.observed_generation = generation;
    // What only a restart changes, as this start takes it (the operator compares
    // it with the spec for RestartRequired); a guest reset comes here too.
    status.booted_with = Some(BootedWith::of(&vm.spec));
    // A VM that boots here is moved by no migration (a mark left by a source that
    // failed mid-send would report it Migrating for good).
    status.migration = None;
    status.host_cpus = config.cpus.host_cpus.clone();
    status.shares = Some(config.shares as i32);
    status.started_at = None;
    status.boot_millis = None;
    status.cpu_usage = None;
    status.conditions.set(condition(
        conditions::READY,
        false,
        reasons::STARTING,
        format!("starting on {node}"),
        generation,
        now,
    ));
    status
}

/// Whether HA marked the VM as not restarted after this host failed, and says so
/// in its `Ready` condition (see `annotations::HA_NOT_RESTARTED`).
fn left_down_by_ha(o: &Observed, status: &VirtualMachineStatus) -> bool {
    o.vm.annotations().get(annotations::HA_NOT_RESTARTED).is_some_and(|host| host == o.node)
        && status.phase == Some(VmPhase::Failed)
        && status.conditions.get(conditions::READY).is_some_and(|c| c.reason == reasons::HA_NOT_RESTARTED)
}

fn halted(vm: &VirtualMachine) -> bool {
    vm.spec.run_strategy == RunStrategy::Halted
}

/// Whether the operator asked for the VM to stop (`status.phase: Stopping`).
fn stopping(status: &VirtualMachineStatus) -> bool {
    status.phase == Some(VmPhase::Stopping)
}

fn offered(o: &Observed) -> CpuSet {
    o.facts.map(|f| f.offered_cpus()).unwrap_or_default()
}

/// A Ready=False condition.
fn ready(o: &Observed, reason: &str, message: impl Into<String>) -> Condition {
    condition(conditions::READY, false, reason, message, o.vm.metadata.generation, o.now.clone())
}

fn normal(reason: &'static str, action: &'static str, note: String) -> Event {
    Event { warning: false, reason, action, note }
}

fn warning(reason: &'static str, action: &'static str, note: String) -> Event {
    Event { warning: true, reason, action, note }
}

fn report(status: VirtualMachineStatus, log: Option<String>, event: Option<Event>) -> Report {
    Report { status, log, event, forget: false, next: Next::Change }
}

impl Report {
    fn forgetting(self) -> Self {
        Report { forget: true, ..self }
    }

    fn then(self, next: Next) -> Plan {
        Plan::Report(Box::new(Report { next, ..self }))
    }
}

#[cfg(test)]
mod tests {
    use drover_crds::contract::{KvmFact, Offered, TopologyFact};
    use drover_vmm_api::ExitStatus;

    use super::*;

    const NODE: &str = "host-1";

    /// Every phase a VM's status can have, and none.
    const PHASES: [Option<VmPhase>; 10] = [
        None,
        Some(VmPhase::Pending),
        Some(VmPhase::Scheduled),
        Some(VmPhase::Starting),
        Some(VmPhase::Running),
        Some(VmPhase::Migrating),
        Some(VmPhase::Stopping),
        Some(VmPhase::Stopped),
        Some(VmPhase::Failed),
        Some(VmPhase::Unknown),
    ];

    fn phases() -> &'static [Option<VmPhase>] {
        &PHASES
    }

    /// The local VMM states the table covers.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Vmm {
        None,
        Running,
        Receiving,
        /// A receiving VMM the host's isolation response killed.
        ReceiveFenced,
        EndedClean,
        EndedReset,
        EndedMigrated,
        EndedFailed,
        Lost,
    }

    const VMMS: [Vmm; 9] = [
        Vmm::None,
        Vmm::Running,
        Vmm::Receiving,
        Vmm::ReceiveFenced,
        Vmm::EndedClean,
        Vmm::EndedReset,
        Vmm::EndedMigrated,
        Vmm::EndedFailed,
        Vmm::Lost,
    ];

    fn exit(status: ExitStatus) -> VmmState {
        VmmState::Ended(ExitRecord { code: Some(status.code().into()), signal: None, at_ms: 1 })
    }

    fn local(vmm: Vmm) -> Option<LocalVmm> {
        let run = |state| {
            Some(LocalVmm {
                role: Role::Run,
                state,
                stop_reason: None,
                handed_over: false,
                orphan: None,
                unrecorded_send: false,
                migration_gone: false,
            })
        };
        match vmm {
            Vmm::None => None,
            Vmm::Running => run(VmmState::Running),
            Vmm::Receiving => Some(LocalVmm {
                role: Role::Receive { migration: "m".into() },
                state: VmmState::Running,
                stop_reason: None,
                handed_over: false,
                orphan: None,
                unrecorded_send: false,
                migration_gone: false,
            }),
            Vmm::ReceiveFenced => Some(LocalVmm {
                role: Role::Receive { migration: "m".into() },
                state: VmmState::Ended(ExitRecord { code: None, signal: Some(9), at_ms: 1 }),
                stop_reason: Some(StopReason::Fenced.text().into()),
                handed_over: false,
                orphan: None,
                unrecorded_send: false,
                migration_gone: false,
            }),
            Vmm::EndedClean => run(exit(ExitStatus::PoweredOff)),
            Vmm::EndedReset => run(exit(ExitStatus::Reset)),
            Vmm::EndedMigrated => run(exit(ExitStatus::MigratedOut)),
            Vmm::EndedFailed => run(VmmState::Ended(ExitRecord { code: None, signal: Some(9), at_ms: 1 })),
            Vmm::Lost => run(VmmState::Lost),
        }
    }

    fn facts(kvm: bool) -> HostFacts {
        HostFacts {
            kvm: KvmFact { usable: kvm, reason: (!kvm).then(|| "/dev/kvm: not found".into()), max_vcpus: 8 },
            topology: TopologyFact {
                cpus: "0-3".into(),
                cores: 4,
                threads_per_core: 1,
                numa_nodes: vec![],
                memory_mib: 4096,
                sibling_groups: vec![],
            },
            offered: Offered { cpus: "1-3".into(), vcpus: 3, memory_mib: 3072, memory_overcommit_ratio: 1.0 },
            policy: None,
            heartbeat: None,
        }
    }

    /// A VM placed on `node` (or nowhere) in `phase`.
    fn vm(node: Option<&str>, phase: Option<VmPhase>) -> VirtualMachine {
        let mut vm: VirtualMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": { "name": "v", "namespace": "ns", "uid": "u-1", "generation": 2 },
            "spec": { "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" }, "boot": { "kernel": "/k" } }
        }))
        .unwrap();
        vm.status = Some(VirtualMachineStatus {
            node_name: node.map(str::to_string),
            phase,
            observed_generation: Some(2),
            ..Default::default()
        });
        vm
    }

    fn halt(mut vm: VirtualMachine) -> VirtualMachine {
        vm.spec.run_strategy = RunStrategy::Halted;
        vm
    }

    fn delete(mut vm: VirtualMachine) -> VirtualMachine {
        vm.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-01-01T00:00:00Z".parse().unwrap()));
        vm
    }

    fn now() -> Time {
        Time("2026-01-02T03:04:05Z".parse().unwrap())
    }

    fn observe<'a>(vm: &'a VirtualMachine, local: Option<LocalVmm>, leased: bool, facts: &'a HostFacts) -> Plan {
        decide(&Observed { vm, node: NODE, local, leased, facts: Some(facts), now: now() })
    }

    /// A plan in a few words, for tables: `report:Failed/VmmExited+forget`,
    /// `reboot>start`, `wait:250ms`.
    fn kind(plan: &Plan) -> String {
        let next = |n: &Next| match n {
            Next::Change => "change".to_string(),
            Next::After(d) => format!("{}ms", d.as_millis()),
        };
        match plan {
            Plan::Wait(n) => format!("wait:{}", next(n)),
            Plan::TakeOver(rest) => format!("take-over>{}", kind(rest)),
            Plan::PowerOff(reason) => format!("power-off:{reason:?}"),
            Plan::CancelSend => "cancel-send".into(),
            Plan::Forget => "forget".into(),
            Plan::Reboot(rest) => format!("reboot>{}", kind(rest)),
            Plan::ReleaseFinalizer => "release".into(),
            Plan::Deleted => "deleted".into(),
            Plan::Report(r) => format!(
                "report:{:?}/{}{}>{}",
                r.status.phase.unwrap_or(VmPhase::Unknown),
                r.status.conditions.get(conditions::READY).map(|c| c.reason.as_str()).unwrap_or("-"),
                if r.forget { "+forget" } else { "" },
                next(&r.next)
            ),
            Plan::Start { .. } => "start".into(),
            Plan::Run { .. } => "run".into(),
        }
    }

    /// One row: which phases (None: any), VMM state, lease (None: either) → plan.
    type Row = (Option<&'static [Option<VmPhase>]>, Vmm, Option<bool>, &'static str);

    /// Checks every phase × VMM state × lease against `rows` (the first row that
    /// matches decides), and that every row is needed.
    fn check_table(rows: &[Row], make: impl Fn(Option<VmPhase>) -> VirtualMachine, kvm: bool) {
        let facts = facts(kvm);
        let mut used = vec![false; rows.len()];
        for &phase in phases() {
            for vmm in VMMS {
                for leased in [true, false] {
                    let (i, row) = rows
                        .iter()
                        .enumerate()
                        .find(|(_, (p, v, l, _))| {
                            p.is_none_or(|p| p.contains(&phase)) && *v == vmm && l.is_none_or(|l| l == leased)
                        })
                        .unwrap_or_else(|| panic!("no row for {phase:?} × {vmm:?} × leased {leased}"));
                    used[i] = true;
                    let vm = make(phase);
                    let got = kind(&observe(&vm, local(vmm), leased, &facts));
                    assert_eq!(got, row.3, "{phase:?} × {vmm:?} × leased {leased}");
                }
            }
        }
        for (row, used) in rows.iter().zip(used) {
            assert!(used, "row never used: {row:?}");
        }
    }

    const STARTABLE: &[Option<VmPhase>] = &[None, Some(VmPhase::Pending), Some(VmPhase::Scheduled)];
    const SAID_TO_RUN: &[Option<VmPhase>] =
        &[Some(VmPhase::Starting), Some(VmPhase::Running), Some(VmPhase::Migrating)];
    /// The operator's word for "power it off".
    const STOPPING: &[Option<VmPhase>] = &[Some(VmPhase::Stopping)];
    const AT_REST: &[Option<VmPhase>] = &[Some(VmPhase::Stopped), Some(VmPhase::Failed), Some(VmPhase::Unknown)];

    #[test]
    fn a_vm_placed_here() {
        check_table(
            &[
                // Nothing runs: start when asked and leased, report a VMM that vanished.
                (Some(STARTABLE), Vmm::None, Some(true), "start"),
                (Some(STARTABLE), Vmm::None, Some(false), "wait:500ms"),
                (Some(SAID_TO_RUN), Vmm::None, None, "report:Failed/VmmLost>change"),
                (Some(STOPPING), Vmm::None, None, "report:Stopped/Stopped>change"),
                (Some(AT_REST), Vmm::None, None, "wait:change"),
                // The operator stops it: power off (no Running report meanwhile).
                (Some(STOPPING), Vmm::Running, None, "power-off:Requested"),
                (Some(STOPPING), Vmm::Receiving, None, "take-over>power-off:Requested"),
                // A VMM runs: report it, whatever the phase and the lease (the monitor
                // fences without the lease); a received one becomes the VM's own.
                (None, Vmm::Running, None, "run"),
                (None, Vmm::Receiving, None, "take-over>run"),
                // A VM handed over here whose receiving VMM this host's isolation
                // response killed before it took it over: a failure, reported.
                (None, Vmm::ReceiveFenced, None, "report:Failed/VmmExited+forget>250ms"),
                // It ended: say how, then forget it; a reset boots again if it may,
                // not while the operator stops it (it has stopped as asked).
                (None, Vmm::EndedClean, None, "report:Stopped/Stopped+forget>250ms"),
                (None, Vmm::EndedFailed, None, "report:Failed/VmmExited+forget>250ms"),
                (Some(STOPPING), Vmm::EndedReset, None, "report:Stopped/Stopped+forget>250ms"),
                (None, Vmm::EndedReset, Some(true), "reboot>start"),
                (None, Vmm::EndedReset, Some(false), "reboot>wait:500ms"),
                (None, Vmm::EndedMigrated, None, "wait:250ms"),
                (None, Vmm::Lost, None, "report:Failed/VmmLost+forget>250ms"),
            ],
            |phase| vm(Some(NODE), phase),
            true,
        );
    }

    #[test]
    fn a_halted_vm_placed_here() {
        let stopped: &[Option<VmPhase>] = &[Some(VmPhase::Stopped)];
        let others: Vec<Option<VmPhase>> = phases().iter().copied().filter(|p| *p != Some(VmPhase::Stopped)).collect();
        let others: &'static [Option<VmPhase>] = others.leak();
        check_table(
            &[
                (Some(stopped), Vmm::None, None, "wait:change"),
                (Some(others), Vmm::None, None, "report:Stopped/Stopped>change"),
                (None, Vmm::Running, None, "power-off:Halted"),
                (None, Vmm::Receiving, None, "take-over>power-off:Halted"),
                (None, Vmm::ReceiveFenced, None, "report:Failed/VmmExited+forget>250ms"),
                (None, Vmm::EndedClean, None, "report:Stopped/Stopped+forget>250ms"),
                (None, Vmm::EndedFailed, None, "report:Failed/VmmExited+forget>250ms"),
                // Halted: a reset is an end like any other (not a clean one), unless
                // the operator was stopping the VM anyway.
                (Some(STOPPING), Vmm::EndedReset, None, "report:Stopped/Stopped+forget>250ms"),
                (None, Vmm::EndedReset, None, "report:Failed/VmmExited+forget>250ms"),
                (None, Vmm::EndedMigrated, None, "wait:250ms"),
                (None, Vmm::Lost, None, "report:Failed/VmmLost+forget>250ms"),
            ],
            |phase| halt(vm(Some(NODE), phase)),
            true,
        );
    }

    #[test]
    fn a_deleted_vm_placed_here() {
        check_table(
            &[(None, Vmm::Running, None, "power-off:Deleted"), (None, Vmm::Receiving, None, "power-off:Deleted")]
                .into_iter()
                .chain(
                    [
                        Vmm::None,
                        Vmm::ReceiveFenced,
                        Vmm::EndedClean,
                        Vmm::EndedReset,
                        Vmm::EndedMigrated,
                        Vmm::EndedFailed,
                        Vmm::Lost,
                    ]
                    .map(|v| (None, v, None, "deleted")),
                )
                .collect::<Vec<Row>>(),
            |phase| delete(vm(Some(NODE), phase)),
            true,
        );
    }

    #[test]
    fn a_vm_placed_on_another_host() {
        let rows: Vec<Row> = vec![
            (None, Vmm::None, None, "wait:change"),
            // Runs here but placed elsewhere (and not handed over): must not run.
            (None, Vmm::Running, None, "power-off:PlacedElsewhere"),
            // A migration target: the migration controller's.
            (None, Vmm::Receiving, None, "wait:2000ms"),
            // Left from a migration (fenced while the host was cut off, say), the VM
            // never placed here and not moving in it: cleared, nothing written.
            (None, Vmm::ReceiveFenced, None, "forget"),
            (None, Vmm::EndedClean, None, "forget"),
            (None, Vmm::EndedReset, None, "forget"),
            (None, Vmm::EndedMigrated, None, "forget"),
            (None, Vmm::EndedFailed, None, "forget"),
            (None, Vmm::Lost, None, "forget"),
        ];
        check_table(&rows, |phase| vm(Some("host-2"), phase), true);
        // Deleted changes nothing while another host holds it...
        check_table(&rows, |phase| delete(vm(Some("host-2"), phase)), true);
        // ...and releases it when no host does.
        let mut nowhere = rows.clone();
        nowhere[0].3 = "release";
        check_table(&nowhere, |phase| delete(vm(None, phase)), true);
        check_table(&rows, |phase| vm(None, phase), true);
    }

    /// A host back from isolation (its lease renewed again) whose VMs the operator
    /// restarted elsewhere meanwhile: every phase the new host may have written ×
    /// this host's VMM of it (run or receiving, killed by the isolation response,
    /// or lost) → cleared, never started, never reported over the new host's status.
    #[test]
    fn a_host_back_from_isolation_clears_what_is_left_of_vms_placed_elsewhere() {
        let facts = facts(true);
        let fenced = |role: Role| LocalVmm {
            role,
            state: VmmState::Ended(ExitRecord { code: None, signal: Some(9), at_ms: 1 }),
            stop_reason: Some(StopReason::Fenced.text().into()),
            handed_over: false,
            orphan: None,
            unrecorded_send: false,
            migration_gone: false,
        };
        let receive = || Role::Receive { migration: "m".into() };
        let lost = LocalVmm { state: VmmState::Lost, ..fenced(Role::Run) };
        for &phase in phases() {
            let mut vm = vm(Some("host-2"), phase);
            // Restarted elsewhere since: a start leaves no migration mark.
            vm.status.as_mut().unwrap().restart_count = Some(1);
            for local in [
                fenced(Role::Run),
                fenced(receive()),
                lost.clone(),
                LocalVmm { state: VmmState::Lost, ..fenced(receive()) },
            ] {
                for leased in [true, false] {
                    let plan = observe(&vm, Some(local.clone()), leased, &facts);
                    assert_eq!(plan, Plan::Forget, "{phase:?} × {:?} {:?} × leased {leased}", local.role, local.state);
                }
            }
            // Nothing left here: nothing to do, and certainly no start.
            assert_eq!(observe(&vm, None, true, &facts), Plan::Wait(Next::Change), "{phase:?}");
        }
    }

    /// A receiving VMM of a VM placed elsewhere × the VM marked as moving in its
    /// migration or not × the migration gone or not.
    #[test]
    fn a_receiving_vmm_is_left_to_its_migration_while_the_vm_may_still_come() {
        let facts = facts(true);
        let receiving = |state: VmmState, migration_gone: bool| LocalVmm {
            role: Role::Receive { migration: "m".into() },
            state,
            stop_reason: None,
            handed_over: false,
            orphan: None,
            unrecorded_send: false,
            migration_gone,
        };
        let ended = exit(ExitStatus::VmmError);
        for marked in [false, true] {
            let mut vm = vm(Some("host-2"), Some(VmPhase::Migrating));
            vm.status.as_mut().unwrap().migration = marked.then(|| "m".into());
            let rows: &[(VmmState, bool, &str)] = &[
                (VmmState::Running, false, "wait:2000ms"),
                // Its migration is gone and the source has settled: it must not run here.
                (VmmState::Running, true, "power-off:PlacedElsewhere"),
                (ended.clone(), false, if marked { "wait:2000ms" } else { "forget" }),
                (VmmState::Lost, false, if marked { "wait:2000ms" } else { "forget" }),
            ];
            for (state, gone, want) in rows {
                let plan = observe(&vm, Some(receiving(state.clone(), *gone)), true, &facts);
                assert_eq!(kind(&plan), *want, "marked {marked} × {state:?} × migration gone {gone}");
            }
        }
    }

    /// A source VMM that ended "migrated" while the target moved the VM's status
    /// first: kept until its migration has been recorded (its figures are in its
    /// directory), then cleared.
    #[test]
    fn a_source_keeps_the_figures_of_a_send_until_its_migration_records_them() {
        let facts = facts(true);
        let vm = vm(Some("host-2"), Some(VmPhase::Running));
        let migrated = |unrecorded_send: bool| LocalVmm {
            role: Role::Run,
            state: exit(ExitStatus::MigratedOut),
            stop_reason: None,
            handed_over: false,
            orphan: None,
            unrecorded_send,
            migration_gone: false,
        };
        assert_eq!(observe(&vm, Some(migrated(true)), true, &facts), Plan::Wait(Next::After(POLL_BUSY)));
        assert_eq!(observe(&vm, Some(migrated(false)), true, &facts), Plan::Forget);
    }

    #[test]
    fn a_source_that_handed_the_vm_over_is_left_to_end() {
        let vm = vm(Some("host-2"), Some(VmPhase::Running));
        let facts = facts(true);
        let handed = LocalVmm {
            role: Role::Run,
            state: VmmState::Running,
            stop_reason: None,
            handed_over: true,
            orphan: None,
            unrecorded_send: false,
            migration_gone: false,
        };
        assert_eq!(observe(&vm, Some(handed), true, &facts), Plan::Wait(Next::After(POLL_BUSY)));
    }

    #[test]
    fn a_host_without_kvm_refuses_the_start_and_says_why() {
        let vm = vm(Some(NODE), Some(VmPhase::Scheduled));
        let Plan::Report(report) = observe(&vm, None, true, &facts(false)) else { panic!("a report") };
        let ready = report.status.conditions.get(conditions::READY).unwrap();
        assert_eq!((ready.reason.as_str(), ready.status.as_str()), (reasons::HOST_CANNOT_RUN_VMS, "False"));
        assert_eq!(ready.message, "host-1 cannot run VMs: /dev/kvm: not found");
        assert_eq!(report.status.phase, Some(VmPhase::Failed));
        assert_eq!(report.next, Next::Change);
        let event = report.event.unwrap();
        assert!(event.warning && event.reason == reasons::HOST_CANNOT_RUN_VMS && event.note == ready.message);
        // Without facts yet, the start waits for them.
        let waiting = decide(&Observed { vm: &vm, node: NODE, local: None, leased: true, facts: None, now: now() });
        assert_eq!(waiting, Plan::Wait(Next::After(POLL_NOT_YET)));
    }

    #[test]
    fn an_invalid_spec_is_tried_again_once_the_spec_changes() {
        let facts = facts(true);
        let mut failed = vm(Some(NODE), Some(VmPhase::Failed));
        let status = invalid_spec(&failed, failed.status.clone().unwrap(), "spec.boot.kernel: no", now());
        assert_eq!(status.observed_generation, Some(2));
        failed.status = Some(status);
        assert_eq!(kind(&observe(&failed, None, true, &facts)), "wait:change", "same spec: not again");
        failed.metadata.generation = Some(3);
        assert_eq!(kind(&observe(&failed, None, true, &facts)), "start", "a new spec: again");
        // A failure of another kind is the operator's to act on.
        let mut lost = failed.clone();
        lost.status.as_mut().unwrap().conditions.set(condition(
            conditions::READY,
            false,
            reasons::VMM_LOST,
            "",
            Some(2),
            now(),
        ));
        assert_eq!(kind(&observe(&lost, None, true, &facts)), "wait:change");
    }

    #[test]
    fn an_end_says_how_and_a_requested_stop_is_no_failure() {
        let vm = vm(Some(NODE), Some(VmPhase::Running));
        let facts = facts(true);
        let killed = |stop_reason: Option<StopReason>| LocalVmm {
            role: Role::Run,
            state: VmmState::Ended(ExitRecord { code: None, signal: Some(9), at_ms: 1 }),
            stop_reason: stop_reason.map(|r| r.text().to_string()),
            handed_over: false,
            orphan: None,
            unrecorded_send: false,
            migration_gone: false,
        };
        let Plan::Report(r) = observe(&vm, Some(killed(Some(StopReason::Halted))), true, &facts) else { panic!() };
        assert_eq!(r.status.phase, Some(VmPhase::Stopped));
        assert_eq!(
            r.status.last_exit.as_deref(),
            Some("VMM killed by signal 9 (stopped on request: spec.runStrategy is Halted)")
        );
        assert_eq!(
            r.log.as_deref(),
            Some("VM ended: VMM killed by signal 9 (stopped on request: spec.runStrategy is Halted)")
        );
        assert!(!r.event.as_ref().unwrap().warning);
        let Plan::Report(r) = observe(&vm, Some(killed(Some(StopReason::Fenced))), true, &facts) else { panic!() };
        assert_eq!(r.status.phase, Some(VmPhase::Failed));
        assert!(r.status.last_exit.unwrap().contains("isolation response"));
        let event = r.event.unwrap();
        assert_eq!((event.warning, event.reason), (true, events::reasons::FAILED));
        assert!(event.note.ends_with(" on host-1"), "{}", event.note);
        // A reset that someone caused (a stop reason) is an end, not a reboot.
        let mut reset = killed(Some(StopReason::Fenced));
        reset.state = exit(ExitStatus::Reset);
        assert_eq!(kind(&observe(&vm, Some(reset), true, &facts)), "report:Failed/VmmExited+forget>250ms");
    }

    #[test]
    fn a_vm_ha_left_down_keeps_why_when_its_healed_host_reports_the_end() {
        let mut vm = vm(Some(NODE), Some(VmPhase::Failed));
        vm.metadata.annotations = Some([(annotations::HA_NOT_RESTARTED.to_string(), NODE.to_string())].into());
        let status = vm.status.as_mut().unwrap();
        status.conditions.set(condition(
            conditions::READY,
            false,
            reasons::HA_NOT_RESTARTED,
            "host-1 failed; spec.ha.restartPriority is Disabled",
            Some(2),
            now(),
        ));
        let facts = facts(true);
        let fenced = LocalVmm {
            role: Role::Run,
            state: VmmState::Ended(ExitRecord { code: None, signal: Some(9), at_ms: 1 }),
            stop_reason: Some(StopReason::Fenced.text().to_string()),
            handed_over: false,
            orphan: None,
            unrecorded_send: false,
            migration_gone: false,
        };
        let Plan::Report(r) = observe(&vm, Some(fenced.clone()), true, &facts) else { panic!() };
        assert_eq!(r.status.phase, Some(VmPhase::Failed));
        assert_eq!(r.status.conditions.get(conditions::READY).unwrap().reason, reasons::HA_NOT_RESTARTED);
        assert!(r.status.last_exit.unwrap().contains("isolation response"));
        assert!(r.event.unwrap().warning);
        // Marked for another host (a stale mark): this host's own end is the news.
        vm.metadata.annotations = Some([(annotations::HA_NOT_RESTARTED.to_string(), "host-9".to_string())].into());
        assert_eq!(kind(&observe(&vm, Some(fenced), true, &facts)), "report:Failed/VmmExited+forget>250ms");
    }

    #[test]
    fn a_reboot_keeps_how_the_guest_ended() {
        let vm = vm(Some(NODE), Some(VmPhase::Running));
        let facts = facts(true);
        let Plan::Reboot(start) = observe(&vm, local(Vmm::EndedReset), true, &facts) else { panic!() };
        let Plan::Start { status, offered } = *start else { panic!() };
        assert_eq!(status.last_exit.as_deref(), Some(ExitStatus::Reset.describe()));
        assert_eq!(offered, CpuSet::parse("1-3").unwrap());
    }

    #[test]
    fn a_stop_the_operator_asked_for_ends_stopped_and_says_so() {
        let facts = facts(true);
        let vm = vm(Some(NODE), Some(VmPhase::Stopping));
        // Its VMM powered off as asked: a clean stop, with the reason in lastExit.
        let killed = LocalVmm {
            role: Role::Run,
            state: VmmState::Ended(ExitRecord { code: None, signal: Some(9), at_ms: 1 }),
            stop_reason: Some(StopReason::Requested.text().to_string()),
            handed_over: false,
            orphan: None,
            unrecorded_send: false,
            migration_gone: false,
        };
        let Plan::Report(r) = observe(&vm, Some(killed), true, &facts) else { panic!() };
        assert_eq!(r.status.phase, Some(VmPhase::Stopped));
        assert_eq!(
            r.status.last_exit.as_deref(),
            Some("VMM killed by signal 9 (stopped on request: the operator asked)")
        );
        assert!(!r.event.unwrap().warning);
        // Nothing ran: stopped, saying so.
        let Plan::Report(r) = observe(&vm, None, true, &facts) else { panic!() };
        assert_eq!(r.status.phase, Some(VmPhase::Stopped));
        let ready = r.status.conditions.get(conditions::READY).unwrap();
        assert_eq!(
            (ready.reason.as_str(), ready.message.as_str()),
            (reasons::STOPPED, "stopped on request on host-1: its VMM was not running")
        );
    }

    #[test]
    fn a_start_records_what_the_vm_boots_with_and_a_reboot_refreshes_it() {
        let facts = facts(true);
        let mut vm = vm(Some(NODE), Some(VmPhase::Running));
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "name": "v", "vcpus": 1, "memoryMib": 64, "kernel": "/k", "cpus": { "hostCpus": "1-3" }
        }))
        .unwrap();
        let first = starting(&vm, vm.status.clone().unwrap(), &config, NODE, now());
        assert_eq!(first.booted_with, Some(BootedWith::of(&vm.spec)));
        assert_eq!(first.booted_with.as_ref().unwrap().memory, "64Mi");
        // The spec changes while it runs; the guest resets: the start in place
        // records the spec it boots with now.
        vm.status = Some(first);
        vm.spec.memory.size = "128Mi".into();
        let Plan::Reboot(start) = observe(&vm, local(Vmm::EndedReset), true, &facts) else { panic!() };
        let Plan::Start { status, .. } = *start else { panic!() };
        assert_eq!(status.booted_with.as_ref().unwrap().memory, "64Mi", "kept until the start is written");
        let again = starting(&vm, *status, &config, NODE, now());
        assert_eq!(again.booted_with, Some(BootedWith::of(&vm.spec)));
        assert_eq!(again.booted_with.unwrap().memory, "128Mi");
    }

    /// A VM marked as moving in a migration that is gone × what its VMM here says
    /// of the send (or that it ended "migrated", with or without the record of
    /// where the send went).
    #[test]
    fn a_send_whose_migration_is_gone_is_settled_here() {
        let facts = facts(true);
        let mut vm = vm(Some(NODE), Some(VmPhase::Migrating));
        vm.status.as_mut().unwrap().migration = Some("m".into());
        vm.status.as_mut().unwrap().allocated_cpus = Some("1".into());
        let outgoing = Outgoing { migration: "m".into(), target_node: "host-2".into(), target_cpus: Some("3".into()) };
        let running = |phase: Option<Phase>| LocalVmm {
            role: Role::Run,
            state: VmmState::Running,
            stop_reason: None,
            handed_over: false,
            orphan: Some(Orphan { phase, outgoing: Some(outgoing.clone()) }),
            unrecorded_send: false,
            migration_gone: false,
        };
        let rows: &[(Option<Phase>, &str)] = &[
            (None, "wait:250ms"),
            (Some(Phase::Connecting), "cancel-send"),
            (Some(Phase::PreCopy), "cancel-send"),
            (Some(Phase::Switchover), "cancel-send"),
            (Some(Phase::Completed), "wait:250ms"),
            (Some(Phase::None), "report:Running/->250ms"),
            (Some(Phase::Failed), "report:Running/->250ms"),
            (Some(Phase::Cancelled), "report:Running/->250ms"),
            (Some(Phase::Unknown), "report:Running/->250ms"),
        ];
        for &(phase, want) in rows {
            let plan = observe(&vm, Some(running(phase)), true, &facts);
            assert_eq!(kind(&plan), want, "VMM says {phase:?}");
            if let Plan::Report(r) = plan {
                assert_eq!((r.status.migration, r.status.node_name.as_deref()), (None, Some(NODE)), "it stays here");
            }
        }
        // Halted or stopping wins: powered off (which ends the send too).
        let mut stopping = vm.clone();
        stopping.status.as_mut().unwrap().phase = Some(VmPhase::Stopping);
        let sending = running(Some(Phase::PreCopy));
        assert_eq!(kind(&observe(&stopping, Some(sending), true, &facts)), "power-off:Requested");
        // It ended "migrated": the VM moves to where the send went, as on success.
        let migrated = |outgoing: Option<Outgoing>| LocalVmm {
            state: exit(ExitStatus::MigratedOut),
            orphan: Some(Orphan { phase: None, outgoing }),
            ..running(None)
        };
        let Plan::Report(r) = observe(&vm, Some(migrated(Some(outgoing.clone()))), true, &facts) else { panic!() };
        assert_eq!(
            (r.status.node_name.as_deref(), r.status.allocated_cpus.as_deref(), r.status.migration.as_deref()),
            (Some("host-2"), Some("3"), None)
        );
        assert_eq!(r.status.conditions.get(conditions::READY).unwrap().reason, reasons::MIGRATED);
        assert!(r.event.unwrap().warning);
        assert_eq!(kind(&observe(&vm, Some(migrated(None)), true, &facts)), "wait:250ms", "nowhere to say");
    }

    #[test]
    fn a_vm_that_vanished_is_reported_lost_with_the_host() {
        let vm = vm(Some(NODE), Some(VmPhase::Running));
        let Plan::Report(r) = observe(&vm, None, false, &facts(true)) else { panic!() };
        let why = "its VMM is gone from host-1 (host restarted or powered off)";
        assert_eq!(r.status.last_exit.as_deref(), Some(why));
        assert_eq!(r.status.conditions.get(conditions::READY).unwrap().last_transition_time, now());
        assert_eq!(r.event.unwrap().note, why);
    }

    #[test]
    fn starting_records_what_the_vmm_is_given() {
        let vm = vm(Some(NODE), Some(VmPhase::Scheduled));
        let mut old = vm.status.clone().unwrap();
        old.boot_millis = Some(5);
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "name": "v", "vcpus": 1, "memoryMib": 64, "kernel": "/k",
            "cpus": { "hostCpus": "1-3" }, "shares": 2000
        }))
        .unwrap();
        let status = starting(&vm, old, &config, NODE, now());
        assert_eq!(status.phase, Some(VmPhase::Starting));
        assert_eq!((status.host_cpus.as_deref(), status.shares, status.boot_millis), (Some("1-3"), Some(2000), None));
        assert_eq!(status.conditions.get(conditions::READY).unwrap().message, "starting on host-1");
        let mut marked = vm.status.clone().unwrap();
        marked.migration = Some("m".into());
        assert_eq!(starting(&vm, marked, &config, NODE, now()).migration, None, "a boot is no migration");
    }
}
