//! Placement: tables of cases, and properties over random clusters.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod fixtures;

use std::collections::HashMap;

use drover_core::placement::{Reason, schedule};
use drover_core::snapshot::{HostHealth, Key, RuleKind, Snapshot};
use drover_core::{Cluster, rules};
use fixtures::*;
use proptest::prelude::*;

#[test]
fn the_host_with_more_room_wins_and_the_runner_up_is_named() {
    let snapshot = Snapshot {
        hosts: vec![host("h1", 4, 8, 1.0), host("h2", 4, 8, 1.0)],
        vms: vec![on(vm("busy", 2, 4096), "h1")],
        ..Default::default()
    };
    let cluster = Cluster::new(&snapshot);
    let p = cluster.place(&vm("new", 1, 1024)).unwrap();
    assert_eq!(p.host, "h2");
    assert_eq!(p.runner_up.as_ref().map(|(h, _)| h.as_str()), Some("h1"));
    assert!(p.score > p.runner_up.unwrap().1);
    assert_eq!(p.feasible, 2);
}

#[test]
fn each_filter_says_why() {
    let mut cordoned = host("cordoned", 4, 8, 1.0);
    cordoned.schedulable = false;
    let mut down = host("down", 4, 8, 1.0);
    down.health = HostHealth::NotReady("no heartbeat for 3 s".into());
    let mut maint = host("maint", 4, 8, 1.0);
    maint.maintenance = true;
    let small = host("small", 2, 1, 1.0);
    let snapshot = Snapshot { hosts: vec![cordoned, down, maint, small], ..Default::default() };
    let cluster = Cluster::new(&snapshot);
    let err = cluster.place(&vm("db-01", 4, 4096)).unwrap_err();
    let reasons: HashMap<&str, &Reason> = err.reasons.iter().map(|(h, r)| (h.as_str(), r)).collect();
    assert_eq!(reasons["cordoned"], &Reason::Cordoned);
    assert_eq!(reasons["maint"], &Reason::Maintenance);
    assert!(matches!(reasons["down"], Reason::NotReady(why) if why.contains("heartbeat")));
    assert_eq!(reasons["small"], &Reason::Cpu { free: 2.0, need: 4 });
    assert_eq!(
        err.message(),
        "0/4 hosts can run db-01: 1 is not ready (no heartbeat for 3 s), 1 is in maintenance, 1 is cordoned, 1 has 2 of 4 free vCPUs"
    );
}

#[test]
fn memory_counts_the_vmm_overhead() {
    let snapshot = Snapshot { hosts: vec![host("h", 4, 1, 1.0)], ..Default::default() };
    let cluster = Cluster::new(&snapshot);
    assert!(cluster.place(&vm("fits", 1, 1024 - 8)).is_ok());
    let err = cluster.place(&vm("too-big", 1, 1024)).unwrap_err();
    assert_eq!(err.reasons[0].1, Reason::Memory { free: 1024, need: 1032 });
}

#[test]
fn node_selector_and_host_rules_filter_hosts() {
    let mut labelled = host("gpu", 4, 8, 1.0);
    labelled.labels.insert("pool".into(), "gpu".into());
    let snapshot = Snapshot {
        hosts: vec![host("plain", 4, 8, 1.0), labelled],
        rules: vec![rule("not-plain", RuleKind::VmHostAntiAffinity, true, &["b"], &["plain"])],
        ..Default::default()
    };
    let cluster = Cluster::new(&snapshot);
    let mut a = vm("a", 1, 512);
    a.node_selector.insert("pool".into(), "gpu".into());
    assert_eq!(cluster.place(&a).unwrap().host, "gpu");
    assert_eq!(cluster.place(&vm("b", 1, 512)).unwrap().host, "gpu");
}

#[test]
fn anti_affinity_spreads_a_batch_and_says_which_rule_blocks() {
    let snapshot = Snapshot {
        hosts: vec![host("h1", 8, 16, 4.0), host("h2", 8, 16, 4.0)],
        vms: vec![],
        rules: vec![rule("web-spread", RuleKind::VmVmAntiAffinity, true, &["w1", "w2", "w3"], &[])],
        ..Default::default()
    };
    let mut cluster = Cluster::new(&snapshot);
    let (w1, w2, w3) = (vm("w1", 2, 512), vm("w2", 2, 512), vm("w3", 2, 512));
    let results = schedule(&mut cluster, &[&w1, &w2, &w3]);
    let hosts: Vec<&str> = results[..2].iter().map(|r| r.as_ref().unwrap().host.as_str()).collect();
    assert_ne!(hosts[0], hosts[1]);
    let err = results[2].as_ref().unwrap_err();
    assert_eq!(err.message(), "0/2 hosts can run w3: 2 break rule web-spread");
}

#[test]
fn preferred_rules_break_only_when_nothing_else_fits() {
    let snapshot = Snapshot {
        hosts: vec![host("h1", 8, 16, 1.0), host("h2", 2, 16, 1.0)],
        vms: vec![on(vm("a", 1, 512), "h1")],
        rules: vec![rule("apart", RuleKind::VmVmAntiAffinity, false, &["a", "b"], &[])],
        ..Default::default()
    };
    let cluster = Cluster::new(&snapshot);
    // h1 has far more room, but b prefers to be away from a.
    assert_eq!(cluster.place(&vm("b", 2, 512)).unwrap().host, "h2");
    // Too big for h2: the rule gives way.
    let p = cluster.place(&vm("b", 4, 512)).unwrap();
    assert_eq!(p.host, "h1");
    assert_eq!(p.preferred_broken, vec![Key::new("ns", "apart")]);
    assert!(p.message().contains("breaks Preferred rule apart"), "{}", p.message());
}

#[test]
fn affinity_keeps_vms_together() {
    let snapshot = Snapshot {
        hosts: vec![host("h1", 8, 16, 1.0), host("h2", 8, 16, 1.0)],
        vms: vec![on(vm("app", 6, 512), "h2")],
        rules: vec![rule("together", RuleKind::VmVmAffinity, true, &["app", "cache"], &[])],
        ..Default::default()
    };
    let cluster = Cluster::new(&snapshot);
    assert_eq!(cluster.place(&vm("cache", 1, 512)).unwrap().host, "h2");
}

#[test]
fn dedicated_vms_get_their_own_cpus_and_shared_vms_keep_clear() {
    let snapshot = Snapshot { hosts: vec![host("h", 8, 16, 2.0)], ..Default::default() };
    let mut cluster = Cluster::new(&snapshot);
    let (d1, d2, d3) = (dedicated("d1", 4, 512), dedicated("d2", 2, 512), dedicated("d3", 4, 512));
    let r = schedule(&mut cluster, &[&d1, &d2]);
    let (c1, c2) = (r[0].as_ref().unwrap().cpus.clone().unwrap(), r[1].as_ref().unwrap().cpus.clone().unwrap());
    assert_eq!(c1, set("0-3"), "one NUMA node");
    assert_eq!(c2, set("4-5"));
    assert_eq!(r[0].as_ref().unwrap().numa_node, Some(0));
    // 2 CPUs left: room for 4 Shared vCPUs at ratio 2, and no Dedicated VM of 4.
    assert!(matches!(cluster.place(&d3).unwrap_err().reasons[0].1, Reason::DedicatedCpus { free: 2, need: 4, .. }));
    assert!(cluster.place(&vm("s", 4, 512)).is_ok());
    assert!(matches!(cluster.place(&vm("s", 5, 512)).unwrap_err().reasons[0].1, Reason::Cpu { .. }));
}

#[test]
fn a_dedicated_vm_does_not_squeeze_the_shared_vms_already_there() {
    let snapshot =
        Snapshot { hosts: vec![host("h", 4, 16, 1.0)], vms: vec![on(vm("s", 3, 512), "h")], ..Default::default() };
    let cluster = Cluster::new(&snapshot);
    assert!(cluster.place(&dedicated("d", 1, 512)).is_ok());
    assert!(cluster.place(&dedicated("d", 2, 512)).is_err(), "3 Shared vCPUs need 3 CPUs at ratio 1");
}

#[test]
fn strict_numa_must_fit_one_node() {
    let snapshot = Snapshot { hosts: vec![host("h", 8, 16, 1.0)], ..Default::default() };
    let cluster = Cluster::new(&snapshot);
    let mut big = dedicated("big", 6, 512);
    big.numa.strict = true;
    let err = cluster.place(&big).unwrap_err();
    assert!(matches!(&err.reasons[0].1, Reason::Numa(why) if why.contains("no NUMA node")), "{err:?}");
    let mut pinned = dedicated("pinned", 2, 512);
    pinned.numa = drover_core::snapshot::NumaRequest { strict: true, nodes: vec![1] };
    assert_eq!(cluster.place(&pinned).unwrap().cpus, Some(set("4-5")));
}

#[test]
fn a_named_target_is_checked_by_the_same_filter() {
    let mut maint = host("maint", 4, 8, 1.0);
    maint.maintenance = true;
    let snapshot = Snapshot { hosts: vec![host("h1", 4, 8, 1.0), maint], ..Default::default() };
    let cluster = Cluster::new(&snapshot);
    assert_eq!(cluster.fit_on(&vm("v", 1, 512), "maint").unwrap_err(), Reason::Maintenance);
    assert!(matches!(cluster.fit_on(&vm("v", 1, 512), "nope").unwrap_err(), Reason::NotReady(_)));
    assert_eq!(cluster.fit_on(&vm("v", 1, 512), "h1").unwrap().host, "h1");
}

#[test]
fn approved_migrations_hold_their_target() {
    let mut moving = on(vm("moving", 3, 512), "h1");
    moving.holds = true;
    let snapshot = Snapshot {
        hosts: vec![host("h1", 4, 8, 1.0), host("h2", 4, 8, 1.0)],
        vms: vec![moving],
        migrations: vec![drover_core::snapshot::Migration {
            key: Key::new("ns", "m"),
            vm: Key::new("ns", "moving"),
            source: "h1".into(),
            target: Some("h2".into()),
            approved: true,
            target_state: None,
        }],
        ..Default::default()
    };
    let cluster = Cluster::new(&snapshot);
    let err = cluster.place(&vm("new", 2, 512)).unwrap_err();
    assert!(err.reasons.iter().all(|(_, r)| matches!(r, Reason::Cpu { .. })), "{err:?}");
}

// Properties over random clusters and batches.

#[derive(Debug, Clone)]
struct Case {
    hosts: Vec<(u32, u64, f64)>,
    vms: Vec<(u32, u64, bool, bool)>, // vCPUs, MiB, dedicated, in the anti-affinity rule
    rule_required: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(
            (prop::sample::select(vec![2u32, 4, 8, 16]), 1u64..16, prop::sample::select(vec![1.0, 2.0, 4.0])),
            1..8,
        ),
        prop::collection::vec(
            (1u32..6, prop::sample::select(vec![256u64, 512, 1024, 2048, 4096]), any::<bool>(), any::<bool>()),
            0..48,
        ),
        any::<bool>(),
    )
        .prop_map(|(hosts, vms, rule_required)| Case { hosts, vms, rule_required })
}

fn build(case: &Case) -> (Snapshot, Vec<drover_core::Vm>) {
    let hosts = case.hosts.iter().enumerate().map(|(i, (c, m, r))| host(&format!("h{i}"), *c, *m, *r)).collect();
    let vms: Vec<_> = case
        .vms
        .iter()
        .enumerate()
        .map(|(i, (c, m, d, _))| if *d { dedicated(&format!("v{i}"), *c, *m) } else { vm(&format!("v{i}"), *c, *m) })
        .collect();
    let members: Vec<String> = case.vms.iter().enumerate().filter(|(_, v)| v.3).map(|(i, _)| format!("v{i}")).collect();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    let rules = vec![rule("spread", RuleKind::VmVmAntiAffinity, case.rule_required, &members, &[])];
    (Snapshot { hosts, vms: vec![], rules, ..Default::default() }, vms)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn no_host_over_capacity_no_required_rule_broken_no_dedicated_cpu_shared(case in case()) {
        let (snapshot, vms) = build(&case);
        let mut cluster = Cluster::new(&snapshot);
        let refs: Vec<&drover_core::Vm> = vms.iter().collect();
        let results = schedule(&mut cluster, &refs);
        // Capacity: recount from the placements.
        let mut by_host: HashMap<String, (u64, u64, Vec<drover_topology::CpuSet>)> = HashMap::new();
        for (vm, result) in vms.iter().zip(&results) {
            if let Ok(p) = result {
                let e = by_host.entry(p.host.clone()).or_default();
                if let Some(cpus) = &p.cpus { e.2.push(cpus.clone()); } else { e.0 += u64::from(vm.vcpus); }
                e.1 += vm.footprint_mib();
            }
        }
        for h in &snapshot.hosts {
            let Some((shared, memory, dedicated)) = by_host.get(&h.name) else { continue };
            let held: usize = dedicated.iter().map(|c| c.len()).sum();
            let all: std::collections::BTreeSet<u32> = dedicated.iter().flat_map(|c| c.iter()).collect();
            prop_assert_eq!(all.len(), held, "two Dedicated VMs share a CPU on {}", h.name);
            prop_assert!(all.iter().all(|c| h.capacity.cpus.contains(*c)));
            let shared_room = (h.capacity.cpus.len() - held) as f64 * h.capacity.cpu_ratio();
            prop_assert!(*shared as f64 <= shared_room + 1e-9, "{}: {} Shared vCPUs on room for {}", h.name, shared, shared_room);
            prop_assert!(*memory <= h.capacity.memory_mib, "{}: memory {} > {}", h.name, memory, h.capacity.memory_mib);
        }
        // Required rules.
        if case.rule_required {
            let placed: HashMap<Key, String> = vms.iter().zip(&results)
                .filter_map(|(vm, r)| r.as_ref().ok().map(|p| (vm.key.clone(), p.host.clone()))).collect();
            prop_assert!(rules::compliance(&snapshot.rules[0], &placed).is_empty());
        }
    }

    #[test]
    fn the_same_snapshot_gives_the_same_decisions(case in case()) {
        let (snapshot, vms) = build(&case);
        let refs: Vec<&drover_core::Vm> = vms.iter().collect();
        let first = schedule(&mut Cluster::new(&snapshot), &refs);
        let second = schedule(&mut Cluster::new(&snapshot.clone()), &refs);
        prop_assert_eq!(first, second);
    }
}
