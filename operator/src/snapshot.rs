//! From API objects to the core's [`Snapshot`] (pure: the objects and each host's
//! heartbeat in, the snapshot out).
//!
//! - A host is a Node whose agent published host facts; it is ready when its
//!   heartbeat is fresh and its KVM usable. Capacity is what the agent offers under
//!   the HostPolicy that selects it (a host no policy selects offers every CPU,
//!   memory less 1 GiB, no overcommit: the agent's defaults).
//! - A VM holds resources on its host while it runs or is about to, and while it
//!   is stopped but its run strategy will start it there again (not when HA left
//!   it down: `drover.dev/ha-not-restarted`).
//! - Rules have their VM and host selectors resolved; disabled rules are left out.
//! - Migrations that have not ended; approved ones hold their target.

use std::collections::BTreeMap;
use std::sync::Arc;

use drover_core::lifecycle::{Phase, RunStrategy};
use drover_core::snapshot::{
    Capacity, CpuRequest, HaSettings, Host, HostHealth, Key, Migration, NumaNode, NumaRequest, RestartPriority, Rule,
    RuleKind, Snapshot, TargetState, Vm, VmHa,
};
use drover_crds::contract::{HostFacts, MAINTENANCE_TAINT};
use drover_crds::drs_rule::{DRSRule, DrsRuleType, Enforcement};
use drover_crds::host_policy::HostPolicy;
use drover_crds::migration::{MigrationPhase, MigrationTargetState, VirtualMachineMigration};
use drover_crds::vm::{self as api_vm, VirtualMachine, VmPhase};
use drover_topology::CpuSet;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use crate::heartbeats::Heartbeat;

/// Everything a snapshot is made of.
pub struct World<'a> {
    pub nodes: &'a [Arc<Node>],
    pub policies: &'a [Arc<HostPolicy>],
    pub vms: &'a [Arc<VirtualMachine>],
    pub rules: &'a [Arc<DRSRule>],
    pub migrations: &'a [Arc<VirtualMachineMigration>],
    /// A host's heartbeat (on the operator's clock).
    pub heartbeat: &'a dyn Fn(&str) -> Heartbeat,
}

/// The snapshot of `world`, hosts and VMs sorted by name (decisions do not depend
/// on the order the stores hand objects out).
pub fn build(world: &World) -> Snapshot {
    let mut hosts: Vec<Host> = world.nodes.iter().filter_map(|n| host(n, world.policies, world.heartbeat)).collect();
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    let ha: BTreeMap<String, HaSettings> =
        world.policies.iter().filter_map(|p| Some((p.metadata.name.clone()?, ha_settings(p)))).collect();
    // A VM that names no restart priority takes its host's pool's default.
    let default_priority = |vm: &VirtualMachine| -> Option<RestartPriority> {
        let node = vm.status.as_ref()?.node_name.as_deref()?;
        let policy = hosts.iter().find(|h| h.name == node)?.policy.as_deref()?;
        let policy = world.policies.iter().find(|p| p.metadata.name.as_deref() == Some(policy))?;
        Some(priority(policy.spec.ha.default_restart_priority))
    };
    let mut vms: Vec<Vm> = world
        .vms
        .iter()
        .filter_map(|v| {
            let mut core = vm(v)?;
            if v.spec.ha.restart_priority.is_none()
                && let Some(p) = default_priority(v)
            {
                core.ha.priority = p;
            }
            Some(core)
        })
        .collect();
    vms.sort_by(|a, b| a.key.cmp(&b.key));
    let mut rules: Vec<Rule> = world.rules.iter().filter_map(|r| rule(r, world.vms, world.nodes)).collect();
    rules.sort_by(|a, b| a.key.cmp(&b.key));
    let mut migrations: Vec<Migration> = world.migrations.iter().filter_map(|m| migration(m)).collect();
    migrations.sort_by(|a, b| a.key.cmp(&b.key));
    Snapshot { hosts, vms, rules, migrations, ha }
}

/// A HostPolicy's HA settings as the core reads them.
pub fn ha_settings(policy: &HostPolicy) -> HaSettings {
    let ha = &policy.spec.ha;
    HaSettings {
        enabled: ha.enabled,
        admission_control: ha.admission_control,
        host_failures_to_tolerate: ha.host_failures_to_tolerate,
    }
}

/// The core's restart priority.
pub fn priority(p: api_vm::RestartPriority) -> RestartPriority {
    match p {
        api_vm::RestartPriority::Disabled => RestartPriority::Disabled,
        api_vm::RestartPriority::Low => RestartPriority::Low,
        api_vm::RestartPriority::Medium => RestartPriority::Medium,
        api_vm::RestartPriority::High => RestartPriority::High,
    }
}

/// A Node's host facts, if its agent published readable ones.
pub fn facts(node: &Node) -> Option<HostFacts> {
    node.metadata.annotations.as_ref().and_then(HostFacts::from_annotations).and_then(Result::ok)
}

/// Whether a Node is tainted for maintenance.
pub fn in_maintenance(node: &Node) -> bool {
    node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| t.iter().any(|t| t.key == MAINTENANCE_TAINT))
}

/// The host a Node is, when an agent runs there.
pub fn host(node: &Node, policies: &[Arc<HostPolicy>], heartbeat: &dyn Fn(&str) -> Heartbeat) -> Option<Host> {
    let name = node.metadata.name.clone()?;
    let facts = facts(node)?;
    let beat = heartbeat(&name);
    let health = match (beat.problem(), facts.kvm.usable) {
        // Stale for its lease duration on our clock: failed (its VMs were fenced).
        (Some(problem), _) if beat.is_stale() => HostHealth::Failed(problem),
        (Some(problem), _) => HostHealth::NotReady(problem),
        (None, false) => HostHealth::NotReady(format!(
            "KVM is not usable: {}",
            facts.kvm.reason.clone().unwrap_or_else(|| "no reason given".into())
        )),
        (None, true) => HostHealth::Ready,
    };
    let policy = facts.policy.as_ref().and_then(|p| policies.iter().find(|hp| hp.metadata.name.as_deref() == Some(p)));
    let cpus = facts.offered_cpus();
    let numa = facts
        .topology
        .numa_nodes
        .iter()
        .map(|n| NumaNode {
            id: n.id,
            cpus: CpuSet::parse(&n.cpus).unwrap_or_default().iter().filter(|c| cpus.contains(*c)).collect(),
            memory_mib: n.memory_mib,
        })
        .collect();
    let siblings = facts.topology.sibling_groups.iter().filter_map(|g| CpuSet::parse(g).ok()).collect();
    Some(Host {
        labels: node.metadata.labels.clone().unwrap_or_default(),
        health,
        schedulable: !node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false),
        maintenance: in_maintenance(node),
        policy: facts.policy.clone(),
        capacity: Capacity { cpus, vcpus: facts.offered.vcpus, memory_mib: facts.offered.memory_mib, numa, siblings },
        numa_spanning: policy.is_none_or(|p| p.spec.numa.allow_spanning),
        name,
    })
}

/// The core's run strategy.
pub fn strategy(spec: &api_vm::VirtualMachineSpec) -> RunStrategy {
    match spec.run_strategy {
        api_vm::RunStrategy::Always => RunStrategy::Always,
        api_vm::RunStrategy::RerunOnFailure => RunStrategy::RerunOnFailure,
        api_vm::RunStrategy::Manual => RunStrategy::Manual,
        api_vm::RunStrategy::Halted => RunStrategy::Halted,
    }
}

/// The core's phase.
pub fn phase(phase: VmPhase) -> Phase {
    match phase {
        VmPhase::Pending => Phase::Pending,
        VmPhase::Scheduled => Phase::Scheduled,
        VmPhase::Starting => Phase::Starting,
        VmPhase::Running => Phase::Running,
        VmPhase::Migrating => Phase::Migrating,
        VmPhase::Stopping => Phase::Stopping,
        VmPhase::Stopped => Phase::Stopped,
        VmPhase::Failed => Phase::Failed,
        VmPhase::Unknown => Phase::Unknown,
    }
}

/// Whether a VM holds resources on its host (see the module's comment).
pub fn holds(vm: &VirtualMachine) -> bool {
    let Some(status) = vm.status.as_ref() else { return false };
    let Some(host) = status.node_name.as_deref() else { return false };
    // Left down by HA when that host failed: nothing starts it there again until
    // a person hands it back (removes the annotation), so it keeps no room.
    if status.phase == Some(VmPhase::Failed)
        && vm.annotations().get(drover_crds::contract::annotations::HA_NOT_RESTARTED).map(String::as_str) == Some(host)
    {
        return false;
    }
    match status.phase.map(phase) {
        Some(p) if p.is_active() => true,
        Some(Phase::Unknown) => true,
        Some(Phase::Stopped) => strategy(&vm.spec) == RunStrategy::Always,
        Some(Phase::Failed) => matches!(strategy(&vm.spec), RunStrategy::Always | RunStrategy::RerunOnFailure),
        _ => false,
    }
}

/// The VM as the core sees it; `None` when its memory size cannot be read (the
/// CRD refuses such specs, so only a hand-edited object gets here).
pub fn vm(vm: &VirtualMachine) -> Option<Vm> {
    let memory_mib = drover_crds::quantity::memory_mib(&vm.spec.memory.size).ok()?;
    let cpu = &vm.spec.cpu;
    let host_cpus = cpu.host_cpus.as_deref().and_then(|l| CpuSet::parse(l).ok());
    let status = vm.status.as_ref();
    Some(Vm {
        key: key(vm),
        labels: vm.labels().clone(),
        vcpus: cpu.vcpus,
        memory_mib,
        cpu: match cpu.placement {
            api_vm::CpuPlacement::Shared => CpuRequest::Shared { host_cpus },
            api_vm::CpuPlacement::Dedicated => CpuRequest::Dedicated { host_cpus, allow_siblings: cpu.allow_siblings },
        },
        numa: NumaRequest { strict: cpu.numa.policy == api_vm::NumaPolicy::Strict, nodes: cpu.numa.nodes.clone() },
        node_selector: vm.spec.node_selector.clone(),
        host: status.and_then(|s| s.node_name.clone()),
        holds: holds(vm),
        allocated_cpus: status
            .and_then(|s| s.allocated_cpus.as_deref())
            .and_then(|l| CpuSet::parse(l).ok())
            .filter(|_| cpu.placement == api_vm::CpuPlacement::Dedicated),
        ha: VmHa {
            priority: vm.spec.ha.restart_priority.map(priority).unwrap_or_default(),
            keeps_running: matches!(strategy(&vm.spec), RunStrategy::Always | RunStrategy::RerunOnFailure),
        },
    })
}

/// A namespaced object's key.
pub fn key<K: kube::Resource>(object: &K) -> Key {
    Key::new(object.meta().namespace.clone().unwrap_or_default(), object.meta().name.clone().unwrap_or_default())
}

/// A rule with its selectors resolved; `None` when disabled.
pub fn rule(rule: &DRSRule, vms: &[Arc<VirtualMachine>], nodes: &[Arc<Node>]) -> Option<Rule> {
    if !rule.spec.enabled {
        return None;
    }
    let ns = rule.namespace().unwrap_or_default();
    let members = match (&rule.spec.vm_names, &rule.spec.vm_selector) {
        (Some(names), _) => names.iter().map(|n| Key::new(ns.clone(), n.clone())).collect(),
        (None, Some(selector)) => {
            let selector = Selector::try_from(selector.clone()).ok()?;
            vms.iter()
                .filter(|v| v.namespace().as_deref() == Some(ns.as_str()))
                .filter(|v| selector.matches(v.labels()))
                .map(|v| key(v.as_ref()))
                .collect()
        }
        (None, None) => Default::default(),
    };
    let hosts = match &rule.spec.node_selector {
        Some(selector) => {
            let selector = Selector::try_from(selector.clone()).ok()?;
            nodes.iter().filter(|n| selector.matches(n.labels())).filter_map(|n| n.metadata.name.clone()).collect()
        }
        None => Default::default(),
    };
    Some(Rule {
        key: key(rule),
        kind: match rule.spec.type_ {
            DrsRuleType::VmVmAffinity => RuleKind::VmVmAffinity,
            DrsRuleType::VmVmAntiAffinity => RuleKind::VmVmAntiAffinity,
            DrsRuleType::VmHostAffinity => RuleKind::VmHostAffinity,
            DrsRuleType::VmHostAntiAffinity => RuleKind::VmHostAntiAffinity,
        },
        required: rule.spec.enforcement == Enforcement::Required,
        vms: members,
        hosts,
    })
}

/// Whether a migration is under way (approved and not ended).
pub fn migration_active(m: &VirtualMachineMigration) -> bool {
    matches!(
        m.status.as_ref().and_then(|s| s.phase),
        Some(MigrationPhase::Scheduled | MigrationPhase::Running | MigrationPhase::Switchover)
    )
}

/// Whether a migration has ended.
pub fn migration_finished(m: &VirtualMachineMigration) -> bool {
    matches!(m.status.as_ref().and_then(|s| s.phase), Some(MigrationPhase::Succeeded | MigrationPhase::Failed))
}

/// A migration that has not ended.
pub fn migration(m: &VirtualMachineMigration) -> Option<Migration> {
    if migration_finished(m) {
        return None;
    }
    let status = m.status.as_ref();
    let approved = migration_active(m);
    Some(Migration {
        key: key(m),
        vm: Key::new(m.namespace().unwrap_or_default(), m.spec.vm_name.clone()),
        source: status.and_then(|s| s.source_node.clone()).unwrap_or_default(),
        target: status.and_then(|s| s.target_node.clone()).filter(|_| approved),
        approved,
        target_state: status.and_then(|s| s.target_state).map(target_state),
    })
}

/// The core's view of what a migration's target VMM does.
pub fn target_state(state: MigrationTargetState) -> TargetState {
    match state {
        MigrationTargetState::Receiving => TargetState::Receiving,
        MigrationTargetState::Running => TargetState::Running,
        MigrationTargetState::Stopped => TargetState::Stopped,
    }
}

/// The CPUs Shared VMs may use on `host`: those it offers that no Dedicated VM holds.
pub fn shared_cpus(snapshot: &drover_core::Snapshot, host: &str) -> Option<String> {
    let offered = &snapshot.hosts.iter().find(|h| h.name == host)?.capacity.cpus;
    let dedicated = dedicated_by_host(snapshot).remove(host).unwrap_or_default();
    Some(offered.iter().filter(|c| !dedicated.contains(*c)).collect::<drover_topology::CpuSet>().to_string())
}

/// The Dedicated CPUs held on each host (for Shared VMs' allocated CPUs).
pub fn dedicated_by_host(snapshot: &Snapshot) -> BTreeMap<String, CpuSet> {
    let mut out: BTreeMap<String, std::collections::BTreeSet<u32>> = BTreeMap::new();
    for vm in snapshot.vms.iter().filter(|v| v.holds && v.is_dedicated()) {
        if let (Some(host), Some(cpus)) = (&vm.host, &vm.allocated_cpus) {
            out.entry(host.clone()).or_default().extend(cpus.iter());
        }
    }
    out.into_iter().map(|(h, s)| (h, s.into_iter().collect())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, facts: Option<serde_json::Value>, extra: serde_json::Value) -> Arc<Node> {
        let mut n = serde_json::json!({ "metadata": { "name": name, "labels": { "pool": "a" } } });
        if let Some(f) = facts {
            n["metadata"]["annotations"] = serde_json::json!({ "drover.dev/host-facts": f.to_string() });
        }
        if let Some(spec) = extra.get("spec") {
            n["spec"] = spec.clone();
        }
        Arc::new(serde_json::from_value(n).unwrap())
    }

    fn facts(usable: bool) -> serde_json::Value {
        serde_json::json!({
            "kvm": { "usable": usable, "reason": if usable { None } else { Some("no /dev/kvm") }, "maxVcpus": 254 },
            "topology": { "cpus": "0-3", "cores": 4, "threadsPerCore": 1, "numaNodes": [{ "id": 0, "cpus": "0-3", "memoryMib": 8192 }], "memoryMib": 8192 },
            "offered": { "cpus": "1-3", "vcpus": 12, "memoryMib": 6144, "memoryOvercommitRatio": 1.0 }
        })
    }

    fn vm(json: serde_json::Value) -> Arc<VirtualMachine> {
        let mut v = serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": { "name": "v", "namespace": "ns", "labels": { "app": "web" } },
            "spec": { "cpu": { "vcpus": 2 }, "memory": { "size": "1Gi" }, "boot": { "kernel": "/k" } }
        });
        for (k, val) in json.as_object().unwrap() {
            v[k] = val.clone();
        }
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn nodes_become_hosts_with_their_health() {
        let nodes = vec![
            node("h1", Some(facts(true)), serde_json::json!({})),
            node("h2", Some(facts(false)), serde_json::json!({})),
            node(
                "h3",
                Some(facts(true)),
                serde_json::json!({ "spec": { "unschedulable": true, "taints": [{ "key": "drover.dev/maintenance", "effect": "NoExecute" }] } }),
            ),
            node("plain", None, serde_json::json!({})),
        ];
        let heartbeat = |h: &str| if h == "h3" { Heartbeat::Missing } else { Heartbeat::Fresh };
        let world =
            World { nodes: &nodes, policies: &[], vms: &[], rules: &[], migrations: &[], heartbeat: &heartbeat };
        let s = build(&world);
        assert_eq!(s.hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), vec!["h1", "h2", "h3"]);
        assert_eq!(s.hosts[0].health, HostHealth::Ready);
        assert_eq!(s.hosts[0].capacity.cpus.to_string(), "1-3");
        assert_eq!(s.hosts[0].capacity.numa[0].cpus.to_string(), "1-3", "NUMA nodes hold only offered CPUs");
        assert_eq!(s.hosts[1].health, HostHealth::NotReady("KVM is not usable: no /dev/kvm".into()));
        assert_eq!(s.hosts[2].health, HostHealth::NotReady("no heartbeat Lease".into()));
        assert!(!s.hosts[2].schedulable && s.hosts[2].maintenance);
    }

    #[test]
    fn vms_hold_resources_while_they_run_or_will_restart_in_place() {
        let table = [
            ("Always", Some("Running"), Some("h1"), true),
            ("Always", Some("Scheduled"), Some("h1"), true),
            ("Always", Some("Stopped"), Some("h1"), true),
            ("RerunOnFailure", Some("Stopped"), Some("h1"), false),
            ("RerunOnFailure", Some("Failed"), Some("h1"), true),
            ("Manual", Some("Failed"), Some("h1"), false),
            ("Always", Some("Pending"), None, false),
            ("Always", None, None, false),
        ];
        for (strategy, phase, host, held) in table {
            let mut status = serde_json::json!({});
            if let Some(p) = phase {
                status["phase"] = p.into();
            }
            if let Some(h) = host {
                status["nodeName"] = h.into();
            }
            let v = vm(
                serde_json::json!({ "spec": { "runStrategy": strategy, "cpu": { "vcpus": 2 }, "memory": { "size": "1Gi" }, "boot": { "kernel": "/k" } }, "status": status }),
            );
            assert_eq!(holds(&v), held, "{strategy} {phase:?} {host:?}");
        }
        // A VM HA left down (Disabled, its host failed) keeps no room there.
        let left = vm(serde_json::json!({
            "metadata": { "annotations": { "drover.dev/ha-not-restarted": "h1" } },
            "spec": { "runStrategy": "Always", "cpu": { "vcpus": 2 }, "memory": { "size": "1Gi" }, "boot": { "kernel": "/k" } },
            "status": { "phase": "Failed", "nodeName": "h1" }
        }));
        assert!(!holds(&left));
    }

    #[test]
    fn rules_resolve_their_selectors_within_the_namespace() {
        let vms = vec![vm(serde_json::json!({})), {
            let mut other = (*vm(serde_json::json!({}))).clone();
            other.metadata.namespace = Some("elsewhere".into());
            Arc::new(other)
        }];
        let nodes = vec![node("h1", Some(facts(true)), serde_json::json!({}))];
        let r: DRSRule = serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "DRSRule",
            "metadata": { "name": "spread", "namespace": "ns" },
            "spec": { "type": "VmVmAntiAffinity", "enforcement": "Required", "vmSelector": { "matchLabels": { "app": "web" } } }
        }))
        .unwrap();
        let resolved = rule(&r, &vms, &nodes).unwrap();
        assert_eq!(resolved.vms.iter().map(|k| k.to_string()).collect::<Vec<_>>(), vec!["ns/v"]);
        assert!(resolved.required);
        let mut off = r.clone();
        off.spec.enabled = false;
        assert!(rule(&off, &vms, &nodes).is_none());
    }
}

#[cfg(test)]
mod placement_tests {
    use super::*;
    use drover_core::Cluster;

    #[test]
    fn a_rule_resolved_from_api_objects_keeps_its_vms_apart() {
        let facts = serde_json::json!({
            "kvm": { "usable": true, "maxVcpus": 254 },
            "topology": { "cpus": "0-1", "cores": 2, "threadsPerCore": 1, "numaNodes": [{ "id": 0, "cpus": "0-1", "memoryMib": 8192 }], "memoryMib": 8192 },
            "offered": { "cpus": "0-1", "vcpus": 2, "memoryMib": 6144, "memoryOvercommitRatio": 1.0 }
        });
        let node = |name: &str| -> Arc<Node> {
            Arc::new(serde_json::from_value(serde_json::json!({ "metadata": { "name": name, "annotations": { "drover.dev/host-facts": facts.to_string() } } })).unwrap())
        };
        let vm = |name: &str, status: serde_json::Value| -> Arc<VirtualMachine> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachine",
                    "metadata": { "name": name, "namespace": "ns", "labels": { "app": "web" } },
                    "spec": { "cpu": { "vcpus": 1 }, "memory": { "size": "32Mi" }, "boot": { "kernel": "/k" } },
                    "status": status
                }))
                .unwrap(),
            )
        };
        let r: Arc<DRSRule> = Arc::new(serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "DRSRule",
            "metadata": { "name": "spread", "namespace": "ns" },
            "spec": { "type": "VmVmAntiAffinity", "enforcement": "Required", "vmSelector": { "matchLabels": { "app": "web" } } }
        })).unwrap());
        let nodes = vec![node("pa"), node("pb")];
        let vms = vec![
            vm("web-1", serde_json::json!({ "phase": "Running", "nodeName": "pa" })),
            vm("web-2", serde_json::json!({ "phase": "Running", "nodeName": "pb" })),
            vm("web-3", serde_json::json!({})),
        ];
        let heartbeat = |_: &str| Heartbeat::Fresh;
        let world =
            World { nodes: &nodes, policies: &[], vms: &vms, rules: &[r], migrations: &[], heartbeat: &heartbeat };
        let snap = build(&world);
        let cluster = Cluster::new(&snap);
        let w3 = snap.vms.iter().find(|v| v.key.name == "web-3").unwrap();
        let result = cluster.place(w3);
        assert!(result.is_err(), "{result:?} {:?}", snap.rules);
    }
}
