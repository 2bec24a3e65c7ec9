//! The pure part of DRS in the operator: a HostPolicy's settings and the VMs'
//! state as the core's [`Input`], and a pass's outcome as what to write — the
//! migrations to start (FullyAutomated) or the recommendations to publish
//! (Manual, PartiallyAutomated), and the pool's DRS status.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use drover_core::drs::{Automation, Input, Move, PoolPass, Settings};
use drover_core::snapshot::{Snapshot, VmKey};
use drover_crds::contract::{DrsMove, annotations};
use drover_crds::host_policy::{DrsAutomationLevel, DrsRecommendation, DrsStatus, HostPolicy};
use drover_crds::migration::{MigrationPhase, MigrationTrigger, VirtualMachineMigration};
use drover_crds::vm::{VirtualMachine, VmPhase};
use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use crate::snapshot::key;

/// A VM DRS moved is not moved again for this many intervals.
pub const COOLDOWN_INTERVALS: u64 = 2;
/// Nor sent back to the host it left for this many.
pub const MEMORY_INTERVALS: u64 = 6;

/// The pool's DRS settings; `in_flight` DRS migrations of the pool are still
/// under way and count against its `maxConcurrentMigrations`.
pub fn settings(policy: &HostPolicy, in_flight: u32) -> Settings {
    let drs = &policy.spec.drs;
    Settings {
        enabled: drs.enabled,
        automation: match drs.automation_level {
            DrsAutomationLevel::Manual => Automation::Manual,
            DrsAutomationLevel::PartiallyAutomated => Automation::PartiallyAutomated,
            DrsAutomationLevel::FullyAutomated => Automation::FullyAutomated,
        },
        threshold: drs.migration_threshold.clamp(1, 5) as u8,
        max_moves: drs.max_concurrent_migrations.saturating_sub(in_flight),
    }
}

/// DRS migrations not ended, by the VM they move.
pub fn in_flight(migrations: &[Arc<VirtualMachineMigration>]) -> BTreeSet<VmKey> {
    migrations
        .iter()
        .filter(|m| m.spec.trigger == MigrationTrigger::Drs)
        .filter(|m| {
            !matches!(m.status.as_ref().and_then(|s| s.phase), Some(MigrationPhase::Succeeded | MigrationPhase::Failed))
        })
        .map(|m| VmKey::new(m.namespace().unwrap_or_default(), m.spec.vm_name.clone()))
        .collect()
}

/// DRS's last move of `vm`, from its annotation.
pub fn last_move(vm: &VirtualMachine) -> Option<DrsMove> {
    serde_json::from_str(vm.annotations().get(annotations::DRS_MOVED)?).ok()
}

/// Which VMs may not move (not running, moving, moved within the cooldown) and
/// where each VM DRS moved recently came from, at `now_ms` for a pool of
/// `interval_ms`.
pub fn frozen_and_left(
    vms: &[Arc<VirtualMachine>],
    moving: &BTreeSet<VmKey>,
    now_ms: i64,
    interval_ms: i64,
) -> (BTreeSet<VmKey>, HashMap<VmKey, String>) {
    let mut frozen = BTreeSet::new();
    let mut left = HashMap::new();
    for vm in vms {
        let k = key(vm.as_ref());
        let status = vm.status.as_ref();
        let running =
            status.and_then(|s| s.phase) == Some(VmPhase::Running) && status.is_some_and(|s| s.migration.is_none());
        let moved = last_move(vm);
        let since = moved.as_ref().map(|m| now_ms - m.at_ms);
        if !running || moving.contains(&k) || since.is_some_and(|s| s < COOLDOWN_INTERVALS as i64 * interval_ms) {
            frozen.insert(k.clone());
        }
        if let Some(m) = moved.filter(|_| since.is_some_and(|s| s < MEMORY_INTERVALS as i64 * interval_ms)) {
            left.insert(k, m.from);
        }
    }
    (frozen, left)
}

/// Everything one pool's pass takes beside the snapshot, as plain data (the
/// what-if command dumps and reads it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolInput {
    pub pool: String,
    pub settings: Settings,
    /// Each VM's CPU demand, host cores (VMs not listed count their vCPUs).
    pub demand: Vec<(VmKey, f64)>,
    pub frozen: Vec<VmKey>,
    pub left: Vec<(VmKey, String)>,
}

impl PoolInput {
    /// The core's input for this pool.
    pub fn input(&self) -> Input {
        Input {
            demand: self.demand.iter().cloned().collect(),
            frozen: self.frozen.iter().cloned().collect(),
            left: self.left.iter().cloned().collect(),
            settings: [(self.pool.clone(), self.settings)].into(),
        }
    }
}

/// `policy`'s pool as DRS sees it at `now_ms`: its settings (less its DRS
/// migrations under way), which VMs stay, where recent moves came from, and each
/// running VM's demand (`demand`: its mean use; VMs that do not run use nothing).
pub fn pool_input(
    snapshot: &Snapshot,
    policy: &HostPolicy,
    vms: &[Arc<VirtualMachine>],
    migrations: &[Arc<VirtualMachineMigration>],
    now_ms: i64,
    demand: &dyn Fn(&VmKey) -> Option<f64>,
) -> PoolInput {
    let pool = policy.name_any();
    let moving = in_flight(migrations);
    let hosts: BTreeSet<&str> =
        snapshot.hosts.iter().filter(|h| h.policy.as_deref() == Some(pool.as_str())).map(|h| h.name.as_str()).collect();
    let in_pool = snapshot
        .vms
        .iter()
        .filter(|v| moving.contains(&v.key) && v.host.as_deref().is_some_and(|h| hosts.contains(h)))
        .count() as u32;
    let interval_ms = i64::from(policy.spec.drs.interval_seconds.max(10)) * 1000;
    let (frozen, left) = frozen_and_left(vms, &moving, now_ms, interval_ms);
    let running: BTreeSet<VmKey> = vms
        .iter()
        .filter(|v| v.status.as_ref().and_then(|s| s.phase) == Some(VmPhase::Running))
        .map(|v| key(v.as_ref()))
        .collect();
    let demand = snapshot
        .vms
        .iter()
        .filter_map(|v| match running.contains(&v.key) {
            true => demand(&v.key).map(|d| (v.key.clone(), d)),
            false => Some((v.key.clone(), 0.0)),
        })
        .collect();
    let mut left: Vec<(VmKey, String)> = left.into_iter().collect();
    left.sort();
    PoolInput { pool, settings: settings(policy, in_pool), demand, frozen: frozen.into_iter().collect(), left }
}

/// What to write after a pool's pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Migrations to start now (FullyAutomated).
    pub migrate: Vec<Move>,
    /// Moves for users to apply (Manual, PartiallyAutomated).
    pub recommendations: Vec<DrsRecommendation>,
    pub status: DrsStatus,
}

/// The plan for `pass`.
pub fn plan(pass: &PoolPass) -> Plan {
    let automated = pass.settings.automation == Automation::FullyAutomated;
    let (migrate, recommend): (Vec<&Move>, Vec<&Move>) = pass.moves.iter().partition(|_| automated);
    let recommendations = recommend
        .into_iter()
        .map(|m| DrsRecommendation {
            vm: m.vm.to_string(),
            from: m.from.clone(),
            to: m.to.clone(),
            priority: i32::from(m.priority),
            reason: m.reason.clone(),
        })
        .collect();
    let did = match (pass.moves.len(), automated) {
        (0, _) => "no move needed".to_string(),
        (n, true) => format!("{n} migration{} started", if n == 1 { "" } else { "s" }),
        (n, false) => format!("{n} move{} recommended", if n == 1 { "" } else { "s" }),
    };
    let balanced = match pass.target {
        None => "threshold 1: only mandatory moves".to_string(),
        Some(t) if pass.before.imbalance <= t && pass.moves.is_empty() => {
            format!("balanced (imbalance {:.3}, target {t:.2})", pass.before.imbalance)
        }
        Some(t) if pass.before.imbalance <= t => format!("imbalance {:.3} within target {t:.2}", pass.before.imbalance),
        Some(t) => format!("imbalance {:.3} over target {t:.2}", pass.before.imbalance),
    };
    let mut message = format!("{balanced}; {did}");
    if !pass.blocked.is_empty() {
        message = format!("{message}; cannot: {}", pass.blocked.join("; "));
    }
    Plan {
        migrate: migrate.into_iter().cloned().collect(),
        recommendations,
        status: DrsStatus {
            imbalance: format!("{:.3}", pass.before.imbalance),
            target: pass.target.map(|t| format!("{t:.2}")),
            score: format!("{:.1}", pass.before.score),
            imbalance_after: format!("{:.3}", pass.after.imbalance),
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::drs::{Balance, Why};

    fn vm(name: &str, phase: &str, moved: Option<i64>) -> Arc<VirtualMachine> {
        let annotations = moved.map(|at| {
            serde_json::json!({ annotations::DRS_MOVED: serde_json::to_string(&DrsMove {
                at_ms: at, from: "h1".into(), to: "h2".into(), migration: "m".into(), reason: "balance".into(),
            }).unwrap() })
        });
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachine",
                "metadata": { "name": name, "namespace": "ns", "annotations": annotations },
                "spec": { "cpu": { "vcpus": 1 }, "memory": { "size": "64Mi" }, "boot": { "kernel": "/k" } },
                "status": { "phase": phase, "nodeName": "h2" }
            }))
            .unwrap(),
        )
    }

    #[test]
    fn only_running_vms_out_of_their_cooldown_move_and_none_goes_back_soon() {
        let interval = 10_000;
        let now = 1_000_000;
        let vms = [
            vm("idle", "Running", None),
            vm("stopped", "Stopped", None),
            vm("just-moved", "Running", Some(now - interval)),
            vm("moved-a-while-ago", "Running", Some(now - 3 * interval)),
            vm("moved-long-ago", "Running", Some(now - 7 * interval)),
            vm("moving", "Running", None),
        ];
        let moving = [VmKey::new("ns", "moving")].into();
        let (frozen, left) = frozen_and_left(&vms, &moving, now, interval);
        let names: Vec<&str> = frozen.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["just-moved", "moving", "stopped"]);
        let mut back: Vec<&str> = left.keys().map(|k| k.name.as_str()).collect();
        back.sort();
        assert_eq!(back, ["just-moved", "moved-a-while-ago"]);
        assert_eq!(left[&VmKey::new("ns", "just-moved")], "h1");
    }

    fn pass(automation: Automation, moves: usize) -> PoolPass {
        let balance = |imbalance| Balance { imbalance, score: 100.0, loads: vec![] };
        PoolPass {
            pool: "pool".into(),
            settings: Settings { automation, ..Default::default() },
            target: Some(0.10),
            before: balance(0.471),
            after: balance(0.118),
            moves: (0..moves)
                .map(|i| Move {
                    vm: VmKey::new("ns", format!("spin-{i}")),
                    from: "h1".into(),
                    to: "h2".into(),
                    priority: 2,
                    why: Why::Balance { gain: 0.5 },
                    imbalance_before: 0.471,
                    imbalance_after: 0.3,
                    cpus: None,
                    reason: "balance: ...".into(),
                })
                .collect(),
            blocked: vec![],
        }
    }

    #[test]
    fn fully_automated_migrates_and_the_others_recommend() {
        let p = plan(&pass(Automation::FullyAutomated, 2));
        assert_eq!((p.migrate.len(), p.recommendations.len()), (2, 0));
        assert_eq!(p.status.message, "imbalance 0.471 over target 0.10; 2 migrations started");
        assert_eq!((p.status.imbalance.as_str(), p.status.imbalance_after.as_str()), ("0.471", "0.118"));
        for level in [Automation::Manual, Automation::PartiallyAutomated] {
            let p = plan(&pass(level, 1));
            assert_eq!((p.migrate.len(), p.recommendations.len()), (0, 1));
            assert_eq!(p.recommendations[0].vm, "ns/spin-0");
            assert_eq!(p.status.message, "imbalance 0.471 over target 0.10; 1 move recommended");
        }
    }

    #[test]
    fn the_threshold_caps_at_five_and_in_flight_moves_use_up_the_limit() {
        let mut policy: HostPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "HostPolicy", "metadata": { "name": "pool" },
            "spec": { "nodeSelector": {}, "drs": { "migrationThreshold": 4, "maxConcurrentMigrations": 3 } }
        }))
        .unwrap();
        let s = settings(&policy, 1);
        assert_eq!((s.threshold, s.max_moves, s.automation), (4, 2, Automation::FullyAutomated));
        policy.spec.drs.migration_threshold = 9;
        assert_eq!(settings(&policy, 5).threshold, 5);
        assert_eq!(settings(&policy, 5).max_moves, 0);
    }
}
