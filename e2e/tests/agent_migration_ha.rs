//! The agents' side of HA for migrations in flight, on the real control plane with
//! netns hosts and real VMMs, and no operator: the tests approve migrations, fail
//! them and restart VMs by hand, as the operator does.
//!
//! - A source agent gone at the hand-over: the target's VMM runs the guest, so the
//!   target agent moves the VM's status to its host (whoever sees the hand-over
//!   first records it); the source agent, back, records the migration Succeeded
//!   with its figures and moves nothing back.
//! - A source host cut off in the middle of a transfer: once the migration is
//!   failed `SourceHostFailed`, the target powers its receiving VMM off without
//!   waiting for the dead source and says `Stopped`; the VM restarted elsewhere, the
//!   healed source starts nothing and writes nothing over the new host's status.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::Path;
use std::time::{Duration, Instant};

use drover_e2e::hosts::{Host, HostOptions, unique_name};
use drover_e2e::vms::*;
use serde_json::Value;

/// A migration of `vm` to be approved by hand; `more` adds spec fields.
fn migration_yaml(ns: &str, name: &str, vm: &str, more: &str) -> String {
    format!(
        "apiVersion: drover.dev/v1alpha1\nkind: VirtualMachineMigration\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{vmName: {vm}{more}}}\n"
    )
}

fn secret_yaml(ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: key, namespace: {ns}}}\nstringData: {{key: correct-horse-battery-staple}}\n"
    )
}

/// Approves a migration as the operator does: source, target, and the Secret.
fn approve(ns: &str, migration: &str, from: &Host, to: &Host) {
    let patch = format!(
        r#"{{"status":{{"phase":"Scheduled","sourceNode":"{}","targetNode":"{}","secretName":"key"}}}}"#,
        from.name(),
        to.name()
    );
    kubectl(&["patch", "vmim", migration, "-n", ns, "--subresource=status", "--type=merge", "-p", &patch]);
}

fn migration_status(ns: &str, name: &str) -> Value {
    get(ns, "vmim", name)["status"].clone()
}

/// Polls `f` every 5 ms (a file, not the API server) until it holds.
fn wait_closely(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// When the agent of `host` last wrote the VM's status (its managed-fields entry).
fn last_write_by(ns: &str, vm: &str, host: &Host) -> Value {
    let manager = format!("drover-agent-{}", host.name());
    get(ns, "vm", vm)["metadata"]["managedFields"]
        .as_array()
        .and_then(|entries| entries.iter().find(|e| e["manager"] == manager.as_str() && e["subresource"] == "status"))
        .map(|e| e["time"].clone())
        .unwrap_or(Value::Null)
}

#[test]
fn the_target_records_the_hand_over_when_the_source_agent_is_gone() {
    let _serial = serial();
    let ns = namespace("agent-ha-handover");
    // A lease long enough that the source's monitor does not fence its VMM while
    // the send it was asked for goes on without its agent.
    let long_lease = HostOptions { agent_args: vec!["--lease-duration-seconds=20".into()], ..Default::default() };
    let a = Host::add_with(&unique_name("hand-a"), &long_lease);
    let b = Host::add(&unique_name("hand-b"));
    // 128 MiB the guest has written: the send takes long enough for the source's
    // agent to be killed while its VMM sends (a debug VMM copies at tens of MiB/s).
    apply(&vm_yaml(&ns, "v", 1, "192Mi", "drover.mode=dirty drover.mem=128 drover.once=1"));
    place(&ns, "v", &a);
    wait_phase(&ns, "v", "Running", Duration::from_secs(30));
    let uid = uid(&ns, "v");
    std::thread::sleep(Duration::from_secs(1));
    apply(&secret_yaml(&ns));
    apply(&migration_yaml(&ns, "move", "v", ""));
    approve(&ns, "move", &a, &b);

    // The source's VMM connects to the target's: the send is under way. The
    // source's agent dies now, before it can see the send end.
    let target_log = b.runtime_dir().join("vms").join(&uid).join("vmm.log");
    wait_closely("the source VMM to connect", Duration::from_secs(30), || {
        read(&target_log).contains("migration source authenticated")
    });
    kill_9(a.agent_pid().expect("source agent"));
    let killed = Instant::now();
    let status = migration_status(&ns, "move");
    assert_ne!(status["phase"], "Succeeded", "the send ended before the source agent was killed: {status}");

    // The target's VMM runs the guest: the target moves the VM's status to itself.
    let vm = wait_for("the target to move the VM's status", Duration::from_secs(20), || {
        let s = vm_status(&ns, "v");
        (s["nodeName"] == b.name()).then_some(s)
    });
    println!("figure: source agent killed -> VM's status moved by the target in {} ms", killed.elapsed().as_millis());
    assert!(vm.get("migration").is_none(), "no longer moving: {vm}");
    let status = wait_for("targetState Running", Duration::from_secs(10), || {
        let s = migration_status(&ns, "move");
        (s["targetState"] == "Running").then_some(s)
    });
    assert!(status["phase"] == "Running" || status["phase"] == "Switchover", "nobody recorded the end: {status}");
    assert!(b.agent_log().contains("its source has not recorded the hand-over"), "{}", b.agent_log());
    let vm = wait_for("the VM reported Running from the target", Duration::from_secs(20), || {
        let s = vm_status(&ns, "v");
        (s["phase"] == "Running" && s["nodeName"] == b.name() && s["cpuUsage"].is_string()).then_some(s)
    });
    assert!(vmm_pid(&b, &uid).is_some(), "the VM runs on the target: {vm}");
    // The source's VMM ended the send by itself: "migrated".
    let exit = a.runtime_dir().join("vms").join(&uid).join("exit.json");
    wait_for("the source VMM to exit", Duration::from_secs(10), || read(&exit).contains("\"code\":6").then_some(()));

    // The source's agent is back: it finds the VM moved, records the migration's
    // end with its figures, and clears its side; the VM stays where it runs.
    a.start();
    let status = wait_for("the migration to end", Duration::from_secs(30), || {
        let s = migration_status(&ns, "move");
        (s["phase"] == "Succeeded" || s["phase"] == "Failed").then_some(s)
    });
    assert_eq!(status["phase"], "Succeeded", "{status}");
    assert!(status["downtimeMicros"].as_i64().is_some_and(|us| us > 0), "the source VMM's figures: {status}");
    assert!(status["bytesTransferred"].as_i64().is_some_and(|b| b > 128 << 20), "{status}");
    assert_eq!(status["targetState"], "Running", "{status}");
    let dir = a.runtime_dir().join("vms").join(&uid);
    wait_for("the source to clear its side", Duration::from_secs(10), || (!dir.exists()).then_some(()));
    let vm = vm_status(&ns, "v");
    assert_eq!((vm["nodeName"].as_str(), vm["phase"].as_str()), (Some(b.name()), Some("Running")), "{vm}");
    assert!(vmm_pid(&b, &uid).is_some());
    let log = a.agent_log();
    let since_restart = log.rsplit_once("[drover-e2e]").map(|(_, after)| after).unwrap_or(&log);
    assert!(since_restart.contains("moved to the target already"), "{since_restart}");
    assert_eq!(count(since_restart, "vm_controller: started vm="), 0, "{since_restart}");
}

#[test]
fn a_source_host_lost_mid_transfer_leaves_the_target_stopped_and_the_vm_to_ha() {
    let _serial = serial();
    let ns = namespace("agent-ha-midsend");
    let a = Host::add(&unique_name("mid-a"));
    let b = Host::add(&unique_name("mid-b"));
    // A guest that dirties 512 MiB as fast as it can: the send is long under way
    // when the source host is cut off.
    apply(&vm_yaml(&ns, "v", 1, "576Mi", "drover.mode=dirty drover.mem=512"));
    place(&ns, "v", &a);
    wait_phase(&ns, "v", "Running", Duration::from_secs(30));
    let uid = uid(&ns, "v");
    let source_vmm = vmm_pid(&a, &uid).expect("source VMM");
    apply(&secret_yaml(&ns));
    apply(&migration_yaml(&ns, "move", "v", ", maxDowntimeMillis: 1, timeoutSeconds: 600"));
    approve(&ns, "move", &a, &b);
    let target_log = b.runtime_dir().join("vms").join(&uid).join("vmm.log");
    wait_closely("the source VMM to connect", Duration::from_secs(30), || {
        read(&target_log).contains("migration source authenticated")
    });

    // The source host's network goes: the target's VMM waits on a connection that
    // says nothing more; the source's monitor kills its VMM before its lease ends.
    a.isolate();
    let status = migration_status(&ns, "move");
    assert_eq!(status["phase"], "Running", "still copying memory: {status}");
    assert_eq!(status["targetState"], "Receiving", "{status}");
    let vm = vm_status(&ns, "v");
    assert_eq!((vm["phase"].as_str(), vm["migration"].as_str()), (Some("Migrating"), Some("move")), "{vm}");
    wait_for("the source's VMM to be fenced", Duration::from_secs(10), || (!alive(source_vmm)).then_some(()));
    let receiving = vmm_pid(&b, &uid).expect("the target's receiving VMM still runs");
    let before_heal = last_write_by(&ns, "v", &a);

    // The operator: the source host failed, and the migration with it.
    let failed = r#"{"status":{"phase":"Failed","failureMessage":"its source host failed (no heartbeat)","conditions":[{"type":"Succeeded","status":"False","reason":"SourceHostFailed","message":"its source host failed (no heartbeat)","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    kubectl(&["patch", "vmim", "move", "-n", &ns, "--subresource=status", "--type=merge", "-p", failed]);
    let failed_at = Instant::now();
    // The target does not wait for the dead source to settle: its receiving VMM,
    // which does not run the guest, goes, and it says so.
    let status = wait_for("targetState Stopped", Duration::from_secs(5), || {
        let s = migration_status(&ns, "move");
        (s["targetState"] == "Stopped").then_some(s)
    });
    println!("figure: migration failed SourceHostFailed -> target Stopped in {} ms", failed_at.elapsed().as_millis());
    assert_eq!(status["phase"], "Failed");
    assert!(!alive(receiving), "the receiving VMM is powered off");
    let target_dir = b.runtime_dir().join("vms").join(&uid);
    wait_for("the target to clear its side", Duration::from_secs(5), || (!target_dir.exists()).then_some(()));
    assert_eq!(vm_status(&ns, "v")["nodeName"], a.name(), "the VM's status is HA's to move, not the target's");

    // HA restarts the VM on the target host.
    let restart = r#"{"status":{"nodeName":"NODE","phase":"Scheduled","migration":null,"restartCount":1}}"#
        .replace("NODE", b.name());
    kubectl(&["patch", "vm", "v", "-n", &ns, "--subresource=status", "--type=merge", "-p", &restart]);
    let vm = wait_phase(&ns, "v", "Running", Duration::from_secs(30));
    assert_eq!(vm["nodeName"], b.name());
    let restarted = vmm_pid(&b, &uid).expect("restarted on the target host");

    // The source host heals: it starts nothing, writes nothing over the VM's status
    // (another host's now), and clears what was left of the VM there.
    a.heal();
    let source_dir = a.runtime_dir().join("vms").join(&uid);
    wait_for("the healed source to clear the VM's leftovers", Duration::from_secs(20), || {
        (!source_dir.exists()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(last_write_by(&ns, "v", &a), before_heal, "the healed source wrote the VM's status");
    let vm = vm_status(&ns, "v");
    assert_eq!((vm["nodeName"].as_str(), vm["phase"].as_str()), (Some(b.name()), Some("Running")), "{vm}");
    assert!(alive(restarted), "the VM still runs on the target host");
    assert_eq!(count(&a.agent_log(), "vm_controller: started vm="), 1, "only the first start, before the migration");
    assert_eq!(migration_status(&ns, "move")["targetState"], "Stopped", "said once, kept");
}
