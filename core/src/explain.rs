//! Placement decisions as users read them in `kubectl describe vm`: the host
//! chosen, its score and the runner-up; or, when nothing fits, the reasons host by
//! host, counted the way kube-scheduler does (`0/3 hosts can run db-01: 2 have 1.2
//! of 4 free vCPUs, 1 breaks rule web-spread`).

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::placement::{NUMA_FIT_POINTS, Placement, Reason, Unschedulable};

impl Placement {
    /// "host-2 (score 87: balance 77, fits NUMA node 0; 3 of 3 hosts feasible;
    /// runner-up host-1, score 62)".
    pub fn message(&self) -> String {
        let numa = self.numa_node.is_some();
        let mut out = format!("{} (score {}: balance {}", self.host, self.score, self.score - numa_points(numa));
        if let Some(node) = self.numa_node {
            let _ = write!(out, ", fits NUMA node {node}");
        }
        if let Some(cpus) = &self.cpus {
            let _ = write!(out, ", Dedicated CPUs {cpus}");
        }
        if !self.preferred_broken.is_empty() {
            let names: Vec<&str> = self.preferred_broken.iter().map(|k| k.name.as_str()).collect();
            let _ = write!(out, ", breaks Preferred rule {} as no host keeps it", names.join(", "));
        }
        let _ = write!(out, "; {} feasible", plural(self.feasible, "host"));
        if let Some((host, score)) = &self.runner_up {
            let _ = write!(out, "; runner-up {host}, score {score}");
        }
        out.push(')');
        out
    }
}

fn numa_points(fits: bool) -> i64 {
    if fits { NUMA_FIT_POINTS } else { 0 }
}

impl Reason {
    /// The words after a count of hosts: "2 [have 1.2 of 4 free vCPUs]".
    fn phrase(&self, plural_hosts: bool) -> String {
        let (have, are, lack, break_) =
            if plural_hosts { ("have", "are", "lack", "break") } else { ("has", "is", "lacks", "breaks") };
        match self {
            Reason::NotReady(why) => format!("{are} not ready ({why})"),
            Reason::Maintenance => format!("{are} in maintenance"),
            Reason::Cordoned => format!("{are} cordoned"),
            Reason::NodeSelector => format!("{lack} the labels of spec.nodeSelector"),
            Reason::Rule(rule) => format!("{break_} rule {}", rule.name),
            Reason::Cpu { free, need } => format!("{have} {} of {need} free vCPUs", number(*free)),
            Reason::DedicatedCpus { free, need, whole_cores } => {
                format!("{have} {free} of {need} free {}", if *whole_cores { "whole cores" } else { "host CPUs" })
            }
            Reason::HostCpus(why) => format!("cannot give spec.cpu.hostCpus ({why})"),
            Reason::Memory { free, need } => format!("{have} {} of {} free memory", mib(*free), mib(*need)),
            Reason::Numa(why) => format!("cannot bind NUMA strictly ({why})"),
            Reason::Source => format!("{are} the VM's own host"),
            Reason::IncomingLimit(n) => format!("{have} {n} incoming migrations already (the limit)"),
            Reason::Admission(why) => why.clone(),
        }
    }

    /// Reasons of one kind are counted together; the message keeps the one
    /// nearest to fitting (the most free) as the example.
    fn kind(&self) -> String {
        match self {
            Reason::NotReady(why) => format!("not-ready:{why}"),
            Reason::Rule(rule) => format!("rule:{rule}"),
            Reason::HostCpus(why) => format!("host-cpus:{why}"),
            Reason::Numa(why) => format!("numa:{why}"),
            Reason::Admission(why) => format!("admission:{why}"),
            Reason::Cpu { .. } => "cpu".into(),
            Reason::DedicatedCpus { .. } => "dedicated".into(),
            Reason::Memory { .. } => "memory".into(),
            other => format!("{other:?}"),
        }
    }

    /// Order among groups of equal size: what users fix first comes first.
    fn rank(&self) -> u8 {
        match self {
            Reason::NotReady(_) => 0,
            Reason::Maintenance => 1,
            Reason::Cordoned => 2,
            Reason::NodeSelector => 3,
            Reason::Source => 4,
            Reason::IncomingLimit(_) => 5,
            Reason::Rule(_) => 6,
            Reason::HostCpus(_) => 7,
            Reason::Cpu { .. } => 8,
            Reason::DedicatedCpus { .. } => 9,
            Reason::Memory { .. } => 10,
            Reason::Numa(_) => 11,
            Reason::Admission(_) => 12,
        }
    }

    fn closeness(&self) -> f64 {
        match self {
            Reason::Cpu { free, .. } => *free,
            Reason::DedicatedCpus { free, .. } => *free as f64,
            Reason::Memory { free, .. } => *free as f64,
            _ => 0.0,
        }
    }
}

impl Unschedulable {
    /// "0/3 hosts can run db-01: 2 have 1.2 of 4 free vCPUs, 1 breaks rule web-spread".
    pub fn message(&self) -> String {
        let hosts = self.reasons.len();
        if hosts == 0 {
            return format!("0/0 hosts can run {}: no host has a Drover agent", self.vm.name);
        }
        let mut groups: BTreeMap<String, (usize, &Reason)> = BTreeMap::new();
        for (_, reason) in &self.reasons {
            let entry = groups.entry(reason.kind()).or_insert((0, reason));
            entry.0 += 1;
            if reason.closeness() > entry.1.closeness() {
                entry.1 = reason;
            }
        }
        let mut groups: Vec<(usize, &Reason)> = groups.into_values().collect();
        // Most hosts first; ties in a fixed order.
        groups
            .sort_by(|a, b| b.0.cmp(&a.0).then(a.1.rank().cmp(&b.1.rank())).then_with(|| a.1.kind().cmp(&b.1.kind())));
        let parts: Vec<String> = groups.iter().map(|(n, r)| format!("{n} {}", r.phrase(*n > 1))).collect();
        format!("0/{hosts} hosts can run {}: {}", self.vm.name, parts.join(", "))
    }

    /// The reason on each host, for Events and logs: "host-1: has 0 of 2 free vCPUs".
    pub fn per_host(&self) -> Vec<String> {
        self.reasons.iter().map(|(host, r)| format!("{host}: {}", r.phrase(false))).collect()
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}

/// 1.2, 4, 0.5: vCPU counts as users read them.
fn number(x: f64) -> String {
    let rounded = (x * 10.0).floor() / 10.0;
    if rounded.fract() == 0.0 { format!("{rounded:.0}") } else { format!("{rounded:.1}") }
}

/// Memory in the units a VM's spec uses.
pub fn mib(m: u64) -> String {
    if m >= 1024 && m.is_multiple_of(1024) { format!("{}Gi", m / 1024) } else { format!("{m}Mi") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Key;

    #[test]
    fn reasons_are_counted_by_kind_with_the_nearest_miss_as_example() {
        let u = Unschedulable {
            vm: Key::new("prod", "db-01"),
            reasons: vec![
                ("host-1".into(), Reason::Cpu { free: 0.5, need: 4 }),
                ("host-2".into(), Reason::Cpu { free: 1.25, need: 4 }),
                ("host-3".into(), Reason::Rule(Key::new("prod", "web-spread"))),
            ],
        };
        assert_eq!(u.message(), "0/3 hosts can run db-01: 2 have 1.2 of 4 free vCPUs, 1 breaks rule web-spread");
        assert_eq!(u.per_host()[2], "host-3: breaks rule web-spread");
    }

    #[test]
    fn a_placement_names_its_score_and_runner_up() {
        let p = Placement {
            host: "host-2".into(),
            score: 87,
            cpus: None,
            numa_node: Some(0),
            preferred_broken: vec![],
            feasible: 3,
            runner_up: Some(("host-1".into(), 62)),
        };
        assert_eq!(
            p.message(),
            "host-2 (score 87: balance 77, fits NUMA node 0; 3 hosts feasible; runner-up host-1, score 62)"
        );
    }

    #[test]
    fn memory_reads_in_spec_units() {
        let u = Unschedulable {
            vm: Key::new("ns", "big"),
            reasons: vec![("h".into(), Reason::Memory { free: 2048, need: 4104 })],
        };
        assert_eq!(u.message(), "0/1 hosts can run big: 1 has 2Gi of 4104Mi free memory");
    }
}
