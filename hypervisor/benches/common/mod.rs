//! Shared by the benchmarks: running drover-vmm and QEMU on the test guest.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const MEMORY_MIB: u64 = 256;

/// The test guest written to a temporary file, and the release drover-vmm
/// (DROVER_VMM names another, for a benchmark binary copied to another machine).
pub fn setup(name: &str) -> (PathBuf, PathBuf) {
    let vmm =
        std::env::var_os("DROVER_VMM").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_drover-vmm")), PathBuf::from);
    let guest = std::env::temp_dir().join(format!("drover-bench-{name}-{}.elf", std::process::id()));
    std::fs::write(&guest, drover_hypervisor::TEST_GUEST).expect("write guest");
    (vmm, guest)
}

/// Runs per measurement (DROVER_BENCH_RUNS, default 10).
pub fn runs() -> usize {
    std::env::var("DROVER_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10)
}

/// One boot: from process start to the guest's first output and to the process's end.
pub struct Run {
    pub first_output: Duration,
    pub exit: Duration,
    pub peak_rss_kib: u64,
}

/// The median of `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Spawns `cmd`, timing the first byte of stdout and the exit; peak RSS from wait4
/// (which reaps the child, in place of `Child::wait`).
#[allow(clippy::zombie_processes)]
pub fn time_boot(mut cmd: Command) -> Run {
    let start = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn VMM");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut byte = [0u8; 1];
    stdout.read_exact(&mut byte).expect("guest output");
    let first_output = start.elapsed();
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    let (status, rss) = wait4(child.id() as i32);
    let exit = start.elapsed();
    assert!(status == 0 || status == 1, "VMM exit status {status}: {}", String::from_utf8_lossy(&rest));
    Run { first_output, exit, peak_rss_kib: rss }
}

/// Waits for `pid`; returns (exit status, peak RSS in KiB).
pub fn wait4(pid: i32) -> (i32, u64) {
    let mut status = 0;
    // SAFETY: rusage is plain data; the pointers are valid for the call.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child; status and usage outlive the call.
    unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    (libc::WEXITSTATUS(status), usage.ru_maxrss as u64)
}

pub fn drover(vmm: &Path, guest: &Path, vcpus: u32, cmdline: &str) -> Command {
    let mut c = Command::new(vmm);
    c.args(["run", "--vcpus", &vcpus.to_string(), "--memory-mib", &MEMORY_MIB.to_string()])
        .arg("--kernel")
        .arg(guest)
        .args(["--cmdline", cmdline]);
    c
}

pub fn qemu(guest: &Path, vcpus: u32, cmdline: &str, cpu: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm", "-enable-kvm", "-cpu", cpu, "-smp", &vcpus.to_string(), "-m", &format!("{MEMORY_MIB}M")])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-device", "isa-debug-exit"])
        .arg("-kernel")
        .arg(guest)
        .args(["-append", cmdline]);
    c
}

/// The QEMU CPU model to use: `host` where QEMU accepts it, else its default.
pub fn qemu_cpu(guest: &Path) -> &'static str {
    for cpu in ["host,-arch-capabilities", "host", "qemu64"] {
        let ok = qemu(guest, 1, "drover.work=1", cpu)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.code() == Some(1));
        if ok.unwrap_or(false) {
            return cpu;
        }
    }
    panic!("qemu-system-x86_64 cannot boot the test guest with KVM here; install Debian's qemu-system-x86");
}

/// The `p`-th percentile (0 to 100) of `v`, nearest rank.
pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// QEMU's microvm with virtio-mmio devices in virtio 1.x mode, as the test guest's
/// driver expects: microvm announces them on the kernel command line only without
/// ACPI, and without ACPI the guest learns its CPU count from `drover.cpus=`.
/// `serial` is a QEMU chardev (`stdio`, `file:PATH`, `null`); add devices to taste.
pub fn qemu_virtio(guest: &Path, vcpus: u32, cmdline: &str, cpu: &str, serial: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", cpu, "-smp", &vcpus.to_string()])
        .args(["-m", &format!("{MEMORY_MIB}M"), "-nodefaults", "-no-user-config", "-nographic"])
        .args(["-serial", serial, "-device", "isa-debug-exit", "-global", "virtio-mmio.force-legacy=false"])
        .arg("-kernel")
        .arg(guest)
        .args(["-append", &format!("{cmdline} drover.cpus={vcpus}")]);
    c
}
