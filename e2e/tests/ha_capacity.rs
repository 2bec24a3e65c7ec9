//! HA and capacity on the real control plane, with real agents and VMMs: admission
//! control holds the start that would leave too little for a host failure (with
//! the figures) and lets it go once a host is added; with room for only some of a
//! failed host's VMs, the High one runs and the Low one waits, saying why, until
//! room appears.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use drover_e2e::hosts::{Host, unique_name};
use drover_e2e::operator::Operator;
use drover_e2e::vms::*;
use serde_json::Value;

/// A pool of its own (label `drover.dev/pool=<pool>` on its hosts): no CPU
/// overcommit, HA admission control for one host failure.
fn pool(pool: &str, hosts: &[&Host]) {
    for h in hosts {
        kubectl(&["label", "node", h.name(), &format!("drover.dev/pool={pool}"), "--overwrite"]);
    }
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: {pool}}}\nspec:\n  nodeSelector: {{matchLabels: {{drover.dev/pool: {pool}}}}}\n  \
         capacity: {{cpuOvercommitRatio: 1, reservedMemory: 256Mi}}\n  ha: {{admissionControl: true, hostFailuresToTolerate: 1}}\n"
    ));
}

/// Waits until every host's facts say it offers `vcpus` vCPUs (its agent read the policy).
fn offers(hosts: &[&Host], vcpus: u64) {
    for h in hosts {
        wait_for(&format!("{} to offer {vcpus} vCPUs", h.name()), Duration::from_secs(40), || {
            let node = get("", "node", h.name());
            let facts: Value =
                serde_json::from_str(node["metadata"]["annotations"]["drover.dev/host-facts"].as_str()?).ok()?;
            (facts["offered"]["vcpus"] == vcpus).then_some(())
        });
    }
}

#[test]
fn admission_control_holds_the_start_that_breaks_failover_capacity_until_a_host_is_added() {
    let _serial = serial();
    let ns = namespace("ha-ac");
    let name = unique_name("ac");
    let hosts = [Host::add(&format!("{name}-1")), Host::add(&format!("{name}-2")), Host::add(&format!("{name}-3"))];
    let all: Vec<&Host> = hosts.iter().collect();
    pool(&name, &all);
    offers(&all, 2);
    let _op = Operator::start("op-1", &ns, &[]);
    // 3 hosts x 2 vCPUs: 4 vCPUs of protected VMs survive any one host failure
    // (the other two hosts hold 4); a fifth does not.
    for i in 1..=4 {
        apply(&idle_vm(&ns, &format!("vm-{i}"), "", 1, ""));
    }
    for i in 1..=4 {
        wait_phase(&ns, &format!("vm-{i}"), "Running", Duration::from_secs(40));
    }
    apply(&idle_vm(&ns, "vm-5", "", 1, ""));
    let status = wait_phase(&ns, "vm-5", "Pending", Duration::from_secs(20));
    let why = condition(&status, "Scheduled");
    let message = why["message"].as_str().unwrap().to_string();
    assert_eq!(why["reason"], "Unschedulable", "{why}");
    assert!(message.contains("would break HA admission control: starting vm-5 there would leave"), "{message}");
    assert!(message.contains("vCPUs needed to survive 1 host failure"), "{message}");
    println!("figure: the held VM says: {message}");
    let policy = get("", "hostpolicy", &name);
    let ha = &policy["status"]["ha"];
    assert_eq!(ha["failoverCapacityOk"], true, "{ha}");
    assert_eq!(ha["hostFailuresToTolerate"], 1, "{ha}");
    println!("figure: HostPolicy status.ha: {ha}");

    // A fourth host joins the pool: room for vm-5 without breaking the reserve.
    let fourth = Host::add(&format!("{name}-4"));
    pool(&name, &[&fourth]);
    let added = Instant::now();
    wait_phase(&ns, "vm-5", "Running", Duration::from_secs(40));
    println!("figure: held VM Running {} ms after a host joined the pool", added.elapsed().as_millis());
    // A VM HA would not restart (Disabled) needs no reserve, but must not eat it
    // either: with 8 vCPUs, 5 protected, a 3-vCPU Disabled VM cannot fit anyway,
    // a 1-vCPU one can.
    apply(&idle_vm(&ns, "scratch", "", 1, "  ha: {restartPriority: Disabled}\n"));
    wait_phase(&ns, "scratch", "Running", Duration::from_secs(40));
}

#[test]
fn with_room_for_some_the_high_priority_vm_restarts_first_and_the_low_one_waits_with_the_reason() {
    let _serial = serial();
    let ns = namespace("ha-order");
    let (a, b) = (Host::add(&unique_name("order")), Host::add(&unique_name("order")));
    let _op = Operator::start("op-1", &ns, &[]);
    // b gets a filler VM, leaving it one free vCPU (2-CPU hosts, no policy: no overcommit).
    apply(&idle_vm(&ns, "filler", "", 1, &format!("  nodeSelector: {{kubernetes.io/hostname: {}}}\n", b.name())));
    wait_phase(&ns, "filler", "Running", Duration::from_secs(30));
    // high and low on a: b cordoned while they are placed.
    kubectl(&["cordon", b.name()]);
    apply(&idle_vm(&ns, "low", "", 1, "  ha: {restartPriority: Low}\n"));
    apply(&idle_vm(&ns, "high", "", 1, "  ha: {restartPriority: High}\n"));
    wait_phase(&ns, "low", "Running", Duration::from_secs(30));
    wait_phase(&ns, "high", "Running", Duration::from_secs(30));
    assert_eq!((node_of(&ns, "low"), node_of(&ns, "high")), (a.name().to_string(), a.name().to_string()));
    kubectl(&["uncordon", b.name()]);

    a.stop();
    let status = wait_for("high to run on b", Duration::from_secs(20), || {
        let s = vm_status(&ns, "high");
        (s["phase"] == "Running" && s["nodeName"] == b.name()).then_some(s)
    });
    assert_eq!(condition(&status, "Scheduled")["reason"], "HARestarted");
    let low = wait_for("low to wait", Duration::from_secs(20), || {
        let s = vm_status(&ns, "low");
        (condition(&s, "Scheduled")["reason"] == "HAWaiting").then_some(s)
    });
    let message = condition(&low, "Scheduled")["message"].as_str().unwrap().to_string();
    assert_eq!(low["phase"], "Unknown", "{low}");
    assert!(message.contains("no host can take it yet: 0/2 hosts can run low"), "{message}");
    assert!(message.contains("0 of 1 free vCPUs"), "{message}");
    println!("figure: the Low VM says: {message}");
    // Room appears: low runs at once.
    let freed = Instant::now();
    kubectl(&["delete", "vm", "filler", "-n", &ns, "--wait=false"]);
    wait_for("low to run on b", Duration::from_secs(30), || {
        let s = vm_status(&ns, "low");
        (s["phase"] == "Running" && s["nodeName"] == b.name()).then_some(())
    });
    println!("figure: the Low VM Running {} ms after room appeared", freed.elapsed().as_millis());
    a.start();
}
