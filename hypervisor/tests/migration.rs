//! Live migration between two drover-vmm processes: the test guest's digest workload
//! must end with exactly the result of a run that never moved, the guest's clock
//! must not jump by more than the downtime, and every failure leaves the VM running
//! where it was (or, for a target, never running a partial VM).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::sync::Mutex;

use common::*;
use drover_vmm_api::client::request;

/// Migrations are CPU-heavy (two VMs and the transfer on a 2-CPU machine): one at a
/// time, so that a workload sized to outlast a migration does.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serialize() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn digest_cmdline(rounds: u32, mem_mib: u32) -> String {
    format!("drover.mode=digest drover.rounds={rounds} drover.mem={mem_mib}")
}

fn reference(vcpus: u32, cmdline: &str) -> (String, u64) {
    let out = run_vmm(&["--vcpus", &vcpus.to_string(), "--memory-mib", "96", "--kernel", GUEST, "--cmdline", cmdline]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    result(&stdout(&out))
}

/// Moves a running digest workload `hops` times between fresh VMMs, on `lanes`
/// connections; targets fault their memory in first when `prefault`.
fn migrate_hops(vcpus: u32, hops: usize, prefault: bool, lanes: Option<u32>) {
    let _one = serialize();
    // 8 MiB rewritten per round: with a 250 ms budget the migration converges
    // without throttling, so the clock check below means something.
    let cmdline = digest_cmdline(1500, 8);
    let (want, normal_gap) = reference(vcpus, &cmdline);
    let key = secret_file(&format!("hops{vcpus}"), "correct horse battery staple");
    let mut current = Vmm::run(&format!("hops{vcpus}-0"), vcpus, &cmdline);
    current.wait_for_round(3);
    let mut max_downtime_ms = 0;
    for hop in 1..=hops {
        let name = format!("hops{vcpus}-{hop}");
        let mut target =
            if prefault { Vmm::receive_expecting(&name, &key, vcpus, true) } else { Vmm::receive(&name, &key) };
        let listen = target.listen_address();
        let (code, body) = current.migrate_on(&listen, &key, 250, lanes);
        assert_eq!(code, 204, "{body}");
        assert_eq!(current.wait(), Some(6), "source exit status (6 = migrated away):\n{}", current.log());
        if let Some(n) = lanes {
            assert!(target.log().contains(&format!("lanes={n}")), "{}", target.log());
        }
        let log = current.log();
        assert_eq!(figure(&log, "throttle_percent"), 0, "the guest was throttled: {log}");
        max_downtime_ms = max_downtime_ms.max(figure(&log, "downtime_ms"));
        // The target continues the same guest: it does not boot again.
        wait_until(|| !target.serial().is_empty() || target.child.try_wait().unwrap().is_some(), "target output");
        assert!(!target.serial().contains("cpu 0 up"), "the target booted the guest again");
        if hop < hops {
            // Let the guest run a while on this host before moving it on.
            wait_until(|| target.serial().matches("drover-guest: round").count() >= 20, "rounds on the target");
        }
        std::mem::swap(&mut current, &mut target);
    }
    assert_eq!(current.wait(), Some(0), "{}", current.log());
    let (got, gap) = result(&current.serial());
    assert_eq!(got, want, "the migrated guest computed something else");
    // The guest's TSC continues across the move: no round is longer than a normal
    // one plus the pause (counted at 4 GHz, faster than any TSC here), plus a
    // quarter second for the host to deschedule the guest on a busy 2-CPU machine
    // (a 35 ms stall failed this once while other tests ran). A TSC that did not
    // follow the VM would jump by the VMMs' difference in uptime: seconds.
    let bound = normal_gap * 3 + max_downtime_ms * 4_000_000 + 1_000_000_000;
    assert!(
        gap <= bound,
        "largest round gap {gap} cycles, {normal_gap} without migration, downtime {max_downtime_ms} ms"
    );
}

#[test]
fn migrate_once_one_vcpu() {
    migrate_hops(1, 1, false, Some(1));
}

#[test]
fn migrate_once_four_vcpus_to_a_prefaulted_target_on_four_lanes() {
    migrate_hops(4, 1, true, Some(4));
}

#[test]
fn migrate_back_and_forth_on_two_lanes() {
    migrate_hops(2, 3, false, Some(2));
}

#[test]
fn wrong_secret_is_refused_and_the_source_keeps_running() {
    let _one = serialize();
    let cmdline = digest_cmdline(150, 16);
    let (want, _) = reference(1, &cmdline);
    let mut target = Vmm::receive("badkey-target", &secret_file("right", "the right secret"));
    let listen = target.listen_address();
    let mut source = Vmm::run("badkey-source", 1, &cmdline);
    source.wait_for_round(2);
    let (code, body) = source.migrate(&listen, &secret_file("wrong", "a wrong secret"));
    assert_eq!(code, 204, "{body}");
    wait_until(|| source.migration()["phase"] == "Failed", "the migration to fail");
    assert!(source.migration()["error"].as_str().unwrap().contains("authentication"), "{}", source.migration());
    target.assert_refused();
    assert!(target.log().contains("refused"), "{}", target.log());
    source.assert_finishes_with(&want);
}

#[test]
fn target_killed_mid_transfer_leaves_the_vm_running_on_the_source() {
    let _one = serialize();
    let cmdline = digest_cmdline(400, 64);
    let (want, _) = reference(2, &cmdline);
    let key = secret_file("killtarget", "k");
    let mut target = Vmm::receive("killtarget-target", &key);
    let listen = target.listen_address();
    let mut source = Vmm::run("killtarget-source", 2, &cmdline);
    source.wait_for_round(2);
    assert_eq!(source.migrate(&listen, &key).0, 204);
    wait_until(|| source.migration()["phase"] == "PreCopy", "pre-copy");
    target.child.kill().unwrap();
    target.child.wait().unwrap();
    wait_until(|| source.migration()["phase"] == "Failed", "the migration to fail");
    source.assert_finishes_with(&want);
}

#[test]
fn source_killed_mid_transfer_never_starts_a_partial_vm() {
    let _one = serialize();
    let cmdline = digest_cmdline(400, 64);
    let key = secret_file("killsource", "k");
    let mut target = Vmm::receive("killsource-target", &key);
    let listen = target.listen_address();
    let mut source = Vmm::run("killsource-source", 2, &cmdline);
    source.wait_for_round(2);
    assert_eq!(source.migrate(&listen, &key).0, 204);
    wait_until(|| source.migration()["phase"] == "PreCopy", "pre-copy");
    source.child.kill().unwrap();
    // It gives up, and never runs the partial VM.
    target.assert_refused();
}

/// Copies `from` to `forward` and back; with `damage`, flips one bit after 1 MiB.
fn relay_one(mut from: std::net::TcpStream, forward: &str, damage: bool) {
    use std::io::{Read, Write};
    let mut to = std::net::TcpStream::connect(forward).unwrap();
    let mut back = to.try_clone().unwrap();
    let mut from_back = from.try_clone().unwrap();
    std::thread::spawn(move || std::io::copy(&mut back, &mut from_back));
    let mut buf = vec![0u8; 65536];
    let mut total = 0usize;
    let mut flipped = !damage;
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        if !flipped && total + n > 1 << 20 {
            buf[(1 << 20) - total.min(1 << 20)] ^= 0x40;
            flipped = true;
        }
        total += n;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

#[test]
fn corrupt_stream_is_refused_and_the_source_keeps_running() {
    let _one = serialize();
    // A relay between source and target that flips one bit after 1 MiB.
    let cmdline = digest_cmdline(300, 32);
    let (want, _) = reference(1, &cmdline);
    let key = secret_file("corrupt", "k");
    let mut target = Vmm::receive("corrupt-target", &key);
    let target_addr = target.listen_address();
    let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    // It forwards every connection (the source opens one per lane) and damages
    // the first, lane 0.
    std::thread::spawn(move || {
        for (index, from) in relay.incoming().enumerate() {
            let (from, forward) = (from.unwrap(), target_addr.clone());
            std::thread::spawn(move || relay_one(from, &forward, index == 0));
        }
    });
    let mut source = Vmm::run("corrupt-source", 1, &cmdline);
    source.wait_for_round(2);
    assert_eq!(source.migrate(&relay_addr, &key).0, 204);
    target.assert_refused();
    assert!(target.log().contains("damaged") || target.log().contains("checksum"), "{}", target.log());
    wait_until(|| source.migration()["phase"] == "Failed", "the migration to fail");
    source.assert_finishes_with(&want);
}

#[test]
fn cancel_keeps_the_vm_running_here() {
    let _one = serialize();
    let cmdline = digest_cmdline(400, 64);
    let (want, _) = reference(2, &cmdline);
    let key = secret_file("cancel", "k");
    let mut target = Vmm::receive("cancel-target", &key);
    let listen = target.listen_address();
    let mut source = Vmm::run("cancel-source", 2, &cmdline);
    source.wait_for_round(2);
    // A 1 ms budget the busy guest cannot meet: the migration is still copying
    // when the cancel arrives, whatever the machine's speed.
    assert_eq!(source.migrate_within(&listen, &key, 1).0, 204);
    wait_until(|| source.migration()["phase"] == "PreCopy", "pre-copy");
    // One migration at a time: a second one is refused as a conflict, not a bad request.
    let (code, body) = source.migrate_within(&listen, &key, 1);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("a migration is already under way"), "{body}");
    let (code, body) = request(&source.socket, "PUT", "/vm/migration/cancel", None).unwrap();
    assert_eq!(code, 204, "cancel: {body}");
    wait_until(|| source.migration()["phase"] == "Cancelled", "the migration to stop");
    wait_until(
        || request(&source.socket, "PUT", "/vm/migration/cancel", None).unwrap().0 == 409,
        "a second cancel to find no migration",
    );
    target.assert_refused();
    source.assert_finishes_with(&want);
}

#[test]
fn migrate_between_two_hosts_over_their_own_network() {
    let _one = serialize();
    let hosts = TwoHosts::new();
    let cmdline = digest_cmdline(1500, 8);
    let (want, _) = reference(2, &cmdline);
    let key = secret_file("netns", "netns secret");
    let mut target = Vmm::receive_with(Some(&hosts.names[1]), "netns-target", &hosts.addresses[1], &key, &[]);
    let listen = target.listen_address();
    let mut source = Vmm::run_in(Some(&hosts.names[0]), "netns-source", 2, &cmdline);
    source.wait_for_round(3);
    let (code, body) = source.migrate_within(&listen, &key, 250);
    assert_eq!(code, 204, "{body}");
    assert_eq!(source.wait(), Some(6), "{}", source.log());
    assert_eq!(target.wait(), Some(0), "{}", target.log());
    assert_eq!(result(&target.serial()).0, want);
    // The source reached the target's address through the veth pair, from its own namespace.
    assert!(target.log().contains(&format!("peer={}", hosts.addresses[0])), "{}", target.log());
}

#[test]
fn a_target_expecting_another_shape_refuses_the_vm() {
    let _one = serialize();
    let cmdline = digest_cmdline(150, 16);
    let (want, _) = reference(2, &cmdline);
    let key = secret_file("shape", "k");
    let mut target = Vmm::receive_expecting("shape-target", &key, 4, false);
    let listen = target.listen_address();
    let mut source = Vmm::run("shape-source", 2, &cmdline);
    source.wait_for_round(2);
    assert_eq!(source.migrate(&listen, &key).0, 204);
    target.assert_refused();
    assert!(target.log().contains("wrong VM shape: the source sends 2 vCPUs"), "{}", target.log());
    wait_until(|| source.migration()["phase"] == "Failed", "the migration to fail");
    source.assert_finishes_with(&want);
}
