//! The target's decisions (pure): whether to start a receiving VMM (and on which
//! host CPUs), publish the one it started, or fail the migration; and, once the
//! migration failed, whether to stop its receiving VMM.

use std::path::Path;
use std::time::Duration;

use drover_crds::contract::{conditions, reasons};
use drover_crds::migration::{VirtualMachineMigration, VirtualMachineMigrationStatus};
use drover_crds::vm::VirtualMachine;
use drover_topology::CpuSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::super::failure::Failure;
use crate::Error;
use crate::conditions::condition;
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
    /// again). Asked only when a failed migration's receiving VMM still runs.
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

/// After the migration failed: whether this host's receiving VMM of it is to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Nothing of it here (or the VM is this host's now).
    Leave,
    /// Forget it, powering it off first if it still runs.
    Forget { power_off: bool },
    /// Not yet: the source may still be sending (the VM is placed there and marked
    /// as moving in this migration); it cancels the send, or moves the VM here if
    /// the send had already handed it over. Look again in `Next`.
    Wait(Next),
    /// Never: the receiving VMM runs the VM (it resumed it, so the source has
    /// promised never to run it again). The VM's status moves here (the source
    /// does that when its VMM completed), and the VM controller takes it over.
    Keep,
}

/// What becomes of this host's VMM of a migration that failed. While the VM is
/// placed on the source, a failure (the operator's, or the source's) never powers
/// off a receiving VMM that runs the VM, nor one that may be about to: the VM would
/// then run nowhere.
pub fn stop(o: &Observed) -> Stop {
    let (Some(vm), Some((role, state))) = (o.vm, &o.local) else { return Stop::Leave };
    let status = vm.status.as_ref();
    let placed_here = status.and_then(|s| s.node_name.as_deref()) == Some(o.node);
    let name = o.migration.name_any();
    if placed_here || *role != (Role::Receive { migration: name.clone() }) {
        return Stop::Leave;
    }
    if *state != VmmState::Running {
        return Stop::Forget { power_off: false };
    }
    // While the VM is placed on the source, its VMM may have handed the VM over (a
    // receiving VMM that runs it) or may still send (the VM marked as moving in
    // this migration): the source settles that first. Once the VM has been placed
    // anywhere else (the operator restarted it after the source failed), it must
    // not run here, and no send can hand it over any more.
    let source = o.migration.status.as_ref().and_then(|s| s.source_node.as_deref());
    let on_source = source.is_some() && status.and_then(|s| s.node_name.as_deref()) == source;
    if on_source && o.resumed {
        return Stop::Keep;
    }
    if on_source && status.and_then(|s| s.migration.as_deref()) == Some(name.as_str()) {
        return Stop::Wait(Next::After(POLL_SETTLING));
    }
    Stop::Forget { power_off: true }
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
    status
}

#[cfg(test)]
mod tests {
    use drover_crds::migration::MigrationPhase;
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

    /// Every local VMM state × the VM placed on the source or already here × the VM
    /// marked as moving in this migration or not × the receiving VMM running the
    /// VM or not.
    #[test]
    fn a_failed_migration_stops_the_receiving_vmm_and_nothing_else() {
        let migration = migration();
        for (placed, node) in [("source", "host-1"), ("here", "host-2"), ("elsewhere", "host-3")] {
            for marked in [false, true] {
                let mut vm = vm(node);
                vm.status.as_mut().unwrap().migration = marked.then(|| "m".into());
                for (name, local) in locals() {
                    for resumed in [false, true] {
                        let want = match (placed, name) {
                            // It runs the VM: the source has let go of it for good.
                            // The source may still be sending: it settles first.
                            ("source", "receiving") if resumed => Stop::Keep,
                            ("source", "receiving") if marked => Stop::Wait(Next::After(POLL_SETTLING)),
                            // Placed elsewhere since (restarted after its source failed):
                            // it must not run here, and no send can hand it over.
                            ("source" | "elsewhere", "receiving") => Stop::Forget { power_off: true },
                            ("source" | "elsewhere", "receiving ended" | "receiving lost") => {
                                Stop::Forget { power_off: false }
                            }
                            _ => Stop::Leave,
                        };
                        for leased in [true, false] {
                            let o = Observed {
                                migration: &migration,
                                node: "host-2",
                                vm: Some(&vm),
                                local: local.clone(),
                                leased,
                                offered: offered(),
                                resumed,
                                now: now(),
                            };
                            let case = format!("placed on the {placed}, marked {marked}, {name}, resumed {resumed}");
                            assert_eq!(stop(&o), want, "{case}, leased {leased}");
                        }
                    }
                }
            }
        }
        let o = Observed {
            migration: &migration,
            node: "host-2",
            vm: None,
            local: locals()[1].1.clone(),
            leased: true,
            offered: offered(),
            resumed: false,
            now: now(),
        };
        assert_eq!(stop(&o), Stop::Leave, "no VM: nothing to say whose the VMM is");
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
    }
}
