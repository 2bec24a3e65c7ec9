//! DRS in the operator: every pool's balancing pass, each `spec.drs.intervalSeconds`,
//! by the core's [`drover_core::drs::pass`]. FullyAutomated pools get the moves as
//! migrations (trigger `DRS`, the target named, through the usual admission and
//! limits); Manual and PartiallyAutomated pools get them as recommendations in
//! the HostPolicy status, which a user applies by creating the migration one
//! describes. Each VM DRS moves is annotated `drover.dev/drs-moved` (when, from,
//! to, the migration, why) and gets a `DRSMigration` Event. [`decide`] holds the
//! pure part, [`demand`] the CPU demand window, [`what_if`] the what-if command.

pub mod decide;
pub mod demand;
pub mod report;
pub mod what_if;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_core::drs::{self, Move};
use drover_core::snapshot::VmKey;
use drover_crds::contract::{DrsMove, annotations, migration_labels, reasons};
use drover_crds::host_policy::HostPolicy;
use drover_crds::migration::MigrationTrigger;
use drover_crds::vm::{VirtualMachine, VmPhase};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::Error;
use crate::context::Context;
use crate::snapshot::key;
use crate::writes::{ms_time, now_ms};
use demand::DemandWindow;
use report::Report;

/// Runs DRS for the leader's term: samples the VMs' CPU use every second and
/// passes over each pool once an interval, the first an interval into the term.
pub async fn run(ctx: Arc<Context>) {
    ctx.ready().await;
    let mut window = DemandWindow::default();
    let mut last: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let vms = ctx.vm_writes.apply(ctx.stores.vms.state());
        let mut live = HashSet::new();
        for vm in &vms {
            let status = vm.status.as_ref();
            if status.and_then(|s| s.phase) != Some(VmPhase::Running) {
                continue;
            }
            if let Some(cores) = status.and_then(|s| s.cpu_usage.as_deref()).and_then(drover_crds::quantity::cores) {
                let k = key(vm.as_ref());
                window.record(&k, cores, now);
                live.insert(k);
            }
        }
        window.retain(&live);
        for policy in ctx.stores.policies.state() {
            let spec = &policy.spec.drs;
            let name = policy.name_any();
            let interval = Duration::from_secs(u64::from(spec.interval_seconds.max(10)));
            // A pool's first pass comes one interval into the term: demand is
            // averaged over a whole interval, never over one sample.
            let since = *last.entry(name.clone()).or_insert(now);
            if !spec.enabled || now.duration_since(since) < interval {
                continue;
            }
            last.insert(name.clone(), now);
            if let Err(e) = pass(&ctx, &policy, &vms, &window, interval).await {
                tracing::warn!(pool = %name, "DRS pass: {e}");
            }
        }
    }
}

/// One pass over `policy`'s pool, carried out.
async fn pass(
    ctx: &Context,
    policy: &HostPolicy,
    vms: &[Arc<VirtualMachine>],
    window: &DemandWindow,
    interval: Duration,
) -> Result<(), Error> {
    let pool = policy.name_any();
    let snapshot = ctx.snapshot();
    let migrations = ctx.migration_writes.apply(ctx.stores.migrations.state());
    let now = Instant::now();
    // Running VMs by their mean use over the interval (or, new, their vCPUs).
    let mean = |vm: &VmKey| window.mean(vm, interval, now);
    let input = decide::pool_input(&snapshot, policy, vms, &migrations, now_ms() as i64, &mean).input();
    let Some(result) = drs::pass(&snapshot, &input).into_iter().next() else { return Ok(()) };
    ctx.metrics.drs_passes.inc();
    let plan = decide::plan(&result);
    tracing::info!(pool = %pool, imbalance = %plan.status.imbalance, moves = result.moves.len(), "DRS: {}", plan.status.message);
    for m in &plan.migrate {
        let Some(vm) = vms.iter().find(|v| key(v.as_ref()) == m.vm) else { continue };
        start(ctx, vm, m).await?;
    }
    let report = Report { at: ms_time(now_ms()), status: plan.status, recommendations: plan.recommendations };
    ctx.drs.lock().unwrap_or_else(|p| p.into_inner()).insert(pool, report);
    Ok(())
}

/// Starts move `m` of `vm`: the migration, the VM's annotation, an Event.
async fn start(ctx: &Context, vm: &VirtualMachine, m: &Move) -> Result<(), Error> {
    let metadata = serde_json::json!({
        "labels": { migration_labels::VM: vm.name_any() },
        "annotations": { annotations::DRS_REASON: m.reason },
    });
    let migration = crate::migration::request(ctx, vm, MigrationTrigger::Drs, metadata, Some(&m.to)).await?;
    let record = DrsMove {
        at_ms: now_ms() as i64,
        from: m.from.clone(),
        to: m.to.clone(),
        migration: migration.clone(),
        reason: m.reason.clone(),
    };
    // A merge of one annotation, without the resourceVersion: nothing is decided
    // on the VM as read, and the agents rewrite its status every few seconds.
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    let patch = serde_json::json!({ "metadata": { "annotations": { annotations::DRS_MOVED: serde_json::to_string(&record)? } } });
    let params =
        PatchParams { field_manager: Some(drover_crds::contract::OPERATOR_FIELD_MANAGER.into()), ..Default::default() };
    api.patch(&vm.name_any(), &params, &Patch::Merge(&patch)).await?;
    let note = format!("DRS moves it from {} to {} (migration {migration}): {}", m.from, m.to, m.reason);
    tracing::info!(vm = %m.vm, "{note}");
    ctx.events.normal(vm, reasons::DRS_MIGRATION, "Migrate", note);
    ctx.metrics.drs_migrations.inc();
    Ok(())
}
