//! What this host offers, published on its `Node` so that the operator (and users,
//! through selectors) know where VMs can run: whether KVM is usable, the CPU/NUMA/
//! hyper-thread topology, the CPUs and memory offered to VMs under the HostPolicy
//! that selects the host, and where migrations and the console reach the agent.

use std::collections::BTreeMap;
use std::path::Path;

pub use drover_crds::contract::HostFacts;
use drover_crds::contract::{HeartbeatFact, KvmFact, NumaFact, Offered, TopologyFact, annotations, labels};
use drover_crds::host_policy::{HostPolicy, IsolationResponse};
use drover_topology::{CpuSet, HostTopology};
use kube::core::{Selector, SelectorExt};

use crate::Error;
use crate::settings::Settings;

/// Gathers the facts: topology from `sysfs_root`, memory from `/proc/meminfo`, KVM
/// as the VMM finds it, capacity from the first HostPolicy (by name) whose selector
/// matches the node's labels.
pub fn gather(
    settings: &Settings,
    node_labels: &BTreeMap<String, String>,
    policies: &[HostPolicy],
) -> Result<HostFacts, Error> {
    let topology = HostTopology::read(&settings.sysfs_root)
        .map_err(|e| Error::Io(format!("host topology from {}: {e}", settings.sysfs_root.display())))?;
    let memory_mib = meminfo_total_mib().unwrap_or(0);
    let kvm = probe_kvm(&settings.vmm, &settings.kvm_device);
    Ok(compute(&topology, memory_mib, kvm, node_labels, policies))
}

/// Whether the VMM can run VMs on `kvm_device`: `drover-vmm kvm-check` is the one
/// judge of what the VMM needs, so the agent asks it rather than opening KVM itself.
pub fn probe_kvm(vmm: &Path, kvm_device: &Path) -> KvmFact {
    let output = match std::process::Command::new(vmm).arg("kvm-check").arg("--device").arg(kvm_device).output() {
        Ok(output) => output,
        Err(e) => {
            return KvmFact {
                usable: false,
                reason: Some(format!("cannot run {} kvm-check: {e}", vmm.display())),
                max_vcpus: 0,
            };
        }
    };
    match serde_json::from_slice::<drover_vmm_api::KvmFacts>(&output.stdout) {
        Ok(facts) if facts.usable() => KvmFact { usable: true, reason: None, max_vcpus: facts.max_vcpus },
        Ok(facts) => KvmFact {
            usable: false,
            reason: Some(format!("{} lacks {}", kvm_device.display(), facts.missing().join(", "))),
            max_vcpus: facts.max_vcpus,
        },
        // No facts at all: the device did not open (the VMM's log line says why).
        Err(_) => {
            let log = String::from_utf8_lossy(&output.stderr);
            let why = log.lines().last().map(str::trim).filter(|l| !l.is_empty()).unwrap_or("kvm-check failed");
            KvmFact { usable: false, reason: Some(format!("{} ({why})", kvm_device.display())), max_vcpus: 0 }
        }
    }
}

/// The pure part of [`gather`].
pub fn compute(
    topology: &HostTopology,
    memory_mib: u64,
    kvm: KvmFact,
    node_labels: &BTreeMap<String, String>,
    policies: &[HostPolicy],
) -> HostFacts {
    let policy = selecting_policy(node_labels, policies);
    let online = topology.online();
    let ratio = policy.map(|p| p.spec.capacity.memory_overcommit_ratio).unwrap_or(1.0);
    let (offered_cpus, vcpus, offered_memory) = match policy {
        Some(p) => {
            let reserved =
                p.spec.capacity.reserved_cpus.as_deref().and_then(|l| CpuSet::parse(l).ok()).unwrap_or_default();
            let cpus: CpuSet = online.iter().filter(|c| !reserved.contains(*c)).collect();
            let reserved_mib = crate::vm_config::memory_mib(&p.spec.capacity.reserved_memory).unwrap_or(1024);
            let vcpus = (cpus.len() as f64 * p.spec.capacity.cpu_overcommit_ratio).floor() as u64;
            let memory = (memory_mib.saturating_sub(reserved_mib) as f64 * p.spec.capacity.memory_overcommit_ratio)
                .floor() as u64;
            (cpus, vcpus, memory)
        }
        // Without a policy: every CPU, no overcommit, and the HostPolicy default of 1 GiB for the host.
        None => (online.clone(), online.len() as u64, memory_mib.saturating_sub(1024)),
    };
    let cores: std::collections::BTreeSet<(u32, u32)> = topology.cpus.iter().map(|c| (c.package, c.core)).collect();
    let threads_per_core = topology.cpus.iter().map(|c| c.siblings.len()).max().unwrap_or(1).max(1);
    let sibling_groups: std::collections::BTreeSet<String> =
        topology.cpus.iter().filter(|c| c.siblings.len() > 1).map(|c| c.siblings.to_string()).collect();
    HostFacts {
        kvm,
        topology: TopologyFact {
            cpus: online.to_string(),
            cores: cores.len(),
            threads_per_core,
            numa_nodes: topology
                .nodes
                .iter()
                .map(|n| NumaFact { id: n.id, cpus: n.cpus.to_string(), memory_mib: n.memory_kib.map(|k| k / 1024) })
                .collect(),
            memory_mib,
            sibling_groups: sibling_groups.into_iter().collect(),
        },
        offered: Offered {
            cpus: offered_cpus.to_string(),
            vcpus,
            memory_mib: offered_memory,
            memory_overcommit_ratio: ratio,
        },
        policy: policy.and_then(|p| p.metadata.name.clone()),
        heartbeat: policy.map(|p| HeartbeatFact {
            interval_seconds: p.spec.ha.heartbeat_interval_seconds,
            lease_duration_seconds: p.spec.ha.failure_detection_seconds,
        }),
    }
}

/// The HostPolicy that selects a host with these labels: the first by name whose
/// selector matches.
pub fn selecting_policy<'a>(
    node_labels: &BTreeMap<String, String>,
    policies: &'a [HostPolicy],
) -> Option<&'a HostPolicy> {
    let mut sorted: Vec<&HostPolicy> = policies.iter().collect();
    sorted.sort_by_key(|p| p.metadata.name.clone());
    sorted
        .into_iter()
        .find(|p| Selector::try_from(p.spec.node_selector.clone()).map(|s| s.matches(node_labels)).unwrap_or(false))
}

/// What the host does with its VMs when it looks isolated: its HostPolicy's
/// `ha.isolationResponse`, else PowerOff (the HostPolicy default). Kept by the
/// agent for its heartbeat, not published: the contract's facts carry no such field.
pub fn isolation_response(node_labels: &BTreeMap<String, String>, policies: &[HostPolicy]) -> IsolationResponse {
    selecting_policy(node_labels, policies).map(|p| p.spec.ha.isolation_response).unwrap_or_default()
}

/// The merge patch that publishes the facts on the Node.
pub fn node_patch(facts: &HostFacts, settings: &Settings) -> serde_json::Value {
    serde_json::json!({
        "metadata": {
            "labels": {
                labels::KVM: facts.kvm.usable.to_string(),
                labels::CPUS: CpuSet::parse(&facts.topology.cpus).map(|s| s.len()).unwrap_or(0).to_string(),
                labels::NUMA_NODES: facts.topology.numa_nodes.len().max(1).to_string(),
                labels::SMT: (facts.topology.threads_per_core > 1).to_string(),
            },
            "annotations": {
                annotations::HOST_FACTS: serde_json::to_string(facts).unwrap_or_default(),
                annotations::MIGRATION_ADDRESS: settings.address.to_string(),
                annotations::AGENT_URL: settings.http_url(),
            }
        }
    })
}

fn meminfo_total_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Publishes the facts on the Node at start, whenever a HostPolicy or the Node's
/// labels change, and every `refresh` in any case; `facts` carries them to the
/// controllers, `isolation` the policy's isolation response to the heartbeat.
pub async fn publish(
    client: kube::Client,
    settings: std::sync::Arc<Settings>,
    facts: tokio::sync::watch::Sender<Option<HostFacts>>,
    isolation: tokio::sync::watch::Sender<IsolationResponse>,
    refresh: std::time::Duration,
) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Node;
    use kube::Api;
    use kube::api::{Patch, PatchParams};
    use kube::runtime::{WatchStreamExt, reflector, watcher};

    let nodes: Api<Node> = Api::all(client.clone());
    let policies: Api<HostPolicy> = Api::all(client.clone());
    let (store, writer) = reflector::store();
    let mut policy_events = reflector(writer, watcher(policies, watcher::Config::default())).default_backoff().boxed();
    let node_config = watcher::Config::default().fields(&format!("metadata.name={}", settings.node));
    let mut node_events = watcher(nodes.clone(), node_config).default_backoff().applied_objects().boxed();
    let mut published: Option<serde_json::Value> = None;
    let mut node_labels = BTreeMap::new();
    loop {
        tokio::select! {
            event = node_events.next() => {
                if let Some(Ok(node)) = event {
                    node_labels = node.metadata.labels.unwrap_or_default();
                    // Our own labels are part of what we publish, not an input.
                    for own in labels::AGENT_OWNED {
                        node_labels.remove(own);
                    }
                }
            }
            _ = policy_events.next() => {}
            _ = tokio::time::sleep(refresh) => {}
        }
        let list: Vec<HostPolicy> = store.state().iter().map(|p| (**p).clone()).collect();
        isolation.send_if_modified(|response| {
            let now = isolation_response(&node_labels, &list);
            std::mem::replace(response, now) != now
        });
        // Gathering runs the VMM's kvm-check: off the async threads.
        let (for_gather, labels_now) = (settings.clone(), node_labels.clone());
        let gathered = match tokio::task::spawn_blocking(move || gather(&for_gather, &labels_now, &list)).await {
            Ok(Ok(f)) => f,
            Err(e) => {
                tracing::error!("cannot gather host facts: {e}");
                continue;
            }
            Ok(Err(e)) => {
                tracing::error!("cannot gather host facts: {e}");
                continue;
            }
        };
        let patch = node_patch(&gathered, &settings);
        if published.as_ref() != Some(&patch) {
            match nodes.patch(&settings.node, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    if published.is_none() {
                        tracing::info!(kvm = gathered.kvm.usable, reason = ?gathered.kvm.reason, offered_cpus = %gathered.offered.cpus, offered_memory_mib = gathered.offered.memory_mib, policy = ?gathered.policy, "host facts published on the Node");
                    }
                    published = Some(patch);
                }
                Err(e) => tracing::warn!("cannot publish host facts on Node {}: {e}", settings.node),
            }
        }
        if !gathered.kvm.usable && facts.borrow().as_ref().is_none_or(|f| f.kvm.usable) {
            tracing::error!("this host cannot run VMs: {}", gathered.kvm.reason.clone().unwrap_or_default());
        }
        facts.send_replace(Some(gathered));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, json_spec: serde_json::Value) -> HostPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "HostPolicy",
            "metadata": { "name": name }, "spec": json_spec
        }))
        .unwrap()
    }

    fn usable() -> KvmFact {
        KvmFact { usable: true, reason: None, max_vcpus: 254 }
    }

    #[test]
    fn facts_follow_the_policy_that_selects_the_host() {
        let root = tempfile::tempdir().unwrap();
        // 2 sockets × 4 cores × 2 threads: 16 CPUs, 2 NUMA nodes.
        drover_topology::write_fixture(root.path(), 2, 4, 2).unwrap();
        let topology = HostTopology::read(root.path()).unwrap();
        let labels: BTreeMap<String, String> = [("pool".to_string(), "prod".to_string())].into();
        let other = policy("a-other", serde_json::json!({ "nodeSelector": { "matchLabels": { "pool": "dev" } } }));
        let prod = policy(
            "b-prod",
            serde_json::json!({
                "nodeSelector": { "matchLabels": { "pool": "prod" } },
                "capacity": { "reservedCpus": "0-1", "reservedMemory": "2Gi", "cpuOvercommitRatio": 2.0, "memoryOvercommitRatio": 1.5 }
            }),
        );
        let facts = compute(&topology, 65536, usable(), &labels, &[other.clone(), prod]);
        assert_eq!(facts.policy.as_deref(), Some("b-prod"));
        assert_eq!(
            facts.heartbeat,
            Some(HeartbeatFact { interval_seconds: 1, lease_duration_seconds: 3 }),
            "HostPolicy defaults"
        );
        assert_eq!(facts.offered.cpus, "2-15");
        assert_eq!(facts.offered.vcpus, 28);
        assert_eq!(facts.offered.memory_mib, (65536 - 2048) * 3 / 2);
        assert_eq!(facts.topology.cores, 8);
        assert_eq!(facts.topology.threads_per_core, 2);
        assert_eq!(facts.topology.numa_nodes.len(), 2);
        assert_eq!(facts.topology.sibling_groups.len(), 8, "one group per core: {:?}", facts.topology.sibling_groups);

        assert_eq!(isolation_response(&labels, std::slice::from_ref(&other)), IsolationResponse::PowerOff, "no policy");
        let mut shutdown =
            policy("c-shutdown", serde_json::json!({ "nodeSelector": {}, "ha": { "isolationResponse": "Shutdown" } }));
        assert_eq!(isolation_response(&labels, &[shutdown.clone()]), IsolationResponse::Shutdown, "selects all");
        shutdown.spec.node_selector = other.spec.node_selector.clone();
        assert_eq!(isolation_response(&labels, &[shutdown]), IsolationResponse::PowerOff, "selects another pool");

        let none = compute(&topology, 4096, usable(), &BTreeMap::new(), &[other]);
        assert_eq!(none.policy, None);
        assert_eq!(none.heartbeat, None);
        assert_eq!(none.offered.cpus, "0-15");
        assert_eq!(none.offered.memory_mib, 3072);
    }

    #[test]
    fn node_patch_carries_labels_for_selectors_and_the_rest_as_annotations() {
        let root = tempfile::tempdir().unwrap();
        drover_topology::write_fixture(root.path(), 1, 2, 1).unwrap();
        let topology = HostTopology::read(root.path()).unwrap();
        let no_kvm = KvmFact { usable: false, reason: Some("/dev/kvm: not found".into()), max_vcpus: 0 };
        let facts = compute(&topology, 8192, no_kvm, &BTreeMap::new(), &[]);
        let settings = crate::settings::tests::settings(root.path());
        let patch = node_patch(&facts, &settings);
        let published = &patch["metadata"]["labels"];
        assert_eq!(published[labels::KVM], "false");
        assert_eq!(published[labels::CPUS], "2");
        assert_eq!(published[labels::NUMA_NODES], "1");
        assert_eq!(published[labels::SMT], "false");
        let notes = &patch["metadata"]["annotations"];
        assert_eq!(notes[annotations::MIGRATION_ADDRESS], "10.77.0.11");
        let read_back = HostFacts::from_annotations(&serde_json::from_value(notes.clone()).unwrap());
        assert_eq!(read_back.unwrap().unwrap(), facts, "the operator reads back what the agent wrote");
    }
}
