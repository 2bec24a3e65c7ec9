//! The target's shell: looks at the migration's VM and this host's VMM of it,
//! decides (`decide`), and carries it out: a receiving `drover-vmm` under a monitor,
//! listening on this host's address, published in `status.targetAddress` once it
//! listens (`targetState: Receiving`); once that VMM runs the guest, the VM's
//! status moved here if the source has not (`Running`); after a failure, that VMM
//! stopped (`Stopped`) unless it runs the VM, or the source has not settled yet
//! whether it will.

use drover_crds::contract::reasons;
use drover_crds::migration::{MigrationTargetState, VirtualMachineMigration, VirtualMachineMigrationStatus};
use drover_crds::vm::VirtualMachine;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use super::failure::Failure;
use super::ports::{free_port, listen_port, listening_ports};
use super::report::{self, TARGET};
use super::secret;
use crate::Error;
use crate::context::Context;
use crate::next::Next;
use crate::status;
use crate::supervisor::{VmmState, new_meta};
use crate::vm_config;
use crate::vm_dir::{Role, StopReason, VmDir};
use crate::vmm_client::VmmClient;

mod decide;

use decide::{Follow, Observed, Plan, Stop, Stopping};

/// How soon a receiving VMM that does not listen yet is looked at again.
const POLL_LISTEN: std::time::Duration = std::time::Duration::from_millis(50);
/// How soon a published target is looked at again.
const POLL_PUBLISHED: std::time::Duration = std::time::Duration::from_secs(1);

/// Gets this host ready to receive, or fails the migration saying why.
pub async fn prepare(
    migration: &VirtualMachineMigration,
    api: &Api<VirtualMachineMigration>,
    vms: &Api<VirtualMachine>,
    ctx: &Context,
) -> Result<Action, Error> {
    let vm = vms.get_opt(&migration.spec.vm_name).await?;
    let uid = vm.as_ref().and_then(|vm| vm.uid()).unwrap_or_default();
    let (_, observed) = observe(migration, vm.as_ref(), ctx, false).await;
    let mut plan = decide::decide(&observed);
    loop {
        match plan {
            Plan::Fail { status, failure } => {
                report::fail(api, migration, &status, &failure, ctx).await?;
                return Ok(Action::await_change());
            }
            Plan::Publish => return publish(migration, api, ctx, &VmDir::new(&ctx.settings.runtime_dir, &uid)).await,
            Plan::Replace(rest) => {
                ctx.supervisor.forget(&uid);
                plan = *rest;
            }
            Plan::Receive { host_cpus } => {
                // Only `Receive` follows from a VM that exists.
                let Some(vm) = &vm else { return Ok(Action::await_change()) };
                return receive(migration, api, ctx, vm, &uid, host_cpus).await;
            }
            Plan::Wait(next) => return Ok(next.into()),
        }
    }
}

/// Follows this host's receiving VMM while the migration is under way: once it
/// runs the guest, records it (`targetState: Running`), moving the VM's status
/// here first if the source has not.
pub async fn follow(
    migration: &VirtualMachineMigration,
    api: &Api<VirtualMachineMigration>,
    vms: &Api<VirtualMachine>,
    ctx: &Context,
) -> Result<Next, Error> {
    let vm = vms.get_opt(&migration.spec.vm_name).await?;
    let (_, observed) = observe(migration, vm.as_ref(), ctx, true).await;
    match decide::follow(&observed) {
        Follow::Wait(next) => Ok(next),
        Follow::Record(state) => {
            record(migration, api, ctx, state).await?;
            Ok(Next::Change)
        }
        Follow::TakeOver => {
            let Some(vm) = &vm else { return Ok(Next::Change) };
            take_over(migration, api, vms, ctx, vm, &observed, "its source has not recorded the hand-over").await?;
            Ok(Next::Change)
        }
    }
}

/// Stops this host's receiving VMM of a migration that failed (the VM still runs
/// on its source), once the source has settled its send (or right away, its host
/// having failed); keeps one that runs the VM, and takes the VM over. Then says
/// so in `targetState`.
pub async fn stop(
    migration: &VirtualMachineMigration,
    api: &Api<VirtualMachineMigration>,
    vms: &Api<VirtualMachine>,
    ctx: &Context,
) -> Result<Next, Error> {
    let vm = vms.get_opt(&migration.spec.vm_name).await?;
    let (uid, observed) = observe(migration, vm.as_ref(), ctx, true).await;
    let Stopping { vmm, record: state } = decide::stop(&observed);
    let next = match vmm {
        Stop::Forget { power_off } => {
            if power_off {
                ctx.supervisor.kill(&uid, StopReason::MigrationFailed);
            }
            ctx.supervisor.forget(&uid);
            tracing::info!(target: TARGET, migration = %migration.name_any(), "migration failed; receiving VMM stopped");
            Next::Change
        }
        Stop::Wait(next) => next,
        Stop::TakeOver => {
            let Some(vm) = &vm else { return Ok(Next::Change) };
            let why = migration.status.as_ref().and_then(|s| s.failure_message.clone()).unwrap_or_default();
            let note = format!("the migration ended as failed ({why}), but the VMM here runs the VM already");
            tracing::warn!(target: TARGET, migration = %migration.name_any(), vm = %vm.name_any(), "{note}: kept");
            take_over(migration, api, vms, ctx, vm, &observed, &note).await?;
            return Ok(Next::Change);
        }
        Stop::Leave => Next::Change,
    };
    if let Some(state) = state {
        record(migration, api, ctx, state).await?;
    }
    Ok(next)
}

/// Moves the VM's status here from the source, against the version read (a
/// conflict: the source moved it meanwhile, or something else changed; the next
/// look decides again), then records `targetState: Running`.
async fn take_over(
    migration: &VirtualMachineMigration,
    api: &Api<VirtualMachineMigration>,
    vms: &Api<VirtualMachine>,
    ctx: &Context,
    vm: &VirtualMachine,
    observed: &Observed<'_>,
    why: &str,
) -> Result<(), Error> {
    let moved = decide::taken_over(observed, vm);
    status::write_vm(vms, vm, &moved, &ctx.manager()).await?;
    let from = migration.status.as_ref().and_then(|s| s.source_node.clone()).unwrap_or_default();
    let note = format!("moved from {from} to {}: its VMM here runs the VM ({why})", ctx.node());
    tracing::info!(target: TARGET, migration = %migration.name_any(), vm = %vm.name_any(), "{note}");
    ctx.events.normal(vm, reasons::MIGRATED, "Migrate", note);
    record(migration, api, ctx, MigrationTargetState::Running).await
}

/// Writes the target's word on its VMM of the migration.
async fn record(
    migration: &VirtualMachineMigration,
    api: &Api<VirtualMachineMigration>,
    ctx: &Context,
    state: MigrationTargetState,
) -> Result<(), Error> {
    let status = decide::recording(migration.status.clone().unwrap_or_default(), state);
    if status::write_migration(api, migration, &status, &ctx.manager()).await? {
        tracing::info!(target: TARGET, migration = %migration.name_any(), "target state: {state:?}");
    }
    Ok(())
}

/// Observes the migration's VM from this host, and the uid of this host's VMM of
/// it (the VM's; without the VM, that of a receiving VMM of this migration left
/// for it). With `ask_vmm`, a receiving VMM of this migration that still runs is
/// asked whether it runs the VM yet.
async fn observe<'a>(
    migration: &'a VirtualMachineMigration,
    vm: Option<&'a VirtualMachine>,
    ctx: &'a Context,
    ask_vmm: bool,
) -> (String, Observed<'a>) {
    let ours = Role::Receive { migration: migration.name_any() };
    let found = match vm {
        Some(vm) => vm.uid().and_then(|uid| ctx.supervisor.get(&uid)),
        None => ctx.supervisor.all().into_iter().find(|l| {
            l.meta.role == ours
                && l.meta.name == migration.spec.vm_name
                && Some(l.meta.namespace.as_str()) == migration.namespace().as_deref()
        }),
    };
    let uid = found.as_ref().map(|l| l.meta.uid.clone()).unwrap_or_default();
    let local = found.as_ref().and_then(|l| Some((l.meta.role.clone(), ctx.supervisor.state(&uid)?)));
    let resumed = match (&found, &local) {
        (Some(l), Some((role, VmmState::Running))) if ask_vmm && *role == ours => {
            VmmClient::new(&l.dir.api_socket()).status().await.is_ok()
        }
        _ => false,
    };
    let offered = ctx.facts().map(|f| f.offered_cpus()).unwrap_or_default();
    let observed =
        Observed { migration, node: ctx.node(), vm, local, leased: ctx.leased(), offered, resumed, now: status::now() };
    (uid, observed)
}

/// Starts a receiving VMM: the Secret's key into its directory, the configuration
/// the VM will arrive with, a free port on this host's address.
async fn receive(
    migration: &VirtualMachineMigration,
    api: &Api<VirtualMachineMigration>,
    ctx: &Context,
    vm: &VirtualMachine,
    uid: &str,
    host_cpus: String,
) -> Result<Action, Error> {
    let name = migration.name_any();
    let secret = match secret::read(ctx, migration).await {
        Ok(secret) => secret,
        Err(e) => return fail(migration, api, ctx, e.to_string()).await,
    };
    let facts = ctx.facts();
    let dir = VmDir::new(&ctx.settings.runtime_dir, uid);
    let config = match vm_config::build_expected(vm, host_cpus, ctx.node(), &dir) {
        Ok(config) => config,
        Err(e) => return fail(migration, api, ctx, e.to_string()).await,
    };
    let port = free_port(ctx)?;
    let listen = std::net::SocketAddr::new(ctx.settings.address, port).to_string();
    let args = decide::receive_args(
        &listen,
        &dir.secret(),
        &dir.config(),
        &dir.api_socket(),
        config.cpus.host_cpus.as_deref(),
        facts.as_ref(),
    );
    let meta = new_meta(&vm.namespace().unwrap_or_default(), &vm.name_any(), uid, Role::Receive { migration: name });
    let local = ctx.supervisor.start(meta, &config, args, Some(&secret))?;
    tracing::info!(target: TARGET, migration = %migration.name_any(), vm = %vm.name_any(), port, "receiving VMM started");
    publish(migration, api, ctx, &local.dir).await
}

/// Fails the migration: this host cannot receive it.
async fn fail(
    migration: &VirtualMachineMigration,
    api: &Api<VirtualMachineMigration>,
    ctx: &Context,
    why: String,
) -> Result<Action, Error> {
    let failure = Failure::target(why);
    let status =
        failure.status(migration.status.clone().unwrap_or_default(), migration.metadata.generation, status::now());
    report::fail(api, migration, &status, &failure, ctx).await?;
    Ok(Action::await_change())
}

/// Publishes where the receiving VMM in `dir` listens, once it does.
async fn publish(
    migration: &VirtualMachineMigration,
    api: &Api<VirtualMachineMigration>,
    ctx: &Context,
    dir: &VmDir,
) -> Result<Action, Error> {
    let Some(port) = listen_port(dir) else { return Ok(Next::After(POLL_LISTEN).into()) };
    if !listening_ports().contains(&port) {
        return Ok(Next::After(POLL_LISTEN).into());
    }
    let address = std::net::SocketAddr::new(ctx.settings.address, port).to_string();
    let status: VirtualMachineMigrationStatus = migration.status.clone().unwrap_or_default();
    let status = decide::listening(migration, status, address, status::now());
    status::write_migration(api, migration, &status, &ctx.manager()).await?;
    Ok(Next::After(POLL_PUBLISHED).into())
}
