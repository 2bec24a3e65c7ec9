//! The target's decisions (pure): whether to start a receiving VMM (and on which
//! host CPUs), publish the one it started, or fail the migration; while the
//! migration is under way, whether its receiving VMM runs the guest (then the VM's
//! status moves here, if the source has not moved it); once the migration failed,
//! whether to stop its receiving VMM. Each says what the migration's
//! `status.targetState` is to be: `Receiving` with the address, `Running` once the
//! VMM runs the guest, `Stopped` once nothing of the migration runs here or will
//! (after a failure). `Running` and `Stopped` are final: the operator's HA acts on
//! them, so they are written once and never changed.

use std::path::Path;
use std::time::Duration;

use drover_crds::contract::{conditions, reasons};
use drover_crds::migration::{
    MigrationPhase, MigrationTargetState, VirtualMachineMigration, VirtualMachineMigrationStatus,
};
use drover_crds::vm::{VirtualMachine, VirtualMachineStatus};
use drover_topology::CpuSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::super::failure::Failure;
use crate::Error;
use crate::conditions::condition;
use crate::handover;
use crate::host_facts::HostFacts;
use crate::next::Next;
use crate::supervisor::VmmState;
use crate::vm_config::{self, Chosen};
use crate::vm_dir::Role;

/// How soon a target that may not start a VMM yet (no lease) looks again.
pub const POLL_NOT_YET: Duration = Duration::from_millis(500);

/// How soon a failed migration's target looks again while the source settles its
/// send (it does so in one look, usually within a second).
pub const POLL_SETTLING: Duration = Duration::from_millis(250);

/// How often the target of a migration under way asks its receiving VMM whether it
/// runs the guest yet. The source says so first when it can (it looks every 50 ms);
/// this is for a source whose host died at the hand-over, and it bounds how long
/// the VM stays placed on a dead host while it runs here.
pub const POLL_FOLLOW: Duration = Duration::from_millis(500);

/// The migration's field with the host CPUs the operator reserved on the target.
pub const TARGET_CPUS: &str = "status.targetCpus";

/// What the target's decisions rest on.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub migration: &'a VirtualMachineMigration,
    /// This host's Node name.
    pub node: &'a str,
    /// The migration's VM, if it exists.
    pub vm: Option<&'a VirtualMachine>,
    /// This host's VMM of that VM, if any: what it does and how it is.
    pub local: Option<(Role, VmmState)>,
    /// Whether the host holds its heartbeat lease (no VMM starts without it).
    pub leased: bool,
    /// The host CPUs this host offers to VMs (empty while its facts are unknown).
    pub offered: CpuSet,
    /// Whether this host's receiving VMM of the migration answers its control API.
    /// `drover-vmm receive` serves it only once the VM it received runs (its start
    /// returns after the source's `Go`, past which the source never runs the VM
    /// again). Asked only of a receiving VMM that still runs, once the target
    /// listens (under way, succeeded or failed).
    pub resumed: bool,
    pub now: Time,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Fail the migration with `status`; nothing more until it changes.
    Fail { status: Box<VirtualMachineMigrationStatus>, failure: Failure },
    /// The receiving VMM started on an earlier pass: publish its address once it listens.
    Publish,
    /// Forget the receiving VMM an earlier attempt left, then the rest.
    Replace(Box<Plan>),
    /// Start a receiving VMM whose vCPUs run on `host_cpus`, then publish its
    /// address once it listens.
    Receive { host_cpus: String },
    /// Nothing now.
    Wait(Next),
}

/// What the target does for a migration that is approved or under way and has no
/// published address yet.
pub fn decide(o: &Observed) -> Plan {
    let Some(vm) = o.vm else {
        return fail(o, Failure::target(format!("VirtualMachine {} not found", o.migration.spec.vm_name)));
    };
    match &o.local {
        Some((Role::Receive { migration }, VmmState::Running)) if *migration == o.migration.name_any() => Plan::Publish,
        Some((Role::Receive { .. }, _)) => Plan::Replace(Box::new(receive(o, vm))),
        Some((Role::Run, _)) => fail(o, Failure::target(format!("{} already runs VM {}", o.node, vm.name_any()))),
        None => receive(o, vm),
    }
}

fn receive(o: &Observed, vm: &VirtualMachine) -> Plan {
    if !o.leased {
        return Plan::Wait(Next::After(POLL_NOT_YET));
    }
    match host_cpus(vm, o.migration, &o.offered, o.node) {
        Ok(host_cpus) => Plan::Receive { host_cpus },
        Err(e) => fail(o, Failure::target(e.to_string())),
    }
}

/// The host CPUs the receiving VMM runs the vCPUs on: `spec.cpu.hostCpus` if set,
/// else the CPUs the operator reserved for the VM on this host (the migration's
/// `status.targetCpus`: a Dedicated VM's), else every CPU this host offers. Never
/// the VM's `status.allocatedCpus`: until the VM has moved, those are the source's.
pub fn host_cpus(
    vm: &VirtualMachine,
    migration: &VirtualMachineMigration,
    offered: &CpuSet,
    node: &str,
) -> Result<String, Error> {
    let reserved = migration.status.as_ref().and_then(|s| s.target_cpus.as_deref());
    vm_config::host_cpus(vm, reserved.map(|list| Chosen { field: TARGET_CPUS, list }), offered, node)
}

fn fail(o: &Observed, failure: Failure) -> Plan {
    let status = o.migration.status.clone().unwrap_or_default();
    let status = failure.status(status, o.migration.metadata.generation, o.now.clone());
    Plan::Fail { status: Box::new(status), failure }
}

/// While the migration is under way (the target listens), or once it Succeeded
/// with the target's word still `Receiving`: what the target records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// Nothing to record now: look again in `Next`.
    Wait(Next),
    /// Write this `targetState`.
    Record(MigrationTargetState),
    /// The receiving VMM runs the guest and the VM is still placed on the source:
    /// move its status here (as the source would), then record `Running`.
    TakeOver,
}

/// What the target records of its receiving VMM while the migration is under way.
/// Whoever sees the hand-over first records it: the source usually does (it moves
/// the VM's status here, and the VM controller takes the VMM over), but a source
/// whose host died just after its `Go` never will, so the target does it too once
/// its VMM runs the guest. Until then the target only watches: a failure is the
/// source's or the operator's to declare.
pub fn follow(o: &Observed) -> Follow {
    let recorded = recorded(o);
    let active = matches!(
        o.migration.status.as_ref().and_then(|s| s.phase),
        Some(MigrationPhase::Scheduled | MigrationPhase::Running | MigrationPhase::Switchover)
    );
    let watch = Follow::Wait(if active { Next::After(POLL_FOLLOW) } else { Next::Change });
    let Some(vm) = o.vm else { return watch };
    if is_final(recorded) {
        return Follow::Wait(Next::Change);
    }
    let here = handover::placed_on(vm, o.node);
    match &o.local {
        Some((role, VmmState::Running)) if *role == ours(o) => match (o.resumed, here) {
            (true, true) => Follow::Record(MigrationTargetState::Running),
            (true, false) if on_source(o, vm) => Follow::TakeOver,
            // Placed on a third host while its VMM here runs the guest: said as it
            // is (the operator waits on this word); a failure of the migration
            // powers it off.
            (true, false) => Follow::Record(MigrationTargetState::Running),
            // Published by an agent from before `targetState`.
            (false, _) if recorded.is_none() => Follow::Record(MigrationTargetState::Receiving),
            (false, _) => watch,
        },
        // The source moved the VM's status here and the VM controller has taken
        // the receiving VMM over (made it the VM's own) before this look.
        Some((Role::Run, VmmState::Running)) if here && recorded == Some(MigrationTargetState::Receiving) => {
            Follow::Record(MigrationTargetState::Running)
        }
        _ => watch,
    }
}

/// After the migration failed: whether this host's receiving VMM of it is to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Nothing of it here to stop (or the VM is this host's now).
    Leave,
    /// Forget it, powering it off first if it still runs.
    Forget { power_off: bool },
    /// Not yet: the source may still be sending (the VM is placed there and marked
    /// as moving in this migration); it cancels the send, or moves the VM here if
    /// the send had already handed it over. Look again in `Next`.
    Wait(Next),
    /// Never: the receiving VMM runs the VM (it resumed it, so the source has
    /// promised never to run it again), and the VM is still placed on the source.
    /// Its status moves here (as the source does when its VMM completed, if it
    /// still can), then the VM controller takes the VMM over.
    TakeOver,
}

/// What the target does about a migration that failed: its VMM, and the
/// `targetState` to write (none when it says so already, or has said its final word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stopping {
    pub vmm: Stop,
    pub record: Option<MigrationTargetState>,
}

/// What becomes of this host's VMM of a migration that failed. While the VM is
/// placed on the source, a failure (the operator's, or the source's) never powers
/// off a receiving VMM that runs the VM, nor one that may be about to: the VM would
/// then run nowhere. The one exception is a source host that failed
/// (`SourceHostFailed`): the operator declares it only once the host's lease has
/// gone unrenewed for its whole duration, and its monitors kill its VMMs before
/// that, so no `Go` can come any more, and the source, dead, never settles: a
/// receiving VMM that does not run the guest by now never will, and goes.
pub fn stop(o: &Observed) -> Stopping {
    let recorded = recorded(o);
    let record = |state| (!is_final(recorded) && recorded != Some(state)).then_some(state);
    let stopped = |vmm| Stopping { vmm, record: record(MigrationTargetState::Stopped) };
    let ours = ours(o);
    let mine = match &o.local {
        Some((role, state)) if *role == ours => Some(state),
        _ => None,
    };
    let Some(vm) = o.vm else {
        // The VM is gone (deleted): its receiving VMM goes too, found by its
        // migration.
        return stopped(match mine {
            Some(VmmState::Running) => Stop::Forget { power_off: true },
            Some(_) => Stop::Forget { power_off: false },
            None => Stop::Leave,
        });
    };
    if handover::placed_on(vm, o.node) {
        // Handed over here (by either end): the VM is this host's, for the VM
        // controller to run or report. Had this host never said it was receiving,
        // no VMM of this migration ever ran here.
        let state = match recorded {
            Some(MigrationTargetState::Receiving) => MigrationTargetState::Running,
            _ => MigrationTargetState::Stopped,
        };
        return Stopping { vmm: Stop::Leave, record: record(state) };
    }
    let Some(state) = mine else {
        // No VMM of this migration here (never started, or gone): none runs, nor will.
        return stopped(Stop::Leave);
    };
    if *state != VmmState::Running {
        return stopped(Stop::Forget { power_off: false });
    }
    // While the VM is placed on the source, its VMM may have handed the VM over (a
    // receiving VMM that runs it) or may still send (the VM marked as moving in
    // this migration): the source settles that first, unless its host failed. Once
    // the VM has been placed anywhere else (the operator restarted it after the
    // source failed), it must not run here, and no send can hand it over any more.
    let on_source = on_source(o, vm);
    let marked = vm.status.as_ref().and_then(|s| s.migration.as_deref()) == Some(o.migration.name_any().as_str());
    if on_source && o.resumed {
        return Stopping { vmm: Stop::TakeOver, record: record(MigrationTargetState::Running) };
    }
    if on_source && marked && !source_failed(o) {
        return Stopping { vmm: Stop::Wait(Next::After(POLL_SETTLING)), record: None };
    }
    stopped(Stop::Forget { power_off: true })
}

/// The role of this host's receiving VMM of the migration.
fn ours(o: &Observed) -> Role {
    Role::Receive { migration: o.migration.name_any() }
}

/// Whether the VM is placed on the migration's source.
fn on_source(o: &Observed, vm: &VirtualMachine) -> bool {
    o.migration.status.as_ref().and_then(|s| s.source_node.as_deref()).is_some_and(|s| handover::placed_on(vm, s))
}

/// Whether the operator failed the migration because its source host failed.
fn source_failed(o: &Observed) -> bool {
    o.migration
        .status
        .as_ref()
        .and_then(|s| s.conditions.get(conditions::SUCCEEDED))
        .is_some_and(|c| c.reason == reasons::SOURCE_HOST_FAILED)
}

/// The target's word on record.
fn recorded(o: &Observed) -> Option<MigrationTargetState> {
    o.migration.status.as_ref().and_then(|s| s.target_state)
}

/// `Running` and `Stopped` are the target's last word on a migration.
fn is_final(state: Option<MigrationTargetState>) -> bool {
    matches!(state, Some(MigrationTargetState::Running | MigrationTargetState::Stopped))
}

/// The migration's status with the target's word `state`.
pub fn recording(
    mut status: VirtualMachineMigrationStatus,
    state: MigrationTargetState,
) -> VirtualMachineMigrationStatus {
    status.target_state = Some(state);
    status
}

/// The VM's status once the target takes it over: as the source writes it on
/// success (see [`handover::moved`]), from the source to this host.
pub fn taken_over(o: &Observed, vm: &VirtualMachine) -> VirtualMachineStatus {
    let status = o.migration.status.as_ref();
    let source = status.and_then(|s| s.source_node.as_deref()).unwrap_or_default();
    let target_cpus = status.and_then(|s| s.target_cpus.as_deref());
    handover::moved(vm, source, o.node, target_cpus, o.now.clone())
}

/// The `drover-vmm receive` arguments for a VMM that listens on `listen`, with the
/// files of its runtime directory.
pub fn receive_args(
    listen: &str,
    secret: &Path,
    config: &Path,
    api_socket: &Path,
    host_cpus: Option<&str>,
    facts: Option<&HostFacts>,
) -> Vec<String> {
    let mut args = vec![
        "receive".into(),
        "--listen".into(),
        listen.into(),
        "--secret-file".into(),
        secret.display().to_string(),
        "--config".into(),
        config.display().to_string(),
        "--api-socket".into(),
        api_socket.display().to_string(),
        "--host-cpus".into(),
        host_cpus.unwrap_or_default().into(),
    ];
    // Without memory overcommit the VM's memory is this host's to give anyway:
    // fault it in before listening, so the transfer does not pay a page fault per
    // page (on the critical path of the migration). With overcommit, memory is
    // only taken as pages arrive.
    if facts.is_none_or(|f| f.offered.memory_overcommit_ratio <= 1.0) {
        args.push("--prefault".into());
    }
    args
}

/// The status that publishes where the receiving VMM listens.
pub fn listening(
    migration: &VirtualMachineMigration,
    mut status: VirtualMachineMigrationStatus,
    address: String,
    now: Time,
) -> VirtualMachineMigrationStatus {
    status.conditions.set(condition(
        conditions::TARGET_READY,
        true,
        reasons::LISTENING,
        format!("receiving VMM listens on {address}"),
        migration.metadata.generation,
        now,
    ));
    status.target_address = Some(address);
    status.target_state = Some(MigrationTargetState::Receiving);
    status
}

#[cfg(test)]
mod tests {
    use drover_crds::vm::VmPhase;
    use drover_vmm_api::ExitStatus;

    use super::*;
    use crate::vm_dir::ExitRecord;

    fn migration() -> VirtualMachineMigration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": { "name": "m", "namespace": "ns", "generation": 1 },
            "spec": { "vmName": "v" },
            "status": { "phase": "Scheduled", "sourceNode": "host-1", "targetNode": "host-2", "secretName": "k" }
        }))
        .unwrap()
    }

    fn vm(node: &str) -> VirtualMachine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": { "name": "v", "namespace": "ns", "uid": "u-1" },
            "spec": { "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" }, "boot": { "kernel": "/k" } },
            "status": { "nodeName": node, "phase": "Running" }
        }))
        .unwrap()
    }

    fn now() -> Time {
        Time("2026-01-02T03:04:05Z".parse().unwrap())
    }

    fn offered() -> CpuSet {
        CpuSet::parse("0-3").unwrap()
    }

    /// The local VMM states the tables cover.
    fn locals() -> Vec<(&'static str, Option<(Role, VmmState)>)> {
        let receive = |m: &str| Role::Receive { migration: m.into() };
        let ended =
            VmmState::Ended(ExitRecord { code: Some(ExitStatus::VmmError.code().into()), signal: None, at_ms: 1 });
        vec![
            ("none", None),
            ("receiving", Some((receive("m"), VmmState::Running))),
            ("receiving ended", Some((receive("m"), ended.clone()))),
            ("receiving lost", Some((receive("m"), VmmState::Lost))),
            ("receiving for another migration", Some((receive("old"), VmmState::Running))),
            ("running the VM", Some((Role::Run, VmmState::Running))),
            ("ran the VM", Some((Role::Run, ended))),
        ]
    }

    fn kind(plan: &Plan) -> String {
        match plan {
            Plan::Fail { failure, .. } => format!("fail:{}", failure.why),
            Plan::Publish => "publish".into(),
            Plan::Replace(rest) => format!("replace>{}", kind(rest)),
            Plan::Receive { host_cpus } => format!("receive:{host_cpus}"),
            Plan::Wait(Next::After(d)) => format!("wait:{}ms", d.as_millis()),
            Plan::Wait(Next::Change) => "wait:change".into(),
        }
    }

    /// Every local VMM state × lease, with the VM there or not.
    #[test]
    fn the_target_gets_ready() {
        let migration = migration();
        let vm = vm("host-1");
        for (name, local) in locals() {
            for leased in [true, false] {
                let want = match (name, leased) {
                    ("receiving", _) => "publish",
                    ("receiving ended" | "receiving lost" | "receiving for another migration", true) => {
                        "replace>receive:0-3"
                    }
                    ("receiving ended" | "receiving lost" | "receiving for another migration", false) => {
                        "replace>wait:500ms"
                    }
                    ("running the VM" | "ran the VM", _) => "fail:host-2 already runs VM v",
                    ("none", true) => "receive:0-3",
                    ("none", false) => "wait:500ms",
                    _ => unreachable!("{name}"),
                };
                let o = Observed {
                    migration: &migration,
                    node: "host-2",
                    vm: Some(&vm),
                    local: local.clone(),
                    leased,
                    offered: offered(),
                    resumed: false,
                    now: now(),
                };
                assert_eq!(kind(&decide(&o)), want, "{name}, leased {leased}");
                let gone = Observed { vm: None, ..o };
                assert_eq!(kind(&decide(&gone)), "fail:VirtualMachine v not found", "{name}, leased {leased}");
            }
        }
    }

    #[test]
    fn a_failure_is_written_on_the_migrations_status() {
        let migration = migration();
        let o = Observed {
            migration: &migration,
            node: "host-2",
            vm: None,
            local: None,
            leased: true,
            offered: offered(),
            resumed: false,
            now: now(),
        };
        let Plan::Fail { status, failure } = decide(&o) else { panic!() };
        assert_eq!(failure.reason, reasons::TARGET_NOT_READY);
        assert_eq!(status.phase, Some(MigrationPhase::Failed));
        assert_eq!(status.source_node.as_deref(), Some("host-1"), "the rest of the status is kept");
    }

    /// A migration with `phase`, failed by the operator for `reason` when `phase`
    /// is Failed, with the target's word `state`.
    fn migration_in(
        phase: MigrationPhase,
        reason: Option<&str>,
        state: Option<MigrationTargetState>,
    ) -> VirtualMachineMigration {
        let mut m = migration();
        let status = m.status.as_mut().unwrap();
        status.phase = Some(phase);
        status.target_address = Some("10.0.0.2:49200".into());
        status.target_state = state;
        status.target_cpus = Some("2-3".into());
        if let Some(reason) = reason {
            status.conditions.set(condition(conditions::SUCCEEDED, false, reason, "why", Some(1), now()));
            status.failure_message = Some("why".into());
        }
        m
    }

    /// The VM placed on `node`, marked as moving in migration `m` or not.
    fn placed(node: &str, marked: bool) -> VirtualMachine {
        let mut vm = vm(node);
        let status = vm.status.as_mut().unwrap();
        status.migration = marked.then(|| "m".into());
        status.phase = Some(if marked { VmPhase::Migrating } else { VmPhase::Running });
        status.allocated_cpus = Some("0".into());
        vm
    }

    fn observed<'a>(
        migration: &'a VirtualMachineMigration,
        vm: Option<&'a VirtualMachine>,
        local: Option<(Role, VmmState)>,
        resumed: bool,
    ) -> Observed<'a> {
        Observed { migration, node: "host-2", vm, local, leased: true, offered: offered(), resumed, now: now() }
    }

    /// Every local VMM state × the VM placed on the source, here or elsewhere × the
    /// VM marked as moving in this migration or not × the receiving VMM running the
    /// VM or not × why the migration failed (its source host failed, or anything
    /// else) × lease → what becomes of the receiving VMM.
    #[test]
    fn a_failed_migration_stops_the_receiving_vmm_and_nothing_else() {
        for reason in
            [reasons::CANCELLED, reasons::MIGRATION_FAILED, reasons::TARGET_HOST_FAILED, reasons::SOURCE_HOST_FAILED]
        {
            let source_failed = reason == reasons::SOURCE_HOST_FAILED;
            let migration = migration_in(MigrationPhase::Failed, Some(reason), Some(MigrationTargetState::Receiving));
            for (placed_on, node) in [("source", "host-1"), ("here", "host-2"), ("elsewhere", "host-3")] {
                for marked in [false, true] {
                    let vm = placed(node, marked);
                    for (name, local) in locals() {
                        for resumed in [false, true] {
                            let want = match (placed_on, name) {
                                // It runs the VM: the source has let go of it for good.
                                ("source", "receiving") if resumed => Stop::TakeOver,
                                // The source may still be sending: it settles first,
                                // unless its host failed (then no Go can come, and it
                                // never settles).
                                ("source", "receiving") if marked && !source_failed => {
                                    Stop::Wait(Next::After(POLL_SETTLING))
                                }
                                // Placed elsewhere since (restarted after its source failed):
                                // it must not run here, and no send can hand it over.
                                ("source" | "elsewhere", "receiving") => Stop::Forget { power_off: true },
                                ("source" | "elsewhere", "receiving ended" | "receiving lost") => {
                                    Stop::Forget { power_off: false }
                                }
                                _ => Stop::Leave,
                            };
                            for leased in [true, false] {
                                let o = Observed { leased, ..observed(&migration, Some(&vm), local.clone(), resumed) };
                                let case = format!(
                                    "{reason}: placed on the {placed_on}, marked {marked}, {name}, resumed {resumed}, leased {leased}"
                                );
                                assert_eq!(stop(&o).vmm, want, "{case}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// What the target says of a failed migration (`targetState`), from what it
    /// says already × where the VM is placed × its VMM of the migration. `Running`
    /// and `Stopped` are final, and a word already said is not written again.
    #[test]
    fn a_failed_migration_gets_the_targets_last_word_once() {
        use MigrationTargetState::*;
        let receive = || Role::Receive { migration: "m".into() };
        let ended = VmmState::Ended(ExitRecord { code: None, signal: Some(9), at_ms: 1 });
        type Row = (&'static str, Option<MigrationTargetState>, &'static str, Option<(Role, VmmState)>, bool, Stopping);
        let stopping = |vmm, record| Stopping { vmm, record };
        let rows: Vec<Row> = vec![
            // Never started here (the address was never published): Stopped, once.
            ("host-1", None, "none", None, false, stopping(Stop::Leave, Some(Stopped))),
            ("host-3", None, "none", None, false, stopping(Stop::Leave, Some(Stopped))),
            ("host-1", Some(Stopped), "none", None, false, stopping(Stop::Leave, None)),
            // Started, then gone before this look (the VM controller cleared it).
            ("host-1", Some(Receiving), "none", None, false, stopping(Stop::Leave, Some(Stopped))),
            // Stopped here: says so.
            (
                "host-1",
                Some(Receiving),
                "receiving ended",
                Some((receive(), ended.clone())),
                false,
                stopping(Stop::Forget { power_off: false }, Some(Stopped)),
            ),
            (
                "host-1",
                Some(Receiving),
                "receiving lost",
                Some((receive(), VmmState::Lost)),
                false,
                stopping(Stop::Forget { power_off: false }, Some(Stopped)),
            ),
            (
                "host-3",
                Some(Receiving),
                "receiving",
                Some((receive(), VmmState::Running)),
                false,
                stopping(Stop::Forget { power_off: true }, Some(Stopped)),
            ),
            // Runs the guest: taken over, Running.
            (
                "host-1",
                Some(Receiving),
                "receiving",
                Some((receive(), VmmState::Running)),
                true,
                stopping(Stop::TakeOver, Some(Running)),
            ),
            (
                "host-1",
                Some(Running),
                "receiving",
                Some((receive(), VmmState::Running)),
                true,
                stopping(Stop::TakeOver, None),
            ),
            // Handed over here already (by either end): Running if it received.
            (
                "host-2",
                Some(Receiving),
                "receiving",
                Some((receive(), VmmState::Running)),
                true,
                stopping(Stop::Leave, Some(Running)),
            ),
            (
                "host-2",
                Some(Receiving),
                "taken over",
                Some((Role::Run, VmmState::Running)),
                false,
                stopping(Stop::Leave, Some(Running)),
            ),
            ("host-2", Some(Receiving), "none", None, false, stopping(Stop::Leave, Some(Running))),
            (
                "host-2",
                Some(Running),
                "taken over",
                Some((Role::Run, VmmState::Running)),
                false,
                stopping(Stop::Leave, None),
            ),
            ("host-2", None, "none", None, false, stopping(Stop::Leave, Some(Stopped))),
            // Final words stay.
            ("host-2", Some(Stopped), "none", None, false, stopping(Stop::Leave, None)),
            (
                "host-3",
                Some(Running),
                "receiving",
                Some((receive(), VmmState::Running)),
                false,
                stopping(Stop::Forget { power_off: true }, None),
            ),
            (
                "host-1",
                Some(Stopped),
                "receiving ended",
                Some((receive(), ended)),
                false,
                stopping(Stop::Forget { power_off: false }, None),
            ),
        ];
        for (node, state, name, local, resumed, want) in rows {
            let migration = migration_in(MigrationPhase::Failed, Some(reasons::SOURCE_HOST_FAILED), state);
            let vm = placed(node, true);
            let o = observed(&migration, Some(&vm), local, resumed);
            assert_eq!(stop(&o), want, "VM on {node}, said {state:?}, {name}, resumed {resumed}");
        }
    }

    /// The VM itself is gone (deleted while it moved): its receiving VMM, found by
    /// the migration, goes too.
    #[test]
    fn a_failed_migration_of_a_deleted_vm_stops_its_receiving_vmm() {
        let migration =
            migration_in(MigrationPhase::Failed, Some(reasons::CANCELLED), Some(MigrationTargetState::Receiving));
        for (name, local) in locals() {
            let want = match name {
                "receiving" => Stop::Forget { power_off: true },
                "receiving ended" | "receiving lost" => Stop::Forget { power_off: false },
                _ => Stop::Leave,
            };
            for resumed in [false, true] {
                let got = stop(&observed(&migration, None, local.clone(), resumed));
                assert_eq!(
                    got,
                    Stopping { vmm: want, record: Some(MigrationTargetState::Stopped) },
                    "{name}, resumed {resumed}"
                );
            }
        }
    }

    /// The source's host dies in the middle of a migration, seen from the target:
    /// first while the migration is still under way (before the operator notices),
    /// then once the operator failed it (`SourceHostFailed`).
    #[test]
    fn a_source_host_that_dies_mid_migration() {
        use MigrationTargetState::*;
        let receiving = Some((Role::Receive { migration: "m".into() }, VmmState::Running));
        let ended = Some((
            Role::Receive { migration: "m".into() },
            VmmState::Ended(ExitRecord { code: Some(ExitStatus::VmmError.code().into()), signal: None, at_ms: 1 }),
        ));
        let vm = placed("host-1", true);
        let under_way = migration_in(MigrationPhase::Running, None, Some(Receiving));
        let failed = migration_in(MigrationPhase::Failed, Some(reasons::SOURCE_HOST_FAILED), Some(Receiving));

        // Mid-transfer: nothing runs the guest here. Under way the target only
        // watches; once failed, its receiving VMM goes (still listening, or ended
        // with the connection) and it says Stopped, without waiting for the source.
        assert_eq!(
            follow(&observed(&under_way, Some(&vm), receiving.clone(), false)),
            Follow::Wait(Next::After(POLL_FOLLOW))
        );
        assert_eq!(
            follow(&observed(&under_way, Some(&vm), ended.clone(), false)),
            Follow::Wait(Next::After(POLL_FOLLOW))
        );
        assert_eq!(
            stop(&observed(&failed, Some(&vm), receiving.clone(), false)),
            Stopping { vmm: Stop::Forget { power_off: true }, record: Some(Stopped) }
        );
        assert_eq!(
            stop(&observed(&failed, Some(&vm), ended, false)),
            Stopping { vmm: Stop::Forget { power_off: false }, record: Some(Stopped) }
        );

        // Just after the switch-over, before the source moved the VM's status: the
        // target's VMM runs the guest, so the target moves the VM to itself, under
        // way or failed, and says Running.
        assert_eq!(follow(&observed(&under_way, Some(&vm), receiving.clone(), true)), Follow::TakeOver);
        assert_eq!(
            stop(&observed(&failed, Some(&vm), receiving.clone(), true)),
            Stopping { vmm: Stop::TakeOver, record: Some(Running) }
        );
        let o = observed(&failed, Some(&vm), receiving, true);
        let moved = taken_over(&o, &vm);
        assert_eq!(
            (moved.node_name.as_deref(), moved.phase, moved.migration.as_deref(), moved.allocated_cpus.as_deref()),
            (Some("host-2"), Some(VmPhase::Running), None, Some("2-3")),
            "as the source moves it: here, Running, no longer moving, on the CPUs reserved here"
        );
        let ready = moved.conditions.get(conditions::READY).unwrap();
        assert_eq!(
            (ready.reason.as_str(), ready.message.as_str()),
            (reasons::MIGRATED, "migrated from host-1 to host-2")
        );
    }

    /// A migration under way or Succeeded × what the target said × where the VM is
    /// placed × its VMM here × whether that VMM runs the guest → what it records.
    #[test]
    fn the_target_follows_its_receiving_vmm_and_records_the_hand_over() {
        use MigrationTargetState::*;
        let receive = || Role::Receive { migration: "m".into() };
        let ended =
            VmmState::Ended(ExitRecord { code: Some(ExitStatus::VmmError.code().into()), signal: None, at_ms: 1 });
        let watch = Follow::Wait(Next::After(POLL_FOLLOW));
        type Row = (MigrationPhase, Option<MigrationTargetState>, &'static str, Option<(Role, VmmState)>, bool, Follow);
        let rows: Vec<Row> = vec![
            // Receiving: watched until it runs the guest.
            (MigrationPhase::Scheduled, Some(Receiving), "host-1", Some((receive(), VmmState::Running)), false, watch),
            (MigrationPhase::Running, Some(Receiving), "host-1", Some((receive(), VmmState::Running)), false, watch),
            (MigrationPhase::Switchover, Some(Receiving), "host-1", Some((receive(), VmmState::Running)), false, watch),
            // It runs the guest: the VM moves here unless the source moved it first.
            (
                MigrationPhase::Running,
                Some(Receiving),
                "host-1",
                Some((receive(), VmmState::Running)),
                true,
                Follow::TakeOver,
            ),
            (
                MigrationPhase::Switchover,
                Some(Receiving),
                "host-1",
                Some((receive(), VmmState::Running)),
                true,
                Follow::TakeOver,
            ),
            (
                MigrationPhase::Switchover,
                Some(Receiving),
                "host-2",
                Some((receive(), VmmState::Running)),
                true,
                Follow::Record(Running),
            ),
            (
                MigrationPhase::Succeeded,
                Some(Receiving),
                "host-2",
                Some((receive(), VmmState::Running)),
                true,
                Follow::Record(Running),
            ),
            // The VM controller took it over before this look.
            (
                MigrationPhase::Succeeded,
                Some(Receiving),
                "host-2",
                Some((Role::Run, VmmState::Running)),
                false,
                Follow::Record(Running),
            ),
            (
                MigrationPhase::Running,
                Some(Receiving),
                "host-2",
                Some((Role::Run, VmmState::Running)),
                false,
                Follow::Record(Running),
            ),
            // Placed on a third host while it runs the guest here: said as it is.
            (
                MigrationPhase::Running,
                Some(Receiving),
                "host-3",
                Some((receive(), VmmState::Running)),
                true,
                Follow::Record(Running),
            ),
            // Said already: nothing more to say.
            (
                MigrationPhase::Running,
                Some(Running),
                "host-1",
                Some((receive(), VmmState::Running)),
                true,
                Follow::Wait(Next::Change),
            ),
            (
                MigrationPhase::Running,
                Some(Running),
                "host-2",
                Some((Role::Run, VmmState::Running)),
                false,
                Follow::Wait(Next::Change),
            ),
            // Published before targetState existed.
            (
                MigrationPhase::Running,
                None,
                "host-1",
                Some((receive(), VmmState::Running)),
                false,
                Follow::Record(Receiving),
            ),
            // Ended or gone while under way: the failure is the source's (its send
            // fails) or the operator's to declare; the target watches.
            (MigrationPhase::Running, Some(Receiving), "host-1", Some((receive(), ended.clone())), false, watch),
            (MigrationPhase::Running, Some(Receiving), "host-1", Some((receive(), VmmState::Lost)), false, watch),
            (MigrationPhase::Running, Some(Receiving), "host-1", None, false, watch),
            (MigrationPhase::Succeeded, Some(Receiving), "host-2", None, false, Follow::Wait(Next::Change)),
            // Another migration's receiving VMM is not this one's word.
            (
                MigrationPhase::Running,
                Some(Receiving),
                "host-1",
                Some((Role::Receive { migration: "old".into() }, VmmState::Running)),
                true,
                watch,
            ),
        ];
        for (phase, state, node, local, resumed, want) in rows {
            let migration = migration_in(phase, None, state);
            let vm = placed(node, phase != MigrationPhase::Succeeded && node == "host-1");
            let case = format!("{phase:?}, said {state:?}, VM on {node}, {local:?}, resumed {resumed}");
            assert_eq!(follow(&observed(&migration, Some(&vm), local.clone(), resumed)), want, "{case}");
        }
        let migration = migration_in(MigrationPhase::Running, None, Some(Receiving));
        let receiving = Some((receive(), VmmState::Running));
        assert_eq!(follow(&observed(&migration, None, receiving, true)), watch, "no VM: the source fails it");
        let recorded = recording(migration.status.clone().unwrap(), Running);
        assert_eq!(recorded.target_state, Some(Running));
        assert_eq!(recorded.target_address, migration.status.unwrap().target_address, "the rest of the status is kept");
    }

    /// spec.cpu.hostCpus × the migration's targetCpus × the VM's allocatedCpus (the
    /// source's) → the receiving VMM's host CPUs, or the failure.
    #[test]
    fn the_receiving_vmm_runs_on_the_cpus_reserved_here() {
        type Row = (Option<&'static str>, Option<&'static str>, Option<&'static str>, &'static str);
        let rows: &[Row] = &[
            (None, None, None, "receive:0-3"),
            (None, None, Some("0"), "receive:0-3"),
            (None, Some("2-3"), None, "receive:2-3"),
            (None, Some("2-3"), Some("0"), "receive:2-3"),
            (Some("1"), Some("2-3"), Some("0"), "receive:1"),
            (Some("1"), None, None, "receive:1"),
            (None, None, Some("9"), "receive:0-3"),
            (None, Some("8"), None, "fail:status.targetCpus: CPU 8 is not offered to VMs on host-2 (offered: 0-3)"),
            (
                Some("8"),
                Some("2"),
                None,
                "fail:spec.cpu.hostCpus: CPU 8 is not offered to VMs on host-2 (offered: 0-3)",
            ),
        ];
        for &(spec, target, allocated, want) in rows {
            let mut migration = migration();
            migration.status.as_mut().unwrap().target_cpus = target.map(str::to_string);
            let mut vm = vm("host-1");
            vm.spec.cpu.host_cpus = spec.map(str::to_string);
            vm.status.as_mut().unwrap().allocated_cpus = allocated.map(str::to_string);
            let o = Observed {
                migration: &migration,
                node: "host-2",
                vm: Some(&vm),
                local: None,
                leased: true,
                offered: offered(),
                resumed: false,
                now: now(),
            };
            assert_eq!(kind(&decide(&o)), want, "spec {spec:?} × target {target:?} × allocated {allocated:?}");
        }
    }

    #[test]
    fn a_target_without_overcommit_faults_memory_in_before_it_listens() {
        let args = |ratio: Option<f64>| {
            let facts = ratio.map(|r| {
                let mut facts: HostFacts = serde_json::from_value(serde_json::json!({
                    "kvm": { "usable": true, "maxVcpus": 1 },
                    "topology": { "cpus": "0", "cores": 1, "threadsPerCore": 1, "numaNodes": [], "memoryMib": 1 },
                    "offered": { "cpus": "0", "vcpus": 1, "memoryMib": 1, "memoryOvercommitRatio": 1.0 }
                }))
                .unwrap();
                facts.offered.memory_overcommit_ratio = r;
                facts
            });
            let p = Path::new;
            receive_args("10.0.0.2:49200", p("/s"), p("/c"), p("/a"), Some("0-1"), facts.as_ref())
        };
        let plain = args(Some(1.0));
        assert_eq!(plain[..3], ["receive", "--listen", "10.0.0.2:49200"]);
        assert!(plain.windows(2).any(|w| w == ["--host-cpus", "0-1"]));
        assert!(plain.contains(&"--prefault".into()));
        assert!(args(None).contains(&"--prefault".into()), "no facts: no overcommit");
        assert!(!args(Some(1.5)).contains(&"--prefault".into()));
    }

    #[test]
    fn listening_publishes_the_address() {
        let migration = migration();
        let status = listening(&migration, migration.status.clone().unwrap(), "10.0.0.2:49201".into(), now());
        assert_eq!(status.target_address.as_deref(), Some("10.0.0.2:49201"));
        let cond = status.conditions.get(conditions::TARGET_READY).unwrap();
        assert_eq!((cond.status.as_str(), cond.reason.as_str()), ("True", reasons::LISTENING));
        assert_eq!(cond.message, "receiving VMM listens on 10.0.0.2:49201");
        assert_eq!(status.target_state, Some(MigrationTargetState::Receiving), "said with the address");
    }
}
