//! Errors a user can act on: one clear log line, exit status 1, no panic.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::process::Command;

use common::*;

fn assert_refused(out: &std::process::Output, says: &str) {
    let log = stderr(out);
    assert_eq!(out.status.code(), Some(1), "exit status; log:\n{log}");
    assert!(log.contains(says), "log should say `{says}`:\n{log}");
    assert!(!log.contains("panicked"), "panic:\n{log}");
}

#[test]
fn missing_kernel_file() {
    let out = run_vmm(&["--vcpus", "1", "--memory-mib", "64", "--kernel", "/nonexistent/vmlinux"]);
    assert_refused(&out, "kernel /nonexistent/vmlinux: cannot open: No such file or directory");
}

#[test]
fn file_that_is_not_a_kernel() {
    let path = std::env::temp_dir().join(format!("drover-not-a-kernel-{}", std::process::id()));
    std::fs::write(&path, b"#!/bin/sh\necho hello\n").unwrap();
    let out = run_vmm(&["--vcpus", "1", "--memory-mib", "64", "--kernel", path.to_str().unwrap()]);
    assert_refused(&out, "neither an ELF image nor a bzImage");
}

#[test]
fn more_vcpus_than_allowed() {
    let out = run_vmm(&["--vcpus", "300", "--memory-mib", "64", "--kernel", GUEST]);
    assert_refused(&out, "vcpus: 300 is out of range 1-254");
}

#[test]
fn topology_that_does_not_add_up() {
    let out = run_vmm(&["--vcpus", "4", "--topology", "2:2:2", "--memory-mib", "64", "--kernel", GUEST]);
    assert_refused(&out, "topology: 2 sockets × 2 cores × 2 threads does not make 4 vCPUs");
}

#[test]
fn memory_that_cannot_be_allocated() {
    // Limit the address space so the guest RAM mapping fails, as on a host out of memory.
    let out = Command::new("bash")
        .args([
            "-c",
            &format!(
                "ulimit -v 262144; exec {} run --vcpus 1 --memory-mib 2048 --kernel {GUEST}",
                env!("CARGO_BIN_EXE_drover-vmm")
            ),
        ])
        .output()
        .unwrap();
    assert_refused(&out, "cannot allocate 2048 MiB of guest memory");
}

#[test]
fn memory_out_of_range() {
    let out = run_vmm(&["--vcpus", "1", "--memory-mib", "8", "--kernel", GUEST]);
    assert_refused(&out, "memoryMib: 8 is out of range");
}

#[test]
fn cpu_set_naming_absent_cpus() {
    let out = run_vmm(&["--vcpus", "1", "--memory-mib", "64", "--kernel", GUEST, "--host-cpus", "4000-4001"]);
    assert_refused(&out, "cpus.hostCpus: CPU 4000-4001 is not available on this host");
}

#[test]
fn malformed_cpu_list() {
    let out = run_vmm(&["--vcpus", "1", "--memory-mib", "64", "--kernel", GUEST, "--host-cpus", "0-"]);
    assert_refused(&out, "cpus.hostCpus: invalid CPU list");
}

#[test]
fn malformed_config_file() {
    let path = std::env::temp_dir().join(format!("drover-bad-config-{}.json", std::process::id()));
    std::fs::write(&path, r#"{"vcpus": 2, "memoryMib": 64, "kernel": "/k", "cpuz": {}}"#).unwrap();
    let out = run_vmm(&["--config", path.to_str().unwrap()]);
    assert_refused(&out, "unknown field `cpuz`");
}

#[test]
fn no_permission_on_dev_kvm() {
    // As an unprivileged user (nobody), /dev/kvm (mode 0600 or 0660, root-owned) cannot
    // be opened. The binary and guest are copied where nobody may read them (the
    // checkout may live under a directory only root can enter).
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("drover-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (vmm, guest) = (dir.join("drover-vmm"), dir.join("guest.elf"));
    std::fs::copy(env!("CARGO_BIN_EXE_drover-vmm"), &vmm).unwrap();
    std::fs::copy(GUEST, &guest).unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&guest, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&vmm)
        .args(["run", "--vcpus", "1", "--memory-mib", "64", "--kernel"])
        .arg(&guest)
        .output()
        .expect("setpriv (util-linux) runs the VMM as nobody");
    let _ = std::fs::remove_dir_all(&dir);
    assert_refused(&out, "cannot open /dev/kvm: Permission denied");
}
