//! DRS rules: which hosts a rule lets a VM run on, prefers, or forbids, and whether
//! the placements of today keep it.
//!
//! - VM-VM affinity: the VMs run on one host. A VM goes where the others of the
//!   rule already run (any of those hosts, if they are split).
//! - VM-VM anti-affinity: no two of the VMs share a host.
//! - VM-Host affinity: the VMs run on the rule's hosts; anti-affinity: never there.
//!
//! Required rules filter hosts out; Preferred ones only rank them (a host that
//! breaks fewer Preferred rules always wins), so they break only when nothing else fits.

use std::collections::{BTreeMap, HashMap};

use crate::snapshot::{Key, Rule, RuleKind, Snapshot, VmKey};

/// The rules and, for each, how many of its VMs every host holds.
#[derive(Clone, Debug, Default)]
pub struct RuleIndex {
    rules: Vec<Rule>,
    /// Rules of each VM, by index into `rules` (only enabled rules are indexed).
    of_vm: HashMap<VmKey, Vec<usize>>,
    /// Per rule: host index → VMs of the rule held there.
    members_on: Vec<HashMap<usize, u32>>,
}

/// What the rules say of one VM on one host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleCheck {
    /// The first Required rule the host breaks, if any.
    pub required_broken: Option<Key>,
    /// Preferred rules the host breaks.
    pub preferred_broken: Vec<Key>,
}

impl RuleIndex {
    /// Indexes `snapshot`'s rules; `host_of` gives the index of the host each VM
    /// holds resources on, if it does.
    pub fn new(snapshot: &Snapshot, host_of: &HashMap<VmKey, usize>) -> Self {
        let rules = snapshot.rules.clone();
        let mut of_vm: HashMap<VmKey, Vec<usize>> = HashMap::new();
        let mut members_on = vec![HashMap::new(); rules.len()];
        for (i, rule) in rules.iter().enumerate() {
            for vm in &rule.vms {
                of_vm.entry(vm.clone()).or_default().push(i);
                if let Some(host) = host_of.get(vm) {
                    *members_on[i].entry(*host).or_insert(0) += 1;
                }
            }
        }
        Self { rules, of_vm, members_on }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether `vm` is governed by any rule (most VMs are not: a fast path).
    pub fn governs(&self, vm: &VmKey) -> bool {
        self.of_vm.contains_key(vm)
    }

    /// The rules of `vm` (indexes for [`RuleIndex::check_rules`]).
    pub fn rules_of(&self, vm: &VmKey) -> &[usize] {
        self.of_vm.get(vm).map(Vec::as_slice).unwrap_or(&[])
    }

    /// What the rules of `vm` say of host `host` (named `host_name`), with `vm`
    /// itself held on `own` (or nowhere).
    pub fn check(&self, vm: &VmKey, own: Option<usize>, host: usize, host_name: &str) -> RuleCheck {
        self.check_rules(self.rules_of(vm), own, host, host_name)
    }

    /// [`RuleIndex::check`] with the VM's rules looked up once (placement tries
    /// every host for the same VM).
    pub fn check_rules(&self, rules: &[usize], own: Option<usize>, host: usize, host_name: &str) -> RuleCheck {
        let mut check = RuleCheck::default();
        for &i in rules {
            let rule = &self.rules[i];
            if !self.keeps(i, own, host, host_name) {
                if rule.required {
                    if check.required_broken.is_none() {
                        check.required_broken = Some(rule.key.clone());
                    }
                } else {
                    check.preferred_broken.push(rule.key.clone());
                }
            }
        }
        check
    }

    /// Whether rule `i` holds with its VM (held on `own`) on `host`.
    fn keeps(&self, i: usize, own: Option<usize>, host: usize, host_name: &str) -> bool {
        let rule = &self.rules[i];
        // Members of the rule on each host, not counting the VM itself.
        let others_on = |h: usize| {
            let n = self.members_on[i].get(&h).copied().unwrap_or(0);
            if own == Some(h) { n.saturating_sub(1) } else { n }
        };
        match rule.kind {
            RuleKind::VmVmAntiAffinity => others_on(host) == 0,
            RuleKind::VmVmAffinity => {
                let elsewhere = self.members_on[i].keys().any(|h| others_on(*h) > 0);
                !elsewhere || others_on(host) > 0
            }
            RuleKind::VmHostAffinity => rule.hosts.contains(host_name),
            RuleKind::VmHostAntiAffinity => !rule.hosts.contains(host_name),
        }
    }

    /// Records that `vm` now holds resources on `host` (or no longer, `add` false).
    pub fn moved(&mut self, vm: &VmKey, host: usize, add: bool) {
        for &i in self.of_vm.get(vm).map(Vec::as_slice).unwrap_or(&[]) {
            let n = self.members_on[i].entry(host).or_insert(0);
            *n = if add { *n + 1 } else { n.saturating_sub(1) };
        }
    }
}

/// One way a rule is broken now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub vms: Vec<String>,
    pub hosts: Vec<String>,
    pub message: String,
}

/// Whether each rule holds for the VMs as they are placed now: `placed` maps each
/// VM that holds resources somewhere to its host.
pub fn compliance(rule: &Rule, placed: &HashMap<VmKey, String>) -> Vec<Violation> {
    let mut by_host: BTreeMap<&str, Vec<&VmKey>> = BTreeMap::new();
    for vm in &rule.vms {
        if let Some(host) = placed.get(vm) {
            by_host.entry(host.as_str()).or_default().push(vm);
        }
    }
    let names = |vms: &[&VmKey]| vms.iter().map(|v| v.name.clone()).collect::<Vec<_>>();
    match rule.kind {
        RuleKind::VmVmAntiAffinity => by_host
            .iter()
            .filter(|(_, vms)| vms.len() > 1)
            .map(|(host, vms)| Violation {
                vms: names(vms),
                hosts: vec![host.to_string()],
                message: format!("{} share host {host}", names(vms).join(", ")),
            })
            .collect(),
        RuleKind::VmVmAffinity if by_host.len() > 1 => {
            let hosts: Vec<String> = by_host.keys().map(|h| h.to_string()).collect();
            let vms: Vec<&VmKey> = by_host.values().flatten().copied().collect();
            vec![Violation { message: format!("the VMs are split over {}", hosts.join(", ")), vms: names(&vms), hosts }]
        }
        RuleKind::VmVmAffinity => Vec::new(),
        RuleKind::VmHostAffinity | RuleKind::VmHostAntiAffinity => {
            let wanted = rule.kind == RuleKind::VmHostAffinity;
            by_host
                .iter()
                .filter(|(host, _)| rule.hosts.contains(**host) != wanted)
                .map(|(host, vms)| Violation {
                    vms: names(vms),
                    hosts: vec![host.to_string()],
                    message: format!(
                        "{} {} on {host}, {} the rule's hosts",
                        names(vms).join(", "),
                        if vms.len() > 1 { "run" } else { "runs" },
                        if wanted { "outside" } else { "one of" }
                    ),
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(kind: RuleKind, required: bool, vms: &[&str], hosts: &[&str]) -> Rule {
        Rule {
            key: Key::new("ns", "r"),
            kind,
            required,
            vms: vms.iter().map(|v| Key::new("ns", *v)).collect(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    fn index(rule: Rule, placed: &[(&str, usize)]) -> RuleIndex {
        let snapshot = Snapshot { rules: vec![rule], ..Default::default() };
        let host_of = placed.iter().map(|(v, h)| (Key::new("ns", *v), *h)).collect();
        RuleIndex::new(&snapshot, &host_of)
    }

    #[test]
    fn anti_affinity_forbids_a_host_holding_another_member_but_not_the_vm_itself() {
        let idx = index(rule(RuleKind::VmVmAntiAffinity, true, &["a", "b"], &[]), &[("a", 0)]);
        let b = Key::new("ns", "b");
        assert!(idx.check(&b, None, 0, "h0").required_broken.is_some());
        assert_eq!(idx.check(&b, None, 1, "h1"), RuleCheck::default());
        let a = Key::new("ns", "a");
        assert_eq!(idx.check(&a, Some(0), 0, "h0"), RuleCheck::default(), "a alone on its own host");
    }

    #[test]
    fn affinity_follows_the_members_already_placed() {
        let idx = index(rule(RuleKind::VmVmAffinity, false, &["a", "b"], &[]), &[("a", 1)]);
        let b = Key::new("ns", "b");
        assert_eq!(idx.check(&b, None, 0, "h0").preferred_broken.len(), 1);
        assert_eq!(idx.check(&b, None, 1, "h1"), RuleCheck::default());
        let lonely = index(rule(RuleKind::VmVmAffinity, true, &["a", "b"], &[]), &[]);
        assert_eq!(lonely.check(&b, None, 0, "h0"), RuleCheck::default(), "the first member goes anywhere");
    }

    #[test]
    fn host_rules_match_host_names() {
        let on = index(rule(RuleKind::VmHostAffinity, true, &["a"], &["h1"]), &[]);
        let a = Key::new("ns", "a");
        assert!(on.check(&a, None, 0, "h0").required_broken.is_some());
        assert!(on.check(&a, None, 1, "h1").required_broken.is_none());
        let off = index(rule(RuleKind::VmHostAntiAffinity, true, &["a"], &["h1"]), &[]);
        assert!(off.check(&a, None, 1, "h1").required_broken.is_some());
    }

    #[test]
    fn compliance_names_the_vms_and_hosts() {
        let r = rule(RuleKind::VmVmAntiAffinity, true, &["a", "b", "c"], &[]);
        let placed =
            [("a", "h1"), ("b", "h1"), ("c", "h2")].iter().map(|(v, h)| (Key::new("ns", *v), h.to_string())).collect();
        let violations = compliance(&r, &placed);
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].message, "a, b share host h1");
        let split = rule(RuleKind::VmVmAffinity, true, &["a", "b", "c"], &[]);
        assert_eq!(compliance(&split, &placed)[0].message, "the VMs are split over h1, h2");
        let host = rule(RuleKind::VmHostAffinity, true, &["a", "c"], &["h1"]);
        assert_eq!(compliance(&host, &placed)[0].message, "c runs on h2, outside the rule's hosts");
    }
}
