//! VirtualMachines: placement and run-strategy lifecycle. [`decide`] says what
//! to do (pure); [`reconcile`] observes, asks, and carries it out.

pub mod decide;
pub mod mine;

use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_core::Cluster;
use drover_crds::contract::annotations;
use drover_crds::vm::VirtualMachine;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::Error;
use crate::context::Context;
use crate::writes::{apply_status, now_ms, patch_metadata};
use decide::{HostState, NeedsHost, Plan};

/// How often a VM is looked at without a reason (status changes bring it sooner).
const RESYNC: Duration = Duration::from_secs(60);

pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.is_ready() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    ctx.metrics.reconciled("vm");
    let vm = ctx.vm_writes.newest(vm);
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    let snapshot = ctx.snapshot_with(Some(&vm));
    if crate::ha::is_stranded(&vm, &snapshot, &|host| crate::heartbeats::heartbeat(&ctx.clock, host).is_stale()) {
        return crate::ha::reconcile(vm, &ctx).await;
    }
    let node = vm.status.as_ref().and_then(|s| s.node_name.clone());
    let host = HostState::of(node.as_deref().and_then(|n| snapshot.hosts.iter().find(|h| h.name == n)));
    let mut plan = decide::decide(&vm, host, now_ms(), &ctx.settings.backoff);
    let started = Instant::now();
    // Placements take the lock one at a time: each sees the ones before (as
    // intents while their writes are on the way, then as written).
    let guard = match plan.needs_host {
        Some(needs) => {
            let guard = ctx.placement.lock().await;
            plan = place(&ctx, &vm, plan, needs);
            Some(guard)
        }
        None => {
            keep_shared_cpus(&ctx, &vm, &mut plan, &snapshot);
            None
        }
    };
    let placed = guard.is_some();
    let current = decide::decide_current(&vm);
    if plan.mine != current {
        // The next placement sees this one from now on; the write goes without
        // holding the others back.
        let mut intent = (*vm).clone();
        plan.mine.apply_to(intent.status.get_or_insert_with(Default::default));
        ctx.vm_writes.intend(intent);
        drop(guard);
        let result = apply_status(&api, &vm, plan.mine.to_json()).await;
        match result {
            Ok(written) => {
                tracing::info!(vm = %format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any()), phase = ?plan.mine.phase, node = ?plan.mine.node_name, "{}", plan.why);
                ctx.vm_writes.remember(written);
                ctx.vm_writes.settle(&vm);
            }
            Err(e) => {
                ctx.vm_writes.settle(&vm);
                if e.is_not_found() {
                    return Ok(Action::await_change());
                }
                return Err(e);
            }
        }
        if placed {
            ctx.metrics.placement_seconds.observe(started.elapsed().as_secs_f64());
        }
        for note in &plan.notes {
            if note.warning {
                ctx.events.warning(vm.as_ref(), note.reason, note.action, note.message.clone());
            } else {
                ctx.events.normal(vm.as_ref(), note.reason, note.action, note.message.clone());
            }
        }
    }
    if plan.consume_request || plan.clear_maintenance_mark {
        let mut remove = serde_json::Map::new();
        if plan.consume_request {
            remove.insert(annotations::REQUEST.into(), serde_json::Value::Null);
        }
        if plan.clear_maintenance_mark {
            remove.insert(annotations::STOPPED_FOR_MAINTENANCE.into(), serde_json::Value::Null);
        }
        let fresh = api.get(&vm.name_any()).await?;
        patch_metadata(&api, &fresh, serde_json::json!({ "annotations": remove })).await?;
    }
    Ok(plan.requeue.map(Action::requeue).unwrap_or(Action::requeue(RESYNC)))
}

/// Finishes a plan that needs a host: the core places the VM on the cluster as
/// it is (minus the VM's own hold, for a restart elsewhere).
fn place(ctx: &Context, vm: &Arc<VirtualMachine>, plan: Plan, needs: NeedsHost) -> Plan {
    let snapshot = ctx.snapshot_with(Some(vm));
    let mut cluster = Cluster::new(&snapshot);
    let Some(mut core_vm) = crate::snapshot::vm(vm) else {
        let mut plan = plan;
        plan.needs_host = None;
        plan.why = format!("spec.memory.size {:?} is not a whole number of MiB", vm.spec.memory.size);
        return plan;
    };
    if matches!(needs, NeedsHost::Restart { .. }) || core_vm.holds {
        cluster.release(&core_vm);
    }
    core_vm.host = None;
    core_vm.holds = false;
    // Starts keep the capacity HA admission control holds for failover free.
    let admission = drover_core::admission::Admission::new(&cluster);
    let result = cluster.place_admitted(&core_vm, |_| None, |h| admission.check(&cluster, &core_vm, h));
    let shared = result
        .as_ref()
        .ok()
        .and_then(|p| (!core_vm.is_dedicated()).then(|| crate::snapshot::shared_cpus(&snapshot, &p.host)).flatten());
    decide::with_placement(plan, vm, &result, shared)
}

/// A placed Shared VM follows the Dedicated VMs of its host: its CPUs are those
/// they leave (the agent moves its vCPUs live).
fn keep_shared_cpus(ctx: &Context, vm: &VirtualMachine, plan: &mut Plan, snapshot: &drover_core::Snapshot) {
    let _ = ctx;
    if vm.spec.cpu.placement != drover_crds::vm::CpuPlacement::Shared || vm.spec.cpu.host_cpus.is_some() {
        return;
    }
    let Some(node) = plan.mine.node_name.clone() else { return };
    if let Some(cpus) = crate::snapshot::shared_cpus(snapshot, &node)
        && !cpus.is_empty()
    {
        plan.mine.allocated_cpus = Some(cpus);
    }
}

pub fn error_policy(vm: Arc<VirtualMachine>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_conflict() {
        // Someone wrote first; the watch brings the new version.
        return Action::requeue(Duration::from_millis(200));
    }
    ctx.metrics.failed("vm");
    tracing::warn!(vm = %vm.name_any(), "reconcile failed: {error}");
    Action::requeue(Duration::from_secs(2))
}
