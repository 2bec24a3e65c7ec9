//! Snapshot and restore: pause -> snapshot -> kill -> restore -> the guest continues
//! and its workload ends with exactly the result of a run that never stopped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use drover_vmm_api::client::request;

const DIGEST: &str = "drover.mode=digest drover.rounds=120 drover.mem=32";

fn digest_line(serial: &str) -> String {
    serial
        .lines()
        .find(|l| l.starts_with("drover-guest: digest"))
        .unwrap_or_else(|| panic!("no digest in:\n{serial}"))
        .split(" max-round-gap")
        .next()
        .unwrap()
        .to_string()
}

fn snapshot_and_restore(vcpus: u32) {
    let reference = boot(vcpus, DIGEST);
    assert_eq!(reference.status.code(), Some(0), "{}", stderr(&reference));
    let want = digest_line(&stdout(&reference));

    let dir = std::env::temp_dir().join(format!("drover-snapshot-{vcpus}-{}", std::process::id()));
    let socket = dir.with_extension("sock");
    let serial = dir.with_extension("log");
    let _ = std::fs::remove_dir_all(&dir);
    let mut vm = Command::new(env!("CARGO_BIN_EXE_drover-vmm"))
        .args(["run", "--vcpus", &vcpus.to_string(), "--memory-mib", "64", "--kernel", GUEST, "--cmdline", DIGEST])
        .args(["--api-socket", socket.to_str().unwrap(), "--serial", serial.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Snapshot mid-run: after the first rounds, long before the last.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&serial).unwrap_or_default().contains("round 5\n") {
        assert!(Instant::now() < deadline, "guest made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(request(&socket, "PUT", "/vm/pause", None).unwrap().0, 204);
    let (code, body) =
        request(&socket, "PUT", "/vm/snapshot", Some(&format!(r#"{{"path": "{}"}}"#, dir.display()))).unwrap();
    assert_eq!(code, 200, "{body}");
    vm.kill().unwrap();
    vm.wait().unwrap();
    let before = std::fs::read_to_string(&serial).unwrap();
    assert!(!before.contains("digest"), "the workload finished before the snapshot; make it longer");

    let restored = Command::new(env!("CARGO_BIN_EXE_drover-vmm"))
        .args(["restore", "--from", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let after = stdout(&restored);
    assert_eq!(restored.status.code(), Some(0), "{after}\n{}", stderr(&restored));
    assert!(!after.contains("cpu 0 up"), "the restored VM booted again instead of continuing:\n{after}");
    assert!(after.contains("round 120"), "{after}");
    assert_eq!(digest_line(&after), want, "the restored guest computed something else");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshot_and_restore_one_vcpu() {
    snapshot_and_restore(1);
}

#[test]
fn snapshot_and_restore_four_vcpus() {
    snapshot_and_restore(4);
}

#[test]
fn restore_refuses_a_damaged_snapshot() {
    let dir = std::env::temp_dir().join(format!("drover-bad-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("state.bin"), b"not a state").unwrap();
    std::fs::write(dir.join("memory.bin"), b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_drover-vmm"))
        .args(["restore", "--from", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("VM state: decoding VM state"), "{}", stderr(&out));
}
