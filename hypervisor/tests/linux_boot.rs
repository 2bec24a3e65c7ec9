//! A real Linux kernel boots to its console with every vCPU up. Needs hardware
//! virtualization: under PVM an unmodified kernel does not boot. Run on a host with
//! kvm_intel or kvm_amd:
//!
//!   DROVER_LINUX_KERNEL=/boot/vmlinuz-$(uname -r) cargo test -p drover-hypervisor --test linux_boot -- --ignored
//!
//! (Debian: `apt-get install linux-image-amd64` provides one.) Without an initrd the
//! kernel boots, brings up its CPUs, fails to mount a root file system, panics and
//! (with `panic=1 reboot=k`) resets through the i8042: exit status 3.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::*;

#[test]
#[ignore = "needs hardware virtualization (kvm_intel/kvm_amd)"]
fn linux_boots_with_four_vcpus() {
    let kernel = std::env::var("DROVER_LINUX_KERNEL")
        .expect("set DROVER_LINUX_KERNEL to a bzImage or vmlinux (e.g. /boot/vmlinuz-*)");
    let out = run_vmm(&[
        "--vcpus",
        "4",
        "--memory-mib",
        "512",
        "--kernel",
        &kernel,
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 nomodule",
    ]);
    let serial = stdout(&out);
    assert!(serial.contains("Linux version"), "no kernel banner:\n{serial}\n{}", stderr(&out));
    assert!(serial.contains("Brought up 1 node, 4 CPUs"), "not every vCPU came up:\n{serial}");
    assert_eq!(out.status.code(), Some(3), "expected the panic's reset:\n{}", stderr(&out));
}
