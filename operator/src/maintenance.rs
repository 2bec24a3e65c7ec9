//! Hosts: maintenance mode and the host-health annotation.
//!
//! A Node tainted `drover.dev/maintenance` (any value, NoExecute) is emptied, each
//! VM by its `onMaintenance` ([`drover_core::maintenance`]); its Node says where
//! the evacuation stands (`drover.dev/maintenance-status`), and an Event marks
//! the moment it is empty. Removing the taint returns the host to service: the
//! annotation goes, and VMs held stopped for it start again by their run strategy.
//! Every host also carries the operator's view of its health
//! (`drover.dev/host-health`), so `kubectl get node -o yaml` says why it takes no VMs.

use std::sync::Arc;
use std::time::Duration;

use drover_core::maintenance::{OnMaintenance, Resident, Step, evacuate};
use drover_crds::contract::{annotations, conditions, migration_labels, reasons};
use drover_crds::migration::{MigrationPhase, MigrationTrigger};
use drover_crds::vm::{MaintenanceAction, VirtualMachine, VmPhase};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::Error;
use crate::context::Context;
use crate::events::reasons as event_reasons;
use crate::snapshot::{in_maintenance, migration_active};
use crate::vm::mine::Mine;
use crate::writes::{apply_status, patch_metadata};

pub async fn reconcile(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.is_ready() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    ctx.metrics.reconciled("host");
    let name = node.name_any();
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut notes = serde_json::Map::new();
    if crate::snapshot::facts(&node).is_some() {
        let beat = crate::heartbeats::heartbeat(&ctx.clock, &name);
        let health = host_health(&beat);
        let old = node.annotations().get(annotations::HOST_HEALTH);
        let was_failed = old.is_some_and(|h| h.starts_with(FAILED));
        if beat.is_stale() && !was_failed {
            tracing::warn!(host = %name, "host failed: {health}");
            ctx.events.warning(
                node.as_ref(),
                reasons::HOST_FAILED,
                "HostFailure",
                format!("{health}: its agent has powered its VMs off; HA restarts them on other hosts where its HostPolicy has HA on"),
            );
        } else if beat.is_fresh() && was_failed {
            tracing::info!(host = %name, "host recovered: its heartbeat is renewed again");
            ctx.events.normal(
                node.as_ref(),
                reasons::HOST_RECOVERED,
                "HostFailure",
                format!("{name} renews its heartbeat again: it takes VMs; VMs HA restarted elsewhere stay there"),
            );
        }
        if old != Some(&health) {
            notes.insert(annotations::HOST_HEALTH.into(), health.into());
        }
    }
    let previous = node.annotations().get(annotations::MAINTENANCE_STATUS).cloned();
    let mut requeue = Duration::from_secs(30);
    if in_maintenance(&node) {
        let evacuation = plan(&ctx, &name);
        for step in &evacuation.steps {
            carry_out(&ctx, &name, step).await?;
        }
        let summary = evacuation.summary();
        if previous.as_deref() != Some(summary.as_str()) {
            notes.insert(annotations::MAINTENANCE_STATUS.into(), summary.clone().into());
            if evacuation.done() {
                tracing::info!(host = %name, "in maintenance: no VM runs there");
                ctx.events.normal(node.as_ref(), event_reasons::IN_MAINTENANCE, "Maintenance", summary);
            } else {
                tracing::info!(host = %name, "{summary}");
            }
        }
        if !evacuation.done() {
            requeue = Duration::from_secs(1);
        }
    } else if previous.is_some() {
        notes.insert(annotations::MAINTENANCE_STATUS.into(), serde_json::Value::Null);
        tracing::info!(host = %name, "back in service");
        ctx.events.normal(
            node.as_ref(),
            event_reasons::BACK_IN_SERVICE,
            "Maintenance",
            format!("{name} takes VMs again"),
        );
        // VMs held stopped for the maintenance start again.
        ctx.nudger.poke();
    }
    if !notes.is_empty() {
        patch_metadata(&nodes, node.as_ref(), serde_json::json!({ "annotations": notes })).await?;
    }
    Ok(Action::requeue(requeue))
}

/// How a failed host's health annotation begins.
const FAILED: &str = "Failed: ";

/// The host-health annotation for a heartbeat: `Ready`, `Failed: ...` once the
/// Lease ran out (HA acts), or why it is not ready yet.
pub fn host_health(beat: &crate::heartbeats::Heartbeat) -> String {
    match beat.problem() {
        None => "Ready".into(),
        Some(problem) if beat.is_stale() => format!("{FAILED}{problem}"),
        Some(problem) => problem,
    }
}

/// The evacuation of `host` as the stores show it.
fn plan(ctx: &Context, host: &str) -> drover_core::maintenance::Evacuation {
    let vms = ctx.vm_writes.apply(ctx.stores.vms.state());
    let migrations = ctx.migration_writes.apply(ctx.stores.migrations.state());
    let residents: Vec<Resident> = vms
        .iter()
        .filter(|v| v.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(host))
        .filter(|v| {
            v.status.as_ref().and_then(|s| s.phase).is_some_and(|p| {
                matches!(
                    p,
                    VmPhase::Scheduled | VmPhase::Starting | VmPhase::Running | VmPhase::Migrating | VmPhase::Stopping
                )
            })
        })
        .map(|v| {
            let ns = v.namespace().unwrap_or_default();
            let moving = migrations.iter().find(|m| {
                m.namespace().as_deref() == Some(ns.as_str())
                    && m.spec.vm_name == v.name_any()
                    && (migration_active(m)
                        || matches!(m.status.as_ref().and_then(|s| s.phase), None | Some(MigrationPhase::Pending)))
            });
            Resident {
                vm: crate::snapshot::key(v.as_ref()),
                action: match v.spec.on_maintenance {
                    MaintenanceAction::LiveMigrate => OnMaintenance::LiveMigrate,
                    MaintenanceAction::Restart => OnMaintenance::Restart,
                    MaintenanceAction::Stop => OnMaintenance::Stop,
                },
                // A VM in the middle of a migration counts as on its way.
                stopping: v.status.as_ref().and_then(|s| s.phase) == Some(VmPhase::Stopping)
                    || v.status.as_ref().is_some_and(|s| s.migration.is_some() && moving.is_none()),
                migration: moving
                    .map(|m| {
                        let waits = (!migration_active(m))
                            .then(|| {
                                m.status
                                    .as_ref()
                                    .and_then(|s| s.conditions.get(conditions::APPROVED))
                                    .map(|c| c.message.clone())
                            })
                            .flatten();
                        (m.name_any(), waits)
                    })
                    .or_else(|| recently_failed(&migrations, &ns, &v.name_any(), host)),
            }
        })
        .collect();
    evacuate(&residents)
}

/// How long a failed evacuation migration holds off the next try of its VM.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// A migration of this VM, made for `host`'s maintenance, that failed lately: the
/// next one waits (a VM that cannot move must not make a failed migration a second).
fn recently_failed(
    migrations: &[Arc<drover_crds::migration::VirtualMachineMigration>],
    ns: &str,
    vm: &str,
    host: &str,
) -> Option<(String, Option<String>)> {
    let now = crate::writes::now_ms();
    migrations
        .iter()
        .filter(|m| m.namespace().as_deref() == Some(ns) && m.spec.vm_name == vm)
        .filter(|m| m.labels().get(migration_labels::MAINTENANCE_HOST).map(String::as_str) == Some(host))
        .filter_map(|m| {
            let status = m.status.as_ref()?;
            let ended = status.completion_time.as_ref().map(crate::writes::time_ms)?;
            (status.phase == Some(MigrationPhase::Failed) && now.saturating_sub(ended) < RETRY_AFTER.as_millis() as u64)
                .then_some((ended, m))
        })
        .max_by_key(|(ended, _)| *ended)
        .map(|(ended, m)| {
            let why = m.status.as_ref().and_then(|s| s.failure_message.clone()).unwrap_or_default();
            let left = (RETRY_AFTER.as_millis() as u64).saturating_sub(now.saturating_sub(ended)) / 1000;
            (m.name_any(), Some(format!("failed ({why}); trying again in {left} s")))
        })
}

async fn carry_out(ctx: &Context, host: &str, step: &Step) -> Result<(), Error> {
    let vm_key = match step {
        Step::Migrate(k) | Step::StopToRestart(k) | Step::StopAndHold(k) => k,
    };
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &vm_key.namespace);
    let Some(vm) = api.get_opt(&vm_key.name).await? else { return Ok(()) };
    match step {
        Step::Migrate(_) => {
            let labels =
                serde_json::json!({ migration_labels::VM: vm_key.name, migration_labels::MAINTENANCE_HOST: host });
            let metadata = serde_json::json!({ "labels": labels });
            let name = crate::migration::request(ctx, &vm, MigrationTrigger::Maintenance, metadata, None).await?;
            tracing::info!(host, vm = %vm_key, migration = %name, "evacuating by live migration");
            ctx.events.normal(
                &vm,
                event_reasons::EVACUATING,
                "Maintenance",
                format!("{host} enters maintenance: migration {name}"),
            );
        }
        Step::StopToRestart(_) | Step::StopAndHold(_) => {
            let restart = matches!(step, Step::StopToRestart(_));
            let mark = format!("{host}/{}", if restart { "Restart" } else { "Stop" });
            let vm = patch_metadata(
                &api,
                &vm,
                serde_json::json!({ "annotations": { annotations::STOPPED_FOR_MAINTENANCE: mark } }),
            )
            .await?;
            let mut mine = Mine::of(vm.status.as_ref());
            mine.phase = Some(VmPhase::Stopping);
            let written = apply_status(&api, &vm, mine.to_json()).await?;
            ctx.vm_writes.remember(written);
            let what = if restart { "stopping to start elsewhere" } else { "stopping until the maintenance ends" };
            tracing::info!(host, vm = %vm_key, "{what}");
            ctx.events.normal(
                &vm,
                event_reasons::STOPPING,
                "Maintenance",
                format!("{host} enters maintenance: {what}"),
            );
        }
    }
    Ok(())
}

pub fn error_policy(node: Arc<Node>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_conflict() {
        return Action::requeue(Duration::from_millis(200));
    }
    ctx.metrics.failed("host");
    tracing::warn!(host = %node.name_any(), "reconcile failed: {error}");
    Action::requeue(Duration::from_secs(2))
}
