//! HA on the real control plane, with real agents on netns hosts and real VMMs: a
//! failed host's VMs start again elsewhere by priority, Disabled ones stay down,
//! admission control holds what would eat into the failover capacity, and a VM
//! never runs twice — including when its host fails in the middle of a migration.
//!
//! Each test starts its own operator replicas, scoped to the test's namespace,
//! and its own hosts; the tests run one at a time.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use drover_e2e::hosts::{Host, unique_name};
use drover_e2e::operator::Operator;
use drover_e2e::vms::*;

#[test]
fn a_stopped_hosts_vms_run_elsewhere_within_seconds_and_disabled_ones_stay_down() {
    let _serial = serial();
    let ns = namespace("ha-basic");
    let hosts = [Host::add(&unique_name("ha")), Host::add(&unique_name("ha"))];
    let _op = Operator::start("op-1", &ns, &[]);
    apply(&idle_vm(&ns, "web", "", 1, "  ha: {restartPriority: High}\n"));
    wait_phase(&ns, "web", "Running", Duration::from_secs(30));
    let first = node_of(&ns, "web");
    apply(&idle_vm(
        &ns,
        "scratch",
        "",
        1,
        &format!("  ha: {{restartPriority: Disabled}}\n  nodeSelector: {{kubernetes.io/hostname: {first}}}\n"),
    ));
    wait_phase(&ns, "scratch", "Running", Duration::from_secs(30));
    let failed = host_named(&hosts, &first);
    let other = hosts.iter().find(|h| h.name() != first).unwrap();
    let uid = uid(&ns, "web");

    let stopped = Instant::now();
    failed.stop();
    let status = wait_for("web to run on the other host", Duration::from_secs(20), || {
        let s = vm_status(&ns, "web");
        (s["phase"] == "Running" && s["nodeName"] == other.name()).then_some(s)
    });
    println!("figure: host stopped -> VM Running on {} in {} ms", other.name(), stopped.elapsed().as_millis());
    assert_eq!(status["restartCount"], 1, "{status}");
    let scheduled = condition(&status, "Scheduled");
    assert_eq!(scheduled["reason"], "HARestarted", "{scheduled}");
    assert!(scheduled["message"].as_str().unwrap().contains(&format!("its host {first} failed")), "{scheduled}");
    assert!(vmm_pid(other, &uid).is_some());

    let scratch = wait_phase(&ns, "scratch", "Failed", Duration::from_secs(10));
    let ready = condition(&scratch, "Ready");
    assert_eq!(ready["reason"], "HANotRestarted", "{scratch}");
    assert!(ready["message"].as_str().unwrap().contains("restartPriority is Disabled"), "{ready}");
    let node = get("", "node", &first);
    let health = node["metadata"]["annotations"]["drover.dev/host-health"].as_str().unwrap_or_default().to_string();
    assert!(health.starts_with("Failed: no heartbeat"), "{health}");

    // The host comes back: the Disabled VM stays down, web stays where it is.
    failed.start();
    wait_for("the host to be Ready again", Duration::from_secs(20), || {
        let node = get("", "node", &first);
        (node["metadata"]["annotations"]["drover.dev/host-health"] == "Ready").then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(vm_status(&ns, "scratch")["phase"], "Failed");
    assert_eq!(node_of(&ns, "web"), other.name());
    assert!(vmm_pid(failed, &uid).is_none(), "the old host runs no copy");
}
