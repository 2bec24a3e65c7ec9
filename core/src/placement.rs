//! Choosing a host for a VM: every host is filtered (health, cordon and
//! maintenance, the VM's node selector, Required rules, CPUs, memory, NUMA), the
//! feasible ones are ranked (fewest Preferred rules broken, then the score:
//! balance, then NUMA fit, then the name), and the first wins. When none is
//! feasible, each host's reason is kept so users read why.
//!
//! [`Cluster`] holds the snapshot with what every host has given out; committing a
//! placement charges its host, so a batch of VMs is placed one after the other on
//! capacity that is always up to date.

use std::collections::HashMap;

use drover_topology::CpuSet;

use crate::ledger::{HostLedger, HostShape};
use crate::rules::RuleIndex;
use crate::snapshot::{CpuRequest, Host, Key, Snapshot, Vm, VmKey};

/// Points for fitting in one NUMA node (the balance part is 0-100).
pub const NUMA_FIT_POINTS: i64 = 10;

/// Why a host cannot take a VM.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// Not ready (the health's reason).
    NotReady(String),
    /// Tainted for maintenance.
    Maintenance,
    /// Cordoned.
    Cordoned,
    /// Lacks a label of the VM's node selector.
    NodeSelector,
    /// Breaks a Required rule.
    Rule(Key),
    /// Too few free Shared vCPUs.
    Cpu { free: f64, need: u32 },
    /// Too few free host CPUs for a Dedicated VM.
    DedicatedCpus { free: usize, need: u32, whole_cores: bool },
    /// The host CPUs the spec names are not all usable there.
    HostCpus(String),
    /// Too little free memory, MiB.
    Memory { free: u64, need: u64 },
    /// Strict NUMA binding that no node (or not the named nodes) can satisfy.
    Numa(String),
    /// The host the VM must leave (a migration's source).
    Source,
    /// As many migrations come in as the host's limit allows.
    IncomingLimit(u32),
    /// HA admission control: taking the VM would eat into the capacity its pool
    /// keeps for failover (the figures).
    Admission(String),
}

/// A host chosen for a VM.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub host: String,
    /// Balance (0-100: the share of the scarcer resource left free after it) plus
    /// [`NUMA_FIT_POINTS`] when it fits one NUMA node.
    pub score: i64,
    /// The Dedicated CPUs it holds there.
    pub cpus: Option<CpuSet>,
    /// The one NUMA node it fits in, if it does.
    pub numa_node: Option<u32>,
    /// Preferred rules it breaks there (only when no host keeps them all).
    pub preferred_broken: Vec<Key>,
    /// Hosts that could have taken it.
    pub feasible: usize,
    /// The next best host and its score.
    pub runner_up: Option<(String, i64)>,
}

/// No host can take a VM; each host's reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Unschedulable {
    pub vm: VmKey,
    pub reasons: Vec<(String, Reason)>,
}

/// The cluster, with what each host has given out.
#[derive(Clone, Debug)]
pub struct Cluster<'a> {
    snapshot: &'a Snapshot,
    by_name: HashMap<&'a str, usize>,
    ledgers: Vec<HostLedger>,
    shapes: Vec<HostShape>,
    rules: RuleIndex,
    /// The host each VM holds resources on.
    held_on: HashMap<VmKey, usize>,
}

/// A feasible host, before ranking. Dedicated CPUs are chosen only for the
/// winner: the score needs how many fit where, not which.
struct Candidate {
    host: usize,
    score: i64,
    cpus: Option<CpuSet>,
    numa_node: Option<u32>,
    preferred_broken: Vec<Key>,
}

/// What is the same for every host a VM is tried on.
struct Ask<'v, 'r> {
    vm: &'v Vm,
    own: Option<usize>,
    rules: &'r [usize],
}

impl<'a> Cluster<'a> {
    /// The cluster of `snapshot`: every VM that holds resources charged to its
    /// host, every approved migration to its target.
    pub fn new(snapshot: &'a Snapshot) -> Self {
        let by_name: HashMap<&str, usize> =
            snapshot.hosts.iter().enumerate().map(|(i, h)| (h.name.as_str(), i)).collect();
        let mut ledgers = vec![HostLedger::default(); snapshot.hosts.len()];
        let mut held_on = HashMap::new();
        for vm in &snapshot.vms {
            if let (true, Some(&host)) = (vm.holds, vm.host.as_deref().and_then(|h| by_name.get(h))) {
                ledgers[host].charge(vm, held_cpus(vm).as_ref());
                held_on.insert(vm.key.clone(), host);
            }
        }
        // The targets of approved migrations hold the VM too (for rules, as for capacity).
        let mut rule_hosts: HashMap<VmKey, usize> = held_on.clone();
        let vms: HashMap<&VmKey, &Vm> = snapshot.vms.iter().map(|v| (&v.key, v)).collect();
        let mut reserved = Vec::new();
        for m in snapshot.migrations.iter().filter(|m| m.approved) {
            if let (Some(vm), Some(&target)) = (vms.get(&m.vm), m.target.as_deref().and_then(|t| by_name.get(t))) {
                ledgers[target].charge(vm, vm.allocated_cpus.as_ref().filter(|_| vm.is_dedicated()));
                reserved.push((m.vm.clone(), target));
            }
        }
        let mut rules = RuleIndex::new(snapshot, &rule_hosts);
        for (vm, target) in reserved {
            rules.moved(&vm, target, true);
            rule_hosts.insert(vm, target);
        }
        let shapes = snapshot.hosts.iter().map(|h| HostShape::new(&h.capacity)).collect();
        Self { snapshot, by_name, ledgers, shapes, rules, held_on }
    }

    pub fn snapshot(&self) -> &'a Snapshot {
        self.snapshot
    }

    pub fn hosts(&self) -> &'a [Host] {
        &self.snapshot.hosts
    }

    /// What host `name` has given out.
    pub fn ledger(&self, name: &str) -> Option<&HostLedger> {
        self.by_name.get(name).map(|&i| &self.ledgers[i])
    }

    pub fn host(&self, name: &str) -> Option<&'a Host> {
        self.by_name.get(name).map(|&i| &self.snapshot.hosts[i])
    }

    pub fn rules(&self) -> &RuleIndex {
        &self.rules
    }

    /// How host `name` counts its CPUs.
    pub fn shape(&self, name: &str) -> Option<&HostShape> {
        self.by_name.get(name).map(|&i| &self.shapes[i])
    }

    /// The host `vm` holds resources on, if any.
    pub fn held_on(&self, vm: &VmKey) -> Option<&'a str> {
        self.held_on.get(vm).map(|&i| self.snapshot.hosts[i].name.as_str())
    }

    /// Where each VM holds resources.
    pub fn placed(&self) -> HashMap<VmKey, String> {
        self.held_on.iter().map(|(vm, &h)| (vm.clone(), self.snapshot.hosts[h].name.clone())).collect()
    }

    /// The best host for `vm`, or why there is none.
    pub fn place(&self, vm: &Vm) -> Result<Placement, Unschedulable> {
        self.choose(vm, |_| None, |_| None)
    }

    /// The best host for `vm` among those `veto` lets through (it names the reason
    /// a host is out: a migration's source, a host at its incoming limit).
    pub fn place_where(&self, vm: &Vm, veto: impl Fn(&Host) -> Option<Reason>) -> Result<Placement, Unschedulable> {
        self.choose(vm, veto, |_| None)
    }

    /// As [`Cluster::place_where`], and a host that can take `vm` must also pass
    /// `admit` (HA admission control: asked only of hosts that fit, so a host's
    /// reason is the first thing that stops it).
    pub fn place_admitted(
        &self,
        vm: &Vm,
        veto: impl Fn(&Host) -> Option<Reason>,
        admit: impl Fn(&Host) -> Option<Reason>,
    ) -> Result<Placement, Unschedulable> {
        self.choose(vm, veto, admit)
    }

    /// Whether `vm` can go to `host` (a target a user named), with the reason if not.
    pub fn fit_on(&self, vm: &Vm, host: &str) -> Result<Placement, Reason> {
        let Some(&i) = self.by_name.get(host) else {
            return Err(Reason::NotReady(format!("host {host} is unknown (no Node with a Drover agent)")));
        };
        let ask = self.ask(vm);
        let candidate = self.evaluate(&ask, i)?;
        self.finish(&ask, candidate, 1, None).ok_or_else(|| dedicated_gone(vm))
    }

    fn ask<'v>(&self, vm: &'v Vm) -> Ask<'v, '_> {
        Ask { vm, own: self.held_on.get(&vm.key).copied(), rules: self.rules.rules_of(&vm.key) }
    }

    fn choose(
        &self,
        vm: &Vm,
        veto: impl Fn(&Host) -> Option<Reason>,
        admit: impl Fn(&Host) -> Option<Reason>,
    ) -> Result<Placement, Unschedulable> {
        let ask = self.ask(vm);
        let mut best: Option<Candidate> = None;
        let mut second: Option<(usize, i64, usize)> = None; // host, score, broken
        let mut feasible = 0;
        let mut reasons = Vec::new();
        for (i, host) in self.snapshot.hosts.iter().enumerate() {
            if let Some(reason) = veto(host) {
                reasons.push((host.name.clone(), reason));
                continue;
            }
            match self.evaluate(&ask, i).and_then(|c| admit(host).map_or(Ok(c), Err)) {
                Err(reason) => reasons.push((host.name.clone(), reason)),
                Ok(candidate) => {
                    feasible += 1;
                    let rank = |c: &Candidate| (c.preferred_broken.len(), -c.score);
                    match &best {
                        Some(b) if rank(b) <= rank(&candidate) => {
                            let key = (candidate.preferred_broken.len(), -candidate.score);
                            if second.is_none_or(|(_, s, broken)| (broken, -s) > key) {
                                second = Some((i, candidate.score, candidate.preferred_broken.len()));
                            }
                        }
                        _ => {
                            if let Some(b) = best.take() {
                                second = Some((b.host, b.score, b.preferred_broken.len()));
                            }
                            best = Some(candidate);
                        }
                    }
                }
            }
        }
        let runner_up = second.map(|(h, s, _)| (self.snapshot.hosts[h].name.clone(), s));
        match best.and_then(|b| self.finish(&ask, b, feasible, runner_up)) {
            Some(placement) => Ok(placement),
            None => Err(Unschedulable { vm: vm.key.clone(), reasons }),
        }
    }

    /// The placement on the winning host, with its Dedicated CPUs chosen now
    /// (`evaluate` counted the same room, so the choice exists).
    fn finish(
        &self,
        ask: &Ask<'_, '_>,
        c: Candidate,
        feasible: usize,
        runner_up: Option<(String, i64)>,
    ) -> Option<Placement> {
        let mut cpus = c.cpus;
        let mut numa_node = c.numa_node;
        if let (CpuRequest::Dedicated { host_cpus: None, allow_siblings }, None) = (&ask.vm.cpu, &cpus) {
            let host = &self.snapshot.hosts[c.host];
            let ledger = self.ledger_for(ask, c.host);
            let (nodes, spanning) = numa_scope(ask.vm, host);
            let choice =
                ledger.choose_dedicated(&self.shapes[c.host], ask.vm.vcpus, *allow_siblings, nodes, spanning)?;
            cpus = Some(choice.cpus);
            numa_node = choice.node;
        }
        Some(Placement {
            host: self.snapshot.hosts[c.host].name.clone(),
            score: c.score,
            cpus,
            numa_node,
            preferred_broken: c.preferred_broken,
            feasible,
            runner_up,
        })
    }

    /// Host `i`'s ledger as `ask`'s VM sees it: without the VM itself if it is held
    /// there already (a restart in place does not compete with itself).
    fn ledger_for<'s>(&'s self, ask: &Ask<'_, '_>, i: usize) -> std::borrow::Cow<'s, HostLedger> {
        let mut ledger = std::borrow::Cow::Borrowed(&self.ledgers[i]);
        if ask.own == Some(i) {
            ledger.to_mut().discharge(ask.vm, held_cpus(ask.vm).as_ref());
        }
        ledger
    }

    /// Filters one host for a VM and scores it if it passes.
    fn evaluate(&self, ask: &Ask<'_, '_>, i: usize) -> Result<Candidate, Reason> {
        let vm = ask.vm;
        let host = &self.snapshot.hosts[i];
        if let Some(why) = host.health.problem() {
            return Err(Reason::NotReady(why.to_string()));
        }
        if host.maintenance {
            return Err(Reason::Maintenance);
        }
        if !host.schedulable {
            return Err(Reason::Cordoned);
        }
        if !vm.node_selector.iter().all(|(k, v)| host.labels.get(k) == Some(v)) {
            return Err(Reason::NodeSelector);
        }
        let preferred_broken = if !ask.rules.is_empty() {
            let check = self.rules.check_rules(ask.rules, ask.own, i, &host.name);
            if let Some(rule) = check.required_broken {
                return Err(Reason::Rule(rule));
            }
            check.preferred_broken
        } else {
            Vec::new()
        };
        let ledger = self.ledger_for(ask, i);
        let shape = &self.shapes[i];
        let cap = &host.capacity;
        let (cpus, cpu_left, dedicated_node) = match &vm.cpu {
            CpuRequest::Shared { host_cpus } => {
                if let Some(pinned) = host_cpus {
                    if let Some(cpu) = pinned.iter().find(|c| !shape.offered.contains(*c)) {
                        return Err(Reason::HostCpus(format!("CPU {cpu} is not offered to VMs")));
                    }
                    if let Some(cpu) = pinned.iter().find(|c| ledger.dedicated.contains(*c)) {
                        return Err(Reason::HostCpus(format!("CPU {cpu} is held by a Dedicated VM")));
                    }
                }
                let free = ledger.free_vcpus(shape);
                if free < f64::from(vm.vcpus) {
                    return Err(Reason::Cpu { free: free.max(0.0), need: vm.vcpus });
                }
                let total = cap.vcpus.max(1) as f64;
                (None, (free - f64::from(vm.vcpus)) / total, None)
            }
            CpuRequest::Dedicated { host_cpus, allow_siblings } => {
                let (held, node) = match host_cpus {
                    Some(wanted) => {
                        if let Some(cpu) = wanted.iter().find(|c| !ledger.is_free(shape, *c)) {
                            let why = if shape.offered.contains(cpu) { "is taken" } else { "is not offered to VMs" };
                            return Err(Reason::HostCpus(format!("CPU {cpu} {why}")));
                        }
                        (wanted.len(), None)
                    }
                    None => {
                        let (nodes, spanning) = numa_scope(vm, host);
                        let want = vm.vcpus as usize;
                        let room = ledger.dedicated_room(shape, *allow_siblings, nodes);
                        let node = room.best_node(want);
                        if node.is_none() && (!spanning || room.total < want) {
                            if vm.numa.strict && room.total >= want {
                                return Err(Reason::Numa(format!(
                                    "no NUMA node{} has {want} free {}",
                                    nodes.map(|n| format!(" of {n:?}")).unwrap_or_default(),
                                    if *allow_siblings { "CPUs" } else { "cores" }
                                )));
                            }
                            return Err(Reason::DedicatedCpus {
                                free: room.total,
                                need: vm.vcpus,
                                whole_cores: !allow_siblings,
                            });
                        }
                        // Whole cores hold all their threads (counted at the largest core:
                        // never less than what the choice will hold).
                        let threads = if *allow_siblings { 1 } else { shape.max_core };
                        (want * threads, node.flatten())
                    }
                };
                // The Shared VMs already here keep fitting on what is left.
                let left = shape.offered.count_without(&ledger.dedicated).saturating_sub(held);
                if (left as f64 * shape.ratio) < ledger.shared_vcpus as f64 {
                    return Err(Reason::DedicatedCpus { free: 0, need: vm.vcpus, whole_cores: !allow_siblings });
                }
                let fraction = left as f64 / shape.offered_count.max(1) as f64;
                (host_cpus.clone(), fraction, node)
            }
        };
        let free_memory = ledger.free_memory_mib(cap);
        if free_memory < vm.footprint_mib() {
            return Err(Reason::Memory { free: free_memory, need: vm.footprint_mib() });
        }
        let numa_node = match (&vm.cpu, dedicated_node) {
            (_, Some(node)) => Some(node),
            (CpuRequest::Dedicated { .. }, None) => None,
            (CpuRequest::Shared { .. }, None) => one_node(vm, host)?,
        };
        let memory_left = (free_memory - vm.footprint_mib()) as f64 / cap.memory_mib.max(1) as f64;
        let balance = (cpu_left.min(memory_left).clamp(0.0, 1.0) * 100.0).round() as i64;
        let score = balance + if numa_node.is_some() { NUMA_FIT_POINTS } else { 0 };
        Ok(Candidate { host: i, score, cpus, numa_node, preferred_broken })
    }

    /// Charges `vm` placed by `placement` to its host (a batch goes on from there).
    /// A VM already held elsewhere stays held there too (a migration's reservation).
    pub fn commit(&mut self, vm: &Vm, placement: &Placement) {
        let Some(&i) = self.by_name.get(placement.host.as_str()) else { return };
        let own = self.held_on.get(&vm.key).copied();
        if own == Some(i) {
            return;
        }
        self.ledgers[i].charge(vm, placement.cpus.as_ref());
        self.rules.moved(&vm.key, i, true);
        self.held_on.entry(vm.key.clone()).or_insert(i);
    }

    /// Gives back what `vm` holds on its host (it stopped for good, or left).
    pub fn release(&mut self, vm: &Vm) {
        if let Some(i) = self.held_on.remove(&vm.key) {
            self.ledgers[i].discharge(vm, held_cpus(vm).as_ref());
            self.rules.moved(&vm.key, i, false);
        }
    }
}

/// The NUMA nodes a Dedicated VM's CPUs may come from, and whether they may span
/// nodes, on `host`.
fn numa_scope<'v>(vm: &'v Vm, host: &Host) -> (Option<&'v [u32]>, bool) {
    let nodes = (vm.numa.strict && !vm.numa.nodes.is_empty()).then_some(vm.numa.nodes.as_slice());
    (nodes, host.numa_spanning && !vm.numa.strict)
}

/// The reason for a Dedicated choice that failed after its room was counted (never
/// expected: both follow the same rules).
fn dedicated_gone(vm: &Vm) -> Reason {
    Reason::DedicatedCpus { free: 0, need: vm.vcpus, whole_cores: true }
}

/// The Dedicated CPUs a VM holds on its host.
fn held_cpus(vm: &Vm) -> Option<CpuSet> {
    match &vm.cpu {
        CpuRequest::Dedicated { host_cpus, .. } => vm.allocated_cpus.clone().or_else(|| host_cpus.clone()),
        CpuRequest::Shared { .. } => None,
    }
}

/// The NUMA node a Shared VM fits in whole, if any; an error when its Strict
/// binding cannot be met on `host`.
fn one_node(vm: &Vm, host: &Host) -> Result<Option<u32>, Reason> {
    let cap = &host.capacity;
    let fits = |node: &crate::snapshot::NumaNode| {
        let cpus_fit = node.cpus.len() as f64 * cap.cpu_ratio() >= f64::from(vm.vcpus);
        let memory_fits = node.memory_mib.is_none_or(|m| m >= vm.footprint_mib());
        cpus_fit && memory_fits
    };
    if vm.numa.strict && !vm.numa.nodes.is_empty() {
        let named: Vec<_> = cap.numa.iter().filter(|n| vm.numa.nodes.contains(&n.id)).collect();
        if named.len() < vm.numa.nodes.len() {
            return Err(Reason::Numa(format!("has no NUMA node {:?}", vm.numa.nodes)));
        }
        let memory: u64 = named.iter().map(|n| n.memory_mib.unwrap_or(u64::MAX / 64)).sum();
        if memory < vm.footprint_mib() {
            return Err(Reason::Numa(format!("NUMA nodes {:?} hold {memory} MiB", vm.numa.nodes)));
        }
        return Ok((named.len() == 1).then(|| named[0].id));
    }
    let node = cap.numa.iter().find(|n| fits(n)).map(|n| n.id);
    if vm.numa.strict && node.is_none() {
        return Err(Reason::Numa("no single NUMA node holds it".into()));
    }
    Ok(node.or_else(|| (cap.numa.len() <= 1).then_some(0)))
}

/// Places `vms` one after the other (in the order given), each on the capacity the
/// ones before left: what a batch of new VMs gets.
pub fn schedule(cluster: &mut Cluster, vms: &[&Vm]) -> Vec<Result<Placement, Unschedulable>> {
    vms.iter()
        .map(|vm| {
            let result = cluster.place(vm);
            if let Ok(placement) = &result {
                cluster.commit(vm, placement);
            }
            result
        })
        .collect()
}
