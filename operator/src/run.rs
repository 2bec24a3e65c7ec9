//! What the leader runs: the watches, and one controller per
//! kind, all on one context. The controllers start at once (they drive the VM,
//! migration and Node watches), but every reconcile waits at the gate until all
//! stores have listed and a moment of heartbeats has been seen.

use std::sync::Arc;
use std::time::Duration;

use drover_crds::drs_rule::DRSRule;
use drover_crds::host_policy::HostPolicy;
use drover_crds::migration::MigrationPhase;
use futures::StreamExt;
use kube::Api;
use kube::runtime::{Controller, watcher};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::Error;
use crate::context::Context;
use crate::heartbeats::{self, Heartbeats};
use crate::metrics::{Metrics, PhaseLabel};
use crate::settings::Settings;
use crate::stores::{Nudger, Overlay, Stores, Streams};
use crate::{maintenance, migration, reports, vm};

/// Runs every controller until one ends (they do not, short of a panic). Every
/// task it starts is its own (a [`JoinSet`]): when leadership is lost and this
/// future is dropped, they all stop with it.
pub async fn lead(
    client: kube::Client,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    heartbeats: Heartbeats,
) -> Result<(), Error> {
    let mut tasks = JoinSet::new();
    let poke = Arc::new(Notify::new());
    let (stores, streams) = Stores::start(&client, &settings, poke.clone(), &mut tasks);
    let clock = heartbeats.clock.clone();
    // A host's heartbeat going stale (or fresh again) is news for its VMs (the
    // nudger) and for its Node (health annotation, HostFailed / HostRecovered).
    let (host_tx, host_rx) = tokio::sync::mpsc::unbounded_channel();
    let node_store = stores.nodes.clone();
    let mut flips = heartbeats.flips();
    let flip = poke.clone();
    tasks.spawn(async move {
        while flips.changed().await.is_ok() {
            flip.notify_one();
            for node in node_store.state() {
                let _ = host_tx.send(kube::runtime::reflector::ObjectRef::from_obj(node.as_ref()));
            }
        }
    });
    let mut host_rx = host_rx;
    let host_flips = futures::stream::poll_fn(move |cx| host_rx.poll_recv(cx));
    let fresh = clock.clone();
    let waiting = move |vm: &drover_crds::vm::VirtualMachine| {
        vm::decide::waiting(vm, &|host| heartbeats::heartbeat(&fresh, host).is_fresh())
    };
    let (nudger, nudges) = Nudger::start(poke.clone(), stores.vms.clone(), waiting, &mut tasks);
    let (open, gate) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(Context {
        client: client.clone(),
        events: crate::events::for_replica(client.clone(), &settings.identity),
        settings: settings.clone(),
        stores: stores.clone(),
        clock,
        metrics: metrics.clone(),
        placement: tokio::sync::Mutex::new(()),
        vm_writes: Overlay::default(),
        migration_writes: Overlay::default(),
        nudger,
        gate,
        drs: Default::default(),
    });
    let opener = {
        let (stores, metrics) = (stores.clone(), metrics.clone());
        async move {
            stores.synced().await;
            // Hosts are only known ready once seen renewing: a replica just started
            // must not take a silent host for a fresh one, nor a fresh one for failed.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            metrics.synced.store(true, std::sync::atomic::Ordering::Release);
            tracing::info!("stores synced; deciding");
            let _ = open.send(true);
        }
    };
    tasks.spawn(opener);
    tasks.spawn(gauges(ctx.clone()));
    tasks.spawn(crate::drs::run(ctx.clone()));
    let Streams { vms: vm_stream, migrations: migration_stream, nodes: node_stream } = streams;
    let tick = || {
        futures::stream::unfold((), |_| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Some(((), ()))
        })
    };
    let vms = Controller::for_stream(vm_stream, stores.vms.clone())
        .reconcile_on(nudges)
        .run(vm::reconcile, vm::error_policy, ctx.clone())
        .for_each(|_| async {});
    let migrations = Controller::for_stream(migration_stream, stores.migrations.clone())
        .run(migration::reconcile, migration::error_policy, ctx.clone())
        .for_each(|_| async {});
    let hosts = Controller::for_stream(node_stream, stores.nodes.clone())
        .reconcile_on(host_flips)
        .run(maintenance::reconcile, maintenance::error_policy, ctx.clone())
        .for_each(|_| async {});
    let policies = Controller::new(Api::<HostPolicy>::all(client.clone()), watcher::Config::default())
        .reconcile_all_on(tick())
        .run(reports::reconcile_policy, reports::error_policy, ctx.clone())
        .for_each(|_| async {});
    let rules = Controller::new(ctx.settings.api::<DRSRule>(&client), watcher::Config::default())
        .reconcile_all_on(tick())
        .run(reports::reconcile_rule, reports::error_policy, ctx.clone())
        .for_each(|_| async {});
    tokio::join!(vms, migrations, hosts, policies, rules);
    drop(tasks);
    Ok(())
}

/// Pending VMs and migrations by phase, every 2 s.
async fn gauges(ctx: Arc<Context>) {
    ctx.ready().await;
    loop {
        let pending = ctx
            .stores
            .vms
            .state()
            .iter()
            .filter(|v| v.status.as_ref().and_then(|s| s.phase) == Some(drover_crds::vm::VmPhase::Pending))
            .count();
        ctx.metrics.pending_vms.set(pending as i64);
        let mut counts = std::collections::BTreeMap::new();
        for phase in ["Pending", "Scheduled", "Running", "Switchover", "Succeeded", "Failed"] {
            counts.insert(phase.to_string(), 0i64);
        }
        for m in ctx.stores.migrations.state() {
            let phase = m.status.as_ref().and_then(|s| s.phase).unwrap_or(MigrationPhase::Pending);
            *counts.entry(format!("{phase:?}")).or_insert(0) += 1;
        }
        for (phase, n) in counts {
            ctx.metrics.migrations.get_or_create(&PhaseLabel { phase }).set(n);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
