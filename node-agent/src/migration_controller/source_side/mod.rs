//! The source's shell: looks at the migration's VM, this host's VMM that runs it and
//! what that VMM says of the send, decides (`decide`), and carries it out: asks the
//! VMM to migrate (`PUT /vm/migrate`), copies its progress into the migration's
//! status, and at the end moves the VM's `status.nodeName` to the target (unless
//! the target agent has already: whoever sees the hand-over first records it) or
//! leaves the VM running here. Once the migration has failed (the operator may end
//! one under way), it settles the send (`settle`): cancels it, or moves the VM if
//! the send had handed it over already.
//!
//! The VM is marked as moving in the migration (`status.migration`) before the
//! VMM is asked to send, and the mark goes only once the send has ended without
//! handing the VM over: while it is there, the target keeps its receiving VMM.

use drover_crds::contract::reasons;
use drover_crds::migration::{MigrationPhase, VirtualMachineMigration, VirtualMachineMigrationStatus};
use drover_crds::vm::VirtualMachine;
use kube::{Api, ResourceExt};

use super::failure::Failure;
use super::report::{self, TARGET};
use super::secret;
use crate::Error;
use crate::context::Context;
use crate::events;
use crate::files::read_json;
use crate::handover;
use crate::next::Next;
use crate::status;
use crate::supervisor::{LocalVm, VmmState};
use crate::vm_dir::{Outgoing, Role};
use crate::vmm_client::{MigrationStatus, VmmClient};

mod decide;

use decide::{Observed, POLL, Plan, Settle};

/// Starts the send, or follows it.
pub async fn drive(
    migration: &VirtualMachineMigration,
    api: &Api<VirtualMachineMigration>,
    vms: &Api<VirtualMachine>,
    ctx: &Context,
) -> Result<Next, Error> {
    let vm = vms.get_opt(&migration.spec.vm_name).await?;
    let sending = migration.status.as_ref().is_some_and(|s| s.phase != Some(MigrationPhase::Scheduled));
    let (local, observed) = observe(migration, vm.as_ref(), ctx, sending).await;
    let shell = Shell { migration, api, vms, ctx };
    match decide::decide(&observed) {
        Plan::Fail { status, failure, release_vm } => {
            report::fail(api, migration, &status, &failure, ctx).await?;
            if let (true, Some(vm)) = (release_vm, &vm) {
                set_migrating(vms, vm, ctx, None).await?;
            }
            Ok(Next::Change)
        }
        Plan::Send { status, address } => {
            // Only `Send` follows from a running VMM of an existing VM.
            let (Some(vm), Some(local)) = (&vm, &local) else { return Ok(Next::Change) };
            shell.send(vm, local, &status, &address).await
        }
        Plan::Follow { status, write } => {
            if write {
                status::write_migration(api, migration, &status, &ctx.manager()).await?;
            }
            Ok(Next::After(POLL))
        }
        Plan::Succeed { status, target } => {
            let Some(vm) = &vm else { return Ok(Next::Change) };
            shell.succeed(vm, &status, &target).await
        }
    }
}

/// How long one look at a failed migration waits for a cancelled send to end. The
/// operator may remove a migration it failed soon after (a deleted one goes once
/// its Secret is gone): the send is settled in this look, not a later one.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Settles the send of a migration that has failed (see `decide::settle`); the
/// migration's status is not written. A send still under way is cancelled and
/// followed here until it ends (or `SETTLE_WAIT` passes: then it is looked at again).
pub async fn settle(
    migration: &VirtualMachineMigration,
    vms: &Api<VirtualMachine>,
    ctx: &Context,
) -> Result<Next, Error> {
    let Some(vm) = vms.get_opt(&migration.spec.vm_name).await? else { return Ok(Next::Change) };
    let name = migration.name_any();
    let deadline = std::time::Instant::now() + SETTLE_WAIT;
    let mut asked = false;
    loop {
        let (local, observed) = observe(migration, Some(&vm), ctx, true).await;
        match decide::settle(&observed) {
            Settle::Nothing => return Ok(Next::Change),
            Settle::Wait(next) | Settle::Cancel(next) if std::time::Instant::now() >= deadline => return Ok(next),
            Settle::Wait(_) => {}
            Settle::Cancel(_) => {
                if let Some(local) = &local {
                    // Refused when the send has just ended, or is past the point of
                    // no return: what the VMM says next tells which.
                    let result = VmmClient::new(&local.dir.api_socket()).cancel_migration().await;
                    if !asked {
                        match result {
                            Ok(()) => {
                                tracing::info!(target: TARGET, migration = %name, "migration failed while the VMM sent: send cancelled")
                            }
                            Err(e) => {
                                tracing::info!(target: TARGET, migration = %name, "migration failed while the VMM sent; cancel refused: {e}")
                            }
                        }
                        asked = true;
                    }
                }
            }
            Settle::Release => {
                set_migrating(vms, &vm, ctx, None).await?;
                tracing::info!(target: TARGET, migration = %name, "migration failed; the VM stays here");
                return Ok(Next::Change);
            }
            Settle::Move { target, target_cpus } => {
                // `vm` was read at the start of this look, and the write is against
                // its version.
                let moved = decide::moved(&vm, ctx.node(), &target, target_cpus.as_deref(), status::now());
                status::write_vm(vms, &vm, &moved, &ctx.manager()).await?;
                let why = migration
                    .status
                    .as_ref()
                    .and_then(|s| s.failure_message.clone())
                    .unwrap_or_else(|| "no reason given".into());
                let note = format!(
                    "moved from {} to {target} although the migration was ended as failed ({why}): its VMM had already handed the VM over",
                    ctx.node()
                );
                tracing::warn!(target: TARGET, migration = %name, to = %target, "{note}");
                ctx.events.warning(&vm, reasons::MIGRATED, "Migrate", note.clone());
                ctx.events.warning(migration, reasons::MIGRATED, "Migrate", note);
                return Ok(Next::Change);
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Observes the migration's VM, this host's VMM that runs it (role Run) and, with
/// `sending`, what that VMM says of the send.
async fn observe<'a>(
    migration: &'a VirtualMachineMigration,
    vm: Option<&'a VirtualMachine>,
    ctx: &'a Context,
    sending: bool,
) -> (Option<LocalVm>, Observed<'a>) {
    let uid = vm.and_then(|vm| vm.uid()).unwrap_or_default();
    let local = vm.and_then(|_| ctx.supervisor.get(&uid)).filter(|l| l.meta.role == Role::Run);
    let state = local.as_ref().and_then(|_| ctx.supervisor.state(&uid));
    let progress = match &local {
        Some(local) if sending => progress(local, state.as_ref()).await,
        _ => None,
    };
    (local, Observed { migration, node: ctx.node(), vm, local: state, progress, now: status::now() })
}

/// What the source's steps act on.
struct Shell<'a> {
    migration: &'a VirtualMachineMigration,
    api: &'a Api<VirtualMachineMigration>,
    vms: &'a Api<VirtualMachine>,
    ctx: &'a Context,
}

/// What the VMM says of the send: its API while it runs; once it has ended, the
/// figures it left.
async fn progress(local: &LocalVm, state: Option<&VmmState>) -> Option<MigrationStatus> {
    match state {
        Some(VmmState::Running) => VmmClient::new(&local.dir.api_socket()).migration().await.ok(),
        _ => read_json::<MigrationStatus>(&local.dir.migration_figures()).ok(),
    }
}

impl Shell<'_> {
    /// Records the send as started, then asks the VMM to migrate.
    async fn send(
        &self,
        vm: &VirtualMachine,
        local: &LocalVm,
        running: &VirtualMachineMigrationStatus,
        address: &str,
    ) -> Result<Next, Error> {
        let Shell { migration, api, vms, ctx } = *self;
        let name = migration.name_any();
        let secret = match secret::read(ctx, migration).await {
            Ok(secret) => String::from_utf8_lossy(&secret).into_owned(),
            Err(e) => {
                let failure = Failure::source(e.to_string());
                let status = failure.status(
                    migration.status.clone().unwrap_or_default(),
                    migration.metadata.generation,
                    status::now(),
                );
                report::fail(api, migration, &status, &failure, ctx).await?;
                return Ok(Next::Change);
            }
        };
        // Marked first: while the mark is there the target keeps its receiving VMM,
        // so it must be there before any send can start. Where the send goes is
        // recorded here too, for a VMM whose migration is gone once it has sent.
        let target = running.target_node.clone().unwrap_or_default();
        local.dir.write_outgoing(&Outgoing {
            migration: name.clone(),
            target_node: target,
            target_cpus: running.target_cpus.clone(),
        })?;
        set_migrating(vms, vm, ctx, Some(&name)).await?;
        status::write_migration(api, migration, running, &ctx.manager()).await?;
        let figures = local.dir.migration_figures();
        let _ = std::fs::remove_file(&figures);
        let client = VmmClient::new(&local.dir.api_socket());
        if let Err(e) = client.migrate(address, secret.trim(), &migration.spec, &figures).await {
            // The status now on record is the Running one just written, unless the
            // operator has failed the migration meanwhile: its word then stands.
            let fresh = api.get_status(&name).await?;
            if fresh.status.as_ref().and_then(|s| s.phase) == Some(MigrationPhase::Running) {
                let failure = Failure::source(e.to_string());
                let status =
                    failure.status(fresh.status.clone().unwrap_or_default(), fresh.metadata.generation, status::now());
                report::fail(api, &fresh, &status, &failure, ctx).await?;
            }
            set_migrating(vms, vm, ctx, None).await?;
            return Ok(Next::Change);
        }
        tracing::info!(target: TARGET, migration = %name, to = %address, "migration started");
        Ok(Next::After(POLL))
    }

    /// The VM runs on the target: its status names the target from now on (the
    /// target agent may have written that first: then it is left as it is), then
    /// the migration is Succeeded.
    async fn succeed(
        &self,
        vm: &VirtualMachine,
        status: &VirtualMachineMigrationStatus,
        target: &str,
    ) -> Result<Next, Error> {
        let Shell { migration, api, vms, ctx } = *self;
        let vm = vms.get_status(&vm.name_any()).await?;
        let target_cpus = status.target_cpus.as_deref();
        match handover::moved_from(&vm, ctx.node(), target, target_cpus, status::now()) {
            Some(moved) => {
                status::write_vm(vms, &vm, &moved, &ctx.manager()).await?;
            }
            None => {
                tracing::info!(target: TARGET, migration = %migration.name_any(), to = %target, "the VM's status was moved to the target already (by the target agent)");
            }
        }
        status::write_migration(api, migration, status, &ctx.manager()).await?;
        tracing::info!(target: TARGET, migration = %migration.name_any(), to = %target, downtime_us = ?status.downtime_micros, total_ms = ?status.total_millis, bytes = ?status.bytes_transferred, passes = ?status.iterations, "migration succeeded");
        let figures = decide::figures(ctx.node(), target, status);
        ctx.events.normal(&vm, reasons::MIGRATED, "Migrate", figures.clone());
        ctx.events.normal(migration, events::reasons::SUCCEEDED, "Migrate", figures);
        Ok(Next::Change)
    }
}

/// Marks the VM as migrating (or no longer), keeping the rest of its status.
async fn set_migrating(
    vms: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    ctx: &Context,
    migration: Option<&str>,
) -> Result<(), Error> {
    let fresh = vms.get_status(&vm.name_any()).await?;
    // A release is for a VM that stays here: one placed elsewhere since (restarted
    // by HA while this host was cut off, say) is another host's to write.
    if migration.is_none() && !handover::placed_on(&fresh, ctx.node()) {
        return Ok(());
    }
    let status = decide::migrating(&fresh, migration);
    status::write_vm(vms, &fresh, &status, &ctx.manager()).await?;
    Ok(())
}
