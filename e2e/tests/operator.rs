//! `drover-operator` on the real control plane, with real agents on netns hosts and
//! real VMMs: placement by rules and capacity (and its reasons), run strategies,
//! Dedicated CPUs, migrations (approval, limits, refusals, cancel), maintenance,
//! and a leader killed in the middle of a migration.
//!
//! Each test starts its own operator replicas, scoped to the test's namespace
//! (`--watch-namespace`), and its own hosts; the tests run one at a time.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use drover_e2e::hosts::{Host, unique_name};
use drover_e2e::operator::{Operator, leader};
use drover_e2e::vms::*;
use serde_json::Value;

/// A VM of Drover's test guest; `cpu` and `extra` are YAML (flow style) for
/// `spec.cpu` and the rest of the spec.
fn vm(ns: &str, name: &str, labels: &str, cpu: &str, memory: &str, cmdline: &str, extra: &str) -> String {
    format!(
        "apiVersion: drover.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
         spec:\n  cpu: {cpu}\n  memory: {{size: {memory}}}\n  boot: {{kernel: {}, cmdline: \"{cmdline}\"}}\n{extra}",
        guest_image().display()
    )
}

fn idle(ns: &str, name: &str, labels: &str, vcpus: u32) -> String {
    vm(ns, name, labels, &format!("{{vcpus: {vcpus}}}"), "32Mi", "drover.mode=idle", "")
}

fn migration_status(ns: &str, name: &str) -> Value {
    get(ns, "vmim", name)["status"].clone()
}

fn wait_migration(ns: &str, name: &str, phase: &str, timeout: Duration) -> Value {
    wait_for(&format!("migration {name} to be {phase}"), timeout, || {
        let status = migration_status(ns, name);
        (status["phase"] == phase).then_some(status)
    })
}

fn migration(ns: &str, name: &str, vm: &str, target: Option<&str>, extra: &str) -> String {
    let target = target.map(|t| format!("  targetNode: {t}\n")).unwrap_or_default();
    format!(
        "apiVersion: drover.dev/v1alpha1\nkind: VirtualMachineMigration\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  vmName: {vm}\n{target}{extra}"
    )
}

fn events(ns: &str, name: &str) -> String {
    kubectl(&["get", "events", "-n", ns, "--field-selector", &format!("involvedObject.name={name}"), "-o", "json"])
}

/// VMMs running the VM with this uid, over all `hosts`.
fn vmms(hosts: &[&Host], uid: &str) -> Vec<(String, u32)> {
    hosts.iter().filter_map(|h| vmm_pid(h, uid).map(|pid| (h.name().to_string(), pid))).collect()
}

/// The host CPUs every vCPU thread of a VMM may use, together.
fn cpus_of(pid: u32) -> BTreeSet<u32> {
    vcpu_affinity(pid)
        .iter()
        .flat_map(|list| drover_topology::CpuSet::parse(list).unwrap().iter().collect::<Vec<_>>())
        .collect()
}

#[test]
fn placement_keeps_rules_and_capacity_says_why_and_places_when_room_appears() {
    let _serial = serial();
    let ns = namespace("op-place");
    let (h1, h2) = (Host::add(&unique_name("pa")), Host::add(&unique_name("pb")));
    let _op = Operator::start("op-1", &ns, &[]);
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: DRSRule\nmetadata: {{name: spread, namespace: {ns}}}\n\
         spec: {{type: VmVmAntiAffinity, enforcement: Required, vmSelector: {{matchLabels: {{app: web}}}}}}\n"
    ));
    let applied = Instant::now();
    apply(&idle(&ns, "web-1", "app: web", 1));
    apply(&idle(&ns, "web-2", "app: web", 1));
    wait_phase(&ns, "web-1", "Running", Duration::from_secs(30));
    wait_phase(&ns, "web-2", "Running", Duration::from_secs(30));
    println!("figure: two VMs applied -> Running in {} ms", applied.elapsed().as_millis());
    let (n1, n2) = (node_of(&ns, "web-1"), node_of(&ns, "web-2"));
    assert_ne!(n1, n2, "the Required anti-affinity keeps them apart");
    assert!([h1.name(), h2.name()].contains(&n1.as_str()) && [h1.name(), h2.name()].contains(&n2.as_str()));
    let scheduled = condition(&vm_status(&ns, "web-1"), "Scheduled");
    assert_eq!(scheduled["reason"], "Placed", "{scheduled}");
    assert!(scheduled["message"].as_str().unwrap().starts_with(&format!("placed on {n1} (score ")), "{scheduled}");

    // A third web VM has nowhere to go: Pending, and the reason host by host.
    apply(&idle(&ns, "web-3", "app: web", 1));
    let status = wait_phase(&ns, "web-3", "Pending", Duration::from_secs(20));
    let why = condition(&status, "Scheduled");
    assert_eq!(why["reason"], "Unschedulable", "{why}");
    let message = why["message"].as_str().unwrap();
    assert!(message.contains("hosts can run web-3") && message.contains("2 break rule spread"), "{message}");
    let described = kubectl(&["describe", "vm", "web-3", "-n", &ns]);
    assert!(described.contains("break rule spread"), "kubectl describe vm shows the reason:\n{described}");
    println!("figure: Pending reason as users read it: {message}");

    // Capacity: each 2-CPU host (no HostPolicy: no overcommit) has one vCPU left,
    // and no host has three.
    apply(&idle(&ns, "big", "", 3));
    let status = wait_phase(&ns, "big", "Pending", Duration::from_secs(20));
    let message = condition(&status, "Scheduled")["message"].as_str().unwrap().to_string();
    assert!(message.contains("have 1 of 3 free vCPUs"), "{message}");

    // Room appears (web-1 goes): web-3 takes its host at once, without a poll.
    let freed = Instant::now();
    kubectl(&["delete", "vm", "web-1", "-n", &ns, "--wait=false"]);
    wait_phase(&ns, "web-3", "Running", Duration::from_secs(30));
    println!("figure: a Pending VM placed {} ms after room appeared", freed.elapsed().as_millis());
    assert_eq!(node_of(&ns, "web-3"), n1);
    assert_eq!(vm_status(&ns, "big")["phase"], "Pending", "still no host with 3 free vCPUs");
}

#[test]
fn run_strategies_restart_stop_and_take_requests() {
    let _serial = serial();
    let ns = namespace("op-life");
    // Two 2-CPU hosts (no HostPolicy, no overcommit): room for the four 1-vCPU VMs
    // that hold a host at once (the stopped Always and Failed RerunOnFailure VMs
    // keep theirs, to start again in place).
    let hosts = [Host::add(&unique_name("life")), Host::add(&unique_name("life"))];
    let _op = Operator::start("op-1", &ns, &[]);
    let sum = |name: &str, strategy: &str| {
        vm(&ns, name, "", "{vcpus: 1}", "32Mi", "drover.mode=sum", &format!("  runStrategy: {strategy}\n"))
    };
    // The guest computes a sum and powers off.
    apply(&sum("always", "Always"));
    apply(&sum("rerun", "RerunOnFailure"));
    // A guest that faults at once (triple fault class: the VMM exits 4).
    apply(&vm(&ns, "crash", "", "{vcpus: 1}", "32Mi", "drover.mode=fault", "  runStrategy: RerunOnFailure\n"));
    apply(&vm(&ns, "manual", "", "{vcpus: 1}", "32Mi", "drover.mode=idle", "  runStrategy: Manual\n"));
    apply(&vm(&ns, "halted", "", "{vcpus: 1}", "32Mi", "drover.mode=idle", "  runStrategy: Halted\n"));

    // Always: a guest power-off is followed by a start.
    wait_for("the Always VM restarted after its guest powered off", Duration::from_secs(40), || {
        (vm_status(&ns, "always")["restartCount"].as_i64().unwrap_or(0) >= 2).then_some(())
    });
    // RerunOnFailure: a clean power-off stays stopped.
    let status = wait_phase(&ns, "rerun", "Stopped", Duration::from_secs(30));
    assert_eq!(status["lastExit"], "guest powered off", "{status}");
    // Failures restart with a growing backoff (1 s, 2 s, 4 s with --restart-backoff-seconds 1).
    let started = Instant::now();
    let status = wait_for("three restarts of the crashing VM", Duration::from_secs(60), || {
        let s = vm_status(&ns, "crash");
        (s["restartCount"].as_i64().unwrap_or(0) >= 3).then_some(s)
    });
    println!("figure: 3 restarts after failures in {} ms", started.elapsed().as_millis());
    assert!(status["startFailure"]["consecutiveFailCount"].as_i64().unwrap_or(0) >= 2, "{status}");
    assert!(events(&ns, "crash").contains("BackOff"), "backoff shows as an Event");
    assert_eq!(vm_status(&ns, "rerun")["phase"], "Stopped", "nothing restarted the clean stop");
    assert!(vm_status(&ns, "rerun")["restartCount"].is_null());

    // Manual: stopped until asked; requests are consumed.
    let status = wait_phase(&ns, "manual", "Stopped", Duration::from_secs(20));
    assert_eq!(condition(&status, "Ready")["reason"], "NotRequested", "{status}");
    kubectl(&["annotate", "vm", "manual", "-n", &ns, "drover.dev/request=start"]);
    wait_phase(&ns, "manual", "Running", Duration::from_secs(30));
    wait_for("the start request consumed", Duration::from_secs(10), || {
        get(&ns, "vm", "manual")["metadata"]["annotations"]["drover.dev/request"].is_null().then_some(())
    });
    kubectl(&["annotate", "vm", "manual", "-n", &ns, "drover.dev/request=stop"]);
    wait_phase(&ns, "manual", "Stopped", Duration::from_secs(30));
    assert!(hosts.iter().all(|h| vmm_pid(h, &uid(&ns, "manual")).is_none()));
    // Halted: never started.
    assert_eq!(vm_status(&ns, "halted")["phase"], "Stopped");
    assert!(vm_status(&ns, "halted")["nodeName"].is_null());
}

#[test]
fn dedicated_vms_never_share_a_cpu_and_shared_vms_keep_clear() {
    let _serial = serial();
    let ns = namespace("op-ded");
    let host = Host::add(&unique_name("ded"));
    let _op = Operator::start("op-1", &ns, &[]);
    let dedicated = |name: &str| vm(&ns, name, "", "{vcpus: 1, placement: Dedicated}", "32Mi", "drover.mode=idle", "");
    apply(&dedicated("d1"));
    wait_phase(&ns, "d1", "Running", Duration::from_secs(30));
    apply(&idle(&ns, "s1", "", 1));
    wait_phase(&ns, "s1", "Running", Duration::from_secs(30));
    let d1 = cpus_of(vmm_pid(&host, &uid(&ns, "d1")).unwrap());
    assert_eq!(d1.len(), 1, "{d1:?}");
    assert_eq!(vm_status(&ns, "d1")["allocatedCpus"], d1.iter().next().unwrap().to_string());
    let s1_pid = vmm_pid(&host, &uid(&ns, "s1")).unwrap();
    let s1 = wait_for("the Shared VM off the Dedicated CPU", Duration::from_secs(20), || {
        let s = cpus_of(s1_pid);
        s.is_disjoint(&d1).then_some(s)
    });
    assert!(!s1.is_empty());
    // The host's second CPU goes to a second Dedicated VM only without the Shared one.
    apply(&dedicated("d2"));
    let status = wait_phase(&ns, "d2", "Pending", Duration::from_secs(20));
    let message = condition(&status, "Scheduled")["message"].as_str().unwrap().to_string();
    assert!(message.contains("whole cores") || message.contains("vCPUs"), "{message}");
    kubectl(&["delete", "vm", "s1", "-n", &ns]);
    wait_phase(&ns, "d2", "Running", Duration::from_secs(30));
    let d2 = cpus_of(vmm_pid(&host, &uid(&ns, "d2")).unwrap());
    assert!(d1.is_disjoint(&d2), "two Dedicated VMs share a CPU: {d1:?} {d2:?}");
}

#[test]
fn migrations_are_approved_limited_refused_with_reasons_and_cancelled_by_deletion() {
    let _serial = serial();
    let ns = namespace("op-mig");
    let hosts = [Host::add(&unique_name("ma")), Host::add(&unique_name("mb")), Host::add(&unique_name("mc"))];
    let all: Vec<&Host> = hosts.iter().collect();
    let _op = Operator::start("op-1", &ns, &["--migrations-out-per-host", "1", "--migrations-in-per-host", "1"]);
    apply(&idle(&ns, "a", "app: a", 1));
    apply(&idle(&ns, "b", "app: b", 1));
    wait_phase(&ns, "a", "Running", Duration::from_secs(30));
    wait_phase(&ns, "b", "Running", Duration::from_secs(30));

    // Without a target, placement picks one.
    let from = node_of(&ns, "a");
    apply(&migration(&ns, "a-move", "a", None, ""));
    let status = wait_migration(&ns, "a-move", "Succeeded", Duration::from_secs(60));
    let to = status["targetNode"].as_str().unwrap().to_string();
    assert_ne!(to, from);
    assert_eq!(node_of(&ns, "a"), to);
    assert_eq!(condition(&status, "Approved")["reason"], "Approved");
    assert!(condition(&status, "Approved")["message"].as_str().unwrap().contains("chosen by placement"));
    assert!(kubectl(&["get", "secret", "-n", &ns]).lines().count() <= 1, "the migration Secret is gone afterwards");
    assert_eq!(vmms(&all, &uid(&ns, "a")).len(), 1, "the VM runs once");

    // A target that breaks a Required rule: refused, the VM untouched.
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: DRSRule\nmetadata: {{name: apart, namespace: {ns}}}\n\
         spec: {{type: VmVmAntiAffinity, enforcement: Required, vmNames: [a, b]}}\n"
    ));
    let b_host = node_of(&ns, "b");
    let a_host = node_of(&ns, "a");
    if a_host != b_host {
        apply(&migration(&ns, "a-to-b", "a", Some(&b_host), ""));
        let status = wait_migration(&ns, "a-to-b", "Failed", Duration::from_secs(20));
        let message = status["failureMessage"].as_str().unwrap();
        assert!(message.contains("breaks rule apart"), "{message}");
        assert_eq!(node_of(&ns, "a"), a_host, "nothing moved");
        assert_eq!(vm_status(&ns, "a")["phase"], "Running");
    }
    // Its own host as target, a VM that does not run: refused too.
    apply(&migration(&ns, "a-home", "a", Some(&a_host), ""));
    let status = wait_migration(&ns, "a-home", "Failed", Duration::from_secs(20));
    assert!(status["failureMessage"].as_str().unwrap().contains("is the host VM a runs on"), "{status}");

    // Limits: two migrations out of one host at once; the second waits for the first.
    apply(&idle(&ns, "c", "", 1));
    wait_phase(&ns, "c", "Running", Duration::from_secs(30));
    let c_host = node_of(&ns, "c");
    let mover = if node_of(&ns, "b") == c_host { "b" } else { "a" };
    if node_of(&ns, mover) == c_host {
        apply(&format!("{}---\n{}", migration(&ns, "c-go", "c", None, ""), migration(&ns, "m-go", mover, None, "")));
        wait_migration(&ns, "c-go", "Succeeded", Duration::from_secs(60));
        wait_migration(&ns, "m-go", "Succeeded", Duration::from_secs(60));
        let waited = events(&ns, "c-go") + &events(&ns, "m-go");
        assert!(waited.contains("its limit"), "one migration waited for the outgoing limit: {waited}");
    }

    // Deleting a running migration cancels it: the VM stays where it was, once.
    let big = vm(&ns, "busy", "", "{vcpus: 1}", "512Mi", "drover.mode=dirty", "");
    apply(&big);
    wait_phase(&ns, "busy", "Running", Duration::from_secs(30));
    let home = node_of(&ns, "busy");
    apply(&migration(&ns, "busy-move", "busy", None, "  maxDowntimeMillis: 1\n"));
    wait_migration(&ns, "busy-move", "Running", Duration::from_secs(30));
    kubectl(&["delete", "vmim", "busy-move", "-n", &ns, "--wait=false"]);
    wait_for("the cancelled migration gone", Duration::from_secs(30), || {
        (!kubectl(&["get", "vmim", "-n", &ns]).contains("busy-move")).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(node_of(&ns, "busy"), home);
    assert_eq!(vm_status(&ns, "busy")["phase"], "Running");
    assert_eq!(vmms(&all, &uid(&ns, "busy")).len(), 1, "cancelled: one VMM, on the source");
}

#[test]
fn maintenance_evacuates_each_vm_by_its_action_and_the_host_returns_to_service() {
    let _serial = serial();
    let ns = namespace("op-maint");
    let (a, b) = (Host::add(&unique_name("xa")), Host::add(&unique_name("xb")));
    let _op = Operator::start("op-1", &ns, &[]);
    // Room for three 1-vCPU VMs on one 2-CPU host: a pool with 4:1 overcommit.
    // HA admission control off: with one of two hosts in maintenance no host
    // failure can be survived, so it would rightly hold the evacuation (the HA
    // tests show that side).
    let pool = format!("pool-{ns}");
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: {pool}}}\n\
         spec:\n  nodeSelector: {{matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [{}, {}]}}]}}\n\
         \x20 capacity: {{cpuOvercommitRatio: 4}}\n  ha: {{admissionControl: false}}\n",
        a.name(),
        b.name()
    ));
    for host in [&a, &b] {
        wait_for("the pool's capacity in the host facts", Duration::from_secs(30), || {
            let node = get("", "node", host.name());
            let facts = node["metadata"]["annotations"]["drover.dev/host-facts"].as_str().unwrap_or("{}").to_string();
            facts.contains(&format!("\"policy\":\"{pool}\"")).then_some(())
        });
    }
    // All three on host a first (a Preferred rule: broken only when a cannot take them).
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: DRSRule\nmetadata: {{name: on-a, namespace: {ns}}}\n\
         spec: {{type: VmHostAffinity, enforcement: Preferred, vmSelector: {{matchLabels: {{pool: m}}}}, \
         nodeSelector: {{matchLabels: {{kubernetes.io/hostname: {}}}}}}}\n",
        a.name()
    ));
    let on = |name: &str, action: &str| {
        vm(&ns, name, "pool: m", "{vcpus: 1}", "32Mi", "drover.mode=idle", &format!("  onMaintenance: {action}\n"))
    };
    apply(&on("live", "LiveMigrate"));
    apply(&on("again", "Restart"));
    apply(&on("held", "Stop"));
    for name in ["live", "again", "held"] {
        wait_phase(&ns, name, "Running", Duration::from_secs(30));
        assert_eq!(node_of(&ns, name), a.name(), "{name} follows the Preferred rule");
    }
    let live_uid = uid(&ns, "live");
    kubectl(&["taint", "node", a.name(), "drover.dev/maintenance=planned:NoExecute"]);
    wait_for("host a empty and in maintenance", Duration::from_secs(60), || {
        let note = get("", "node", a.name())["metadata"]["annotations"]["drover.dev/maintenance-status"].clone();
        (note == "in maintenance: no VM runs here").then_some(())
    });
    assert_eq!(node_of(&ns, "live"), b.name());
    assert_eq!(vm_status(&ns, "live")["phase"], "Running");
    assert!(vmm_pid(&b, &live_uid).is_some(), "live-migrated, same VM");
    let again = wait_phase(&ns, "again", "Running", Duration::from_secs(30));
    assert_eq!(again["nodeName"], b.name(), "restarted elsewhere");
    assert_eq!(vm_status(&ns, "held")["phase"], "Stopped", "stopped for the maintenance");
    let migrations = kubectl(&["get", "vmim", "-n", &ns, "-o", "jsonpath={.items[*].spec.trigger}"]);
    assert!(migrations.contains("Maintenance"), "{migrations}");

    kubectl(&["taint", "node", a.name(), "drover.dev/maintenance-"]);
    wait_phase(&ns, "held", "Running", Duration::from_secs(30));
    assert_eq!(node_of(&ns, "held"), a.name(), "back in service: it starts where it was");
    wait_for("the maintenance note removed", Duration::from_secs(10), || {
        get("", "node", a.name())["metadata"]["annotations"]["drover.dev/maintenance-status"].is_null().then_some(())
    });
    kubectl(&["delete", "hostpolicy", &pool]);
}

#[test]
fn a_standby_takes_over_a_killed_leader_mid_migration_and_the_vm_runs_once() {
    let _serial = serial();
    let ns = namespace("op-ha");
    let hosts = [Host::add(&unique_name("la")), Host::add(&unique_name("lb"))];
    let all: Vec<&Host> = hosts.iter().collect();
    let mut ops = [Operator::start("op-1", &ns, &[]), Operator::start("op-2", &ns, &[])];
    let first = wait_for("a leader", Duration::from_secs(20), || leader(&ns));
    apply(&vm(&ns, "db", "", "{vcpus: 1}", "256Mi", "drover.mode=dirty", ""));
    wait_phase(&ns, "db", "Running", Duration::from_secs(30));
    let from = node_of(&ns, "db");
    apply(&migration(&ns, "db-move", "db", None, ""));
    wait_for("the migration approved", Duration::from_secs(20), || {
        let phase = migration_status(&ns, "db-move")["phase"].clone();
        (phase != Value::Null && phase != "Pending").then_some(())
    });
    let killed = Instant::now();
    let leader_index = ops.iter().position(|o| o.identity == first).unwrap();
    ops[leader_index].kill9();
    let status = wait_migration(&ns, "db-move", "Succeeded", Duration::from_secs(60));
    assert_ne!(status["targetNode"], from.as_str());
    let second = wait_for("a new leader", Duration::from_secs(20), || leader(&ns).filter(|l| *l != first));
    println!("figure: standby {second} leads {} ms after the leader was killed", killed.elapsed().as_millis());
    // The new leader cleans up after the migration the old one approved.
    wait_for("the migration's Secret removed by the new leader", Duration::from_secs(20), || {
        (!kubectl(&["get", "secret", "-n", &ns]).contains("db-move")).then_some(())
    });
    assert_eq!(vmms(&all, &uid(&ns, "db")).len(), 1, "the VM runs exactly once");
    // Only a leader ever acted: the standby logged no decision before it led.
    let standby = &ops[1 - leader_index];
    let log = standby.log();
    let led_at = log.find("leading: starting the controllers").expect("the standby became leader");
    for act in ["approved", "placed", "VM placed"] {
        assert!(!log[..led_at].contains(act), "the standby acted before it led: {act}\n{}", &log[..led_at]);
    }
    // And the leader's Events name the replica that wrote them.
    let by: Vec<String> = serde_json::from_str::<Value>(&events(&ns, "db-move")).unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reportingComponent"] == "drover-operator")
        .filter_map(|e| e["reportingInstance"].as_str().map(str::to_string))
        .collect();
    assert!(by.iter().all(|i| *i == first || *i == second), "{by:?}");
}
