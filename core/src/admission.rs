//! HA admission control: each pool (HostPolicy) with `admissionControl` keeps
//! enough capacity free that every protected VM (one HA would restart) could start
//! again after any `hostFailuresToTolerate` of its hosts fail.
//!
//! Counted per resource, as vSphere's "cluster resource percentage" policy does:
//! Shared vCPUs (in overcommitted units), memory (VMM overhead included), and host
//! CPUs for Dedicated VMs. For a set S of failed hosts, the protected VMs of S need
//! `demand(S)` and the other hosts have `free(rest)`; the worst S of N hosts is the
//! one with the most `demand(h) + free(h)` (the deficit `demand(S) - free(rest)` is
//! `Σ_S (demand + free) - free(all)`), so it is found by sorting, not by trying
//! every set. A start or a migration into the pool that would leave `free(rest) <
//! demand(S)` for the worst S is refused with the figures; HA's own restarts are
//! never refused (they are what the capacity was kept for).
//!
//! What it does not do: pack VMs into hosts one by one (a VM larger than any single
//! host's free room passes if the pool's total is enough), as vSphere's percentage
//! policy does not either. Hosts that are not ready, cordoned or in maintenance
//! offer nothing for failover; failed hosts are out of the count (their VMs are
//! what HA restarts now).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::placement::{Cluster, Reason};
use crate::snapshot::{CpuRequest, HaSettings, Host, Vm};

/// The resources admission control counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Resource {
    /// Shared vCPUs, in overcommitted units.
    Vcpus,
    /// Memory, MiB.
    MemoryMib,
    /// Host CPUs of Dedicated VMs.
    DedicatedCpus,
}

const RESOURCES: [Resource; 3] = [Resource::Vcpus, Resource::MemoryMib, Resource::DedicatedCpus];

impl Resource {
    /// As the HostPolicy status names it.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Vcpus => "vcpus",
            Resource::MemoryMib => "memoryMiB",
            Resource::DedicatedCpus => "dedicatedCpus",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Resource::Vcpus => "vCPUs",
            Resource::MemoryMib => "MiB of memory",
            Resource::DedicatedCpus => "host CPUs for Dedicated VMs",
        }
    }
}

/// One resource's failover figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub resource: Resource,
    /// What the protected VMs of the worst hosts need.
    pub needed: f64,
    /// What the other hosts have free.
    pub free: f64,
    /// The worst hosts.
    pub worst: Vec<String>,
}

impl Figures {
    pub fn ok(&self) -> bool {
        self.free + 1e-9 >= self.needed
    }
}

/// A pool's failover capacity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failover {
    pub settings: HaSettings,
    /// One entry per resource.
    pub figures: Vec<Figures>,
}

impl Failover {
    pub fn ok(&self) -> bool {
        self.figures.iter().all(Figures::ok)
    }
}

/// What one host of a pool counts for.
#[derive(Clone, Debug, PartialEq)]
struct Counted {
    name: String,
    demand: [f64; 3],
    free: [f64; 3],
    /// It can take restarted VMs (ready, schedulable, not in maintenance): only
    /// then does it count what it has free.
    takes: bool,
}

/// Every pool's hosts as admission control counts them.
#[derive(Clone, Debug)]
pub struct Admission {
    pools: BTreeMap<String, (HaSettings, Vec<Counted>)>,
}

/// What `vm` costs of each resource on a host whose largest core has `max_core` CPUs.
fn cost(vm: &Vm, max_core: usize) -> [f64; 3] {
    let memory = vm.footprint_mib() as f64;
    match &vm.cpu {
        CpuRequest::Shared { .. } => [f64::from(vm.vcpus), memory, 0.0],
        CpuRequest::Dedicated { allow_siblings, .. } => {
            let cpus = match &vm.allocated_cpus {
                Some(held) => held.len() as f64,
                None if *allow_siblings => f64::from(vm.vcpus),
                None => f64::from(vm.vcpus) * max_core as f64,
            };
            [0.0, memory, cpus]
        }
    }
}

impl Admission {
    /// The pools of `cluster` as it stands (with what it has committed so far).
    pub fn new(cluster: &Cluster) -> Self {
        let snapshot = cluster.snapshot();
        let mut pools: BTreeMap<String, (HaSettings, Vec<Counted>)> = BTreeMap::new();
        let mut index: BTreeMap<&str, (String, usize)> = BTreeMap::new();
        for host in snapshot.hosts.iter().filter(|h| !h.health.is_failed()) {
            let Some(policy) = host.policy.clone() else { continue };
            let settings = snapshot.ha_of(host);
            if !settings.admission_control {
                continue;
            }
            let free = match (cluster.ledger(&host.name), cluster.shape(&host.name)) {
                (Some(ledger), Some(shape)) if takes_restarts(host) => {
                    let shared_cpus_busy = (ledger.shared_vcpus as f64 / shape.ratio.max(f64::MIN_POSITIVE)).ceil();
                    let mut held = ledger.dedicated.clone();
                    held.add(&ledger.pinned_shared);
                    let dedicated_free = shape.offered.count_without(&held) as f64 - shared_cpus_busy;
                    [
                        ledger.free_vcpus(shape).max(0.0),
                        ledger.free_memory_mib(&host.capacity) as f64,
                        dedicated_free.max(0.0),
                    ]
                }
                _ => [0.0; 3],
            };
            let pool = pools.entry(policy.clone()).or_insert_with(|| (settings, Vec::new()));
            index.insert(host.name.as_str(), (policy, pool.1.len()));
            pool.1.push(Counted { name: host.name.clone(), demand: [0.0; 3], free, takes: takes_restarts(host) });
        }
        for vm in snapshot.vms.iter().filter(|v| v.ha.protected()) {
            let Some(host) = cluster.held_on(&vm.key) else { continue };
            let Some((policy, i)) = index.get(host) else { continue };
            let max_core = cluster.shape(host).map_or(1, |s| s.max_core);
            if let Some((_, hosts)) = pools.get_mut(policy) {
                let c = cost(vm, max_core);
                for (d, c) in hosts[*i].demand.iter_mut().zip(c) {
                    *d += c;
                }
            }
        }
        Self { pools }
    }

    /// The failover figures of every pool with admission control on.
    pub fn failover(&self) -> BTreeMap<String, Failover> {
        self.pools.iter().map(|(name, (settings, hosts))| (name.clone(), failover(*settings, hosts))).collect()
    }

    /// Whether `vm` may start on (or move to) `host`: `None` if so, else the reason
    /// with the figures. VMs that already hold resources there pass.
    pub fn check(&self, cluster: &Cluster, vm: &Vm, host: &Host) -> Option<Reason> {
        let policy = host.policy.as_ref()?;
        let (settings, hosts) = self.pools.get(policy)?;
        if settings.host_failures_to_tolerate == 0 || cluster.held_on(&vm.key) == Some(host.name.as_str()) {
            return None;
        }
        let i = hosts.iter().position(|h| h.name == host.name)?;
        let max_core = cluster.shape(&host.name).map_or(1, |s| s.max_core);
        let c = cost(vm, max_core);
        let mut after = hosts.clone();
        for (r, c) in c.iter().enumerate() {
            after[i].free[r] = (after[i].free[r] - c).max(0.0);
            if vm.ha.protected() {
                after[i].demand[r] += c;
            }
        }
        // A VM that moves within the pool leaves its old host.
        if let Some(j) = cluster.held_on(&vm.key).and_then(|from| hosts.iter().position(|h| h.name == from)) {
            let c = cost(vm, cluster.shape(&hosts[j].name).map_or(1, |s| s.max_core));
            for (r, c) in c.iter().enumerate() {
                if after[j].takes {
                    after[j].free[r] += c;
                }
                if vm.ha.protected() {
                    after[j].demand[r] = (after[j].demand[r] - c).max(0.0);
                }
            }
        }
        let figures = failover(*settings, &after);
        let short = figures.figures.iter().find(|f| !f.ok())?;
        let n = settings.host_failures_to_tolerate;
        Some(Reason::Admission(format!(
            "would break HA admission control: starting {} there would leave {} of the {} {} needed to survive {} host failure{} ({} worst: {})",
            vm.key.name,
            amount(short.resource, short.free),
            amount(short.resource, short.needed),
            short.resource.unit(),
            n,
            if n == 1 { "" } else { "s" },
            if short.worst.len() == 1 { "the" } else { "those" },
            short.worst.join(", "),
        )))
    }
}

/// A host that can take restarted VMs.
fn takes_restarts(host: &Host) -> bool {
    host.health.is_ready() && host.schedulable && !host.maintenance
}

fn amount(resource: Resource, x: f64) -> String {
    match resource {
        Resource::Vcpus => {
            let rounded = (x * 10.0).floor() / 10.0;
            if rounded.fract() == 0.0 { format!("{rounded:.0}") } else { format!("{rounded:.1}") }
        }
        _ => format!("{}", x.floor()),
    }
}

/// The figures of one pool: per resource, the worst `N` hosts by `demand + free`.
fn failover(settings: HaSettings, hosts: &[Counted]) -> Failover {
    let n = settings.host_failures_to_tolerate as usize;
    let figures = RESOURCES
        .iter()
        .enumerate()
        .map(|(r, &resource)| {
            let mut order: Vec<usize> = (0..hosts.len()).collect();
            // Ties (the same deficit either way) go to the host that needs the
            // most, then by name, so the figures name the hosts users expect.
            order.sort_by(|&a, &b| {
                let key = |h: &Counted| h.demand[r] + h.free[r];
                key(&hosts[b])
                    .total_cmp(&key(&hosts[a]))
                    .then_with(|| hosts[b].demand[r].total_cmp(&hosts[a].demand[r]))
                    .then_with(|| hosts[a].name.cmp(&hosts[b].name))
            });
            let (worst, rest) = order.split_at(n.min(order.len()));
            Figures {
                resource,
                needed: worst.iter().map(|&h| hosts[h].demand[r]).sum(),
                free: rest.iter().map(|&h| hosts[h].free[r]).sum(),
                worst: worst.iter().map(|&h| hosts[h].name.clone()).collect(),
            }
        })
        .collect();
    Failover { settings, figures }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{HostHealth, RestartPriority, Snapshot, VmHa};

    fn host(name: &str, cpus: u32) -> Host {
        crate::fixtures::host(name, cpus, u64::from(cpus), 64 * 1024)
    }

    fn vm(name: &str, vcpus: u32, on: Option<&str>, priority: RestartPriority) -> Vm {
        Vm { ha: VmHa { priority, keeps_running: true }, ..crate::fixtures::vm(name, vcpus, 1024, on) }
    }

    fn snapshot(vms: Vec<Vm>, tolerate: u32) -> Snapshot {
        Snapshot {
            hosts: vec![host("h1", 4), host("h2", 4), host("h3", 4)],
            vms,
            ha: [(
                "pool".to_string(),
                HaSettings { enabled: true, admission_control: true, host_failures_to_tolerate: tolerate },
            )]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_vm_that_would_leave_too_little_for_one_host_failure_is_held_with_the_figures() {
        // 3 hosts × 4 vCPUs (no overcommit), 3 + 3 + 2 vCPUs used: if h1 fails, its
        // 3 vCPUs fit in the 1 + 2 free on the others.
        let vms = vec![
            vm("a", 3, Some("h1"), RestartPriority::Medium),
            vm("b", 3, Some("h2"), RestartPriority::Medium),
            vm("c", 2, Some("h3"), RestartPriority::Medium),
        ];
        let s = snapshot(vms, 1);
        let cluster = Cluster::new(&s);
        let admission = Admission::new(&cluster);
        let failover = &admission.failover()["pool"];
        assert!(failover.ok(), "{failover:?}");
        let vcpus = &failover.figures[0];
        assert_eq!((vcpus.needed, vcpus.free, vcpus.worst.clone()), (3.0, 3.0, vec!["h1".to_string()]));
        // One more vCPU anywhere leaves 2 for the 3 needed.
        let new = vm("web-07", 1, None, RestartPriority::Medium);
        let err = cluster.place_admitted(&new, |_| None, |h| admission.check(&cluster, &new, h)).unwrap_err();
        let message = err.message();
        assert!(message.starts_with("0/3 hosts can run web-07"), "{message}");
        assert!(message.contains("would break HA admission control: starting web-07 there would leave 2 of the 3 vCPUs needed to survive 1 host failure"), "{message}");
        // Tolerating no failures admits anything that fits.
        let s0 = snapshot(s.vms.clone(), 0);
        let c0 = Cluster::new(&s0);
        let a0 = Admission::new(&c0);
        assert!(c0.place_admitted(&new, |_| None, |h| a0.check(&c0, &new, h)).is_ok());
        // Without admission control, the same.
        let mut off = s.clone();
        off.ha.get_mut("pool").unwrap().admission_control = false;
        let c1 = Cluster::new(&off);
        let a1 = Admission::new(&c1);
        assert!(a1.failover().is_empty());
        assert!(c1.place_admitted(&new, |_| None, |h| a1.check(&c1, &new, h)).is_ok());
    }

    #[test]
    fn an_unprotected_vm_uses_spare_capacity_but_needs_none_kept() {
        let vms =
            vec![vm("a", 3, Some("h1"), RestartPriority::Medium), vm("b", 2, Some("h2"), RestartPriority::Medium)];
        let s = snapshot(vms, 1);
        let cluster = Cluster::new(&s);
        let admission = Admission::new(&cluster);
        // A Disabled VM of 4 vCPUs on h3 would leave 2 free for h1's 3: refused.
        let big = vm("big", 4, None, RestartPriority::Disabled);
        let err = cluster.place_admitted(&big, |_| None, |h| admission.check(&cluster, &big, h)).unwrap_err();
        assert!(err.message().contains("admission"), "{}", err.message());
        // A Disabled 2-vCPU VM leaves enough, and needs nothing kept for itself.
        let small = vm("small", 2, None, RestartPriority::Disabled);
        let placed = cluster.place_admitted(&small, |_| None, |h| admission.check(&cluster, &small, h)).unwrap();
        assert_eq!(placed.host, "h3");
    }

    #[test]
    fn failed_hosts_are_out_and_added_hosts_bring_room() {
        let vms =
            vec![vm("a", 3, Some("h1"), RestartPriority::Medium), vm("b", 3, Some("h2"), RestartPriority::Medium)];
        let mut s = snapshot(vms, 1);
        let cluster = Cluster::new(&s);
        let admission = Admission::new(&cluster);
        let new = vm("c", 3, None, RestartPriority::Medium);
        assert!(cluster.place_admitted(&new, |_| None, |h| admission.check(&cluster, &new, h)).is_err());
        s.hosts.push(host("h4", 4));
        let cluster = Cluster::new(&s);
        let admission = Admission::new(&cluster);
        assert!(cluster.place_admitted(&new, |_| None, |h| admission.check(&cluster, &new, h)).is_ok());
        s.hosts[3].health = HostHealth::Failed("no heartbeat".into());
        let cluster = Cluster::new(&s);
        let admission = Admission::new(&cluster);
        assert_eq!(admission.failover()["pool"].figures[0].worst, vec!["h1".to_string()]);
    }

    #[test]
    fn a_move_frees_its_old_host_unless_that_host_takes_no_restarts() {
        // a (3 vCPUs) on h1, b (3) on h2: moving a to h3 keeps the reserve (h1 is
        // free again); with h1 in maintenance, its room does not count.
        let vms =
            vec![vm("a", 3, Some("h1"), RestartPriority::Medium), vm("b", 3, Some("h2"), RestartPriority::Medium)];
        let mut s = snapshot(vms, 1);
        let cluster = Cluster::new(&s);
        let admission = Admission::new(&cluster);
        let h3 = cluster.host("h3").unwrap();
        assert_eq!(admission.check(&cluster, &s.vms[0], h3), None);
        s.hosts[0].maintenance = true;
        let cluster = Cluster::new(&s);
        let admission = Admission::new(&cluster);
        let h3 = cluster.host("h3").unwrap();
        let reason = admission.check(&cluster, &s.vms[0], h3);
        assert!(matches!(reason, Some(Reason::Admission(_))), "{reason:?}");
    }

    #[test]
    fn dedicated_vms_count_their_host_cpus() {
        let mut d = vm("d", 2, Some("h1"), RestartPriority::High);
        d.cpu = CpuRequest::Dedicated { host_cpus: None, allow_siblings: false };
        d.allocated_cpus = Some((0..2).collect());
        let s = snapshot(vec![d], 1);
        let cluster = Cluster::new(&s);
        let failover = &Admission::new(&cluster).failover()["pool"];
        let dedicated = failover.figures.iter().find(|f| f.resource == Resource::DedicatedCpus).unwrap();
        assert_eq!((dedicated.needed, dedicated.free), (2.0, 8.0));
        assert!(failover.ok());
    }
}
