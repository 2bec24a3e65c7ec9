//! The source's decisions (pure): start the send once the target listens, follow
//! it from what the VMM reports, and end the migration (the VM moved, or it stays);
//! and once the migration has failed (the operator may end one under way), settle
//! a send that may still go on. The target agent may record the hand-over before
//! the source does (its VMM runs the guest): the source then finds the VM placed
//! there and only records the migration's end, with its figures.

use std::time::Duration;

use drover_crds::contract::{conditions, reasons};
use drover_crds::migration::{MigrationPhase, VirtualMachineMigration, VirtualMachineMigrationStatus};
use drover_crds::vm::{VirtualMachine, VirtualMachineStatus, VmPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::super::failure::Failure;
use crate::conditions::condition;
pub use crate::handover::moved;
use crate::next::Next;
use crate::supervisor::VmmState;
use crate::vmm_client::{MigrationStatus, Phase};

/// How often a running migration is looked at (the VMM's API is local and cheap).
pub const POLL: Duration = Duration::from_millis(50);
/// Progress goes to the API server at most this often (phase changes at once).
pub const PROGRESS_EVERY_MS: i64 = 500;

/// What the source's decisions rest on.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub migration: &'a VirtualMachineMigration,
    /// This host's Node name.
    pub node: &'a str,
    /// The migration's VM, if it exists.
    pub vm: Option<&'a VirtualMachine>,
    /// The state of this host's VMM that runs the VM (role Run), if there is one.
    pub local: Option<VmmState>,
    /// What the VMM says of the send, once it has started: its API while it runs,
    /// else the figures it left.
    pub progress: Option<MigrationStatus>,
    pub now: Time,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Fail the migration with `status`; with `release_vm`, the VM (which keeps
    /// running here) is no longer marked as migrating.
    Fail { status: Box<VirtualMachineMigrationStatus>, failure: Failure, release_vm: bool },
    /// Record `status` (Running), then ask the VMM to send to `address`.
    Send { status: Box<VirtualMachineMigrationStatus>, address: String },
    /// The send goes on: `status` has the VMM's figures; written when `write`.
    Follow { status: Box<VirtualMachineMigrationStatus>, write: bool },
    /// The VM runs on `target`: its status moves there (unless the target agent
    /// has moved it already), then the migration's `status` (Succeeded) is written.
    Succeed { status: Box<VirtualMachineMigrationStatus>, target: String },
}

/// What the source does for a migration whose target has published its address.
pub fn decide(o: &Observed) -> Plan {
    let mut status = o.migration.status.clone().unwrap_or_default();
    let Some(vm) = o.vm else {
        return fail(
            o,
            status,
            Failure::source(format!("VirtualMachine {} not found", o.migration.spec.vm_name)),
            false,
        );
    };
    let target = status.target_node.clone().unwrap_or_default();

    if status.phase == Some(MigrationPhase::Scheduled) {
        if o.local != Some(VmmState::Running) {
            return fail(
                o,
                status,
                Failure::source(format!("VM {} is not running on {}", vm.name_any(), o.node)),
                false,
            );
        }
        let address = status.target_address.clone().unwrap_or_default();
        // Recorded before the send starts: a crash of this agent right after must
        // find the migration Running and follow it, not start it twice.
        status.phase = Some(MigrationPhase::Running);
        status.start_time = Some(o.now.clone());
        status.conditions.set(condition(
            conditions::SUCCEEDED,
            false,
            reasons::MIGRATION_RUNNING,
            format!("copying memory to {target} ({address})"),
            o.migration.metadata.generation,
            o.now.clone(),
        ));
        return Plan::Send { status: Box::new(status), address };
    }

    // Running or Switchover: follow the VMM. The target agent moves the VM's status
    // to its host only once its VMM runs the guest, past the source's point of no
    // return: from then on the VM is the target's whatever this VMM says.
    let taken_over = target != o.node && crate::handover::placed_on(vm, &target);
    let ended = match ended(o) {
        Some(Err(_)) if taken_over => Some(Ok(())),
        ended => ended,
    };
    if let Some(p) = &o.progress {
        status.iterations = Some(p.pass as i32);
        status.bytes_transferred = Some(p.bytes_sent as i64);
        status.dirty_rate_bytes_per_second = Some(p.dirty_rate_bps as i64);
        status.downtime_millis = p.downtime_ms.map(|ms| ms as i64);
        status.downtime_micros = p.downtime_us.map(|us| us as i64);
        status.total_millis = Some(p.total_ms as i64);
        if p.phase == Phase::Switchover {
            status.phase = Some(MigrationPhase::Switchover);
        }
    }
    match ended {
        None => {
            let old = o.migration.status.as_ref();
            let recent = old
                .and_then(|o| o.total_millis)
                .zip(status.total_millis)
                .is_some_and(|(a, b)| b - a < PROGRESS_EVERY_MS);
            let write = old.map(|o| o.phase) != Some(status.phase) || !recent;
            Plan::Follow { status: Box::new(status), write }
        }
        Some(Ok(())) => {
            status.phase = Some(MigrationPhase::Succeeded);
            status.completion_time = Some(o.now.clone());
            status.conditions.set(condition(
                conditions::SUCCEEDED,
                true,
                reasons::MIGRATED,
                format!("the VM runs on {target}"),
                o.migration.metadata.generation,
                o.now.clone(),
            ));
            Plan::Succeed { status: Box::new(status), target }
        }
        // The VM stays here, and is released here: a VM placed elsewhere since is
        // another host's to write.
        Some(Err(why)) => fail(o, status, Failure::source(why), crate::handover::placed_on(vm, o.node)),
    }
}

/// Whether the send has ended, and how: from the VMM's exit once it has exited,
/// else from what it reports.
fn ended(o: &Observed) -> Option<Result<(), String>> {
    match (&o.local, &o.progress) {
        (Some(VmmState::Ended(record)), _) if record.is_migrated() => Some(Ok(())),
        (Some(VmmState::Ended(record)), _) => Some(Err(format!("the source VMM ended: {}", record.describe()))),
        (Some(VmmState::Lost), _) | (None, _) => Some(Err(format!("the source VMM is gone from {}", o.node))),
        (_, Some(p)) if p.phase == Phase::Completed => Some(Ok(())),
        (_, Some(p)) if p.phase == Phase::Failed || p.phase == Phase::Cancelled => {
            Some(Err(p.error.clone().unwrap_or_else(|| format!("migration {:?}", p.phase).to_lowercase())))
        }
        (_, Some(p)) if p.phase == Phase::Unknown => Some(Err(
            "the target never confirmed the switch-over: the VM is paused on the source and may run on the target"
                .into(),
        )),
        _ => None,
    }
}

fn fail(o: &Observed, status: VirtualMachineMigrationStatus, failure: Failure, release_vm: bool) -> Plan {
    let status = failure.status(status, o.migration.metadata.generation, o.now.clone());
    Plan::Fail { status: Box::new(status), failure, release_vm }
}

/// What the source does about a migration that has failed: whoever failed it, a
/// send that may still go on is settled here, and the migration's status is left
/// as it is (the operator's reason and message, or the agent's own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Nothing of it here: the VM is not placed here, or not marked as moving in
    /// this migration (never was, or already settled).
    Nothing,
    /// The VMM still sends: cancel the send (the VM keeps running here), then look
    /// again in `Next`.
    Cancel(Next),
    /// The VMM has not said how its send stands (its API did not answer): look again.
    Wait(Next),
    /// The send ended without handing the VM over: it keeps running here, no longer
    /// marked as migrating (the target may then stop its receiving VMM).
    Release,
    /// The send had handed the VM over before the migration was failed: the VM
    /// runs on `target` now (and never again here), so its status moves there as
    /// on success, with the host CPUs reserved there.
    Move { target: String, target_cpus: Option<String> },
}

/// Settles what the source's VMM did for a migration that has failed.
///
/// The operator fails a migration under way when it is deleted or runs out of
/// time, without knowing how far the VMM got. Before the switch-over's point of
/// no return the VMM can still give up, and the VM stays here: cancel, then release
/// the VM once the VMM says the send ended. Past it (the VMM reports `Completed`,
/// or exited "migrated") the VM runs on the target whatever the migration says: a
/// VM never vanishes, so its status moves to the target as on success, and the
/// migration keeps the operator's `Failed` (its reason, message and time are the
/// operator's to write, and a phase that ended does not change again; the VM's
/// status and an Event say where the VM is). A VMM that reports `Unknown` (the
/// target never confirmed) is paused here and may run there: as for the source's
/// own failure, the VM stays placed here and is released, and the target keeps a
/// receiving VMM that runs the VM.
pub fn settle(o: &Observed) -> Settle {
    let Some(vm) = o.vm else { return Settle::Nothing };
    let status = vm.status.as_ref();
    let name = o.migration.name_any();
    let marked = status.and_then(|s| s.migration.as_deref()) == Some(name.as_str());
    let here = status.and_then(|s| s.node_name.as_deref()) == Some(o.node);
    if !marked || !here {
        return Settle::Nothing;
    }
    let migration = o.migration.status.as_ref();
    let moved = || match migration.and_then(|s| s.target_node.clone()) {
        Some(target) => Settle::Move { target, target_cpus: migration.and_then(|s| s.target_cpus.clone()) },
        // An approved migration names its target; without one no send was made.
        None => Settle::Nothing,
    };
    match (&o.local, &o.progress) {
        (Some(VmmState::Ended(record)), _) if record.is_migrated() => moved(),
        (Some(VmmState::Ended(_) | VmmState::Lost) | None, _) => Settle::Release,
        (Some(VmmState::Running), None) => Settle::Wait(Next::After(POLL)),
        (Some(VmmState::Running), Some(p)) => match p.phase {
            Phase::Connecting | Phase::PreCopy | Phase::Switchover => Settle::Cancel(Next::After(POLL)),
            Phase::Completed => moved(),
            Phase::None | Phase::Failed | Phase::Cancelled | Phase::Unknown => Settle::Release,
        },
    }
}

/// The VM's status while `migration` moves it (or, with `None`, no longer): the
/// rest of its status kept.
pub fn migrating(vm: &VirtualMachine, migration: Option<&str>) -> VirtualMachineStatus {
    let mut status = vm.status.clone().unwrap_or_default();
    status.migration = migration.map(str::to_string);
    if status.phase == Some(VmPhase::Running) || status.phase == Some(VmPhase::Migrating) {
        status.phase = Some(if migration.is_some() { VmPhase::Migrating } else { VmPhase::Running });
    }
    status
}

/// The figures of a migration that succeeded, for its Events.
pub fn figures(node: &str, target: &str, status: &VirtualMachineMigrationStatus) -> String {
    format!(
        "from {node} to {target}: downtime {:.1} ms, total {} ms, {} bytes, {} passes",
        status.downtime_micros.unwrap_or(0) as f64 / 1000.0,
        status.total_millis.unwrap_or(0),
        status.bytes_transferred.unwrap_or(0),
        status.iterations.unwrap_or(0)
    )
}

#[cfg(test)]
mod tests {
    use drover_vmm_api::ExitStatus;

    use super::*;
    use crate::vm_dir::ExitRecord;

    fn migration(phase: MigrationPhase, total_millis: Option<i64>) -> VirtualMachineMigration {
        let mut m: VirtualMachineMigration = serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": { "name": "m", "namespace": "ns", "generation": 1 },
            "spec": { "vmName": "v" },
            "status": { "sourceNode": "host-1", "targetNode": "host-2", "secretName": "k",
                        "targetAddress": "10.0.0.2:49200" }
        }))
        .unwrap();
        let status = m.status.as_mut().unwrap();
        status.phase = Some(phase);
        status.total_millis = total_millis;
        m
    }

    fn vm(phase: VmPhase, migration: Option<&str>) -> VirtualMachine {
        let mut vm: VirtualMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": { "name": "v", "namespace": "ns", "uid": "u-1", "generation": 3 },
            "spec": { "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" }, "boot": { "kernel": "/k" } },
            "status": { "nodeName": "host-1", "cpuUsage": "100m" }
        }))
        .unwrap();
        let status = vm.status.as_mut().unwrap();
        status.phase = Some(phase);
        status.migration = migration.map(str::to_string);
        vm
    }

    fn now() -> Time {
        Time("2026-01-02T03:04:05Z".parse().unwrap())
    }

    fn exit(status: ExitStatus) -> VmmState {
        VmmState::Ended(ExitRecord { code: Some(status.code().into()), signal: None, at_ms: 1 })
    }

    /// The source VMM states the tables cover.
    fn locals() -> Vec<(&'static str, Option<VmmState>)> {
        vec![
            ("none", None),
            ("running", Some(VmmState::Running)),
            ("migrated", Some(exit(ExitStatus::MigratedOut))),
            ("failed", Some(exit(ExitStatus::VmmError))),
            ("lost", Some(VmmState::Lost)),
        ]
    }

    /// What the VMM reports of the send.
    fn progress(phase: Phase) -> MigrationStatus {
        MigrationStatus { phase, pass: 3, bytes_sent: 4096, total_ms: 900, ..Default::default() }
    }

    fn kind(plan: &Plan) -> String {
        match plan {
            Plan::Fail { failure, release_vm, .. } => {
                format!("fail{}:{}", if *release_vm { "+release" } else { "" }, failure.why)
            }
            Plan::Send { address, .. } => format!("send:{address}"),
            Plan::Follow { status, write } => {
                format!(
                    "follow:{:?}{}",
                    status.phase.unwrap_or(MigrationPhase::Pending),
                    if *write { "+write" } else { "" }
                )
            }
            Plan::Succeed { target, .. } => format!("succeed:{target}"),
        }
    }

    fn decide_for(
        m: &VirtualMachineMigration,
        vm: Option<&VirtualMachine>,
        local: Option<VmmState>,
        p: Option<MigrationStatus>,
    ) -> Plan {
        decide(&Observed { migration: m, node: "host-1", vm, local, progress: p, now: now() })
    }

    #[test]
    fn the_send_starts_only_from_a_vmm_that_runs_the_vm() {
        let m = migration(MigrationPhase::Scheduled, None);
        let vm = vm(VmPhase::Running, None);
        for (name, local) in locals() {
            let want = if name == "running" { "send:10.0.0.2:49200" } else { "fail:VM v is not running on host-1" };
            assert_eq!(kind(&decide_for(&m, Some(&vm), local.clone(), None)), want, "{name}");
            assert_eq!(kind(&decide_for(&m, None, local, None)), "fail:VirtualMachine v not found", "{name}");
        }
        let Plan::Send { status, .. } = decide_for(&m, Some(&vm), Some(VmmState::Running), None) else { panic!() };
        assert_eq!((status.phase, status.start_time.clone()), (Some(MigrationPhase::Running), Some(now())));
        let cond = status.conditions.get(conditions::SUCCEEDED).unwrap();
        assert_eq!(cond.message, "copying memory to host-2 (10.0.0.2:49200)");
    }

    /// Running and Switchover × every source VMM state × every report of the VMM.
    #[test]
    fn the_send_is_followed_to_its_end() {
        let vm = vm(VmPhase::Migrating, Some("m"));
        let reports: Vec<(&str, Option<MigrationStatus>)> = vec![
            ("nothing", None),
            ("pre-copy", Some(progress(Phase::PreCopy))),
            ("switch-over", Some(progress(Phase::Switchover))),
            ("completed", Some(progress(Phase::Completed))),
            ("failed", Some(MigrationStatus { error: Some("target refused".into()), ..progress(Phase::Failed) })),
            ("cancelled", Some(progress(Phase::Cancelled))),
            ("unknown", Some(progress(Phase::Unknown))),
        ];
        for phase in [MigrationPhase::Running, MigrationPhase::Switchover] {
            let m = migration(phase, None);
            for (local_name, local) in locals() {
                for (report, p) in &reports {
                    let want = match (local_name, *report) {
                        ("migrated", _) => "succeed:host-2".to_string(),
                        ("failed", _) => "fail+release:the source VMM ended: VMM error (see the VMM log)".into(),
                        ("none" | "lost", _) => "fail+release:the source VMM is gone from host-1".into(),
                        (_, "completed") => "succeed:host-2".into(),
                        (_, "failed") => "fail+release:target refused".into(),
                        (_, "cancelled") => "fail+release:migration cancelled".into(),
                        (_, "unknown") => "fail+release:the target never confirmed the switch-over: the VM is paused on the source and may run on the target".into(),
                        (_, "switch-over") => "follow:Switchover+write".into(),
                        (_, _) if phase == MigrationPhase::Switchover => "follow:Switchover+write".into(),
                        (_, _) => "follow:Running+write".into(),
                    };
                    let got = kind(&decide_for(&m, Some(&vm), local.clone(), p.clone()));
                    assert_eq!(got, want, "{phase:?} × VMM {local_name} × report {report}");
                }
            }
        }
    }

    /// The target agent moved the VM's status first (its VMM runs the guest: the
    /// source's host may have been slow, or its agent down at the hand-over) ×
    /// Running and Switchover × every source VMM state × every report of the VMM:
    /// the migration Succeeded, with the figures the VMM gives, once it has said
    /// how the send ended; never a failure, and the VM is not moved again.
    #[test]
    fn a_vm_the_target_moved_first_makes_the_migration_succeed() {
        let mut vm = vm(VmPhase::Running, None);
        vm.status.as_mut().unwrap().node_name = Some("host-2".into());
        let reports: Vec<(&str, Option<MigrationStatus>)> = vec![
            ("nothing", None),
            ("pre-copy", Some(progress(Phase::PreCopy))),
            ("switch-over", Some(progress(Phase::Switchover))),
            ("completed", Some(MigrationStatus { downtime_us: Some(900), ..progress(Phase::Completed) })),
            ("failed", Some(progress(Phase::Failed))),
            ("unknown", Some(progress(Phase::Unknown))),
        ];
        for phase in [MigrationPhase::Running, MigrationPhase::Switchover] {
            let m = migration(phase, None);
            for (local_name, local) in locals() {
                for (report, p) in &reports {
                    // A VMM that still runs and has not said how the send ended is
                    // followed (it says Completed, or the VM controller powers off a
                    // VMM whose VM is placed elsewhere and has not handed it over).
                    let running = local_name == "running";
                    let want = match *report {
                        "nothing" | "pre-copy" | "switch-over" if running => {
                            format!(
                                "follow:{:?}+write",
                                if *report == "switch-over" { MigrationPhase::Switchover } else { phase }
                            )
                        }
                        _ => "succeed:host-2".into(),
                    };
                    let plan = decide_for(&m, Some(&vm), local.clone(), p.clone());
                    assert_eq!(kind(&plan), want, "{phase:?} × VMM {local_name} × report {report}");
                    if let Plan::Succeed { status, .. } = plan {
                        assert_eq!(status.phase, Some(MigrationPhase::Succeeded));
                        if p.is_some() {
                            assert_eq!(
                                (status.iterations, status.bytes_transferred),
                                (Some(3), Some(4096)),
                                "its figures"
                            );
                        }
                    }
                }
            }
        }
        // Placed on a third host meanwhile (HA, while this host was cut off): the
        // send failed, and the VM is not this host's to release.
        let mut elsewhere = vm.clone();
        elsewhere.status.as_mut().unwrap().node_name = Some("host-3".into());
        let m = migration(MigrationPhase::Running, None);
        let plan = decide_for(&m, Some(&elsewhere), Some(exit(ExitStatus::VmmError)), None);
        assert_eq!(kind(&plan), "fail:the source VMM ended: VMM error (see the VMM log)");
        // The VM's status is left as the target wrote it (and as it reports since).
        let mut reported = vm.clone();
        reported.status.as_mut().unwrap().phase = Some(VmPhase::Stopped);
        assert_eq!(crate::handover::moved_from(&reported, "host-1", "host-2", None, now()), None);
    }

    #[test]
    fn progress_is_written_at_most_twice_a_second_and_phase_changes_at_once() {
        let vm = vm(VmPhase::Migrating, Some("m"));
        let running = Some(VmmState::Running);
        // (last written total, VMM's phase) → written?
        for (written_ms, phase, write) in [
            (Some(800), Phase::PreCopy, false),
            (Some(300), Phase::PreCopy, true),
            (None, Phase::PreCopy, true),
            (Some(800), Phase::Switchover, true),
        ] {
            let m = migration(MigrationPhase::Running, written_ms);
            let Plan::Follow { status, write: got } = decide_for(&m, Some(&vm), running.clone(), Some(progress(phase)))
            else {
                panic!()
            };
            assert_eq!(got, write, "written at {written_ms:?}, VMM {phase:?}");
            assert_eq!(
                (status.iterations, status.bytes_transferred, status.total_millis),
                (Some(3), Some(4096), Some(900))
            );
        }
    }

    #[test]
    fn a_success_records_the_figures_and_moves_the_vm() {
        let m = migration(MigrationPhase::Switchover, None);
        let vm = vm(VmPhase::Migrating, Some("m"));
        let done = MigrationStatus { downtime_us: Some(860), downtime_ms: Some(0), ..progress(Phase::Completed) };
        let Plan::Succeed { status, target } = decide_for(&m, Some(&vm), Some(VmmState::Running), Some(done)) else {
            panic!()
        };
        assert_eq!((status.phase, status.completion_time.clone()), (Some(MigrationPhase::Succeeded), Some(now())));
        assert_eq!((status.downtime_micros, status.downtime_millis), (Some(860), Some(0)));
        assert_eq!(
            figures("host-1", &target, &status),
            "from host-1 to host-2: downtime 0.9 ms, total 900 ms, 4096 bytes, 3 passes"
        );
        let mut allocated = vm.clone();
        allocated.status.as_mut().unwrap().allocated_cpus = Some("0-1".into());
        let moved = moved(&allocated, "host-1", &target, Some("4-5"), now());
        assert_eq!(
            (moved.node_name.as_deref(), moved.phase, moved.migration.clone()),
            (Some("host-2"), Some(VmPhase::Running), None)
        );
        assert_eq!(moved.allocated_cpus.as_deref(), Some("4-5"), "the CPUs reserved on the target");
        let shared = super::moved(&allocated, "host-1", &target, None, now());
        assert_eq!(shared.allocated_cpus, None, "the source's allocation does not travel");
        let mut stopping = vm.clone();
        stopping.status.as_mut().unwrap().phase = Some(VmPhase::Stopping);
        assert_eq!(super::moved(&stopping, "host-1", &target, None, now()).phase, Some(VmPhase::Stopping));
        assert_eq!(moved.cpu_usage, None, "the source's figure is not the target's");
        let ready = moved.conditions.get(conditions::READY).unwrap();
        assert_eq!(
            (ready.reason.as_str(), ready.message.as_str()),
            (reasons::MIGRATED, "migrated from host-1 to host-2")
        );
        assert_eq!(ready.observed_generation, Some(3));
    }

    /// A failed migration (by the operator: Cancelled, TimedOut; or by an agent) ×
    /// the VM marked as moving in it or not, placed here or not × every source VMM
    /// state × every report of the VMM → how the source settles it.
    #[test]
    fn a_failed_migration_is_settled_by_what_the_vmm_did() {
        let mut m = migration(MigrationPhase::Failed, Some(900));
        m.status.as_mut().unwrap().target_cpus = Some("4-5".into());
        m.status.as_mut().unwrap().failure_message = Some("deleted while under way".into());
        let reports: Vec<(&str, Option<MigrationStatus>)> = vec![
            ("nothing", None),
            ("none", Some(progress(Phase::None))),
            ("connecting", Some(progress(Phase::Connecting))),
            ("pre-copy", Some(progress(Phase::PreCopy))),
            ("switch-over", Some(progress(Phase::Switchover))),
            ("completed", Some(progress(Phase::Completed))),
            ("failed", Some(progress(Phase::Failed))),
            ("cancelled", Some(progress(Phase::Cancelled))),
            ("unknown", Some(progress(Phase::Unknown))),
        ];
        let moved = Settle::Move { target: "host-2".into(), target_cpus: Some("4-5".into()) };
        for (placed, mark) in
            [("host-1", Some("m")), ("host-1", None), ("host-1", Some("other")), ("host-2", Some("m"))]
        {
            let mut vm = vm(VmPhase::Migrating, mark);
            vm.status.as_mut().unwrap().node_name = Some(placed.into());
            for (local_name, local) in locals() {
                for (report, p) in &reports {
                    let want = match (placed, mark, local_name, *report) {
                        ("host-1", Some("m"), "migrated", _) => moved.clone(),
                        ("host-1", Some("m"), "none" | "failed" | "lost", _) => Settle::Release,
                        ("host-1", Some("m"), "running", "nothing") => Settle::Wait(Next::After(POLL)),
                        ("host-1", Some("m"), "running", "connecting" | "pre-copy" | "switch-over") => {
                            Settle::Cancel(Next::After(POLL))
                        }
                        ("host-1", Some("m"), "running", "completed") => moved.clone(),
                        ("host-1", Some("m"), "running", _) => Settle::Release,
                        _ => Settle::Nothing,
                    };
                    let o = Observed {
                        migration: &m,
                        node: "host-1",
                        vm: Some(&vm),
                        local: local.clone(),
                        progress: p.clone(),
                        now: now(),
                    };
                    assert_eq!(settle(&o), want, "VM on {placed} marked {mark:?} × VMM {local_name} × report {report}");
                }
            }
        }
        let o = Observed { migration: &m, node: "host-1", vm: None, local: None, progress: None, now: now() };
        assert_eq!(settle(&o), Settle::Nothing, "no VM");
        // The VM moves as on success, with the target's CPUs; the migration's
        // status is no part of a settlement (it stays as the operator wrote it).
        let vm = vm(VmPhase::Migrating, Some("m"));
        let Settle::Move { target, target_cpus } = moved else { unreachable!() };
        let status = super::moved(&vm, "host-1", &target, target_cpus.as_deref(), now());
        assert_eq!(
            (status.node_name.as_deref(), status.allocated_cpus.as_deref(), status.migration),
            (Some("host-2"), Some("4-5"), None)
        );
    }

    #[test]
    fn a_vm_is_marked_migrating_only_while_it_runs() {
        let running = vm(VmPhase::Running, None);
        assert_eq!(migrating(&running, Some("m")).phase, Some(VmPhase::Migrating));
        assert_eq!(migrating(&running, Some("m")).migration.as_deref(), Some("m"));
        let moving = vm(VmPhase::Migrating, Some("m"));
        let back = migrating(&moving, None);
        assert_eq!((back.phase, back.migration), (Some(VmPhase::Running), None));
        let stopped = vm(VmPhase::Stopped, None);
        assert_eq!(migrating(&stopped, Some("m")).phase, Some(VmPhase::Stopped));
    }
}
