//! Runs the VirtualMachines the operator placed on this host (`status.nodeName`),
//! and reports what they do.
//!
//! The agent starts a VM when it is placed here and `Scheduled` (the operator's
//! word for "start it"), the spec can run here, and the host holds its heartbeat
//! lease; the start is recorded (`Starting`) with the resourceVersion it was decided
//! on, so a VM that was meanwhile placed elsewhere is never started. A VM that stops
//! is reported `Stopped` or `Failed` with the reason; what happens next (restart,
//! placement elsewhere) is the operator's decision. CPU set and priority changes are
//! applied to the running VM. A finalizer holds deletion until the VM has stopped.

use std::sync::Arc;
use std::time::Duration;

use drover_crds::vm::{RunStrategy, VirtualMachine, VirtualMachineStatus, VmPhase};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::Error;
use crate::context::Context;
use crate::status::{self, condition, time_ms};
use crate::supervisor::{VmmState, new_meta};
use crate::vm_config;
use crate::vm_dir::{Role, StopReason, VmDir, stop_was_requested};
use crate::vmm_client::{Phase, VmmClient, host_cpus};

/// Held on every VM an agent has started, until its VMM has stopped.
pub use drover_crds::contract::finalizers::VM_AGENT as FINALIZER;

/// Ready condition reasons the agent uses.
mod reason {
    pub use drover_crds::contract::reasons::{
        HOST_CANNOT_RUN_VMS as NO_KVM, INVALID_SPEC, RUNNING, STARTING, STOPPED, VMM_EXITED as FAILED, VMM_LOST as LOST,
    };
}

/// How often a running VM's status is refreshed.
const POLL_RUNNING: Duration = Duration::from_secs(2);
/// How often a starting or stopping VM is looked at.
const POLL_BUSY: Duration = Duration::from_millis(250);

pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    let uid = vm.uid().ok_or_else(|| Error::Config("VirtualMachine without uid".into()))?;
    let ns = vm.namespace().unwrap_or_default();
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let status = vm.status.clone().unwrap_or_default();
    let here = status.node_name.as_deref() == Some(ctx.node());
    let local = ctx.supervisor.get(&uid);
    let state = ctx.supervisor.state(&uid);

    if !here {
        return elsewhere(&vm, &api, &ctx, &uid, local.map(|l| l.meta.role), state).await;
    }
    if vm.metadata.deletion_timestamp.is_some() {
        return delete(&vm, &api, &ctx, &uid, state).await;
    }
    match state {
        Some(VmmState::Running) => running(&vm, &api, &ctx, &uid).await,
        Some(VmmState::Ended(record)) if record.is_migrated() => {
            // The migration controller moves the VM's status to the target.
            Ok(Action::requeue(POLL_BUSY))
        }
        Some(VmmState::Ended(record)) => {
            let dir = VmDir::new(&ctx.settings.runtime_dir, &uid);
            let stop_reason = dir.read_stop_reason();
            let what = match &stop_reason {
                Some(r) => format!("{} ({r})", record.describe()),
                None => record.describe(),
            };
            if record.is_reset() && vm.spec.run_strategy != RunStrategy::Halted && stop_reason.is_none() {
                // A guest reboot: the machine starts again where it is.
                tracing::info!(vm = %vm.name_any(), "guest reset: starting it again");
                ctx.supervisor.forget(&uid);
                let mut new = status.clone();
                new.last_exit = Some(what);
                return start(&vm, &api, &ctx, &uid, new).await;
            }
            let mut new = status.clone();
            let clean = record.is_clean() || stop_reason.as_deref().is_some_and(stop_was_requested);
            new.phase = Some(if clean { VmPhase::Stopped } else { VmPhase::Failed });
            new.last_exit = Some(what.clone());
            new.cpu_usage = None;
            let reason = if clean { reason::STOPPED } else { reason::FAILED };
            new.conditions.set(condition(
                "Ready",
                false,
                reason,
                format!("{what} on {}", ctx.node()),
                vm.metadata.generation,
            ));
            tracing::info!(vm = %vm.name_any(), "VM ended: {what}");
            status::write_vm(&api, &vm, &new, &ctx.manager()).await?;
            if clean {
                ctx.events.normal(vm.as_ref(), "Stopped", "Stop", format!("{what} on {}", ctx.node()));
            } else {
                ctx.events.warning(vm.as_ref(), "Failed", "Stop", format!("{what} on {}", ctx.node()));
            }
            ctx.supervisor.forget(&uid);
            Ok(Action::requeue(POLL_BUSY))
        }
        Some(VmmState::Lost) => {
            let mut new = status.clone();
            new.phase = Some(VmPhase::Failed);
            new.last_exit = Some("the VMM's monitor vanished without recording an exit".into());
            new.conditions.set(condition(
                "Ready",
                false,
                reason::LOST,
                format!("VMM lost on {}", ctx.node()),
                vm.metadata.generation,
            ));
            status::write_vm(&api, &vm, &new, &ctx.manager()).await?;
            ctx.events.warning(vm.as_ref(), "VmmLost", "Stop", format!("the VMM's monitor vanished on {}", ctx.node()));
            ctx.supervisor.forget(&uid);
            Ok(Action::requeue(POLL_BUSY))
        }
        None => idle(&vm, &api, &ctx, &uid, status).await,
    }
}

/// The VM is placed elsewhere (or nowhere). A VMM of ours may still exist: a
/// migration target (left to the migration controller), a source that has handed
/// the VM over, or one that must not run (the VM was moved while this host was cut
/// off and has fenced; this is the belt to that braces).
async fn elsewhere(
    vm: &VirtualMachine,
    api: &Api<VirtualMachine>,
    ctx: &Context,
    uid: &str,
    role: Option<Role>,
    state: Option<VmmState>,
) -> Result<Action, Error> {
    match (role, state) {
        (Some(Role::Run), Some(VmmState::Running)) => {
            let client = VmmClient::new(&VmDir::new(&ctx.settings.runtime_dir, uid).api_socket());
            let handed_over = client.migration().await.map(|m| m.phase == Phase::Completed).unwrap_or(false);
            if !handed_over {
                tracing::warn!(vm = %vm.name_any(), placed = ?vm.status.as_ref().and_then(|s| s.node_name.clone()), "VM runs here but is placed elsewhere: powering it off");
                ctx.supervisor.kill(uid, StopReason::PlacedElsewhere);
            }
            Ok(Action::requeue(POLL_BUSY))
        }
        (Some(Role::Run), _) => {
            ctx.supervisor.forget(uid);
            Ok(Action::await_change())
        }
        (Some(Role::Receive { .. }), _) => Ok(Action::requeue(POLL_RUNNING)),
        (None, _) => {
            // A deleted VM that no host runs: nobody else will release it.
            let nowhere = vm.status.as_ref().and_then(|s| s.node_name.as_ref()).is_none();
            if vm.metadata.deletion_timestamp.is_some() && nowhere {
                remove_finalizer(api, vm).await?;
            }
            Ok(Action::await_change())
        }
    }
}

/// Deleted: power off, then let the deletion proceed.
async fn delete(
    vm: &VirtualMachine,
    api: &Api<VirtualMachine>,
    ctx: &Context,
    uid: &str,
    state: Option<VmmState>,
) -> Result<Action, Error> {
    if state == Some(VmmState::Running) {
        ctx.supervisor.kill(uid, StopReason::Deleted);
        return Ok(Action::requeue(POLL_BUSY));
    }
    ctx.supervisor.forget(uid);
    remove_finalizer(api, vm).await?;
    tracing::info!(vm = %vm.name_any(), "deleted");
    Ok(Action::await_change())
}

/// Nothing runs here for a VM placed here: start it, or say why not.
async fn idle(
    vm: &VirtualMachine,
    api: &Api<VirtualMachine>,
    ctx: &Context,
    uid: &str,
    status: VirtualMachineStatus,
) -> Result<Action, Error> {
    let halted = vm.spec.run_strategy == RunStrategy::Halted;
    let invalid_spec_changed = status.phase == Some(VmPhase::Failed)
        && status.conditions.get("Ready").is_some_and(|c| c.reason == reason::INVALID_SPEC)
        && status.observed_generation < vm.metadata.generation;
    match status.phase {
        _ if halted => {
            if status.phase != Some(VmPhase::Stopped) {
                let mut new = status.clone();
                new.phase = Some(VmPhase::Stopped);
                new.conditions.set(condition(
                    "Ready",
                    false,
                    reason::STOPPED,
                    "spec.runStrategy is Halted",
                    vm.metadata.generation,
                ));
                status::write_vm(api, vm, &new, &ctx.manager()).await?;
            }
            Ok(Action::await_change())
        }
        None | Some(VmPhase::Pending) | Some(VmPhase::Scheduled) => start(vm, api, ctx, uid, status).await,
        Some(VmPhase::Failed) if invalid_spec_changed => start(vm, api, ctx, uid, status).await,
        Some(VmPhase::Starting) | Some(VmPhase::Running) | Some(VmPhase::Migrating) | Some(VmPhase::Stopping) => {
            // The status says it runs here, but nothing does: the host lost power
            // (its runtime directory is gone) or the VMM vanished.
            let mut new = status.clone();
            new.phase = Some(VmPhase::Failed);
            new.last_exit = Some(format!("its VMM is gone from {} (host restarted or powered off)", ctx.node()));
            new.cpu_usage = None;
            new.conditions.set(condition(
                "Ready",
                false,
                reason::LOST,
                new.last_exit.clone().unwrap_or_default(),
                vm.metadata.generation,
            ));
            status::write_vm(api, vm, &new, &ctx.manager()).await?;
            ctx.events.warning(vm, "VmmLost", "Stop", new.last_exit.clone().unwrap_or_default());
            Ok(Action::await_change())
        }
        Some(VmPhase::Stopped) | Some(VmPhase::Failed) | Some(VmPhase::Unknown) => Ok(Action::await_change()),
    }
}

async fn start(
    vm: &VirtualMachine,
    api: &Api<VirtualMachine>,
    ctx: &Context,
    uid: &str,
    mut new: VirtualMachineStatus,
) -> Result<Action, Error> {
    if !ctx.leased() {
        // Not an error to report on the VM: the host will renew its lease or the
        // operator will place the VM elsewhere.
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let Some(facts) = ctx.facts() else {
        return Ok(Action::requeue(Duration::from_millis(500)));
    };
    let generation = vm.metadata.generation;
    if !facts.kvm.usable {
        let why = facts.kvm.reason.clone().unwrap_or_default();
        new.phase = Some(VmPhase::Failed);
        new.conditions.set(condition(
            "Ready",
            false,
            reason::NO_KVM,
            format!("{} cannot run VMs: {why}", ctx.node()),
            generation,
        ));
        new.observed_generation = generation;
        status::write_vm(api, vm, &new, &ctx.manager()).await?;
        ctx.events.warning(vm, reason::NO_KVM, "Start", format!("{} cannot run VMs: {why}", ctx.node()));
        return Ok(Action::await_change());
    }
    let dir = VmDir::new(&ctx.settings.runtime_dir, uid);
    let config = match vm_config::build(vm, &facts.offered_cpus(), ctx.node(), &dir) {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(vm = %vm.name_any(), "cannot start: {e}");
            new.phase = Some(VmPhase::Failed);
            new.conditions.set(condition("Ready", false, reason::INVALID_SPEC, e.to_string(), generation));
            new.observed_generation = generation;
            status::write_vm(api, vm, &new, &ctx.manager()).await?;
            ctx.events.warning(vm, reason::INVALID_SPEC, "Start", e.to_string());
            return Ok(Action::await_change());
        }
    };
    add_finalizer(api, vm).await?;
    // Record the decision against the version of the VM it was made on: if the
    // operator placed the VM elsewhere meanwhile, this write conflicts and nothing
    // starts.
    new.phase = Some(VmPhase::Starting);
    new.observed_generation = generation;
    new.host_cpus = config.cpus.host_cpus.clone();
    new.shares = Some(config.shares as i32);
    new.started_at = None;
    new.boot_millis = None;
    new.cpu_usage = None;
    new.conditions.set(condition("Ready", false, reason::STARTING, format!("starting on {}", ctx.node()), generation));
    let fresh = api.get_status(&vm.name_any()).await?;
    if fresh.status.as_ref().and_then(|s| s.node_name.as_deref()) != Some(ctx.node()) {
        return Ok(Action::requeue(POLL_BUSY));
    }
    status::write_vm(api, &fresh, &new, &ctx.manager()).await?;
    let meta = new_meta(&vm.namespace().unwrap_or_default(), &vm.name_any(), uid, Role::Run);
    let args = vec!["run".to_string(), "--config".to_string(), dir.config().display().to_string()];
    ctx.supervisor.start(meta, &config, args, None)?;
    tracing::info!(vm = %vm.name_any(), vcpus = config.vcpus, memory_mib = config.memory_mib, host_cpus = ?config.cpus.host_cpus, "started");
    ctx.events.normal(
        vm,
        "Started",
        "Start",
        format!(
            "started on {}: {} vCPUs, {} MiB, host CPUs {}",
            ctx.node(),
            config.vcpus,
            config.memory_mib,
            config.cpus.host_cpus.as_deref().unwrap_or("all")
        ),
    );
    Ok(Action::requeue(POLL_BUSY))
}

/// A VM whose VMM runs here: apply spec changes, report.
async fn running(vm: &VirtualMachine, api: &Api<VirtualMachine>, ctx: &Context, uid: &str) -> Result<Action, Error> {
    let Some(local) = ctx.supervisor.get(uid) else { return Ok(Action::requeue(POLL_BUSY)) };
    if let Role::Receive { .. } = local.meta.role {
        // A migration brought it here and its status names this host: it is ours now.
        ctx.supervisor.set_role(uid, Role::Run)?;
        tracing::info!(vm = %vm.name_any(), "took over the VM a migration brought here");
    }
    if vm.spec.run_strategy == RunStrategy::Halted {
        ctx.supervisor.kill(uid, StopReason::Halted);
        return Ok(Action::requeue(POLL_BUSY));
    }
    let client = VmmClient::new(&local.dir.api_socket());
    let Ok(mut vmm) = client.status().await else {
        // The VMM is still setting up its control socket.
        return Ok(Action::requeue(POLL_BUSY));
    };
    let status = vm.status.clone().unwrap_or_default();
    let mut new = status.clone();
    let generation = vm.metadata.generation;

    // Live changes: host CPUs and priority, applied without a restart.
    let offered = ctx.facts().map(|f| f.offered_cpus()).unwrap_or_default();
    let (mut applied, mut changed) = (true, false);
    match vm_config::desired_host_cpus(vm, &offered, ctx.node()) {
        Ok(want) if !offered.is_empty() && !cpus_in_effect(vm, &want, &host_cpus(&vmm)) => {
            match client.set_host_cpus(&want).await {
                Ok(()) => {
                    changed = true;
                    tracing::info!(vm = %vm.name_any(), host_cpus = %want, "host CPUs changed on the running VM");
                }
                Err(e) => {
                    applied = false;
                    new.conditions.set(condition("CpuConfigApplied", false, "Refused", e.to_string(), generation));
                }
            }
        }
        Ok(_) => {}
        Err(e) => {
            applied = false;
            new.conditions.set(condition("CpuConfigApplied", false, reason::INVALID_SPEC, e.to_string(), generation));
        }
    }
    let shares = vm.spec.cpu.effective_shares();
    if shares != vmm.shares {
        match client.set_shares(shares).await {
            Ok(()) => {
                changed = true;
                tracing::info!(vm = %vm.name_any(), shares, "priority changed on the running VM");
            }
            Err(e) => {
                applied = false;
                new.conditions.set(condition("CpuConfigApplied", false, "Refused", e.to_string(), generation));
            }
        }
    }
    if changed {
        // What the VMM now reports (its CPU lists and change times) goes to status.
        vmm = client.status().await?;
        ctx.events.normal(
            vm,
            "CpuConfigChanged",
            "Reconfigure",
            format!("host CPUs {}, {} shares, without a restart", host_cpus(&vmm), vmm.shares),
        );
    }
    if applied {
        new.observed_generation = generation;
        if status.conditions.get("CpuConfigApplied").is_some() {
            new.conditions.set(condition(
                "CpuConfigApplied",
                true,
                "Applied",
                "host CPUs and priority in effect",
                generation,
            ));
        }
    }

    let started_ms = local.meta.started_at_ms;
    new.phase = Some(if new.migration.is_some() { VmPhase::Migrating } else { VmPhase::Running });
    new.host_cpus = Some(host_cpus(&vmm));
    new.numa_nodes = Some(vmm.numa_nodes.clone()).filter(|n| !n.is_empty());
    new.shares = Some(vmm.shares as i32);
    new.cpu_changed_at = vmm.cpus_changed_at_ms.max(vmm.priority_changed_at_ms).and_then(time_ms);
    // Kept across migrations: the guest started then, whatever VMM runs it now.
    if new.started_at.is_none() {
        new.started_at = time_ms(started_ms);
    }
    if new.boot_millis.is_none() {
        new.boot_millis = vmm.boot_time_ms.map(|ms| ms as i64);
    }
    if let Some(cores) = ctx.supervisor.cpu_usage(uid) {
        // Rounded to 50m, so an idle or steady VM does not cause a write per sample.
        new.cpu_usage = Some(format!("{}m", ((cores * 1000.0 / 50.0).round() * 50.0) as i64));
    }
    new.console_url = Some(format!(
        "{}/vms/{}/{}/console",
        ctx.settings.http_url(),
        vm.namespace().unwrap_or_default(),
        vm.name_any()
    ));
    new.conditions.set(condition(
        "Ready",
        true,
        reason::RUNNING,
        format!("running on {} ({})", ctx.node(), vmm.state),
        generation,
    ));
    if status::write_vm(api, vm, &new, &ctx.manager()).await?
        && status.phase != Some(VmPhase::Running)
        && new.phase == Some(VmPhase::Running)
    {
        tracing::info!(vm = %vm.name_any(), boot_ms = ?new.boot_millis, since_start_ms = crate::vm_dir::unix_ms().saturating_sub(started_ms), "running");
    }
    Ok(Action::requeue(POLL_RUNNING))
}

/// Whether the vCPUs already run where the spec wants them: on exactly those CPUs
/// (Shared), or each on one of them (Dedicated: the VMM pins to a subset of the list).
fn cpus_in_effect(vm: &VirtualMachine, want: &str, now: &str) -> bool {
    let (Ok(want), Ok(now)) = (drover_topology::CpuSet::parse(want), drover_topology::CpuSet::parse(now)) else {
        return false;
    };
    if vm.spec.cpu.placement == drover_crds::vm::CpuPlacement::Dedicated {
        !now.is_empty() && now.iter().all(|cpu| want.contains(cpu))
    } else {
        now == want
    }
}

async fn add_finalizer(api: &Api<VirtualMachine>, vm: &VirtualMachine) -> Result<(), Error> {
    if vm.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let mut finalizers = vm.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    set_finalizers(api, vm, finalizers).await
}

async fn remove_finalizer(api: &Api<VirtualMachine>, vm: &VirtualMachine) -> Result<(), Error> {
    if !vm.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let finalizers = vm.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    match set_finalizers(api, vm, finalizers).await {
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => Ok(()),
        other => other,
    }
}

/// A merge patch replaces the whole list; the resourceVersion makes sure it is the
/// list we read (another controller's finalizer is never dropped).
async fn set_finalizers(api: &Api<VirtualMachine>, vm: &VirtualMachine, finalizers: Vec<String>) -> Result<(), Error> {
    let patch =
        serde_json::json!({ "metadata": { "resourceVersion": vm.resource_version(), "finalizers": finalizers } });
    api.patch(&vm.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// What the controller does with an error: log it and look again soon. Conflicts
/// are routine (someone wrote first) and retried at once.
pub fn error_policy(vm: Arc<VirtualMachine>, error: &Error, _ctx: Arc<Context>) -> Action {
    status::retry(vm.as_ref(), error, Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(placement: &str) -> VirtualMachine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachine", "metadata": { "name": "v" },
            "spec": { "cpu": { "vcpus": 2, "placement": placement }, "memory": { "size": "64Mi" }, "boot": { "kernel": "/k" } }
        }))
        .unwrap()
    }

    #[test]
    fn dedicated_vcpus_on_a_subset_of_the_list_need_no_change_shared_ones_do() {
        // Dedicated: the VMM pinned the two vCPUs to 2 and 3 out of 2-5.
        assert!(cpus_in_effect(&vm("Dedicated"), "2-5", "2-3"));
        assert!(!cpus_in_effect(&vm("Dedicated"), "4-5", "2-3"), "pinned outside the new list");
        // Shared: the threads float over exactly the list.
        assert!(cpus_in_effect(&vm("Shared"), "0-3", "0-3"));
        assert!(!cpus_in_effect(&vm("Shared"), "0-3", "0-1"));
        assert!(!cpus_in_effect(&vm("Shared"), "0-3", ""), "unknown: apply");
    }
}
