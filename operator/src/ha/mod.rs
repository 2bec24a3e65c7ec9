//! HA: the VMs of failed hosts. A host is failed once its Lease has not changed
//! for the lease duration on this process's clock ([`crate::heartbeats`]); by then
//! its agent (or, agent or no agent, each VM's monitor) has powered its VMs off.
//! Every VM that ran there (or was starting, moving, stopping) is decided on with
//! all the others, by the core's [`drover_core::ha::plan`] (High priority first,
//! through placement), under the placement lock, and its status is taken over
//! from the dead host's agent: placed elsewhere (`Scheduled`, `restartCount` + 1),
//! left `Failed` (Disabled, or a run strategy that does not keep it running), or
//! `Unknown` (waiting for room or for a migration target's word; HA off).
//! [`decide`] holds the pure part.

pub mod decide;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use drover_core::Cluster;
use drover_core::ha::{Moving, Stranded, Verdict};
use drover_core::snapshot::Snapshot;
use drover_crds::contract::{OPERATOR_FIELD_MANAGER, annotations};
use drover_crds::migration::VirtualMachineMigration;
use drover_crds::vm::{VirtualMachine, VmPhase};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::Error;
use crate::context::Context;
use crate::snapshot::{key, target_state};
use crate::writes::patch_metadata;

/// Phases in which a VM on a failed host is HA's: it ran there, or was starting,
/// moving or stopping (a `Scheduled` VM never started there: placement moves it).
pub fn stranded_phase(phase: Option<VmPhase>) -> bool {
    matches!(
        phase,
        Some(VmPhase::Starting | VmPhase::Running | VmPhase::Migrating | VmPhase::Stopping | VmPhase::Unknown)
    )
}

/// Whether `vm` is on a failed host in such a phase. A host the snapshot lacks
/// (its Node deleted after it died, say) is failed when its heartbeat says so
/// (`stale`): its Lease outlives its Node, and its VMs must not wait for a Node
/// that will not come back.
pub fn is_stranded(vm: &VirtualMachine, snapshot: &Snapshot, stale: &dyn Fn(&str) -> bool) -> bool {
    let Some(status) = vm.status.as_ref() else { return false };
    if vm.metadata.deletion_timestamp.is_some() || !stranded_phase(status.phase) {
        return false;
    }
    let Some(node) = status.node_name.as_deref() else { return false };
    match snapshot.hosts.iter().find(|h| h.name == node) {
        Some(host) => host.health.is_failed(),
        None => stale(node),
    }
}

/// The migration that was moving `vm` when its host failed, as its target last
/// said. Only a VM whose status names a migration can have been sent: the source
/// agent records it before its VMM sends. Whether the target's host failed is its
/// heartbeat's word (`stale`), not the snapshot's: a target whose Node is gone or
/// unreadable may still run the VM.
fn moving(
    vm: &VirtualMachine,
    migrations: &[Arc<VirtualMachineMigration>],
    stale: &dyn Fn(&str) -> bool,
) -> Option<Moving> {
    let name = vm.status.as_ref()?.migration.clone()?;
    let ns = vm.namespace();
    let m = migrations.iter().find(|m| m.namespace() == ns && m.name_any() == name);
    let status = m.and_then(|m| m.status.as_ref());
    let target = status.and_then(|s| s.target_node.clone());
    Some(Moving {
        migration: name,
        target_failed: target.as_deref().is_some_and(stale),
        target,
        target_state: status.and_then(|s| s.target_state).map(target_state),
    })
}

pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: &Context) -> Result<Action, Error> {
    let ns = vm.namespace().unwrap_or_default();
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let mut migrations = ctx.migration_writes.apply(ctx.stores.migrations.state());
    // What the target said is read from the API server, not the store: a store a
    // moment behind could miss the address the source sent to, and a VM the
    // target runs must not be started a second time.
    if let Some(name) = vm.status.as_ref().and_then(|s| s.migration.clone()) {
        let api: Api<VirtualMachineMigration> = Api::namespaced(ctx.client.clone(), &ns);
        if let Some(fresh) = api.get_opt(&name).await? {
            migrations.retain(|m| !(m.namespace().as_deref() == Some(ns.as_str()) && m.name_any() == name));
            migrations.push(Arc::new(fresh));
        }
    }
    let stale = |host: &str| crate::heartbeats::heartbeat(&ctx.clock, host).is_stale();
    let guard = ctx.placement.lock().await;
    let snapshot = ctx.snapshot_with(Some(&vm));
    let id = key(vm.as_ref());
    let mut objects = ctx.vm_writes.apply(ctx.stores.vms.state());
    objects.retain(|v| key(v.as_ref()) != id);
    objects.push(vm.clone());
    let core: HashMap<_, _> = snapshot.vms.iter().map(|v| (v.key.clone(), v)).collect();
    let stranded: Vec<Stranded> = objects
        .iter()
        .filter(|v| is_stranded(v, &snapshot, &stale))
        .filter_map(|v| Some(Stranded { vm: core.get(&key(v.as_ref()))?, moving: moving(v, &migrations, &stale) }))
        .collect();
    let mut cluster = Cluster::new(&snapshot);
    let decisions = drover_core::ha::plan(&mut cluster, &stranded);
    let Some(mine) = decisions.into_iter().find(|d| d.vm == id) else {
        // Its memory size cannot be read (the CRD refuses that): nothing to place.
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let shared = match &mine.verdict {
        Verdict::Restart(p) if vm.spec.cpu.placement == drover_crds::vm::CpuPlacement::Shared => {
            crate::snapshot::shared_cpus(&snapshot, &p.host)
        }
        _ => None,
    };
    let plan = decide::plan(&vm, &mine.verdict, mine.priority, shared);
    if let Some(host) = &plan.mark_not_restarted
        && vm.annotations().get(annotations::HA_NOT_RESTARTED) != Some(host)
    {
        let written = patch_metadata(
            &api,
            vm.as_ref(),
            serde_json::json!({ "annotations": { annotations::HA_NOT_RESTARTED: host } }),
        )
        .await?;
        // The status write below goes with the new resourceVersion.
        return write(ctx, &api, Arc::new(written), guard, plan).await;
    }
    write(ctx, &api, vm, guard, plan).await
}

async fn write(
    ctx: &Context,
    api: &Api<VirtualMachine>,
    vm: Arc<VirtualMachine>,
    guard: tokio::sync::MutexGuard<'_, ()>,
    plan: decide::Plan,
) -> Result<Action, Error> {
    let name = vm.name_any();
    let after = plan.status.as_ref().or(vm.status.as_ref());
    let ha_off = after
        .and_then(|s| s.conditions.get(drover_crds::contract::conditions::READY))
        .is_some_and(|c| c.reason == drover_crds::contract::reasons::HOST_FAILED_HA_OFF);
    let requeue = match after.and_then(|s| s.phase) {
        // Placed elsewhere, or left: the usual paths take it from there.
        Some(VmPhase::Scheduled | VmPhase::Failed) => Duration::from_secs(60),
        // Left as it is until its host returns (a heartbeat flip nudges it).
        _ if ha_off => Duration::from_secs(30),
        // Waiting (for room, or a target's word) is looked at again soon: a
        // migration's change does not nudge its VM.
        _ => Duration::from_millis(500),
    };
    let Some(status) = plan.status.clone() else {
        drop(guard);
        return Ok(Action::requeue(requeue));
    };
    let mut intent = (*vm).clone();
    intent.status = Some(status.clone());
    ctx.vm_writes.intend(intent);
    drop(guard);
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": vm.resource_version() },
        "status": decide::merge_patch(&vm.status.clone().unwrap_or_default(), &status),
    });
    let params = PatchParams { field_manager: Some(OPERATOR_FIELD_MANAGER.into()), ..Default::default() };
    let result = api.patch_status(&name, &params, &Patch::Merge(&patch)).await;
    ctx.vm_writes.settle(&vm);
    let written = result?;
    ctx.vm_writes.remember(written);
    tracing::info!(vm = %format!("{}/{name}", vm.namespace().unwrap_or_default()), phase = ?status.phase, node = ?status.node_name, "{}", plan.why);
    if let Some(note) = &plan.note {
        if note.warning {
            ctx.events.warning(vm.as_ref(), note.reason, note.action, note.message.clone());
        } else {
            ctx.events.normal(vm.as_ref(), note.reason, note.action, note.message.clone());
        }
    }
    if status.phase == Some(VmPhase::Scheduled) {
        ctx.metrics.ha_restarts.inc();
    }
    Ok(Action::requeue(requeue))
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::snapshot::{Host, HostHealth};

    fn vm(phase: &str, node: &str) -> VirtualMachine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": { "name": "db", "namespace": "ns" },
            "spec": { "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" }, "boot": { "kernel": "/k" } },
            "status": { "phase": phase, "nodeName": node }
        }))
        .unwrap()
    }

    fn snapshot(h1: Option<HostHealth>) -> Snapshot {
        let hosts = h1
            .into_iter()
            .map(|health| Host {
                name: "h1".into(),
                labels: Default::default(),
                health,
                schedulable: true,
                maintenance: false,
                policy: None,
                capacity: Default::default(),
                numa_spanning: true,
            })
            .collect();
        Snapshot { hosts, ..Default::default() }
    }

    #[test]
    fn a_vm_is_for_ha_once_its_host_failed_with_its_node_or_without() {
        let failed = || Some(HostHealth::Failed("no heartbeat".into()));
        // (phase, h1 in the snapshot, h1's heartbeat stale) -> HA's?
        let table = [
            ("Running", failed(), false, true),
            ("Running", Some(HostHealth::Ready), true, false),
            ("Running", Some(HostHealth::NotReady("overdue".into())), true, false),
            // Its Node deleted after it died: the heartbeat decides.
            ("Running", None, true, true),
            ("Running", None, false, false),
            // Never started there: placement's, not HA's.
            ("Scheduled", failed(), true, false),
            ("Migrating", None, true, true),
        ];
        for (phase, h1, stale, expected) in table {
            let snap = snapshot(h1.clone());
            assert_eq!(is_stranded(&vm(phase, "h1"), &snap, &|_| stale), expected, "{phase} {h1:?} {stale}");
        }
    }
}
