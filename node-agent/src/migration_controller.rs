//! Carries a VirtualMachineMigration the operator approved (`status.phase`
//! `Scheduled`, with `sourceNode`, `targetNode` and `secretName` set), at both ends.
//!
//! 1. Target agent: reads the Secret, starts a receiving `drover-vmm` under a
//!    monitor, listening on this host's address, and publishes it in
//!    `status.targetAddress` once it listens.
//! 2. Source agent: asks its VMM to migrate there (`PUT /vm/migrate`), then copies
//!    progress into the migration's status until the VMM reports an end.
//! 3. On success the source agent moves the VM's `status.nodeName` to the target,
//!    whose agent then takes the VM over; on failure the VM keeps running on the
//!    source, the target's VMM is stopped, and the status says why.

use std::sync::Arc;
use std::time::Duration;

use drover_crds::migration::{MigrationPhase, VirtualMachineMigration, VirtualMachineMigrationStatus};
use drover_crds::vm::{VirtualMachine, VmPhase};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::Error;
use crate::context::Context;
use crate::status::{self, now};
use crate::supervisor::{VmmState, new_meta};
use crate::vm_config;
use crate::vm_dir::{Role, StopReason, VmDir};
use crate::vmm_client::{MigrationStatus, Phase, VmmClient};

use drover_crds::contract::MIGRATION_SECRET_KEY as SECRET_KEY;

/// How often a running migration is looked at (the VMM's API is local and cheap).
const POLL: Duration = Duration::from_millis(50);
/// Progress goes to the API server at most this often (phase changes at once).
const PROGRESS_EVERY_MS: i64 = 500;

pub async fn reconcile(migration: Arc<VirtualMachineMigration>, ctx: Arc<Context>) -> Result<Action, Error> {
    let Some(status) = migration.status.clone() else { return Ok(Action::await_change()) };
    let node = ctx.node();
    let ns = migration.namespace().unwrap_or_default();
    let api: Api<VirtualMachineMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let active =
        matches!(status.phase, Some(MigrationPhase::Scheduled | MigrationPhase::Running | MigrationPhase::Switchover));

    if status.target_node.as_deref() == Some(node) {
        if active && status.target_address.is_none() {
            return prepare_target(&migration, &api, &vms, &ctx, status).await;
        }
        if status.phase == Some(MigrationPhase::Failed) {
            stop_target(&migration, &vms, &ctx).await?;
            return Ok(Action::await_change());
        }
    }
    if status.source_node.as_deref() == Some(node) && active && status.target_address.is_some() {
        return drive_source(&migration, &api, &vms, &ctx, status).await;
    }
    // Nothing to do here until the status changes (the other side's step); only
    // the two hosts involved look again now and then, in case an update was missed.
    let involved = [&status.source_node, &status.target_node].iter().any(|n| n.as_deref() == Some(node));
    Ok(if active && involved { Action::requeue(Duration::from_secs(2)) } else { Action::await_change() })
}

/// Target side: a receiving VMM, listening, and its address published.
async fn prepare_target(
    migration: &VirtualMachineMigration,
    api: &Api<VirtualMachineMigration>,
    vms: &Api<VirtualMachine>,
    ctx: &Context,
    mut status: VirtualMachineMigrationStatus,
) -> Result<Action, Error> {
    let name = migration.name_any();
    let fail =
        |status: &mut VirtualMachineMigrationStatus, why: String| fail(ctx, migration, status, "TargetNotReady", why);
    let vm = match vms.get_opt(&migration.spec.vm_name).await? {
        Some(vm) => vm,
        None => {
            fail(&mut status, format!("VirtualMachine {} not found", migration.spec.vm_name));
            status::write_migration(api, migration, &status, &ctx.manager()).await?;
            return Ok(Action::await_change());
        }
    };
    let uid = vm.uid().unwrap_or_default();
    if let Some(local) = ctx.supervisor.get(&uid) {
        match (local.meta.role, ctx.supervisor.state(&uid)) {
            // Started on an earlier pass: wait until it listens.
            (Role::Receive { migration: m }, Some(VmmState::Running)) if m == name => {
                return publish_when_listening(migration, api, ctx, &local.dir, status).await;
            }
            (Role::Receive { .. }, _) => ctx.supervisor.forget(&uid),
            (Role::Run, _) => {
                fail(&mut status, format!("{} already runs VM {}", ctx.node(), vm.name_any()));
                status::write_migration(api, migration, &status, &ctx.manager()).await?;
                return Ok(Action::await_change());
            }
        }
    }
    if !ctx.leased() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let secret = match read_secret(ctx, migration).await {
        Ok(secret) => secret,
        Err(e) => {
            fail(&mut status, e.to_string());
            status::write_migration(api, migration, &status, &ctx.manager()).await?;
            return Ok(Action::await_change());
        }
    };
    let facts = ctx.facts();
    let offered = facts.as_ref().map(|f| f.offered_cpus()).unwrap_or_default();
    let dir = VmDir::new(&ctx.settings.runtime_dir, &uid);
    let config = match vm_config::build_expected(&vm, &offered, ctx.node(), &dir) {
        Ok(config) => config,
        Err(e) => {
            fail(&mut status, e.to_string());
            status::write_migration(api, migration, &status, &ctx.manager()).await?;
            return Ok(Action::await_change());
        }
    };
    let port = free_port(ctx)?;
    let listen = std::net::SocketAddr::new(ctx.settings.address, port).to_string();
    let mut args = vec![
        "receive".into(),
        "--listen".into(),
        listen,
        "--secret-file".into(),
        dir.secret().display().to_string(),
        "--config".into(),
        dir.config().display().to_string(),
        "--api-socket".into(),
        dir.api_socket().display().to_string(),
        "--host-cpus".into(),
        config.cpus.host_cpus.clone().unwrap_or_default(),
    ];
    // Without memory overcommit the VM's memory is this host's to give anyway:
    // fault it in before listening, so the transfer does not pay a page fault per
    // page (on the critical path of the migration). With overcommit, memory is
    // only taken as pages arrive.
    if facts.as_ref().is_none_or(|f| f.offered.memory_overcommit_ratio <= 1.0) {
        args.push("--prefault".into());
    }
    let meta =
        new_meta(&vm.namespace().unwrap_or_default(), &vm.name_any(), &uid, Role::Receive { migration: name.clone() });
    let local = ctx.supervisor.start(meta, &config, args, Some(&secret))?;
    tracing::info!(migration = %name, vm = %vm.name_any(), port, "receiving VMM started");
    publish_when_listening(migration, api, ctx, &local.dir, status).await
}

async fn publish_when_listening(
    migration: &VirtualMachineMigration,
    api: &Api<VirtualMachineMigration>,
    ctx: &Context,
    dir: &VmDir,
    mut status: VirtualMachineMigrationStatus,
) -> Result<Action, Error> {
    let Some(port) = listen_port(dir) else { return Ok(Action::requeue(POLL)) };
    if !listening_ports().contains(&port) {
        return Ok(Action::requeue(Duration::from_millis(50)));
    }
    let address = std::net::SocketAddr::new(ctx.settings.address, port).to_string();
    status.target_address = Some(address.clone());
    status.conditions.set(condition(
        "TargetReady",
        true,
        "Listening",
        format!("receiving VMM listens on {address}"),
        migration.metadata.generation,
    ));
    status::write_migration(api, migration, &status, &ctx.manager()).await?;
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// Stops a receiving VMM whose migration failed (the VM still runs on the source).
async fn stop_target(
    migration: &VirtualMachineMigration,
    vms: &Api<VirtualMachine>,
    ctx: &Context,
) -> Result<(), Error> {
    let Some(vm) = vms.get_opt(&migration.spec.vm_name).await? else { return Ok(()) };
    let uid = vm.uid().unwrap_or_default();
    let placed_here = vm.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(ctx.node());
    let Some(local) = ctx.supervisor.get(&uid) else { return Ok(()) };
    if placed_here || local.meta.role != (Role::Receive { migration: migration.name_any() }) {
        return Ok(());
    }
    if ctx.supervisor.state(&uid) == Some(VmmState::Running) {
        ctx.supervisor.kill(&uid, StopReason::MigrationFailed);
    }
    ctx.supervisor.forget(&uid);
    tracing::info!(migration = %migration.name_any(), "migration failed; receiving VMM stopped");
    Ok(())
}

/// Source side: start the send, then follow it.
async fn drive_source(
    migration: &VirtualMachineMigration,
    api: &Api<VirtualMachineMigration>,
    vms: &Api<VirtualMachine>,
    ctx: &Context,
    mut status: VirtualMachineMigrationStatus,
) -> Result<Action, Error> {
    let name = migration.name_any();
    let generation = migration.metadata.generation;
    let fail = |status: &mut VirtualMachineMigrationStatus, why: String| fail(ctx, migration, status, "Failed", why);
    let Some(vm) = vms.get_opt(&migration.spec.vm_name).await? else {
        fail(&mut status, format!("VirtualMachine {} not found", migration.spec.vm_name));
        status::write_migration(api, migration, &status, &ctx.manager()).await?;
        return Ok(Action::await_change());
    };
    let uid = vm.uid().unwrap_or_default();
    let target = status.target_node.clone().unwrap_or_default();
    let local = ctx.supervisor.get(&uid).filter(|l| l.meta.role == Role::Run);
    let state = local.as_ref().and_then(|_| ctx.supervisor.state(&uid));
    let client = local.as_ref().map(|l| VmmClient::new(&l.dir.api_socket()));

    if status.phase == Some(MigrationPhase::Scheduled) {
        let (Some(client), Some(VmmState::Running)) = (client, state) else {
            fail(&mut status, format!("VM {} is not running on {}", vm.name_any(), ctx.node()));
            status::write_migration(api, migration, &status, &ctx.manager()).await?;
            return Ok(Action::await_change());
        };
        let secret = match read_secret(ctx, migration).await {
            Ok(secret) => String::from_utf8_lossy(&secret).into_owned(),
            Err(e) => {
                fail(&mut status, e.to_string());
                status::write_migration(api, migration, &status, &ctx.manager()).await?;
                return Ok(Action::await_change());
            }
        };
        let address = status.target_address.clone().unwrap_or_default();
        // Recorded before the send starts: a crash of this agent right after must
        // find the migration Running and follow it, not start it twice.
        status.phase = Some(MigrationPhase::Running);
        status.start_time = Some(now());
        status.conditions.set(condition(
            "Succeeded",
            false,
            "Running",
            format!("copying memory to {target} ({address})"),
            generation,
        ));
        status::write_migration(api, migration, &status, &ctx.manager()).await?;
        let figures = local.as_ref().map(|l| l.dir.migration_figures()).unwrap_or_default();
        let _ = std::fs::remove_file(&figures);
        if let Err(e) = client.migrate(&address, secret.trim(), &migration.spec, &figures).await {
            let fresh = api.get_status(&name).await?;
            let mut status = fresh.status.clone().unwrap_or_default();
            fail(&mut status, e.to_string());
            status::write_migration(api, &fresh, &status, &ctx.manager()).await?;
            set_vm_migrating(vms, &vm, ctx, None).await?;
            return Ok(Action::await_change());
        }
        tracing::info!(migration = %name, to = %address, "migration started");
        set_vm_migrating(vms, &vm, ctx, Some(&name)).await?;
        return Ok(Action::requeue(POLL));
    }

    // Running or Switchover: follow the VMM.
    // While the VMM runs, its API; once it has ended, the figures it left.
    let progress = match (&client, &state) {
        (Some(client), Some(VmmState::Running)) => client.migration().await.ok(),
        _ => local.as_ref().and_then(|l| crate::files::read_json::<MigrationStatus>(&l.dir.migration_figures()).ok()),
    };
    let ended = match (&state, &progress) {
        (Some(VmmState::Ended(record)), _) if record.is_migrated() => Some(Ok(())),
        (Some(VmmState::Ended(record)), _) => Some(Err(format!("the source VMM ended: {}", record.describe()))),
        (Some(VmmState::Lost), _) | (None, _) => Some(Err(format!("the source VMM is gone from {}", ctx.node()))),
        (_, Some(p)) if p.phase == Phase::Completed => Some(Ok(())),
        (_, Some(p)) if p.phase == Phase::Failed || p.phase == Phase::Cancelled => {
            Some(Err(p.error.clone().unwrap_or_else(|| format!("migration {:?}", p.phase).to_lowercase())))
        }
        (_, Some(p)) if p.phase == Phase::Unknown => Some(Err(
            "the target never confirmed the switch-over: the VM is paused on the source and may run on the target"
                .into(),
        )),
        _ => None,
    };
    if let Some(p) = &progress {
        status.iterations = Some(p.pass as i32);
        status.bytes_transferred = Some(p.bytes_sent as i64);
        status.dirty_rate_bytes_per_second = Some(p.dirty_rate_bps as i64);
        status.downtime_millis = p.downtime_ms.map(|ms| ms as i64);
        status.downtime_micros = p.downtime_us.map(|us| us as i64);
        status.total_millis = Some(p.total_ms as i64);
        if p.phase == Phase::Switchover {
            status.phase = Some(MigrationPhase::Switchover);
        }
    }
    match ended {
        None => {
            let old = migration.status.as_ref();
            let recent = old
                .and_then(|o| o.total_millis)
                .zip(status.total_millis)
                .is_some_and(|(a, b)| b - a < PROGRESS_EVERY_MS);
            if old.map(|o| o.phase) != Some(status.phase) || !recent {
                status::write_migration(api, migration, &status, &ctx.manager()).await?;
            }
            Ok(Action::requeue(POLL))
        }
        Some(Ok(())) => {
            // The target runs the VM: its status names the target from now on.
            let vm = vms.get_status(&vm.name_any()).await?;
            let mut vm_status = vm.status.clone().unwrap_or_default();
            vm_status.node_name = Some(target.clone());
            vm_status.phase = Some(VmPhase::Running);
            vm_status.migration = None;
            vm_status.cpu_usage = None;
            vm_status.conditions.set(condition(
                "Ready",
                true,
                "Migrated",
                format!("migrated from {} to {target}", ctx.node()),
                vm.metadata.generation,
            ));
            status::write_vm(vms, &vm, &vm_status, &ctx.manager()).await?;
            status.phase = Some(MigrationPhase::Succeeded);
            status.completion_time = Some(now());
            status.conditions.set(condition(
                "Succeeded",
                true,
                "Migrated",
                format!("the VM runs on {target}"),
                generation,
            ));
            status::write_migration(api, migration, &status, &ctx.manager()).await?;
            tracing::info!(migration = %name, to = %target, downtime_us = ?status.downtime_micros, total_ms = ?status.total_millis, bytes = ?status.bytes_transferred, passes = ?status.iterations, "migration succeeded");
            let figures = format!(
                "from {} to {target}: downtime {:.1} ms, total {} ms, {} bytes, {} passes",
                ctx.node(),
                status.downtime_micros.unwrap_or(0) as f64 / 1000.0,
                status.total_millis.unwrap_or(0),
                status.bytes_transferred.unwrap_or(0),
                status.iterations.unwrap_or(0)
            );
            ctx.events.normal(&vm, "Migrated", "Migrate", figures.clone());
            ctx.events.normal(migration, "Succeeded", "Migrate", figures);
            Ok(Action::await_change())
        }
        Some(Err(why)) => {
            fail(&mut status, why);
            status::write_migration(api, migration, &status, &ctx.manager()).await?;
            set_vm_migrating(vms, &vm, ctx, None).await?;
            Ok(Action::await_change())
        }
    }
}

/// Marks a migration failed, saying why (the VM keeps running on its source).
fn fail(
    ctx: &Context,
    migration: &VirtualMachineMigration,
    status: &mut VirtualMachineMigrationStatus,
    reason: &str,
    why: String,
) {
    tracing::warn!(migration = %migration.name_any(), "failed ({reason}): {why}");
    ctx.events.warning(migration, reason, "Migrate", format!("{why} (the VM keeps running on its source)"));
    status.phase = Some(MigrationPhase::Failed);
    status.completion_time = Some(now());
    status.conditions.set(condition("Succeeded", false, reason, why.clone(), migration.metadata.generation));
    status.failure_message = Some(why);
}

/// Marks the VM as migrating (or no longer), keeping the rest of its status.
async fn set_vm_migrating(
    vms: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    ctx: &Context,
    migration: Option<&str>,
) -> Result<(), Error> {
    let fresh = vms.get_status(&vm.name_any()).await?;
    let mut status = fresh.status.clone().unwrap_or_default();
    status.migration = migration.map(str::to_string);
    if status.phase == Some(VmPhase::Running) || status.phase == Some(VmPhase::Migrating) {
        status.phase = Some(if migration.is_some() { VmPhase::Migrating } else { VmPhase::Running });
    }
    status::write_vm(vms, &fresh, &status, &ctx.manager()).await?;
    Ok(())
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    crate::conditions::condition(type_, ok, reason, message, generation, now())
}

async fn read_secret(ctx: &Context, migration: &VirtualMachineMigration) -> Result<Vec<u8>, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let name = migration.status.as_ref().and_then(|s| s.secret_name.clone()).ok_or_else(|| {
        Error::Reference(
            "status.secretName is not set: the operator names the migration Secret when it approves".into(),
        )
    })?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = secrets
        .get_opt(&name)
        .await?
        .ok_or_else(|| Error::Reference(format!("Secret {ns}/{name} (status.secretName) not found")))?;
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(SECRET_KEY))
        .map(|b| b.0.clone())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Error::Reference(format!("Secret {ns}/{name} has no key {SECRET_KEY:?}")))?;
    Ok(value)
}

/// The port a receiving VMM was told to listen on, from its recorded command line.
fn listen_port(dir: &VmDir) -> Option<u16> {
    let pid = VmDir::read_pid(&dir.vmm_pid())?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let listen = args.iter().skip_while(|a| *a != "--listen").nth(1)?;
    listen.rsplit_once(':')?.1.parse().ok()
}

/// A port in the configured range that no socket here uses and no other receiving
/// VMM of this host was given. Connected sockets count too: the range may overlap
/// the kernel's ephemeral ports, and a client's port there makes the bind fail.
fn free_port(ctx: &Context) -> Result<u16, Error> {
    let used = ports_in_use();
    let taken: Vec<u16> = ctx
        .supervisor
        .all()
        .into_iter()
        .filter(|l| matches!(l.meta.role, Role::Receive { .. }))
        .filter_map(|l| listen_port(&l.dir))
        .collect();
    let (low, high) = ctx.settings.migration_ports;
    (low..=high)
        .find(|p| !used.contains(p) && !taken.contains(p))
        .ok_or_else(|| Error::Io(format!("no free migration port in {low}-{high}")))
}

/// TCP ports in LISTEN state in this network namespace.
fn listening_ports() -> Vec<u16> {
    tcp_ports(true)
}

/// Local TCP ports of every socket in this network namespace, whatever its state.
fn ports_in_use() -> Vec<u16> {
    tcp_ports(false)
}

/// Local ports from /proc/net/tcp{,6}, of listening sockets only or of all.
fn tcp_ports(only_listening: bool) -> Vec<u16> {
    let mut ports = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        ports.extend(local_ports(&text, only_listening));
    }
    ports
}

/// The local ports in a /proc/net/tcp table: the second column is `address:port`
/// in hex, the fourth the state (`0A` is LISTEN).
fn local_ports(table: &str, only_listening: bool) -> impl Iterator<Item = u16> + '_ {
    table.lines().skip(1).filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if only_listening && fields.get(3) != Some(&"0A") {
            return None;
        }
        u16::from_str_radix(fields.get(1)?.rsplit_once(':')?.1, 16).ok()
    })
}

pub fn error_policy(migration: Arc<VirtualMachineMigration>, error: &Error, _ctx: Arc<Context>) -> Action {
    status::retry(migration.as_ref(), error, Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_ports_sees_a_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listening_ports().contains(&port));
    }

    #[test]
    fn a_connected_socket_port_is_in_use_but_not_listening() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let port = client.local_addr().unwrap().port();
        assert!(ports_in_use().contains(&port), "a client's ephemeral port must not be offered for a migration");
        assert!(!listening_ports().contains(&port));
    }

    #[test]
    fn local_ports_reads_the_proc_table() {
        let table = "  sl  local_address rem_address   st\n   0: 0100007F:C030 00000000:0000 0A\n   1: 0100007F:9C40 0100007F:C030 01\n";
        assert_eq!(local_ports(table, false).collect::<Vec<_>>(), vec![0xC030, 0x9C40]);
        assert_eq!(local_ports(table, true).collect::<Vec<_>>(), vec![0xC030]);
    }
}
