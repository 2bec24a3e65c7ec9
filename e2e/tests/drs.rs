//! DRS on the real control plane, with real agents and VMMs: VMs whose guests burn
//! CPU (the test guest's `spin` mode), all started on one host, are spread over
//! the pool's three hosts by FullyAutomated DRS, each move a real live migration,
//! and the pool then stays still; at the Manual level DRS only recommends, and
//! exactly the move a user applies (by creating the migration it describes) is
//! made.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use drover_e2e::control_plane;
use drover_e2e::hosts::{Host, unique_name};
use drover_e2e::operator::Operator;
use drover_e2e::vms::*;
use serde_json::Value;

/// DRS interval, seconds (the API's shortest).
const INTERVAL: u64 = 10;
const SPINNERS: [&str; 3] = ["spin-1", "spin-2", "spin-3"];

/// Three hosts in a pool of their own with DRS at `level`, threshold 3, a
/// 10-second interval; three 1-vCPU spinning VMs all running on the first host
/// (the other two cordoned while they start, then uncordoned; HA admission
/// control off, as cordoned hosts keep no failover capacity).
fn spinning_on_one_host(prefix: &str, level: &str) -> (String, String, Vec<Host>, Operator) {
    let ns = namespace(prefix);
    let pool = unique_name(prefix);
    let hosts: Vec<Host> = (1..=3).map(|i| Host::add(&format!("{pool}-{i}"))).collect();
    for h in &hosts {
        kubectl(&["label", "node", h.name(), &format!("drover.dev/pool={pool}"), "--overwrite"]);
    }
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: {pool}}}\nspec:\n  \
         nodeSelector: {{matchLabels: {{drover.dev/pool: {pool}}}}}\n  capacity: {{cpuOvercommitRatio: 4}}\n  ha: {{admissionControl: false}}\n  \
         drs: {{automationLevel: {level}, migrationThreshold: 3, intervalSeconds: {INTERVAL}, maxConcurrentMigrations: 2}}\n"
    ));
    for h in &hosts[1..] {
        kubectl(&["cordon", h.name()]);
    }
    let op = Operator::start("op-1", &ns, &[]);
    for vm in SPINNERS {
        apply(&vm_yaml(&ns, vm, 1, "32Mi", "drover.mode=spin"));
    }
    for vm in SPINNERS {
        let status = wait_phase(&ns, vm, "Running", Duration::from_secs(60));
        assert_eq!(status["nodeName"], hosts[0].name(), "{vm}: {status}");
    }
    for h in &hosts[1..] {
        kubectl(&["uncordon", h.name()]);
    }
    (ns, pool, hosts, op)
}

fn hosts_of(ns: &str) -> Vec<String> {
    SPINNERS.iter().map(|vm| vm_status(ns, vm)["nodeName"].as_str().unwrap_or_default().to_string()).collect()
}

fn drs_migrations(ns: &str) -> Vec<Value> {
    let list: Value = serde_json::from_str(&kubectl(&["get", "vmim", "-n", ns, "-o", "json"])).unwrap();
    list["items"].as_array().unwrap().iter().filter(|m| m["spec"]["trigger"] == "DRS").cloned().collect()
}

#[test]
fn fully_automated_drs_spreads_vms_burning_cpu_on_one_host_and_then_stays_still() {
    let _serial = serial();
    let (ns, pool, _hosts, _op) = spinning_on_one_host("drs-auto", "FullyAutomated");
    let uncordoned = Instant::now();
    let spread = wait_for("the spinning VMs on three hosts", Duration::from_secs(4 * INTERVAL + 30), || {
        let on = hosts_of(&ns);
        let distinct: BTreeSet<&String> = on.iter().collect();
        let running = SPINNERS.iter().all(|vm| vm_status(&ns, vm)["phase"] == "Running");
        (distinct.len() == 3 && running).then_some(on)
    });
    let moves = drs_migrations(&ns);
    println!(
        "figure: 3 spinning VMs on one host spread over 3 hosts {} ms after the hosts were uncordoned ({INTERVAL} s \
         DRS interval), in {} DRS migrations (the fewest that balance: 2); on {spread:?}",
        uncordoned.elapsed().as_millis(),
        moves.len()
    );
    assert_eq!(moves.len(), 2, "{moves:#?}");
    for m in &moves {
        assert_eq!(m["status"]["phase"], "Succeeded", "{m}");
        let vm = get(&ns, "vm", m["spec"]["vmName"].as_str().unwrap());
        let moved: Value =
            serde_json::from_str(vm["metadata"]["annotations"]["drover.dev/drs-moved"].as_str().unwrap()).unwrap();
        assert_eq!(moved["migration"], m["metadata"]["name"], "{moved}");
        assert!(moved["reason"].as_str().unwrap().starts_with("balance: "), "{moved}");
        println!("figure: {} annotated drover.dev/drs-moved: {moved}", vm["metadata"]["name"]);
    }
    let hp = get("", "hostpolicy", &pool);
    let drs = &hp["status"]["drs"];
    assert!(drs["imbalance"].is_string() && drs["message"].is_string(), "{}", hp["status"]);
    println!("figure: HostPolicy status.drs after the moves: {drs}");
    // Balanced: two more passes start nothing.
    std::thread::sleep(Duration::from_secs(2 * INTERVAL + 2));
    assert_eq!(drs_migrations(&ns).len(), 2, "DRS moved a balanced pool: {:#?}", drs_migrations(&ns));
    assert_eq!(hosts_of(&ns), spread);
    let drs = &get("", "hostpolicy", &pool)["status"]["drs"];
    assert!(drs["message"].as_str().unwrap().ends_with("no move needed"), "{drs}");
    println!("figure: two passes later: {drs}");
}

#[test]
fn manual_drs_only_recommends_and_the_move_a_user_applies_is_made() {
    let _serial = serial();
    let (ns, pool, hosts, _op) = spinning_on_one_host("drs-manual", "Manual");
    let recommendations = wait_for("DRS recommendations", Duration::from_secs(2 * INTERVAL + 20), || {
        let status = get("", "hostpolicy", &pool)["status"].clone();
        status["recommendations"].as_array().filter(|r| !r.is_empty()).cloned()
    });
    println!("figure: kubectl get hp {pool} -o yaml shows recommendations: {}", Value::Array(recommendations.clone()));
    assert!(drs_migrations(&ns).is_empty());
    assert!(hosts_of(&ns).iter().all(|h| h == hosts[0].name()), "{:?}", hosts_of(&ns));
    // The what-if command reads the live cluster and says the same, moving nothing.
    let out = std::process::Command::new(bin_dir().join("drover-what-if"))
        .args([
            "--kubeconfig",
            &control_plane().kubeconfig.display().to_string(),
            "--heartbeat-namespace",
            "drover-system",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "drover-what-if: {}", String::from_utf8_lossy(&out.stderr));
    let pool_report =
        text.split("\npool ").find(|p| p.starts_with(&pool) || p.starts_with(&format!("pool {pool}"))).unwrap_or("");
    assert!(pool_report.contains("(Manual, threshold 3, at most 2 moves)"), "{text}");
    assert!(pool_report.contains("recommended") && pool_report.contains(&format!("  move {ns}/spin-")), "{text}");
    println!("figure: drover-what-if says of the pool:\npool {}", pool_report.trim_start_matches("pool "));
    assert!(drs_migrations(&ns).is_empty());
    let first = &recommendations[0];
    assert!(first["reason"].as_str().unwrap().starts_with("balance: "), "{first}");
    assert_eq!(first["from"], hosts[0].name());
    // The user applies the first: the migration it describes.
    let vm = first["vm"].as_str().unwrap().split_once('/').unwrap().1.to_string();
    let to = first["to"].as_str().unwrap().to_string();
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: VirtualMachineMigration\nmetadata: {{name: apply-drs, namespace: {ns}}}\n\
         spec: {{vmName: {vm}, targetNode: {to}}}\n"
    ));
    wait_for("the applied move", Duration::from_secs(60), || {
        (get(&ns, "vmim", "apply-drs")["status"]["phase"] == "Succeeded").then_some(())
    });
    assert_eq!(vm_status(&ns, &vm)["nodeName"], to.as_str());
    // Nothing else moved, and DRS started no migration of its own.
    let on = hosts_of(&ns);
    assert_eq!(on.iter().filter(|h| *h == hosts[0].name()).count(), 2, "{on:?}");
    assert!(drs_migrations(&ns).is_empty(), "{:#?}", drs_migrations(&ns));
}
