//! Helpers for tests that run `drover-vmm` with the test guest on this host's KVM.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
#![allow(dead_code)]

use std::process::{Command, Output};

/// Path of the test guest image built by build.rs.
pub const GUEST: &str = env!("DROVER_TEST_GUEST");

/// `drover-vmm run` with these extra arguments; serial output to stdout.
pub fn run_vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_drover-vmm"))
        .arg("run")
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("start drover-vmm")
}

/// Boots the test guest with `vcpus` vCPUs and a command line.
pub fn boot(vcpus: u32, cmdline: &str) -> Output {
    run_vmm(&["--vcpus", &vcpus.to_string(), "--memory-mib", "64", "--kernel", GUEST, "--cmdline", cmdline])
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What the guest's `sum` workload must print for `work` items: the sum of
/// splitmix64(i) for i < work, whatever the number of CPUs sharing it.
pub fn expected_sum(work: u64) -> u64 {
    (0..work).fold(0u64, |acc, i| {
        let mut x = i.wrapping_add(0x9e3779b97f4a7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
        acc.wrapping_add(x ^ (x >> 31))
    })
}
