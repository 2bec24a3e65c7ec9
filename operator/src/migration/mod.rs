//! VirtualMachineMigrations: the operator validates and approves them (target
//! reserved, a fresh Secret made), keeps them within the limits, fails bad
//! requests and late ones, cancels deleted ones, and cleans up after each.
//! [`decide`] holds the pure parts.

pub mod decide;

use std::sync::Arc;
use std::time::Duration;

use drover_core::Cluster;
use drover_core::migration::{Admission, Request};
use drover_crds::contract::{MIGRATION_SECRET_KEY, finalizers, migration_labels, reasons};
use drover_crds::migration::{MigrationPhase, MigrationTargetState, VirtualMachineMigration};
use drover_crds::vm::VirtualMachine;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};

use crate::Error;
use crate::context::Context;
use crate::snapshot::{self, key};
use crate::writes::{apply_status, now, now_ms, patch_metadata};
use decide::{Mine, Stage};

pub async fn reconcile(m: Arc<VirtualMachineMigration>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.is_ready() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    ctx.metrics.reconciled("migration");
    let m = ctx.migration_writes.newest(m);
    let ns = m.namespace().unwrap_or_default();
    let api: Api<VirtualMachineMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let stage = decide::stage(&m);
    if m.metadata.deletion_timestamp.is_some() {
        if stage == Stage::Underway {
            // The source agent cancels its VMM's send on Failed; the VM stays put.
            fail(&ctx, &api, &m, reasons::CANCELLED, "deleted while under way: cancelled; the VM stays on its source")
                .await?;
            return Ok(Action::requeue(Duration::from_millis(500)));
        }
        if source_settling(&ctx, &m) {
            return Ok(Action::requeue(Duration::from_millis(500)));
        }
        cleanup(&ctx, &m).await?;
        return Ok(Action::await_change());
    }
    match stage {
        Stage::Waiting if decide::timed_out(&m, now_ms()) => {
            let why = format!("not approved within spec.timeoutSeconds ({} s)", decide::timeout_ms(&m) / 1000);
            fail(&ctx, &api, &m, reasons::TIMED_OUT, &why).await?;
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Stage::Waiting => admit(&ctx, &api, &m).await,
        Stage::Underway if decide::timed_out(&m, now_ms()) => {
            let why = format!(
                "its target did not get ready within spec.timeoutSeconds ({} s)",
                decide::timeout_ms(&m) / 1000
            );
            fail(&ctx, &api, &m, reasons::TIMED_OUT, &why).await?;
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Stage::Underway => {
            let snapshot = ctx.snapshot();
            let failed = |h: &str| snapshot.hosts.iter().any(|host| host.name == h && host.health.is_failed());
            if let Some((reason, why)) = decide::host_failed(&m, &failed) {
                fail(&ctx, &api, &m, reason, &why).await?;
                ctx.nudger.poke();
                return Ok(Action::requeue(Duration::from_millis(500)));
            }
            // Looked at again within a second: a host failing mid-move is noticed
            // without waiting for an event.
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Stage::Finished if source_settling(&ctx, &m) => Ok(Action::requeue(Duration::from_millis(500))),
        Stage::Finished => {
            cleanup(&ctx, &m).await?;
            ctx.nudger.poke();
            Ok(Action::await_change())
        }
    }
}

/// Admission, under the placement lock: the target chosen here is what the next
/// placement sees as reserved.
async fn admit(
    ctx: &Context,
    api: &Api<VirtualMachineMigration>,
    m: &VirtualMachineMigration,
) -> Result<Action, Error> {
    let vm_key = drover_core::snapshot::Key::new(m.namespace().unwrap_or_default(), m.spec.vm_name.clone());
    let mut vm_object = ctx.vm_writes.apply(ctx.stores.vms.state()).into_iter().find(|v| key(v.as_ref()) == vm_key);
    if vm_object.is_none() {
        // Not in the store (yet?): ask the API server before calling it unknown.
        let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &vm_key.namespace);
        vm_object = vms.get_opt(&vm_key.name).await?.map(Arc::new);
    }
    let guard = ctx.placement.lock().await;
    let snapshot = ctx.snapshot_with(vm_object.as_ref());
    let cluster = Cluster::new(&snapshot);
    let vm = snapshot.vms.iter().find(|v| v.key == vm_key);
    let vm_phase = vm_object.as_ref().and_then(|v| v.status.as_ref()).and_then(|s| s.phase).map(snapshot::phase);
    let active: Vec<_> = snapshot.migrations.iter().filter(|x| x.approved).cloned().collect();
    let request = Request { key: &key(m), vm, vm_phase, target: m.spec.target_node.as_deref() };
    let admission = drover_core::migration::admit(&cluster, &request, &active, &ctx.settings.limits);
    let secret = secret_name(m);
    if let Admission::Approve { .. } = &admission {
        ensure_finalizer(ctx, api, m).await?;
        make_secret(ctx, m, &secret).await?;
    }
    let mine = decide::admitted(m, &admission, &secret, now());
    let changed = mine != Mine::of(m.status.as_ref());
    if changed {
        let fresh = api.get(&m.name_any()).await?;
        let written = apply_status(api, &fresh, mine.to_json()).await?;
        ctx.migration_writes.remember(written);
    }
    drop(guard);
    let name = m.name_any();
    match admission {
        Admission::Approve { source, target, why, .. } => {
            tracing::info!(migration = %name, %source, %target, "approved {why}");
            ctx.events.normal(m, reasons::APPROVED, "Approve", format!("from {source} {why}"));
            Ok(Action::requeue(Duration::from_secs(5)))
        }
        Admission::Wait { why } => {
            if changed {
                tracing::info!(migration = %name, "waits: {why}");
                ctx.events.normal(m, reasons::WAITING, "Approve", why);
            }
            Ok(Action::requeue(Duration::from_secs(2)))
        }
        Admission::Refuse { why } => {
            tracing::warn!(migration = %name, "refused: {why}");
            ctx.events.warning(m, reasons::REFUSED, "Approve", format!("{why}; nothing moved"));
            Ok(Action::requeue(Duration::from_secs(1)))
        }
    }
}

/// Whether the source agent is still settling a migration that ended (it cancels
/// the VMM's send, or moves the VM's status if the send had already handed over):
/// the VM's `status.migration` still names it. Its Secret and finalizer stay until
/// then, and so the target agent keeps the migration to clean up after.
fn source_settling(ctx: &Context, m: &VirtualMachineMigration) -> bool {
    let vm_key = drover_core::snapshot::Key::new(m.namespace().unwrap_or_default(), m.spec.vm_name.clone());
    ctx.vm_writes
        .apply(ctx.stores.vms.state())
        .iter()
        .find(|v| key(v.as_ref()) == vm_key)
        .and_then(|v| v.status.as_ref().and_then(|s| s.migration.clone()))
        .is_some_and(|name| name == m.name_any())
        || target_undecided(ctx, m)
}

/// Whether a failed migration's target may still say what its VMM does: it
/// listened (so it may have received the VM), has not given its final word
/// (`targetState` Running or Stopped), and its host has not failed. HA reads that
/// word, so the migration is kept until it comes.
fn target_undecided(ctx: &Context, m: &VirtualMachineMigration) -> bool {
    let Some(status) = m.status.as_ref() else { return false };
    let final_word = matches!(status.target_state, Some(MigrationTargetState::Running | MigrationTargetState::Stopped));
    if status.phase != Some(MigrationPhase::Failed) || final_word || status.target_address.is_none() {
        return false;
    }
    let snapshot = ctx.snapshot();
    status.target_node.as_deref().is_some_and(|t| snapshot.hosts.iter().any(|h| h.name == t && !h.health.is_failed()))
}

/// The operator ends `m` as failed; the VM stays on its source.
async fn fail(
    ctx: &Context,
    api: &Api<VirtualMachineMigration>,
    m: &VirtualMachineMigration,
    reason: &str,
    why: &str,
) -> Result<(), Error> {
    let mut mine = Mine::of(m.status.as_ref());
    decide::fail(&mut mine, reason, why.to_string(), m.metadata.generation, now());
    let written = apply_status(api, m, mine.to_json()).await?;
    ctx.migration_writes.remember(written);
    tracing::warn!(migration = %m.name_any(), "failed ({reason}): {why}");
    ctx.events.warning(m, reason, "Migrate", why.to_string());
    Ok(())
}

/// The Secret of a migration: named after it, owned by it.
fn secret_name(m: &VirtualMachineMigration) -> String {
    let name = m.name_any();
    let base: String = name.chars().take(240).collect();
    format!("{base}-migration")
}

/// A fresh random secret (64 hex digits) for the two VMMs to prove they share;
/// made once per migration.
async fn make_secret(ctx: &Context, m: &VirtualMachineMigration, name: &str) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    if api.get_opt(name).await?.is_some() {
        return Ok(());
    }
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| Error::Io("the system random generator failed".into()))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let owner = OwnerReference {
        api_version: VirtualMachineMigration::api_version(&()).into(),
        kind: VirtualMachineMigration::kind(&()).into(),
        name: m.name_any(),
        uid: m.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": name,
            "labels": { migration_labels::VM: m.spec.vm_name },
            "ownerReferences": [owner],
        },
        "type": "Opaque",
        "stringData": { MIGRATION_SECRET_KEY: hex },
    }))?;
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn ensure_finalizer(
    ctx: &Context,
    api: &Api<VirtualMachineMigration>,
    m: &VirtualMachineMigration,
) -> Result<(), Error> {
    if m.finalizers().iter().any(|f| f == finalizers::MIGRATION_OPERATOR) {
        return Ok(());
    }
    let fresh = api.get(&m.name_any()).await?;
    let mut list = fresh.finalizers().to_vec();
    list.push(finalizers::MIGRATION_OPERATOR.into());
    let mut labels = fresh.labels().clone();
    labels.insert(migration_labels::VM.into(), m.spec.vm_name.clone());
    let written = patch_metadata(api, &fresh, serde_json::json!({ "finalizers": list, "labels": labels })).await?;
    ctx.migration_writes.remember(written);
    Ok(())
}

/// After the end: the Secret goes, the finalizer goes, and the VM's oldest
/// finished migrations beyond the kept number are deleted.
async fn cleanup(ctx: &Context, m: &VirtualMachineMigration) -> Result<(), Error> {
    let ns = m.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = m.status.as_ref().and_then(|s| s.secret_name.clone()).unwrap_or_else(|| secret_name(m));
    match secrets.delete(&name, &DeleteParams::default()).await {
        Ok(_) => tracing::debug!(migration = %m.name_any(), secret = %name, "migration Secret deleted"),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let api: Api<VirtualMachineMigration> = Api::namespaced(ctx.client.clone(), &ns);
    if m.finalizers().iter().any(|f| f == finalizers::MIGRATION_OPERATOR) {
        let list: Vec<String> =
            m.finalizers().iter().filter(|f| *f != finalizers::MIGRATION_OPERATOR).cloned().collect();
        match patch_metadata(&api, m, serde_json::json!({ "finalizers": list })).await {
            Ok(written) => ctx.migration_writes.remember(written),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    let of_vm: Vec<Arc<VirtualMachineMigration>> = ctx
        .stores
        .migrations
        .state()
        .into_iter()
        .filter(|x| x.namespace().as_deref() == Some(ns.as_str()) && x.spec.vm_name == m.spec.vm_name)
        .filter(|x| x.metadata.deletion_timestamp.is_none())
        .collect();
    for old in decide::prunable(&of_vm, ctx.settings.migrations_kept) {
        match api.delete(&old, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(migration = %old, vm = %m.spec.vm_name, "pruned (more finished migrations than kept)")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Creates a migration of `vm` (maintenance evacuations, DRS) with `metadata`
/// (labels, annotations), to `target` if given (else placement picks one).
pub async fn request(
    ctx: &Context,
    vm: &VirtualMachine,
    trigger: drover_crds::migration::MigrationTrigger,
    metadata: serde_json::Value,
    target: Option<&str>,
) -> Result<String, Error> {
    let ns = vm.namespace().unwrap_or_default();
    let api: Api<VirtualMachineMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let name = vm.name_any();
    let mut object = serde_json::json!({
        "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachineMigration",
        "metadata": { "generateName": format!("{}-{}-", name.chars().take(200).collect::<String>(), match trigger {
            drover_crds::migration::MigrationTrigger::Maintenance => "evacuate",
            drover_crds::migration::MigrationTrigger::Drs => "drs",
            drover_crds::migration::MigrationTrigger::User => "move",
        }) },
        "spec": { "vmName": name, "trigger": trigger, "targetNode": target },
    });
    for field in ["labels", "annotations"] {
        if let Some(value) = metadata.get(field) {
            object["metadata"][field] = value.clone();
        }
    }
    let object: VirtualMachineMigration = serde_json::from_value(object)?;
    let made = api.create(&PostParams::default(), &object).await?;
    let name = made.name_any();
    // Seen at once by the next evacuation pass, before its watch event.
    ctx.migration_writes.remember(made);
    Ok(name)
}

pub fn error_policy(m: Arc<VirtualMachineMigration>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_conflict() {
        return Action::requeue(Duration::from_millis(200));
    }
    ctx.metrics.failed("migration");
    tracing::warn!(migration = %m.name_any(), "reconcile failed: {error}");
    Action::requeue(Duration::from_secs(2))
}
