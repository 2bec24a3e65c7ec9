//! Boot benchmark: drover-vmm side by side with QEMU (`-M microvm`, the same test
//! guest image, memory and vCPUs), in the same run.
//!
//!   cargo bench -p drover-hypervisor --bench boot
//!
//! Prints medians of RUNS runs (env DROVER_BENCH_RUNS, default 10) and Drover/QEMU:
//! - time from process start to the guest's first serial output, and to the guest's
//!   own exit, for 1, 2 and 4 vCPUs;
//! - VMM memory overhead: peak RSS minus the guest memory the guest touched;
//! - port-I/O exit round trip from guest ring 3, against a bare KVM_RUN loop that
//!   runs the same guest code with no device dispatch at all.
//!
//! QEMU is Debian's qemu-system-x86 (installed by e2e/install-prereqs); without it
//! the benchmark fails and says so.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{MEMORY_MIB, Run, drover, median, qemu, qemu_cpu, time_boot};

use drover_hypervisor::arch::x86_64::{cpuid, layout, regs};
use drover_hypervisor::config::VmConfig;
use drover_hypervisor::vstate::vm::Vm;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::VcpuExit;

const PIO_EXITS: u64 = 20_000;

/// Guest memory the test guest touches: the resident size of drover-vmm's guest
/// RAM mapping while the guest spins after boot (the same pages QEMU's guest touches).
fn guest_touched_kib(vmm: &Path, guest: &Path) -> u64 {
    let mut child =
        drover(vmm, guest, 1, "drover.mode=spin").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    while let Some(Ok(line)) = lines.next() {
        if line.contains("tick") {
            break;
        }
    }
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", child.id())).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let mut in_guest_ram = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-') && !r.contains(':')) {
            let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
            let size = u64::from_str_radix(b, 16).unwrap_or(0).saturating_sub(u64::from_str_radix(a, 16).unwrap_or(0));
            in_guest_ram = size == MEMORY_MIB << 20;
        } else if in_guest_ram && line.starts_with("Rss:") {
            return line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    panic!("guest RAM mapping not found in drover-vmm's smaps");
}

/// Seconds per port-I/O exit: the time between the guest's "pio start" and "pio end"
/// lines as they reach us, over PIO_EXITS exits.
fn pio_exit_cost(mut cmd: Command) -> f64 {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut start = None;
    let mut cost = f64::NAN;
    while let Some(Ok(line)) = lines.next() {
        if line.contains("pio start") {
            start = Some(Instant::now());
        } else if line.contains("pio end") {
            cost = start.map(|s| s.elapsed().as_secs_f64() / PIO_EXITS as f64).unwrap_or(f64::NAN);
        }
    }
    let _ = child.wait();
    cost
}

/// The floor: the same guest, one vCPU, run by a loop that does nothing but KVM_RUN
/// and watch the serial port for the two lines.
fn bare_kvm_pio_cost(guest: &Path) -> f64 {
    let config: VmConfig = serde_json::from_value(serde_json::json!({
        "vcpus": 1, "memoryMib": MEMORY_MIB, "kernel": guest,
        "cmdline": format!("drover.mode=pio drover.pio={PIO_EXITS}"),
    }))
    .expect("config");
    let vm = Vm::new(1, MEMORY_MIB << 20).expect("VM");
    let ram = layout::ram_regions(MEMORY_MIB << 20);
    let entry = drover_hypervisor::boot::load(&config, &vm.memory, &[0], &ram).expect("load guest");
    let mut vcpu = vm.fd.create_vcpu(0).expect("vCPU");
    let mut cpuid = vm.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).expect("cpuid");
    cpuid::configure(&mut cpuid, 0, config.topology());
    vcpu.set_cpuid2(&cpuid).expect("set cpuid");
    let sregs = vcpu.get_sregs().expect("sregs");
    let drover_hypervisor::boot::BootEntry::Pvh { entry, start_info } = entry else {
        panic!("the test guest boots through PVH")
    };
    vcpu.set_sregs(&regs::pvh_sregs(sregs)).expect("set sregs");
    vcpu.set_regs(&regs::pvh_regs(entry, start_info)).expect("set regs");
    let mut line = Vec::new();
    let mut start = None;
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x3f8, data) => {
                if data[0] == b'\n' {
                    let text = String::from_utf8_lossy(&line).into_owned();
                    if text.contains("pio start") {
                        start = Some(Instant::now());
                    } else if text.contains("pio end") {
                        return start.map(|s| s.elapsed().as_secs_f64() / PIO_EXITS as f64).unwrap_or(f64::NAN);
                    }
                    line.clear();
                } else {
                    line.push(data[0]);
                }
            }
            VcpuExit::IoOut(0x501, _) => return f64::NAN,
            VcpuExit::IoIn(_, data) => data.fill(0xff),
            _ => {}
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` asks a harness for its benchmarks
    }
    let runs = common::runs();
    let (vmm, guest) = common::setup("boot");
    let cpu = qemu_cpu(&guest);
    println!("drover-vmm vs QEMU microvm (-cpu {cpu}), test guest, {MEMORY_MIB} MiB, median of {runs} runs\n");
    println!("{:<34} {:>12} {:>12} {:>8}", "", "drover", "qemu", "ratio");

    let mut rss = (Vec::new(), Vec::new());
    for vcpus in [1u32, 2, 4] {
        let cmdline = format!("drover.work=1 drover.cpus={vcpus}");
        let (mut d, mut q) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            d.push(time_boot(drover(&vmm, &guest, vcpus, &cmdline)));
            q.push(time_boot(qemu(&guest, vcpus, &cmdline, cpu)));
        }
        let ms = |v: &[Run], f: fn(&Run) -> Duration| median(v.iter().map(|r| f(r).as_secs_f64() * 1e3).collect());
        for (what, f) in
            [("first output", (|r: &Run| r.first_output) as fn(&Run) -> Duration), ("guest exit", |r: &Run| r.exit)]
        {
            let (dm, qm) = (ms(&d, f), ms(&q, f));
            println!("{:<34} {:>9.2} ms {:>9.2} ms {:>7.3}x", format!("{what}, {vcpus} vCPU"), dm, qm, dm / qm);
        }
        if vcpus == 1 {
            rss =
                (d.iter().map(|r| r.peak_rss_kib as f64).collect(), q.iter().map(|r| r.peak_rss_kib as f64).collect());
        }
    }

    let touched = guest_touched_kib(&vmm, &guest) as f64;
    let (dr, qr) = (median(rss.0), median(rss.1));
    println!("{:<34} {:>8.1} MiB {:>8.1} MiB {:>7.3}x", "peak RSS, 1 vCPU", dr / 1024.0, qr / 1024.0, dr / qr);
    println!(
        "{:<34} {:>8.1} MiB {:>8.1} MiB {:>7.3}x   (guest touched {:.1} MiB)",
        "VMM overhead (RSS - guest touched)",
        (dr - touched) / 1024.0,
        (qr - touched) / 1024.0,
        (dr - touched) / (qr - touched),
        touched / 1024.0
    );

    let pio = format!("drover.mode=pio drover.pio={PIO_EXITS}");
    let n = runs.clamp(1, 5);
    let d = median((0..n).map(|_| pio_exit_cost(drover(&vmm, &guest, 1, &pio))).collect());
    let q = median((0..n).map(|_| pio_exit_cost(qemu(&guest, 1, &pio, cpu))).collect());
    let bare = median((0..n).map(|_| bare_kvm_pio_cost(&guest)).collect());
    println!("{:<34} {:>9.2} us {:>9.2} us {:>7.3}x", "PIO exit from ring 3", d * 1e6, q * 1e6, d / q);
    println!(
        "{:<34} {:>9.2} us {:>12} {:>7.3}x   (drover / bare)",
        "bare KVM_RUN loop, same guest",
        bare * 1e6,
        "",
        d / bare
    );
    let _ = std::fs::remove_file(&guest);
}
