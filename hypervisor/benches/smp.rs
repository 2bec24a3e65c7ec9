//! Virtual SMP scaling: the test guest's `sum` workload split over 1, 2, 4, ... vCPUs
//! (up to the host's CPUs), drover-vmm and QEMU microvm side by side in the same run.
//!
//!   cargo bench -p drover-hypervisor --bench smp
//!
//! Prints the median time from process start to the guest's exit, and the speed-up
//! over 1 vCPU, for both. The workload runs in guest ring 3 at native speed, so the
//! speed-up shows how well vCPU threads spread over host CPUs. On a 2-CPU host only
//! 1 and 2 vCPUs are measured; the 16-core device machine shows more.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed unwrap is a failed run

mod common;

use common::{drover, median, qemu, qemu_cpu, time_boot};

/// Items summed: large enough that the workload dominates start-up.
const WORK: u64 = 1 << 30;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = common::runs().clamp(1, 5);
    let (vmm, guest) = common::setup("smp");
    let cpu = qemu_cpu(&guest);
    let host = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let counts: Vec<u32> = std::iter::successors(Some(1u32), |n| Some(n * 2)).take_while(|n| *n <= host).collect();
    println!("Virtual SMP scaling, sum over {WORK} items, {host} host CPUs, median of {runs} runs (QEMU -cpu {cpu})\n");
    println!("{:<8} {:>12} {:>9} {:>12} {:>9} {:>8}", "vCPUs", "drover", "speed-up", "qemu", "speed-up", "ratio");
    let mut base = None;
    for vcpus in counts {
        let cmdline = format!("drover.work={WORK} drover.cpus={vcpus}");
        let d =
            median((0..runs).map(|_| time_boot(drover(&vmm, &guest, vcpus, &cmdline)).exit.as_secs_f64()).collect());
        let q = median((0..runs).map(|_| time_boot(qemu(&guest, vcpus, &cmdline, cpu)).exit.as_secs_f64()).collect());
        let (d1, q1) = *base.get_or_insert((d, q));
        println!(
            "{vcpus:<8} {:>9.1} ms {:>8.2}x {:>9.1} ms {:>8.2}x {:>7.3}x",
            d * 1e3,
            d1 / d,
            q * 1e3,
            q1 / q,
            d / q
        );
    }
    let _ = std::fs::remove_file(&guest);
}
