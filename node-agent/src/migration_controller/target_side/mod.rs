//! The target's shell: looks at the migration's VM and this host's VMM of it,
//! decides (`decide`), and carries it out: a receiving `drover-vmm` under a monitor,
//! listening on this host's address, published in `status.targetAddress` once it
//! listens; after a failure, that VMM stopped (unless it runs the VM, or the source
//! has not settled yet whether it will).

use drover_crds::migration::{VirtualMachineMigration, VirtualMachineMigrationStatus};
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

use decide::{Observed, Plan, Stop};

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
    let observed = observe(migration, vm.as_ref(), &uid, ctx, false).await;
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

/// Stops this host's receiving VMM of a migration that failed (the VM still runs
/// on its source), once the source has settled its send; keeps one that runs the VM.
pub async fn stop(
    migration: &VirtualMachineMigration,
    vms: &Api<VirtualMachine>,
    ctx: &Context,
) -> Result<Next, Error> {
    let vm = vms.get_opt(&migration.spec.vm_name).await?;
    let uid = vm.as_ref().and_then(|vm| vm.uid()).unwrap_or_default();
    match decide::stop(&observe(migration, vm.as_ref(), &uid, ctx, true).await) {
        Stop::Forget { power_off } => {
            if power_off {
                ctx.supervisor.kill(&uid, StopReason::MigrationFailed);
            }
            ctx.supervisor.forget(&uid);
            tracing::info!(target: TARGET, migration = %migration.name_any(), "migration failed; receiving VMM stopped");
            Ok(Next::Change)
        }
        Stop::Wait(next) => Ok(next),
        Stop::Keep => {
            tracing::warn!(target: TARGET, migration = %migration.name_any(), vm = %migration.spec.vm_name, "migration ended as failed, but the VM runs here already: kept (the source moves its status here)");
            Ok(Next::Change)
        }
        Stop::Leave => Ok(Next::Change),
    }
}

/// Observes the migration's VM from this host. With `ask_vmm`, a receiving VMM of
/// this migration that still runs is asked whether it runs the VM yet.
async fn observe<'a>(
    migration: &'a VirtualMachineMigration,
    vm: Option<&'a VirtualMachine>,
    uid: &str,
    ctx: &'a Context,
    ask_vmm: bool,
) -> Observed<'a> {
    let found = vm.and_then(|_| ctx.supervisor.get(uid));
    let local = found.as_ref().and_then(|l| Some((l.meta.role.clone(), ctx.supervisor.state(uid)?)));
    let ours = Role::Receive { migration: migration.name_any() };
    let resumed = match (&found, &local) {
        (Some(l), Some((role, VmmState::Running))) if ask_vmm && *role == ours => {
            VmmClient::new(&l.dir.api_socket()).status().await.is_ok()
        }
        _ => false,
    };
    let offered = ctx.facts().map(|f| f.offered_cpus()).unwrap_or_default();
    Observed { migration, node: ctx.node(), vm, local, leased: ctx.leased(), offered, resumed, now: status::now() }
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
