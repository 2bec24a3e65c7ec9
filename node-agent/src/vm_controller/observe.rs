//! What the VM controller looks at before it decides: gathered here, so that
//! `decide` reads no file, socket or clock.

use drover_crds::migration::{MigrationPhase, VirtualMachineMigration};
use drover_crds::vm::VirtualMachine;
use kube::{Api, ResourceExt};

use super::decide::{LocalVmm, Observed, Orphan};
use crate::context::Context;
use crate::host_facts::HostFacts;
use crate::status;
use crate::supervisor::{LocalVm, VmmState};
use crate::vm_dir::Role;
use crate::vmm_client::{Phase, VmmClient};

/// Observes `vm` (uid `uid`) from this host.
pub async fn observe<'a>(
    vm: &'a VirtualMachine,
    ctx: &'a Context,
    uid: &str,
    facts: Option<&'a HostFacts>,
) -> Observed<'a> {
    let here = vm.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(ctx.node());
    let local = match (ctx.supervisor.get(uid), ctx.supervisor.state(uid)) {
        (Some(local), Some(state)) => {
            let stop_reason = if matches!(state, VmmState::Ended(_)) { local.dir.read_stop_reason() } else { None };
            // Only a VMM that runs a VM placed elsewhere is asked: it may be the
            // source of a migration that has just handed the VM over.
            let handed_over = if !here && local.meta.role == Role::Run && state == VmmState::Running {
                let client = VmmClient::new(&local.dir.api_socket());
                client.migration().await.is_ok_and(|m| m.phase == Phase::Completed)
            } else {
                false
            };
            let orphan = if here { orphan(vm, ctx, &local, &state).await } else { None };
            let unrecorded_send = !here
                && local.meta.role == Role::Run
                && matches!(&state, VmmState::Ended(r) if r.is_migrated())
                && unrecorded_send(vm, ctx, &local).await;
            let migration_gone = !here && receiving_for_gone(vm, ctx, &local, &state).await;
            Some(LocalVmm {
                role: local.meta.role,
                state,
                stop_reason,
                handed_over,
                orphan,
                unrecorded_send,
                migration_gone,
            })
        }
        _ => None,
    };
    Observed { vm, node: ctx.node(), local, leased: ctx.leased(), facts, now: status::now() }
}

/// The send of a VM marked as moving in a migration that no longer exists, made by
/// its VMM here (running, or ended "migrated"): nobody else settles it. Looked for
/// only while the VM is marked.
async fn orphan(vm: &VirtualMachine, ctx: &Context, local: &LocalVm, state: &VmmState) -> Option<Orphan> {
    let name = vm.status.as_ref()?.migration.as_deref()?;
    let sent = local.meta.role == Role::Run
        && (*state == VmmState::Running || matches!(state, VmmState::Ended(r) if r.is_migrated()));
    if !sent {
        return None;
    }
    let api: Api<VirtualMachineMigration> = Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    // Only a migration known to be gone: an error says nothing.
    if !matches!(api.get_opt(name).await, Ok(None)) {
        return None;
    }
    let phase = if *state == VmmState::Running {
        VmmClient::new(&local.dir.api_socket()).migration().await.ok().map(|m| m.phase)
    } else {
        None
    };
    Some(Orphan { phase, outgoing: local.dir.read_outgoing().filter(|o| o.migration == name) })
}

/// Whether the send this VMM made (it ended "migrated") is still under way in its
/// migration, which this host's migration controller then still has to record with
/// the figures the VMM left in its directory: the target may have moved the VM's
/// status first. An error says nothing, and keeps the directory a while longer.
async fn unrecorded_send(vm: &VirtualMachine, ctx: &Context, local: &LocalVm) -> bool {
    let Some(outgoing) = local.dir.read_outgoing() else { return false };
    let api: Api<VirtualMachineMigration> = Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    match api.get_opt(&outgoing.migration).await {
        Ok(Some(m)) => m.status.as_ref().is_some_and(|s| {
            matches!(s.phase, Some(MigrationPhase::Running | MigrationPhase::Switchover))
                && s.source_node.as_deref() == Some(ctx.node())
        }),
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Whether this receiving VMM, which still runs, is left from a migration that no
/// longer exists, while the VM is not marked as moving in it (its source has
/// settled the send): nobody else will stop it. Asked only then.
async fn receiving_for_gone(vm: &VirtualMachine, ctx: &Context, local: &LocalVm, state: &VmmState) -> bool {
    let Role::Receive { migration } = &local.meta.role else { return false };
    let marked = vm.status.as_ref().and_then(|s| s.migration.as_deref()) == Some(migration.as_str());
    if marked || *state != VmmState::Running {
        return false;
    }
    let api: Api<VirtualMachineMigration> = Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    // Only a migration known to be gone: an error says nothing.
    matches!(api.get_opt(migration).await, Ok(None))
}
