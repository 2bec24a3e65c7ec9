//! Virtual SMP: the test guest's BSP starts its APs (INIT/SIPI through the in-kernel
//! LAPIC), every vCPU reports in, and a workload shared across them gives the same
//! result as one computed here. Runs on this host's KVM (PVM included).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::*;

fn check_smp(vcpus: u32) {
    let work = 1u64 << 22;
    let out = boot(vcpus, &format!("drover.work={work}"));
    let serial = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "exit status; serial:\n{serial}\nlog:\n{}", stderr(&out));
    for cpu in 0..vcpus {
        assert!(serial.contains(&format!("drover-guest: cpu {cpu} up")), "vCPU {cpu} did not report in:\n{serial}");
    }
    assert!(serial.contains(&format!("drover-guest: {vcpus} cpus,")), "guest counted its CPUs wrong:\n{serial}");
    let expected = format!("drover-guest: sum {:016x} over {work} on {vcpus} cpus", expected_sum(work));
    assert!(serial.contains(&expected), "want `{expected}`:\n{serial}");
}

#[test]
fn one_vcpu() {
    check_smp(1);
}

#[test]
fn two_vcpus() {
    check_smp(2);
}

#[test]
fn four_vcpus() {
    check_smp(4);
}

#[test]
fn eight_vcpus() {
    check_smp(8);
}

#[test]
fn thirty_two_vcpus_on_a_small_host() {
    check_smp(32);
}

#[test]
fn topology_reaches_the_guest_through_cpuid_and_acpi() {
    let out = run_vmm(&["--vcpus", "12", "--topology", "2:3:2", "--memory-mib", "64", "--kernel", GUEST]);
    let serial = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{serial}{}", stderr(&out));
    assert!(serial.contains("12 cpus, cpuid topology: 2 threads/core, 6 threads/package"), "{serial}");
    // APIC IDs pack thread (1 bit), core (2 bits) and socket: 0-5 and 8-13.
    let mut ids: Vec<u32> = serial
        .lines()
        .filter_map(|l| l.split("apic id ").nth(1))
        .map(|id| id.trim().parse().expect("apic id"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
}

#[test]
fn vcpu_threads_are_named() {
    // A guest that spins until killed; its threads are listed while it runs.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_drover-vmm"))
        .args([
            "run",
            "--vcpus",
            "3",
            "--memory-mib",
            "64",
            "--kernel",
            GUEST,
            "--cmdline",
            "drover.mode=spin",
            "--serial",
            "null",
        ])
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .expect("task dir")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    for i in 0..3 {
        assert!(names.contains(&format!("vcpu {i}")), "thread `vcpu {i}` missing: {names:?}");
    }
}
