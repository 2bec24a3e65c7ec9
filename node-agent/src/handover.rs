//! The VM's status once a migration has handed it over to its target: written by
//! the source agent (its migration controller on success, or when the send had
//! handed the VM over before the migration was failed; its VM controller when the
//! migration is gone by then). Pure.

use drover_crds::contract::{conditions, reasons};
use drover_crds::vm::{VirtualMachine, VirtualMachineStatus, VmPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::conditions::condition;

/// The VM's status once it runs on `target`, from its `fresh` status: the target's
/// agent takes it over from here. Its host CPUs there are the ones the operator
/// reserved for the migration (`target_cpus`: a Dedicated VM's); without them the
/// allocation goes, and the operator writes the target's (a Shared VM's). An
/// operator's `Stopping` stays: the stop it asked for still holds there.
pub fn moved(
    vm: &VirtualMachine,
    node: &str,
    target: &str,
    target_cpus: Option<&str>,
    now: Time,
) -> VirtualMachineStatus {
    let mut status = vm.status.clone().unwrap_or_default();
    status.node_name = Some(target.into());
    if status.phase != Some(VmPhase::Stopping) {
        status.phase = Some(VmPhase::Running);
    }
    status.allocated_cpus = target_cpus.map(str::to_string);
    status.migration = None;
    status.cpu_usage = None;
    status.conditions.set(condition(
        conditions::READY,
        true,
        reasons::MIGRATED,
        format!("migrated from {node} to {target}"),
        vm.metadata.generation,
        now,
    ));
    status
}
