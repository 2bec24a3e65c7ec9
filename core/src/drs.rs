//! DRS: one balancing pass over each pool (HostPolicy) whose DRS is on. Pure: the
//! snapshot, each VM's measured demand and which VMs may move come in; the moves
//! (with their reasons, priorities and the imbalance before and after) come out.
//! The operator turns them into migrations (FullyAutomated) or recommendations in
//! the HostPolicy status (Manual, PartiallyAutomated).
//!
//! **Load.** A host's load is the larger of its CPU load (the VMs' measured CPU
//! demand, in host cores, over the host CPUs it offers) and its memory load (the
//! VMs' memory, VMM overhead included, over the memory it offers): 1.0 is a full
//! host. A VM's demand is capped at its vCPUs; a VM without a figure counts all of
//! its vCPUs (not measured yet: assumed busy). Demand is measured use, so on a
//! saturated host it reads low (no CPU ready time is measured); such a host still
//! reads a load near 1.0, and moves off it still gain.
//!
//! **Imbalance** is the standard deviation of the loads of the pool's ready hosts
//! (vSphere's classic "host load standard deviation"). **VM score** (in the spirit
//! of vSphere 7's DRS score): the share of its CPU demand a VM gets on its host,
//! 100 when the host's demand fits its CPUs, less in proportion when it does not;
//! the pool's score is the mean over its VMs.
//!
//! **Moves**, in the order of their priority (1 most important, as the threshold):
//!
//! | priority | move | when |
//! | --- | --- | --- |
//! | 1 | mandatory: fix a broken Required rule (after an HA restart, say), relieve a host over capacity | always, whatever the threshold |
//! | 2-5 | balance: from a loaded host to a less loaded one | the imbalance is over the threshold's target and the move's gain is large enough for the threshold |
//! | 3 | keep a Preferred rule the VM breaks where it is | threshold 3 or more, and the move raises the imbalance by less than [`PREFERRED_SLACK`] |
//!
//! A balancing move's *gain* is how much it narrows the load gap between its two
//! hosts (`(l_from - l_to) - |l_from' - l_to'|`, in host loads), less its cost
//! ([`COST_PER_GIB`] per GiB of guest memory: what the copy costs). Its priority is
//! the first of 2 (gain ≥ 0.20), 3 (≥ 0.10), 4 (≥ 0.05), 5 (≥ 0.02); it is made
//! when its priority is within the threshold, the pool's imbalance is above the
//! threshold's target ([`target`]: 2 → 0.20, 3 → 0.10, 4 → 0.05, 5 → 0.02; 1 →
//! no balancing), and it lowers the imbalance. The gain is measured on the two
//! hosts, not on the pool's deviation, so that one move means the same in a pool
//! of 3 hosts as in one of 1,000.
//!
//! **Stillness.** A move that does not narrow a gap by the threshold's gain is not
//! made, and nothing moves while the imbalance is at or under the target
//! (hysteresis); VMs moved within the cooldown, moving, or not running are given as
//! [`Input::frozen`] and stay, and a VM is not balanced back to a host it left in
//! a recent move ([`Input::left`]: no ping-pong). Every move is checked by placement's own filter on
//! its target (capacity, Required rules, NUMA, Dedicated CPUs), a balancing move
//! never breaks a Preferred rule the VM keeps where it is, and HA admission control
//! must admit it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use drover_topology::CpuSet;
use serde::{Deserialize, Serialize};

use crate::admission::Admission;
use crate::placement::{Cluster, Placement};
use crate::snapshot::{Key, Snapshot, Vm, VmKey};

/// What moving 1 GiB of guest memory costs a move, in host load.
pub const COST_PER_GIB: f64 = 0.005;

/// How much a move that keeps a Preferred rule may raise the imbalance and still
/// count as costing nothing (its memory moves too: the loads never stay exactly).
pub const PREFERRED_SLACK: f64 = 0.01;

/// A pool's DRS automation level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Automation {
    /// Moves are recommendations only.
    Manual,
    /// DRS places new VMs; moves are recommendations.
    PartiallyAutomated,
    /// DRS migrates.
    #[default]
    FullyAutomated,
}

/// A pool's DRS settings (a HostPolicy's `spec.drs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub enabled: bool,
    pub automation: Automation,
    /// 1 (mandatory moves only) to 5 (aggressive).
    pub threshold: u8,
    /// Most moves one pass may propose (the operator gives what its migration
    /// limits leave).
    pub max_moves: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self { enabled: true, automation: Automation::FullyAutomated, threshold: 3, max_moves: 2 }
    }
}

/// What a pass needs beside the snapshot.
#[derive(Clone, Debug, Default)]
pub struct Input {
    /// Each VM's CPU demand, host cores (measured, over a window). A VM not listed
    /// counts all its vCPUs.
    pub demand: HashMap<VmKey, f64>,
    /// VMs that must not move now: moved within the cooldown, moving, not running.
    pub frozen: BTreeSet<VmKey>,
    /// The host each VM left in a recent DRS move: balancing does not send it back
    /// there (the loads that made it leave may return; a VM going back and forth
    /// pays two migrations for nothing). Mandatory moves may.
    pub left: HashMap<VmKey, String>,
    /// DRS settings per pool (HostPolicy name). Pools not listed are not balanced,
    /// nor are hosts no policy selects.
    pub settings: BTreeMap<String, Settings>,
}

/// Why a move is made.
#[derive(Clone, Debug, PartialEq)]
pub enum Why {
    /// The VM breaks this Required rule where it is.
    RequiredRule(Key),
    /// Its host holds more than it offers.
    OverCapacity,
    /// The VM breaks this Preferred rule where it is, and the move costs no balance.
    PreferredRule(Key),
    /// Balance: the gain (gap narrowed, less the cost).
    Balance { gain: f64 },
}

/// One move DRS proposes.
#[derive(Clone, Debug, PartialEq)]
pub struct Move {
    pub vm: VmKey,
    pub from: String,
    pub to: String,
    /// 1 (mandatory) to 5.
    pub priority: u8,
    pub why: Why,
    /// The pool's imbalance before and after this move (after the moves before it).
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    /// The Dedicated CPUs it takes there.
    pub cpus: Option<CpuSet>,
    /// As users read it.
    pub reason: String,
}

/// A pool's balance.
#[derive(Clone, Debug, PartialEq)]
pub struct Balance {
    /// Standard deviation of the hosts' loads.
    pub imbalance: f64,
    /// Mean VM score, 0-100.
    pub score: f64,
    /// Each host's load, by name.
    pub loads: Vec<(String, f64)>,
}

/// One pool's pass.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolPass {
    pub pool: String,
    pub settings: Settings,
    /// The imbalance the threshold tolerates (`None` at threshold 1: no balancing).
    pub target: Option<f64>,
    pub before: Balance,
    /// After every move of `moves`.
    pub after: Balance,
    pub moves: Vec<Move>,
    /// What DRS would do and cannot (a broken rule no host can fix, say).
    pub blocked: Vec<String>,
}

/// The imbalance threshold `t` tolerates (none at 1: mandatory moves only).
pub fn target(threshold: u8) -> Option<f64> {
    match threshold {
        0 | 1 => None,
        2 => Some(0.20),
        3 => Some(0.10),
        4 => Some(0.05),
        _ => Some(0.02),
    }
}

/// The priority of a balancing move of `gain`, if it is worth one.
pub fn priority(gain: f64) -> Option<u8> {
    [(0.20, 2), (0.10, 3), (0.05, 4), (0.02, 5)].into_iter().find(|(g, _)| gain >= *g).map(|(_, p)| p)
}

/// One DRS pass over every pool `input` has settings for, in pool order.
pub fn pass(snapshot: &Snapshot, input: &Input) -> Vec<PoolPass> {
    let mut cluster = Cluster::new(snapshot);
    let mut out = Vec::new();
    for (pool, settings) in input.settings.iter().filter(|(_, s)| s.enabled) {
        if let Some(state) = Pool::new(&cluster, pool, input) {
            out.push(state.run(&mut cluster, pool, *settings, input));
        }
    }
    out
}

/// One VM (by index) moving between two pool hosts, to the placement it gets there.
struct Step {
    v: usize,
    from: usize,
    to: usize,
    placement: Placement,
}

/// Where one pool stands, kept up to date move by move.
struct Pool<'s> {
    snapshot: &'s Snapshot,
    /// Host indexes into the snapshot.
    hosts: Vec<usize>,
    names: Vec<&'s str>,
    cpu: Vec<f64>,
    cpu_cap: Vec<f64>,
    mem: Vec<f64>,
    mem_cap: Vec<f64>,
    /// VM indexes into the snapshot, per pool host.
    vms_on: Vec<Vec<usize>>,
    /// Each VM's demand (cores), by VM index.
    demand: HashMap<usize, f64>,
    /// VMs this pass moved: a VM moves at most once a pass (its demand where it
    /// lands is not known yet, and the cluster charges it there by its move).
    moved: BTreeSet<usize>,
}

impl<'s> Pool<'s> {
    fn new(cluster: &Cluster<'s>, pool: &str, input: &Input) -> Option<Self> {
        let snapshot = cluster.snapshot();
        let hosts: Vec<usize> = (0..snapshot.hosts.len())
            .filter(|&i| {
                let h = &snapshot.hosts[i];
                h.policy.as_deref() == Some(pool) && h.health.is_ready() && !h.maintenance
            })
            .collect();
        if hosts.is_empty() {
            return None;
        }
        let at: HashMap<&str, usize> =
            hosts.iter().enumerate().map(|(p, &i)| (snapshot.hosts[i].name.as_str(), p)).collect();
        let mut state = Pool {
            snapshot,
            names: hosts.iter().map(|&i| snapshot.hosts[i].name.as_str()).collect(),
            cpu: vec![0.0; hosts.len()],
            cpu_cap: hosts.iter().map(|&i| (snapshot.hosts[i].capacity.cpus.len() as f64).max(1.0)).collect(),
            mem: vec![0.0; hosts.len()],
            mem_cap: hosts.iter().map(|&i| (snapshot.hosts[i].capacity.memory_mib as f64).max(1.0)).collect(),
            vms_on: vec![Vec::new(); hosts.len()],
            demand: HashMap::new(),
            moved: BTreeSet::new(),
            hosts,
        };
        for (v, vm) in snapshot.vms.iter().enumerate() {
            let Some(&p) = cluster.held_on(&vm.key).and_then(|h| at.get(h)) else { continue };
            let demand =
                input.demand.get(&vm.key).copied().unwrap_or(f64::from(vm.vcpus)).clamp(0.0, f64::from(vm.vcpus));
            state.cpu[p] += demand;
            state.mem[p] += vm.footprint_mib() as f64;
            state.vms_on[p].push(v);
            state.demand.insert(v, demand);
        }
        Some(state)
    }

    fn load_of(&self, p: usize, cpu: f64, mem: f64) -> f64 {
        (cpu / self.cpu_cap[p]).max(mem / self.mem_cap[p])
    }

    fn load(&self, p: usize) -> f64 {
        self.load_of(p, self.cpu[p], self.mem[p])
    }

    fn loads(&self) -> Vec<f64> {
        (0..self.hosts.len()).map(|p| self.load(p)).collect()
    }

    fn balance(&self) -> Balance {
        let loads = self.loads();
        let mut scored = 0usize;
        let mut total = 0.0;
        for (p, vms) in self.vms_on.iter().enumerate() {
            let share = if self.cpu[p] <= self.cpu_cap[p] { 100.0 } else { 100.0 * self.cpu_cap[p] / self.cpu[p] };
            scored += vms.len();
            total += share * vms.len() as f64;
        }
        Balance {
            imbalance: deviation(&loads),
            score: if scored == 0 { 100.0 } else { total / scored as f64 },
            loads: self.names.iter().map(|n| n.to_string()).zip(loads).collect(),
        }
    }

    /// The loads of `from` and `to` once VM `v` has moved between them.
    fn moved_loads(&self, v: usize, from: usize, to: usize) -> (f64, f64) {
        let vm = &self.snapshot.vms[v];
        let d = self.demand.get(&v).copied().unwrap_or(0.0);
        let m = vm.footprint_mib() as f64;
        (
            self.load_of(from, self.cpu[from] - d, self.mem[from] - m),
            self.load_of(to, self.cpu[to] + d, self.mem[to] + m),
        )
    }

    /// The pool's imbalance once VM `v` has moved from `from` to `to` (`stats` of
    /// `loads`, the loads now): two loads change, so it takes O(1).
    fn imbalance_after(&self, loads: &[f64], stats: Stats, v: usize, from: usize, to: usize) -> f64 {
        let (lf, lt) = self.moved_loads(v, from, to);
        stats.replace(loads[from], lf).replace(loads[to], lt).deviation()
    }

    fn apply(&mut self, cluster: &mut Cluster, v: usize, from: usize, to: usize, placement: &Placement) {
        let vm = &self.snapshot.vms[v];
        let d = self.demand.get(&v).copied().unwrap_or(0.0);
        let m = vm.footprint_mib() as f64;
        self.cpu[from] -= d;
        self.mem[from] -= m;
        self.cpu[to] += d;
        self.mem[to] += m;
        self.vms_on[from].retain(|&x| x != v);
        self.vms_on[to].push(v);
        self.moved.insert(v);
        cluster.release(vm);
        let mut there = vm.clone();
        there.host = Some(self.names[to].to_string());
        cluster.commit(&there, placement);
    }

    /// Whether `vm` may go to pool host `to`: placement's filter and admission control.
    fn fits(&self, cluster: &Cluster, admission: &Admission, vm: &Vm, to: usize) -> Option<Placement> {
        let host = &self.snapshot.hosts[self.hosts[to]];
        let placement = cluster.fit_on(vm, &host.name).ok()?;
        admission.check(cluster, vm, host).is_none().then_some(placement)
    }

    fn run(mut self, cluster: &mut Cluster, pool: &str, settings: Settings, input: &Input) -> PoolPass {
        let before = self.balance();
        let mut moves: Vec<Move> = Vec::new();
        let mut blocked = Vec::new();
        let limit = settings.max_moves as usize;
        let snapshot = self.snapshot;
        let moving: BTreeSet<&VmKey> = snapshot.migrations.iter().map(|m| &m.vm).collect();
        let movable = |v: usize| !input.frozen.contains(&snapshot.vms[v].key) && !moving.contains(&snapshot.vms[v].key);

        // Mandatory: Required rules broken where the VM is.
        let mut broken: Vec<(usize, usize, Key)> = Vec::new();
        for (p, vms) in self.vms_on.iter().enumerate() {
            for &v in vms {
                let vm = &self.snapshot.vms[v];
                if !cluster.rules().governs(&vm.key) || !movable(v) {
                    continue;
                }
                let own = self.hosts[p];
                if let Some(rule) = cluster.rules().check(&vm.key, Some(own), own, self.names[p]).required_broken {
                    broken.push((v, p, rule));
                }
            }
        }
        broken.sort_by(|a, b| self.snapshot.vms[a.0].key.cmp(&self.snapshot.vms[b.0].key));
        for (v, from, rule) in broken {
            let vm = &self.snapshot.vms[v];
            let own = self.hosts[from];
            // An earlier move may have fixed it (the other VM of a pair moved).
            if cluster.rules().check(&vm.key, Some(own), own, self.names[from]).required_broken.is_none() {
                continue;
            }
            if moves.len() >= limit {
                blocked.push(format!("{} breaks rule {}: waits for a move slot", vm.key, rule.name));
                continue;
            }
            match self.best_target(cluster, vm, v, from) {
                Some((to, placement, after)) => {
                    let reason = format!(
                        "{} breaks Required rule {} on {}; on {} it keeps it (imbalance {:.3} -> {:.3})",
                        vm.key.name,
                        rule.name,
                        self.names[from],
                        self.names[to],
                        deviation(&self.loads()),
                        after
                    );
                    moves.push(self.make(cluster, Step { v, from, to, placement }, 1, Why::RequiredRule(rule), reason));
                }
                None => blocked.push(format!(
                    "{} breaks Required rule {} on {}, and no host of the pool can take it",
                    vm.key, rule.name, self.names[from]
                )),
            }
        }

        // Mandatory: hosts holding more than they offer.
        for from in 0..self.hosts.len() {
            while let Some((ledger, shape)) = cluster.ledger(self.names[from]).zip(cluster.shape(self.names[from])) {
                let host = &self.snapshot.hosts[self.hosts[from]];
                let over_cpu = ledger.free_vcpus(shape) < 0.0;
                let over_mem = ledger.memory_mib > host.capacity.memory_mib;
                if !(over_cpu || over_mem) {
                    break;
                }
                let what = if over_cpu {
                    format!("{} of {:.0} vCPUs", ledger.shared_vcpus, ledger.shared_capacity(shape))
                } else {
                    format!("{} of {} MiB", ledger.memory_mib, host.capacity.memory_mib)
                };
                if moves.len() >= limit {
                    blocked.push(format!("{} is over capacity ({what}): waits for a move slot", self.names[from]));
                    break;
                }
                // The largest VM that can go somewhere.
                let mut candidates: Vec<usize> =
                    self.vms_on[from].iter().copied().filter(|&v| movable(v) && !self.moved.contains(&v)).collect();
                candidates.sort_by_key(|&v| {
                    let vm = &self.snapshot.vms[v];
                    (std::cmp::Reverse(if over_cpu { u64::from(vm.vcpus) } else { vm.memory_mib }), vm.key.clone())
                });
                let found = candidates
                    .into_iter()
                    .find_map(|v| self.best_target(cluster, &self.snapshot.vms[v], v, from).map(|t| (v, t)));
                let Some((v, (to, placement, after))) = found else {
                    blocked.push(format!(
                        "{} is over capacity ({what}), and none of its VMs can go elsewhere",
                        self.names[from]
                    ));
                    break;
                };
                let reason = format!(
                    "{} is over capacity ({what}); {} moves to {} (imbalance {:.3} -> {:.3})",
                    self.names[from],
                    self.snapshot.vms[v].key.name,
                    self.names[to],
                    deviation(&self.loads()),
                    after
                );
                moves.push(self.make(cluster, Step { v, from, to, placement }, 1, Why::OverCapacity, reason));
            }
        }

        let target = target(settings.threshold);
        if let Some(target) = target {
            // Preferred rules, when keeping them costs no balance.
            if settings.threshold >= 3 {
                self.preferred(cluster, &movable, limit, &mut moves);
            }
            self.rebalance(cluster, &movable, input, settings, target, &mut moves);
        }
        PoolPass { pool: pool.to_string(), settings, target, before, after: self.balance(), moves, blocked }
    }

    /// The pool host that takes VM `v` (on `from`) with the lowest imbalance after.
    fn best_target(&self, cluster: &Cluster, vm: &Vm, v: usize, from: usize) -> Option<(usize, Placement, f64)> {
        let admission = Admission::new(cluster);
        let loads = self.loads();
        let stats = Stats::of(&loads);
        let mut best: Option<(usize, Placement, f64)> = None;
        for to in (0..self.hosts.len()).filter(|&to| to != from) {
            let after = self.imbalance_after(&loads, stats, v, from, to);
            if best.as_ref().is_some_and(|(_, _, b)| *b <= after) {
                continue;
            }
            if let Some(placement) = self.fits(cluster, &admission, vm, to) {
                best = Some((to, placement, after));
            }
        }
        best
    }

    fn make(&mut self, cluster: &mut Cluster, step: Step, priority: u8, why: Why, reason: String) -> Move {
        let Step { v, from, to, placement } = step;
        let imbalance_before = deviation(&self.loads());
        self.apply(cluster, v, from, to, &placement);
        Move {
            vm: self.snapshot.vms[v].key.clone(),
            from: self.names[from].to_string(),
            to: self.names[to].to_string(),
            priority,
            why,
            imbalance_before,
            imbalance_after: deviation(&self.loads()),
            cpus: placement.cpus.clone(),
            reason,
        }
    }

    fn preferred(
        &mut self,
        cluster: &mut Cluster,
        movable: &dyn Fn(usize) -> bool,
        limit: usize,
        moves: &mut Vec<Move>,
    ) {
        let mut candidates: Vec<(usize, usize)> = Vec::new();
        for (p, vms) in self.vms_on.iter().enumerate() {
            for &v in vms {
                let key = &self.snapshot.vms[v].key;
                if !cluster.rules().governs(key) || !movable(v) || self.moved.contains(&v) {
                    continue;
                }
                let own = self.hosts[p];
                let broken = cluster.rules().check(key, Some(own), own, self.names[p]).preferred_broken;
                if !broken.is_empty() {
                    candidates.push((v, p));
                }
            }
        }
        candidates.sort_by(|a, b| self.snapshot.vms[a.0].key.cmp(&self.snapshot.vms[b.0].key));
        for (v, from) in candidates {
            if moves.len() >= limit {
                return;
            }
            let vm = &self.snapshot.vms[v];
            // An earlier move may have kept it (the other VM of the rule moved).
            let own = self.hosts[from];
            let broken = cluster.rules().check(&vm.key, Some(own), own, self.names[from]).preferred_broken;
            if broken.is_empty() {
                continue;
            }
            let admission = Admission::new(cluster);
            let loads = self.loads();
            let stats = Stats::of(&loads);
            let now = stats.deviation();
            let best = (0..self.hosts.len())
                .filter(|&to| to != from)
                .filter_map(|to| {
                    let after = self.imbalance_after(&loads, stats, v, from, to);
                    if after > now + PREFERRED_SLACK {
                        return None;
                    }
                    let placement = self.fits(cluster, &admission, vm, to)?;
                    (placement.preferred_broken.len() < broken.len()).then_some((to, placement, after))
                })
                .min_by(|a, b| a.1.preferred_broken.len().cmp(&b.1.preferred_broken.len()).then(a.2.total_cmp(&b.2)));
            if let Some((to, placement, after)) = best {
                let rule = broken[0].clone();
                let reason = format!(
                    "{} breaks Preferred rule {} on {} and keeps it on {}, at no cost to balance (imbalance {:.3} -> {:.3})",
                    vm.key.name, rule.name, self.names[from], self.names[to], now, after
                );
                moves.push(self.make(cluster, Step { v, from, to, placement }, 3, Why::PreferredRule(rule), reason));
            }
        }
    }

    fn rebalance(
        &mut self,
        cluster: &mut Cluster,
        movable: &dyn Fn(usize) -> bool,
        input: &Input,
        settings: Settings,
        target: f64,
        moves: &mut Vec<Move>,
    ) {
        let (threshold, limit) = (settings.threshold, settings.max_moves as usize);
        /// Hosts tried as sources (the most loaded) and as targets (the least).
        const SOURCES: usize = 6;
        const TARGETS: usize = 12;
        while moves.len() < limit {
            let loads = self.loads();
            let stats = Stats::of(&loads);
            let now = stats.deviation();
            if now <= target {
                return;
            }
            let mut order: Vec<usize> = (0..self.hosts.len()).collect();
            order.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]).then(a.cmp(&b)));
            let sources = &order[..order.len().min(SOURCES)];
            let targets: Vec<usize> = order.iter().rev().take(TARGETS).copied().collect();
            // (imbalance after, gain, vm, from, to): qualified by their gain, the
            // one that evens the pool most first.
            let mut candidates: Vec<(f64, f64, usize, usize, usize)> = Vec::new();
            for &from in sources {
                for &v in self.vms_on[from].iter().filter(|&&v| movable(v) && !self.moved.contains(&v)) {
                    let cost = self.snapshot.vms[v].memory_mib as f64 / 1024.0 * COST_PER_GIB;
                    let left = input.left.get(&self.snapshot.vms[v].key).map(String::as_str);
                    for &to in targets.iter().filter(|&&to| to != from && loads[to] < loads[from]) {
                        if left == Some(self.names[to]) {
                            continue;
                        }
                        let (lf, lt) = self.moved_loads(v, from, to);
                        let gain = (loads[from] - loads[to]) - (lf - lt).abs() - cost;
                        let after = stats.replace(loads[from], lf).replace(loads[to], lt).deviation();
                        if priority(gain).is_some_and(|p| p <= threshold) && after < now {
                            candidates.push((after, gain, v, from, to));
                        }
                    }
                }
            }
            candidates.sort_by(|a, b| {
                a.0.total_cmp(&b.0)
                    .then(b.1.total_cmp(&a.1))
                    .then_with(|| self.snapshot.vms[a.2].key.cmp(&self.snapshot.vms[b.2].key))
                    .then(a.4.cmp(&b.4))
            });
            let admission = Admission::new(cluster);
            let chosen = candidates.into_iter().find_map(|(after, gain, v, from, to)| {
                let vm = &self.snapshot.vms[v];
                let placement = self.fits(cluster, &admission, vm, to)?;
                // Never break a Preferred rule the VM keeps where it is.
                let own = self.hosts[from];
                let kept = cluster.rules().check(&vm.key, Some(own), own, self.names[from]).preferred_broken.len();
                (placement.preferred_broken.len() <= kept).then_some((after, gain, v, from, to, placement))
            });
            let Some((after, gain, v, from, to, placement)) = chosen else { return };
            let vm = &self.snapshot.vms[v];
            let (lf, lt) = self.moved_loads(v, from, to);
            let p = priority(gain).unwrap_or(5);
            let reason = format!(
                "balance: {} ({:.2} cores) from {} (load {:.2} -> {:.2}) to {} ({:.2} -> {:.2}); imbalance {:.3} -> {:.3}, target {:.2} (threshold {threshold}, priority {p})",
                vm.key.name,
                self.demand.get(&v).copied().unwrap_or(0.0),
                self.names[from],
                loads[from],
                lf,
                self.names[to],
                loads[to],
                lt,
                now,
                after,
                target
            );
            moves.push(self.make(cluster, Step { v, from, to, placement }, p, Why::Balance { gain }, reason));
        }
    }
}

/// Sums of a set of loads, for its deviation with one load replaced in O(1).
#[derive(Clone, Copy, Debug)]
struct Stats {
    n: f64,
    sum: f64,
    squares: f64,
}

impl Stats {
    fn of(values: &[f64]) -> Self {
        Self { n: values.len() as f64, sum: values.iter().sum(), squares: values.iter().map(|x| x * x).sum() }
    }

    fn replace(self, old: f64, new: f64) -> Self {
        Self { n: self.n, sum: self.sum - old + new, squares: self.squares - old * old + new * new }
    }

    fn deviation(self) -> f64 {
        if self.n == 0.0 {
            return 0.0;
        }
        let mean = self.sum / self.n;
        (self.squares / self.n - mean * mean).max(0.0).sqrt()
    }
}

/// Population standard deviation.
pub fn deviation(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    (values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt()
}
