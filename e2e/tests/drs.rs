//! DRS on the real control plane, with real agents and VMMs: VMs whose guests burn
//! CPU (the test guest's `spin` mode), all started on one host, are spread over
//! the pool's three hosts by FullyAutomated DRS, each move a real live migration,
//! and the pool then stays still; at the Manual level DRS only recommends (and
//! `drover-what-if` says the same), and exactly the move a user applies (by
//! creating the migration it describes) is made; a Required rule broken where its
//! VMs run (made after they were placed) is fixed by a mandatory move at
//! threshold 1, which balances nothing; PartiallyAutomated places a new VM and
//! moves nothing; a Preferred rule is kept when keeping it costs no balance; DRS
//! moves and a maintenance evacuation together keep to the cluster's migration
//! limit.

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

/// Three hosts in a pool of their own with DRS at `level` and `threshold`, a
/// 10-second interval; 1-vCPU VMs `vms` (guest mode `mode`) all running on the
/// first host (the other two cordoned while they start, then uncordoned; HA
/// admission control off, as cordoned hosts keep no failover capacity).
fn on_one_host(
    prefix: &str,
    level: &str,
    threshold: u32,
    vms: &[&str],
    mode: &str,
) -> (String, String, Vec<Host>, Operator) {
    on_one_host_with(prefix, level, threshold, vms, mode, &[])
}

/// [`on_one_host`], the operator started with `flags`.
fn on_one_host_with(
    prefix: &str,
    level: &str,
    threshold: u32,
    vms: &[&str],
    mode: &str,
    flags: &[&str],
) -> (String, String, Vec<Host>, Operator) {
    let ns = namespace(prefix);
    let pool = unique_name(prefix);
    let hosts: Vec<Host> = (1..=3).map(|i| Host::add(&format!("{pool}-{i}"))).collect();
    for h in &hosts {
        kubectl(&["label", "node", h.name(), &format!("drover.dev/pool={pool}"), "--overwrite"]);
    }
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: {pool}}}\nspec:\n  \
         nodeSelector: {{matchLabels: {{drover.dev/pool: {pool}}}}}\n  capacity: {{cpuOvercommitRatio: 4}}\n  ha: {{admissionControl: false}}\n  \
         drs: {{automationLevel: {level}, migrationThreshold: {threshold}, intervalSeconds: {INTERVAL}, maxConcurrentMigrations: 2}}\n"
    ));
    for h in &hosts[1..] {
        kubectl(&["cordon", h.name()]);
    }
    let op = Operator::start("op-1", &ns, flags);
    for vm in vms {
        apply(&vm_yaml(&ns, vm, 1, "32Mi", &format!("drover.mode={mode}")));
    }
    for vm in vms {
        let status = wait_phase(&ns, vm, "Running", Duration::from_secs(60));
        assert_eq!(status["nodeName"], hosts[0].name(), "{vm}: {status}");
    }
    for h in &hosts[1..] {
        kubectl(&["uncordon", h.name()]);
    }
    (ns, pool, hosts, op)
}

fn spinning_on_one_host(prefix: &str, level: &str) -> (String, String, Vec<Host>, Operator) {
    on_one_host(prefix, level, 3, &SPINNERS, "spin")
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
        assert!(
            m["metadata"]["annotations"]["drover.dev/drs-reason"].as_str().unwrap().starts_with("balance: "),
            "{m}"
        );
        let vm = get(&ns, "vm", m["spec"]["vmName"].as_str().unwrap());
        let moved: Value =
            serde_json::from_str(vm["metadata"]["annotations"]["drover.dev/drs-moved"].as_str().unwrap()).unwrap();
        assert_eq!(moved["migration"], m["metadata"]["name"], "{moved}");
        assert!(moved["reason"].as_str().unwrap().starts_with("balance: "), "{moved}");
        println!("figure: {} annotated drover.dev/drs-moved: {moved}", vm["metadata"]["name"]);
    }
    // The HostPolicy status shows the pass (its reports refresh every 5 s).
    let status_of = |wanted: &str| {
        wait_for(&format!("status.drs saying {wanted:?}"), Duration::from_secs(2 * INTERVAL + 10), || {
            let drs = get("", "hostpolicy", &pool)["status"]["drs"].clone();
            drs["message"].as_str().is_some_and(|m| m.contains(wanted)).then_some(drs)
        })
    };
    let drs = status_of("2 migrations started");
    assert!(drs["imbalance"].is_string() && drs["imbalanceAfter"].is_string() && drs["target"] == "0.10", "{drs}");
    println!("figure: HostPolicy status.drs after the moves: {drs}");
    // Balanced: the next passes start nothing.
    let drs = status_of("no move needed");
    println!("figure: a pass later: {drs}");
    std::thread::sleep(Duration::from_secs(INTERVAL + 2));
    assert_eq!(drs_migrations(&ns).len(), 2, "DRS moved a balanced pool: {:#?}", drs_migrations(&ns));
    assert_eq!(hosts_of(&ns), spread);
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

#[test]
fn a_required_rule_broken_where_the_vms_run_is_fixed_by_a_mandatory_move_even_at_threshold_one() {
    let _serial = serial();
    // Two idle VMs on one host; then a Required anti-affinity rule for them.
    let (ns, pool, hosts, _op) = on_one_host("drs-rule", "FullyAutomated", 1, &["pair-1", "pair-2"], "idle");
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: DRSRule\nmetadata: {{name: apart, namespace: {ns}}}\nspec:\n  \
         type: VmVmAntiAffinity\n  enforcement: Required\n  vmNames: [pair-1, pair-2]\n"
    ));
    let ruled = Instant::now();
    let apart = wait_for("the pair apart", Duration::from_secs(3 * INTERVAL + 30), || {
        let on: Vec<String> = ["pair-1", "pair-2"]
            .iter()
            .map(|v| vm_status(&ns, v)["nodeName"].as_str().unwrap_or_default().to_string())
            .collect();
        let running = ["pair-1", "pair-2"].iter().all(|v| vm_status(&ns, v)["phase"] == "Running");
        (on[0] != on[1] && running).then_some(on)
    });
    let moves = drs_migrations(&ns);
    assert_eq!(moves.len(), 1, "{moves:#?}");
    let vm = get(&ns, "vm", moves[0]["spec"]["vmName"].as_str().unwrap());
    let moved: Value =
        serde_json::from_str(vm["metadata"]["annotations"]["drover.dev/drs-moved"].as_str().unwrap()).unwrap();
    assert!(moved["reason"].as_str().unwrap().contains("breaks Required rule apart on"), "{moved}");
    assert_eq!(moved["from"], hosts[0].name());
    println!(
        "figure: Required rule applied -> the pair on {apart:?} {} ms later (threshold 1, {INTERVAL} s interval): {}",
        ruled.elapsed().as_millis(),
        moved["reason"]
    );
    wait_for("the rule compliant", Duration::from_secs(20), || {
        (get(&ns, "drsrule", "apart")["status"]["compliant"] == true).then_some(())
    });
    let drs = wait_for("the pass in status.drs", Duration::from_secs(2 * INTERVAL + 10), || {
        let drs = get("", "hostpolicy", &pool)["status"]["drs"].clone();
        drs["message"].as_str().is_some_and(|m| m.starts_with("threshold 1: only mandatory moves")).then_some(drs)
    });
    assert_eq!(drs["target"], Value::Null, "threshold 1 balances nothing: {drs}");
}

#[test]
fn partially_automated_drs_places_new_vms_and_only_recommends_moves() {
    let _serial = serial();
    let (ns, pool, hosts, _op) = spinning_on_one_host("drs-partial", "PartiallyAutomated");
    wait_for("DRS recommendations", Duration::from_secs(2 * INTERVAL + 20), || {
        let status = get("", "hostpolicy", &pool)["status"].clone();
        status["recommendations"].as_array().filter(|r| !r.is_empty()).cloned()
    });
    apply(&vm_yaml(&ns, "new-1", 1, "32Mi", "drover.mode=idle"));
    let placed = wait_phase(&ns, "new-1", "Running", Duration::from_secs(40));
    println!("figure: a new VM in a PartiallyAutomated pool placed on {}", placed["nodeName"]);
    // Another pass: still recommendations only.
    std::thread::sleep(Duration::from_secs(INTERVAL + 2));
    assert!(drs_migrations(&ns).is_empty(), "{:#?}", drs_migrations(&ns));
    assert!(hosts_of(&ns).iter().all(|h| h == hosts[0].name()), "{:?}", hosts_of(&ns));
    let drs = &get("", "hostpolicy", &pool)["status"]["drs"];
    assert!(drs["message"].as_str().unwrap().contains("recommended"), "{drs}");
}

#[test]
fn a_preferred_rule_is_kept_by_drs_when_keeping_it_costs_no_balance() {
    let _serial = serial();
    // Two idle VMs on one host, then a Preferred anti-affinity rule for them: a
    // move costs no balance (it even evens the hosts' memory), so DRS makes it.
    let (ns, _pool, _hosts, _op) = on_one_host("drs-pref", "FullyAutomated", 3, &["web-1", "web-2"], "idle");
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: DRSRule\nmetadata: {{name: spread, namespace: {ns}}}\nspec:\n  \
         type: VmVmAntiAffinity\n  enforcement: Preferred\n  vmNames: [web-1, web-2]\n"
    ));
    wait_for("the web VMs apart", Duration::from_secs(3 * INTERVAL + 30), || {
        let on: Vec<String> = ["web-1", "web-2"]
            .iter()
            .map(|v| vm_status(&ns, v)["nodeName"].as_str().unwrap_or_default().to_string())
            .collect();
        let running = ["web-1", "web-2"].iter().all(|v| vm_status(&ns, v)["phase"] == "Running");
        (on[0] != on[1] && running).then_some(on)
    });
    let moves = drs_migrations(&ns);
    assert_eq!(moves.len(), 1, "{moves:#?}");
    let reason = moves[0]["metadata"]["annotations"]["drover.dev/drs-reason"].as_str().unwrap().to_string();
    assert!(reason.contains("breaks Preferred rule spread on") && reason.contains("at no cost to balance"), "{reason}");
    println!("figure: Preferred rule kept by DRS: {reason}");
}

#[test]
fn drs_and_a_maintenance_evacuation_together_keep_to_the_migration_limit() {
    let _serial = serial();
    // One migration at a time in the cluster. Spinners on host 1 (DRS wants two
    // moves), two idle VMs on host 2; once DRS has made its migrations, host 2
    // goes into maintenance and its VMs must leave too.
    let flags = ["--migrations-per-cluster", "1"];
    let (ns, _pool, hosts, _op) = on_one_host_with("drs-limit", "FullyAutomated", 3, &SPINNERS, "spin", &flags);
    for h in [&hosts[0], &hosts[2]] {
        kubectl(&["cordon", h.name()]);
    }
    for vm in ["idle-1", "idle-2"] {
        apply(&vm_yaml(&ns, vm, 1, "32Mi", "drover.mode=idle"));
    }
    for vm in ["idle-1", "idle-2"] {
        let status = wait_phase(&ns, vm, "Running", Duration::from_secs(40));
        assert_eq!(status["nodeName"], hosts[1].name(), "{vm}: {status}");
    }
    for h in [&hosts[0], &hosts[2]] {
        kubectl(&["uncordon", h.name()]);
    }
    let list = || -> Vec<Value> {
        let list: Value = serde_json::from_str(&kubectl(&["get", "vmim", "-n", &ns, "-o", "json"])).unwrap();
        list["items"].as_array().cloned().unwrap_or_default()
    };
    wait_for("DRS's migrations", Duration::from_secs(3 * INTERVAL + 20), || {
        (list().iter().filter(|m| m["spec"]["trigger"] == "DRS").count() >= 2).then_some(())
    });
    kubectl(&["taint", "node", hosts[1].name(), "drover.dev/maintenance=planned:NoExecute", "--overwrite"]);
    // Every migration as it goes, until host 2 is empty and none is under way.
    let began = Instant::now();
    let (mut most, mut both, mut samples) = (0, false, 0);
    loop {
        let all = list();
        samples += 1;
        let unfinished: Vec<&Value> =
            all.iter().filter(|m| !matches!(m["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))).collect();
        let in_flight = unfinished
            .iter()
            .filter(|m| matches!(m["status"]["phase"].as_str(), Some("Scheduled" | "Running" | "Switchover")))
            .count();
        most = most.max(in_flight);
        let kinds: BTreeSet<&str> = unfinished.iter().filter_map(|m| m["spec"]["trigger"].as_str()).collect();
        both |= kinds.contains("DRS") && kinds.contains("Maintenance");
        if unfinished.is_empty()
            && all.iter().any(|m| m["spec"]["trigger"] == "Maintenance")
            && ["idle-1", "idle-2"].iter().all(|v| vm_status(&ns, v)["nodeName"] != hosts[1].name())
        {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(120), "migrations still under way: {all:#?}");
    }
    let all = list();
    let count = |t: &str| all.iter().filter(|m| m["spec"]["trigger"] == t).count();
    println!(
        "figure: {} DRS and {} maintenance migrations, at most {most} under way at once (limit 1) over {samples} \
         samples; DRS and maintenance migrations waiting together: {both}",
        count("DRS"),
        count("Maintenance")
    );
    assert_eq!(most, 1, "more migrations at once than the cluster's limit");
    assert!(both, "the evacuation did not meet DRS's migrations: the test proved nothing");
    // Every evacuation done; a DRS move whose target went into maintenance before
    // its turn failed saying so (its VM stays where it was), the others done.
    for m in &all {
        let refused = m["status"]["failureMessage"].as_str().is_some_and(|f| f.ends_with("is in maintenance"));
        let ok = m["status"]["phase"] == "Succeeded" || (m["spec"]["trigger"] == "DRS" && refused);
        assert!(ok, "{m:#}");
    }
    assert!(SPINNERS.iter().all(|v| vm_status(&ns, v)["phase"] == "Running"));
    kubectl(&["taint", "node", hosts[1].name(), "drover.dev/maintenance-"]);
}
