//! HostPolicy and DRSRule status: what each pool has and gives, and whether each
//! rule holds. Computed from the same snapshot placement uses (pure:
//! [`policy_status`], [`rule_status`]); the controllers write what changed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use drover_core::Cluster;
use drover_core::snapshot::{Key, Snapshot};
use drover_crds::Conditions;
use drover_crds::drs_rule::{DRSRule, DRSRuleStatus, RuleViolation};
use drover_crds::host_policy::{FailoverCapacity, HaStatus, HostPolicy, HostPolicyStatus, HostSummary};
use drover_crds::quantity::format_mib;
use k8s_openapi::api::core::v1::Node;
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::Error;
use crate::context::Context;
use crate::writes::{apply_status, condition};

/// How often reports are refreshed without a change to their object.
const REFRESH: Duration = Duration::from_secs(5);

/// Condition type on a HostPolicy: every host it selects is selected by it alone.
pub const EXCLUSIVE: &str = "Exclusive";

/// The Drover hosts (Nodes with facts) a policy selects.
pub fn selected(policy: &HostPolicy, nodes: &[Arc<Node>]) -> Vec<String> {
    let Ok(selector) = Selector::try_from(policy.spec.node_selector.clone()) else { return Vec::new() };
    let mut hosts: Vec<String> = nodes
        .iter()
        .filter(|n| crate::snapshot::facts(n).is_some())
        .filter(|n| selector.matches(n.labels()))
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    hosts.sort();
    hosts
}

/// A policy's status: its hosts, what each offers and has given out, and whether
/// another policy selects any of them (the agent then follows the first by name).
pub fn policy_status(
    policy: &HostPolicy,
    cluster: &Cluster,
    hosts: &[String],
    others: &HashMap<String, Vec<String>>,
    old: Option<&HostPolicyStatus>,
    drs: Option<&crate::drs::report::Report>,
) -> HostPolicyStatus {
    let mut summaries = Vec::new();
    for name in hosts {
        let (Some(host), Some(ledger)) = (cluster.host(name), cluster.ledger(name)) else { continue };
        summaries.push(HostSummary {
            name: name.clone(),
            ready: host.health.is_ready() && host.schedulable && !host.maintenance,
            cpus: host.capacity.cpus.len() as i32,
            vcpus_allocated: (ledger.shared_vcpus + ledger.dedicated.len() as u64) as i32,
            memory: format_mib(host.capacity.memory_mib),
            memory_allocated: format_mib(ledger.memory_mib),
            vms: ledger.vms as i32,
        });
    }
    let shared: Vec<String> = hosts
        .iter()
        .filter_map(|h| others.get(h).filter(|o| !o.is_empty()).map(|o| format!("{h} (also {})", o.join(", "))))
        .collect();
    let mut conditions = old.map(|s| s.conditions.clone()).unwrap_or_default();
    let generation = policy.metadata.generation;
    conditions.set(if shared.is_empty() {
        condition(EXCLUSIVE, true, "Exclusive", "no other HostPolicy selects these hosts", generation)
    } else {
        condition(
            EXCLUSIVE,
            false,
            "Overlap",
            format!(
                "hosts selected by more than one HostPolicy (each follows the first by name): {}",
                shared.join("; ")
            ),
            generation,
        )
    });
    HostPolicyStatus {
        observed_generation: generation,
        conditions,
        host_count: Some(summaries.len() as i32),
        ready_hosts: Some(summaries.iter().filter(|s| s.ready).count() as i32),
        hosts: summaries,
        // DRS's last pass of this term, else what the status holds (a new leader's
        // first pass replaces it).
        recommendations: match drs {
            Some(r) => r.recommendations.clone(),
            None => old.map(|s| s.recommendations.clone()).unwrap_or_default(),
        },
        last_drs_run: drs.map(|r| r.at.clone()).or_else(|| old.and_then(|s| s.last_drs_run.clone())),
        drs: drs.map(|r| r.status.clone()).or_else(|| old.and_then(|s| s.drs.clone())),
        ha: Some(ha_status(policy, cluster, hosts)),
    }
}

/// HA in a pool: its failed hosts, and the failover capacity admission control
/// keeps (what the worst `hostFailuresToTolerate` hosts would need, what the
/// others have free).
pub fn ha_status(policy: &HostPolicy, cluster: &Cluster, hosts: &[String]) -> HaStatus {
    let ha = &policy.spec.ha;
    let failed: Vec<String> =
        hosts.iter().filter(|h| cluster.host(h).is_some_and(|h| h.health.is_failed())).cloned().collect();
    let name = policy.name_any();
    let failover = drover_core::admission::Admission::new(cluster).failover().remove(&name);
    let figures: Vec<FailoverCapacity> = failover
        .as_ref()
        .map(|f| {
            f.figures
                .iter()
                .map(|x| FailoverCapacity {
                    resource: x.resource.name().into(),
                    needed: x.needed,
                    free: x.free,
                    worst_hosts: x.worst.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    let ok = failover.as_ref().is_none_or(|f| f.ok());
    let n = ha.host_failures_to_tolerate;
    let mut message = if !ha.enabled {
        "HA is off: VMs of failed hosts are left as they are".to_string()
    } else if !ha.admission_control || n == 0 {
        "HA restarts VMs of failed hosts, best effort (no admission control)".to_string()
    } else if ok {
        format!("every protected VM can restart after {n} host failure{}", if n == 1 { "" } else { "s" })
    } else {
        let short: Vec<String> = failover
            .iter()
            .flat_map(|f| f.figures.iter().filter(|x| !x.ok()))
            .map(|x| format!("{} {:.1} free of {:.1} needed", x.resource.name(), x.free, x.needed))
            .collect();
        format!("failover capacity short for {n} host failure{}: {}", if n == 1 { "" } else { "s" }, short.join(", "))
    };
    if !failed.is_empty() {
        message = format!("failed: {}; {message}", failed.join(", "));
    }
    HaStatus {
        failed_hosts: failed,
        host_failures_to_tolerate: n as i32,
        failover_capacity_ok: ok,
        failover: figures,
        message: Some(message),
    }
}

/// A rule's status: compliant or not, and each violation.
pub fn rule_status(rule: &DRSRule, snapshot: &Snapshot, cluster: &Cluster) -> DRSRuleStatus {
    let key = crate::snapshot::key(rule);
    let placed = cluster.placed();
    let violations: Vec<RuleViolation> = snapshot
        .rules
        .iter()
        .find(|r| r.key == key)
        .map(|r| drover_core::rules::compliance(r, &placed))
        .unwrap_or_default()
        .into_iter()
        .map(|v| RuleViolation { vms: v.vms, nodes: v.hosts, message: v.message })
        .collect();
    DRSRuleStatus {
        observed_generation: rule.metadata.generation,
        conditions: Conditions::default(),
        // A disabled rule is not in the snapshot: nothing to break.
        compliant: Some(violations.is_empty()),
        violations,
    }
}

/// For each host, the policies that select it.
fn selectors_by_host(policies: &[Arc<HostPolicy>], nodes: &[Arc<Node>]) -> HashMap<String, Vec<String>> {
    let mut by_host: HashMap<String, Vec<String>> = HashMap::new();
    for p in policies {
        for h in selected(p, nodes) {
            by_host.entry(h).or_default().push(p.name_any());
        }
    }
    by_host
}

pub async fn reconcile_policy(policy: Arc<HostPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.is_ready() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    ctx.metrics.reconciled("hostpolicy");
    let snapshot = ctx.snapshot();
    let cluster = Cluster::new(&snapshot);
    ctx.metrics.failed_hosts.set(snapshot.hosts.iter().filter(|h| h.health.is_failed()).count() as i64);
    let nodes = ctx.stores.nodes.state();
    let hosts = selected(&policy, &nodes);
    let name = policy.name_any();
    let others: HashMap<String, Vec<String>> = selectors_by_host(&ctx.stores.policies.state(), &nodes)
        .into_iter()
        .map(|(h, ps)| (h, ps.into_iter().filter(|p| *p != name).collect()))
        .collect();
    let drs = ctx.drs.lock().unwrap_or_else(|p| p.into_inner()).get(&name).cloned();
    let status = policy_status(&policy, &cluster, &hosts, &others, policy.status.as_ref(), drs.as_ref());
    if policy.status.as_ref() != Some(&status) {
        let api: Api<HostPolicy> = Api::all(ctx.client.clone());
        apply_status(&api, policy.as_ref(), serde_json::to_value(&status)?).await?;
    }
    Ok(Action::requeue(REFRESH))
}

pub async fn reconcile_rule(rule: Arc<DRSRule>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.is_ready() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    ctx.metrics.reconciled("drsrule");
    let snapshot = ctx.snapshot();
    let cluster = Cluster::new(&snapshot);
    let status = rule_status(&rule, &snapshot, &cluster);
    if rule.status.as_ref() != Some(&status) {
        let api: Api<DRSRule> = Api::namespaced(ctx.client.clone(), &rule.namespace().unwrap_or_default());
        apply_status(&api, rule.as_ref(), serde_json::to_value(&status)?).await?;
        if !status.violations.is_empty() {
            let what: Vec<&str> = status.violations.iter().map(|v| v.message.as_str()).collect();
            tracing::warn!(rule = %Key::new(rule.namespace().unwrap_or_default(), rule.name_any()), "broken: {}", what.join("; "));
        }
    }
    Ok(Action::requeue(REFRESH))
}

pub fn error_policy<K: kube::Resource<DynamicType = ()>>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_conflict() {
        return Action::requeue(Duration::from_millis(200));
    }
    ctx.metrics.failed(&K::kind(&()).to_lowercase());
    tracing::warn!(object = %object.meta().name.clone().unwrap_or_default(), "report failed: {error}");
    Action::requeue(Duration::from_secs(5))
}
