//! What every controller shares: the client, the stores, the hosts' heartbeats,
//! the overlay of the operator's own writes, the placement lock, Events, metrics.

use std::sync::Arc;

use drover_core::snapshot::Snapshot;
use drover_crds::migration::VirtualMachineMigration;
use drover_crds::vm::VirtualMachine;

use crate::events::Events;
use crate::heartbeats::{self, SharedClock};
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::snapshot::{self, World};
use crate::stores::{Nudger, Overlay, Stores};

pub struct Context {
    pub client: kube::Client,
    pub settings: Arc<Settings>,
    pub stores: Stores,
    pub clock: SharedClock,
    pub events: Events,
    pub metrics: Arc<Metrics>,
    /// Placements and migration approvals take it, one at a time: each decides on
    /// the capacity the one before left (its write is in the overlay by then).
    pub placement: tokio::sync::Mutex<()>,
    pub vm_writes: Overlay<VirtualMachine>,
    pub migration_writes: Overlay<VirtualMachineMigration>,
    pub nudger: Nudger,
    /// Opens (true) once every store has listed: no decision before.
    pub gate: tokio::sync::watch::Receiver<bool>,
    /// What each pool's last DRS pass found and did (this term's; published by
    /// the HostPolicy reports).
    pub drs: crate::drs::report::Reports,
}

impl Context {
    /// Waits at the gate.
    pub async fn ready(&self) {
        let mut gate = self.gate.clone();
        let _ = gate.wait_for(|open| *open).await;
    }

    /// Whether the gate is open. A reconcile before it returns at once to be tried
    /// again: one waiting there would hold its controller's slot, and a controller
    /// with its slots full stops reading the watch that fills the stores, so the
    /// gate would never open.
    pub fn is_ready(&self) -> bool {
        *self.gate.borrow()
    }

    /// The cluster now: the stores, with the operator's newer writes over them.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_with(None)
    }

    /// The cluster now, with `vm` as given: the VM a reconcile decides for may be
    /// newer than the store's copy, or not in the store yet (the controller's
    /// watch and the store's are two streams), and rules must see it as it is.
    pub fn snapshot_with(&self, vm: Option<&Arc<VirtualMachine>>) -> Snapshot {
        let nodes = self.stores.nodes.state();
        let policies = self.stores.policies.state();
        let mut vms = self.vm_writes.apply(self.stores.vms.state());
        if let Some(vm) = vm {
            let id = crate::snapshot::key(vm.as_ref());
            vms.retain(|v| crate::snapshot::key(v.as_ref()) != id);
            vms.push(vm.clone());
        }
        let rules = self.stores.rules.state();
        let migrations = self.migration_writes.apply(self.stores.migrations.state());
        let clock = self.clock.clone();
        let heartbeat = move |host: &str| heartbeats::heartbeat(&clock, host);
        snapshot::build(&World {
            nodes: &nodes,
            policies: &policies,
            vms: &vms,
            rules: &rules,
            migrations: &migrations,
            heartbeat: &heartbeat,
        })
    }
}
