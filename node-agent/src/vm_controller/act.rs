//! Carries out a [`Plan`]: the VM controller's writes to the API server, its orders
//! to the supervisor and the VMM, its Events and log lines. What to do was decided
//! before (`decide`); what is left here are the steps whose outcome only the
//! world knows (a spec's files on this host, a write that conflicts, a VMM that
//! refuses a change), each followed by the pure function that says what it means.

use drover_crds::contract::finalizers::VM_AGENT as FINALIZER;
use drover_crds::contract::reasons;
use drover_crds::vm::{VirtualMachine, VirtualMachineStatus, VmPhase};
use drover_topology::CpuSet;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use super::decide::{self, Event, Next, POLL_BUSY, POLL_RUNNING, Plan, Report};
use super::running::{self, Outcome, Seen};
use crate::Error;
use crate::context::Context;
use crate::events;
use crate::status;
use crate::supervisor::new_meta;
use crate::vm_config;
use crate::vm_dir::{Role, StopReason, VmDir, unix_ms};
use crate::vmm_client::{VmmClient, host_cpus};

/// The controller's log lines keep the target they had before it was split into
/// modules: operators filter on it, and the e2e tests read the log.
const TARGET: &str = "drover_agent::vm_controller";

pub async fn act(plan: Plan, vm: &VirtualMachine, ctx: &Context, uid: &str) -> Result<Action, Error> {
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    let mut plan = plan;
    loop {
        match plan {
            Plan::Wait(next) => return Ok(next.into()),
            Plan::TakeOver(rest) => {
                ctx.supervisor.set_role(uid, Role::Run)?;
                tracing::info!(target: TARGET, vm = %vm.name_any(), "took over the VM a migration brought here");
                plan = *rest;
            }
            Plan::PowerOff(reason) => {
                if reason == StopReason::PlacedElsewhere {
                    tracing::warn!(target: TARGET, vm = %vm.name_any(), placed = ?vm.status.as_ref().and_then(|s| s.node_name.clone()), "VM runs here but is placed elsewhere: powering it off");
                }
                ctx.supervisor.kill(uid, reason);
                return Ok(Next::After(POLL_BUSY).into());
            }
            Plan::CancelSend => {
                if let Some(local) = ctx.supervisor.get(uid) {
                    let result = VmmClient::new(&local.dir.api_socket()).cancel_migration().await;
                    tracing::info!(target: TARGET, vm = %vm.name_any(), migration = ?vm.status.as_ref().and_then(|s| s.migration.clone()), ok = result.is_ok(), "the migration of this send is gone: send cancelled");
                }
                return Ok(Next::After(POLL_BUSY).into());
            }
            Plan::Forget => {
                ctx.supervisor.forget(uid);
                return Ok(Next::Change.into());
            }
            Plan::Reboot(rest) => {
                tracing::info!(target: TARGET, vm = %vm.name_any(), "guest reset: starting it again");
                ctx.supervisor.forget(uid);
                plan = *rest;
            }
            Plan::ReleaseFinalizer => {
                remove_finalizer(&api, vm).await?;
                return Ok(Next::Change.into());
            }
            Plan::Deleted => {
                ctx.supervisor.forget(uid);
                remove_finalizer(&api, vm).await?;
                tracing::info!(target: TARGET, vm = %vm.name_any(), "deleted");
                return Ok(Next::Change.into());
            }
            Plan::Report(report) => return write_report(*report, &api, vm, ctx, uid).await,
            Plan::Start { status, offered } => return start(&api, vm, ctx, uid, *status, &offered).await,
            Plan::Run { offered } => return run(&api, vm, ctx, uid, &offered).await,
        }
    }
}

async fn write_report(
    report: Report,
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    ctx: &Context,
    uid: &str,
) -> Result<Action, Error> {
    if let Some(line) = &report.log {
        tracing::info!(target: TARGET, vm = %vm.name_any(), "{line}");
    }
    status::write_vm(api, vm, &report.status, &ctx.manager()).await?;
    if let Some(event) = report.event {
        publish(ctx, vm, event);
    }
    // Only now that its end is on record: forgetting first would leave a VM whose
    // status says it runs and nothing here to say otherwise.
    if report.forget {
        ctx.supervisor.forget(uid);
    }
    Ok(report.next.into())
}

fn publish(ctx: &Context, vm: &VirtualMachine, event: Event) {
    if event.warning {
        ctx.events.warning(vm, event.reason, event.action, event.note);
    } else {
        ctx.events.normal(vm, event.reason, event.action, event.note);
    }
}

/// Starts the VM's VMM: its configuration from the spec (checked on this host),
/// the finalizer, `Starting` recorded against a fresh read, then the VMM.
async fn start(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    ctx: &Context,
    uid: &str,
    status: VirtualMachineStatus,
    offered: &CpuSet,
) -> Result<Action, Error> {
    let dir = VmDir::new(&ctx.settings.runtime_dir, uid);
    let config = match vm_config::build(vm, offered, ctx.node(), &dir) {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(target: TARGET, vm = %vm.name_any(), "cannot start: {e}");
            let refused = decide::invalid_spec(vm, status, &e.to_string(), status::now());
            status::write_vm(api, vm, &refused, &ctx.manager()).await?;
            ctx.events.warning(vm, reasons::INVALID_SPEC, "Start", e.to_string());
            return Ok(Next::Change.into());
        }
    };
    add_finalizer(api, vm).await?;
    // Record the decision against the VM it was made on. The finalizer write has
    // moved the resourceVersion on, so the write goes against a fresh read, and
    // only if that read still has the status and spec the decision was made on: if
    // the operator placed the VM elsewhere, asked for a stop or changed its CPUs
    // meanwhile (or the spec changed), nothing starts and the VM is looked at
    // again; a change after the read makes the write conflict.
    let starting = decide::starting(vm, status, &config, ctx.node(), status::now());
    let fresh = api.get_status(&vm.name_any()).await?;
    if fresh.status != vm.status || fresh.metadata.generation != vm.metadata.generation {
        return Ok(Next::After(POLL_BUSY).into());
    }
    status::write_vm(api, &fresh, &starting, &ctx.manager()).await?;
    let meta = new_meta(&vm.namespace().unwrap_or_default(), &vm.name_any(), uid, Role::Run);
    let args = vec!["run".to_string(), "--config".to_string(), dir.config().display().to_string()];
    ctx.supervisor.start(meta, &config, args, None)?;
    tracing::info!(target: TARGET, vm = %vm.name_any(), vcpus = config.vcpus, memory_mib = config.memory_mib, host_cpus = ?config.cpus.host_cpus, "started");
    ctx.events.normal(
        vm,
        events::reasons::STARTED,
        "Start",
        format!(
            "started on {}: {} vCPUs, {} MiB, host CPUs {}",
            ctx.node(),
            config.vcpus,
            config.memory_mib,
            config.cpus.host_cpus.as_deref().unwrap_or("all")
        ),
    );
    Ok(Next::After(POLL_BUSY).into())
}

/// A VM whose VMM runs here: apply spec changes, report.
async fn run(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    ctx: &Context,
    uid: &str,
    offered: &CpuSet,
) -> Result<Action, Error> {
    let Some(local) = ctx.supervisor.get(uid) else { return Ok(Next::After(POLL_BUSY).into()) };
    let client = VmmClient::new(&local.dir.api_socket());
    let Ok(mut vmm) = client.status().await else {
        // The VMM is still setting up its control socket.
        return Ok(Next::After(POLL_BUSY).into());
    };

    // Live changes: host CPUs and priority, applied without a restart.
    let changes = running::changes(vm, &vmm, offered, ctx.node());
    let mut outcome = Outcome::default();
    if let Some(want) = &changes.host_cpus {
        let result = client.set_host_cpus(want).await.map_err(|e| e.to_string());
        if result.is_ok() {
            tracing::info!(target: TARGET, vm = %vm.name_any(), host_cpus = %want, "host CPUs changed on the running VM");
        }
        outcome.host_cpus = Some(result);
    }
    if let Some(shares) = changes.shares {
        let result = client.set_shares(shares).await.map_err(|e| e.to_string());
        if result.is_ok() {
            tracing::info!(target: TARGET, vm = %vm.name_any(), shares, "priority changed on the running VM");
        }
        outcome.shares = Some(result);
    }
    if outcome.changed() {
        // What the VMM now reports (its CPU lists and change times) goes to status.
        vmm = client.status().await?;
        ctx.events.normal(
            vm,
            events::reasons::CPU_CONFIG_CHANGED,
            "Reconfigure",
            format!("host CPUs {}, {} shares, without a restart", host_cpus(&vmm), vmm.shares),
        );
    }

    let started_ms = local.meta.started_at_ms;
    let agent_url = ctx.settings.http_url();
    let new = running::status(&Seen {
        vm,
        node: ctx.node(),
        vmm: &vmm,
        changes: &changes,
        outcome: &outcome,
        started_at_ms: started_ms,
        cpu_usage: ctx.supervisor.cpu_usage(uid),
        agent_url: &agent_url,
        now: status::now(),
    });
    let was = vm.status.as_ref().and_then(|s| s.phase);
    if status::write_vm(api, vm, &new, &ctx.manager()).await?
        && was != Some(VmPhase::Running)
        && new.phase == Some(VmPhase::Running)
    {
        tracing::info!(target: TARGET, vm = %vm.name_any(), boot_ms = ?new.boot_millis, since_start_ms = unix_ms().saturating_sub(started_ms), "running");
    }
    Ok(Next::After(POLL_RUNNING).into())
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
        Err(e) if e.is_not_found() => Ok(()),
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
