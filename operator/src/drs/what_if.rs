//! What one DRS pass would do, without doing it: from the live cluster (listed
//! once) or from a dump file of it. The `drover-what-if` command.
//!
//! A live cluster is read as it stands: each running VM's demand is its current
//! `status.cpuUsage` (the operator averages over its interval; a dump taken from
//! the live cluster can be edited to try other figures), and a host's heartbeat
//! is judged by its Lease's `renewTime` against this machine's clock (the
//! operator times Leases on its own clock instead; for a what-if the difference
//! is a second of skew).

use std::collections::HashMap;
use std::sync::Arc;

use drover_core::drs::{self, PoolPass};
use drover_core::snapshot::Snapshot;
use drover_crds::drs_rule::DRSRule;
use drover_crds::host_policy::HostPolicy;
use drover_crds::migration::VirtualMachineMigration;
use drover_crds::vm::VirtualMachine;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};

use super::decide::{self, PoolInput};
use crate::Error;
use crate::heartbeats::Heartbeat;
use crate::snapshot::{World, build, key};
use crate::writes::now_ms;

/// A cluster as DRS sees it: the snapshot and each pool's input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dump {
    pub snapshot: Snapshot,
    pub pools: Vec<PoolInput>,
}

async fn list<K>(api: Api<K>) -> Result<Vec<Arc<K>>, Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api.list(&ListParams::default()).await?.items.into_iter().map(Arc::new).collect())
}

/// Reads the live cluster once.
pub async fn live(client: kube::Client, heartbeat_namespace: &str) -> Result<Dump, Error> {
    let nodes: Vec<Arc<Node>> = list(Api::all(client.clone())).await?;
    let policies: Vec<Arc<HostPolicy>> = list(Api::all(client.clone())).await?;
    let vms: Vec<Arc<VirtualMachine>> = list(Api::all(client.clone())).await?;
    let rules: Vec<Arc<DRSRule>> = list(Api::all(client.clone())).await?;
    let migrations: Vec<Arc<VirtualMachineMigration>> = list(Api::all(client.clone())).await?;
    let leases: Vec<Arc<Lease>> = list(Api::namespaced(client, heartbeat_namespace)).await?;
    let now = now_ms() as i64;
    let heartbeat = |host: &str| lease_heartbeat(leases.iter().find(|l| l.name_any() == host).map(Arc::as_ref), now);
    let snapshot = build(&World {
        nodes: &nodes,
        policies: &policies,
        vms: &vms,
        rules: &rules,
        migrations: &migrations,
        heartbeat: &heartbeat,
    });
    let usage: HashMap<_, f64> = vms
        .iter()
        .filter_map(|v| {
            Some((key(v.as_ref()), drover_crds::quantity::cores(v.status.as_ref()?.cpu_usage.as_deref()?)?))
        })
        .collect();
    let usage = |vm: &drover_core::snapshot::VmKey| usage.get(vm).copied();
    let pools = policies
        .iter()
        .filter(|p| p.spec.drs.enabled)
        .map(|p| decide::pool_input(&snapshot, p, &vms, &migrations, now, &usage))
        .collect();
    Ok(Dump { snapshot, pools })
}

/// A Lease's heartbeat by its renew time against `now_ms` (the what-if's view).
fn lease_heartbeat(lease: Option<&Lease>, now_ms: i64) -> Heartbeat {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else { return Heartbeat::Missing };
    let duration = std::time::Duration::from_secs(spec.lease_duration_seconds.unwrap_or(3).max(1) as u64);
    let renewed = spec.renew_time.as_ref().map(|t| t.0.as_millisecond()).unwrap_or(0);
    let silent = std::time::Duration::from_millis(now_ms.saturating_sub(renewed).max(0) as u64);
    if silent <= duration { Heartbeat::Fresh } else { Heartbeat::Stale { silent, duration } }
}

/// One pass per pool of `dump`.
pub fn passes(dump: &Dump) -> Vec<PoolPass> {
    dump.pools.iter().flat_map(|p| drs::pass(&dump.snapshot, &p.input())).collect()
}

/// The passes as users read them.
pub fn report(passes: &[PoolPass]) -> String {
    let mut out = String::new();
    if passes.is_empty() {
        out.push_str("no pool has DRS on (a HostPolicy with spec.drs.enabled and ready hosts)\n");
    }
    for p in passes {
        let plan = decide::plan(p);
        out.push_str(&format!(
            "pool {} ({:?}, threshold {}, at most {} moves): {}\n  imbalance {} -> {} (target {}), VM score {} -> {:.1}\n",
            p.pool,
            p.settings.automation,
            p.settings.threshold,
            p.settings.max_moves,
            plan.status.message,
            plan.status.imbalance,
            plan.status.imbalance_after,
            plan.status.target.as_deref().unwrap_or("none"),
            plan.status.score,
            p.after.score,
        ));
        for (host, load) in &p.before.loads {
            out.push_str(&format!("  host {host}: load {load:.3}\n"));
        }
        for m in &p.moves {
            out.push_str(&format!("  move {} {} -> {} (priority {}): {}\n", m.vm, m.from, m.to, m.priority, m.reason));
        }
        for b in &p.blocked {
            out.push_str(&format!("  cannot: {b}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::drs::{Automation, Settings};
    use drover_core::snapshot::{Capacity, CpuRequest, Host, HostHealth, Key, Vm};

    fn host(name: &str) -> Host {
        Host {
            name: name.into(),
            labels: Default::default(),
            health: HostHealth::Ready,
            schedulable: true,
            maintenance: false,
            policy: Some("pool".into()),
            capacity: Capacity { cpus: (0..2).collect(), vcpus: 8, memory_mib: 8192, numa: vec![], siblings: vec![] },
            numa_spanning: true,
        }
    }

    fn vm(name: &str) -> Vm {
        Vm {
            key: Key::new("ns", name),
            labels: Default::default(),
            vcpus: 1,
            memory_mib: 32,
            cpu: CpuRequest::Shared { host_cpus: None },
            numa: Default::default(),
            node_selector: Default::default(),
            host: Some("h1".into()),
            holds: true,
            allocated_cpus: None,
            ha: Default::default(),
        }
    }

    #[test]
    fn a_dump_reads_back_and_says_what_a_pass_would_do() {
        let dump = Dump {
            snapshot: Snapshot {
                hosts: vec![host("h1"), host("h2")],
                vms: vec![vm("a"), vm("b")],
                ..Default::default()
            },
            pools: vec![PoolInput {
                pool: "pool".into(),
                settings: Settings { automation: Automation::Manual, ..Default::default() },
                demand: vec![(Key::new("ns", "a"), 1.0), (Key::new("ns", "b"), 1.0)],
                frozen: vec![],
                left: vec![],
            }],
        };
        let text = serde_json::to_string(&dump).unwrap();
        let back: Dump = serde_json::from_str(&text).unwrap();
        assert_eq!(back, dump);
        let out = report(&passes(&back));
        assert!(
            out.starts_with(
                "pool pool (Manual, threshold 3, at most 2 moves): imbalance 0.500 over target 0.10; 1 move recommended"
            ),
            "{out}"
        );
        assert!(out.contains("  move ns/a h1 -> h2 (priority 2): balance: a (1.00 cores)"), "{out}");
        assert!(report(&[]).starts_with("no pool has DRS on"));
    }

    #[test]
    fn a_lease_is_fresh_within_its_duration_of_its_renewal() {
        let lease = |renew: &str| -> Lease {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "h1" }, "spec": { "renewTime": renew, "leaseDurationSeconds": 3 }
            }))
            .unwrap()
        };
        let at = 1_767_225_600_000; // 2026-01-01T00:00:00Z
        assert!(lease_heartbeat(Some(&lease("2026-01-01T00:00:00.000000Z")), at + 2_000).is_fresh());
        assert!(lease_heartbeat(Some(&lease("2026-01-01T00:00:00.000000Z")), at + 4_000).is_stale());
        assert_eq!(lease_heartbeat(None, at), Heartbeat::Missing);
    }
}
