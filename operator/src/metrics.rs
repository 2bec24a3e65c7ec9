//! The operator's metrics, in the Prometheus text format at `/metrics`.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

/// Every metric, registered once.
pub struct Metrics {
    pub registry: Registry,
    /// Reconciles per controller.
    pub reconciles: Family<ControllerLabel, Counter>,
    /// Reconciles that ended in an error, per controller.
    pub errors: Family<ControllerLabel, Counter>,
    /// Time to decide and write one placement, seconds.
    pub placement_seconds: Histogram,
    /// VMs that should run and have no host.
    pub pending_vms: Gauge,
    /// Migrations per phase.
    pub migrations: Family<PhaseLabel, Gauge>,
    /// 1 while this replica is the leader.
    pub leader: Gauge,
    /// VMs of failed hosts that HA placed elsewhere.
    pub ha_restarts: Counter,
    /// Hosts declared failed now.
    pub failed_hosts: Gauge,
    /// DRS passes made.
    pub drs_passes: Counter,
    /// Migrations DRS started (FullyAutomated pools).
    pub drs_migrations: Counter,
    /// Whether the stores have synced (for /readyz).
    pub synced: AtomicBool,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("drover_operator");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let errors = Family::<ControllerLabel, Counter>::default();
        // 0.1 ms to 3.3 s.
        let placement_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let pending_vms = Gauge::default();
        let migrations = Family::<PhaseLabel, Gauge>::default();
        let leader = Gauge::default();
        let ha_restarts = Counter::default();
        let failed_hosts = Gauge::default();
        let drs_passes = Counter::default();
        let drs_migrations = Counter::default();
        registry.register("drs_passes", "DRS balancing passes over a pool", drs_passes.clone());
        registry.register("drs_migrations", "Migrations DRS started", drs_migrations.clone());
        registry.register("ha_restarts", "VMs of failed hosts HA placed on another host", ha_restarts.clone());
        registry.register("failed_hosts", "Hosts whose heartbeat Lease ran out (failed)", failed_hosts.clone());
        registry.register("reconciles", "Reconciles, by controller", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed, by controller", errors.clone());
        registry.register("placement_seconds", "Time to place one VM and write it", placement_seconds.clone());
        registry.register("pending_vms", "VMs that should run and have no host", pending_vms.clone());
        registry.register("migrations", "VirtualMachineMigrations by phase", migrations.clone());
        registry.register("leader", "1 while this replica is the leader", leader.clone());
        Self {
            registry,
            reconciles,
            errors,
            placement_seconds,
            pending_vms,
            migrations,
            leader,
            ha_restarts,
            failed_hosts,
            drs_passes,
            drs_migrations,
            synced: AtomicBool::new(false),
        }
    }

    pub fn reconciled(&self, controller: &str) {
        self.reconciles.get_or_create(&ControllerLabel { controller: controller.into() }).inc();
    }

    pub fn failed(&self, controller: &str) {
        self.errors.get_or_create(&ControllerLabel { controller: controller.into() }).inc();
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
