//! The VM's status once a migration has handed it over to its target. Whoever sees
//! the hand-over first records it: the source agent (its migration controller when
//! its VMM completed the send, also after the migration was failed; its VM
//! controller when the migration is gone by then), or the target agent once its
//! receiving VMM runs the guest (with the source's host dead, nobody else would).
//! Each writes with the resourceVersion it read, so the second writer conflicts,
//! looks again and finds the VM moved. Pure.

use drover_crds::contract::{conditions, reasons};
use drover_crds::vm::{VirtualMachine, VirtualMachineStatus, VmPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::conditions::condition;

/// Whether `vm`'s status places it on `node`.
pub fn placed_on(vm: &VirtualMachine, node: &str) -> bool {
    vm.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
}

/// The VM's status once it runs on `target`, from its `fresh` status (placed on
/// `node`, the source): the target's agent takes it over from here. Its host CPUs
/// there are the ones the operator reserved for the migration (`target_cpus`: a
/// Dedicated VM's); without them the allocation goes, and the operator writes the
/// target's (a Shared VM's). An operator's `Stopping` stays: the stop it asked for
/// still holds there.
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

/// [`moved`], unless the VM is no longer placed on `node`: the other end recorded
/// the hand-over first (its status is then left as it is, never moved back nor
/// written again over what the target has reported since).
pub fn moved_from(
    vm: &VirtualMachine,
    node: &str,
    target: &str,
    target_cpus: Option<&str>,
    now: Time,
) -> Option<VirtualMachineStatus> {
    placed_on(vm, node).then(|| moved(vm, node, target, target_cpus, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(node: &str) -> VirtualMachine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": { "name": "v", "namespace": "ns", "uid": "u-1", "generation": 3 },
            "spec": { "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" }, "boot": { "kernel": "/k" } },
            "status": { "nodeName": node, "phase": "Migrating", "migration": "m", "allocatedCpus": "0" }
        }))
        .unwrap()
    }

    #[test]
    fn the_vm_moves_only_from_where_it_is_placed() {
        let now = Time("2026-01-02T03:04:05Z".parse().unwrap());
        let on_source = vm("host-1");
        let status = moved_from(&on_source, "host-1", "host-2", Some("4"), now.clone()).unwrap();
        assert_eq!(
            (status.node_name.as_deref(), status.phase, status.migration, status.allocated_cpus.as_deref()),
            (Some("host-2"), Some(VmPhase::Running), None, Some("4"))
        );
        // The target recorded it first (or the operator placed it elsewhere): left.
        assert_eq!(moved_from(&vm("host-2"), "host-1", "host-2", Some("4"), now.clone()), None);
        assert_eq!(moved_from(&vm("host-3"), "host-1", "host-2", None, now), None);
    }
}
