//! virtio benchmark: drover-vmm's virtio-blk and virtio-net devices against QEMU's
//! (microvm with virtio-mmio devices, the same test-guest image, the same disk file)
//! in the same run, and live migration of a VM that has them.
//!
//!   cargo bench -p drover-hypervisor --bench virtio
//!
//! Needs root (taps, a bridge, ping intervals under 10 ms), /dev/kvm, /dev/net/tun,
//! QEMU (Debian's qemu-system-x86) and iputils-ping; without the network it prints
//! the virtio-blk rows only. Every VM has 1 vCPU and 256 MiB (enough for qd 32 of
//! 1 MiB: the guest's benchmark buffers are qd x bs bytes at 32 MiB). Medians of
//! DROVER_BENCH_RUNS runs (default 10); runs alternate between the VMMs, so that a
//! slow moment of the host falls on both. DROVER_BENCH_PARTS=blk,net,migration keeps
//! some sections only. Ratios are drover/QEMU for throughput and QEMU/drover for
//! latency and time, so that above 1 always means drover-vmm does better.
//!
//! virtio-blk: a 256 MiB raw image of non-zero data (no holes), the same file for
//! both VMMs. Both read and write through the host page cache (drover-vmm: pread and
//! pwrite on its device thread; QEMU: cache=writeback, aio=threads, its defaults) and
//! nothing is dropped from it: the image was just written, so the rows measure the
//! device path (notification, request handling, completion), not the host's disk.
//! The guest's blkbench mode keeps qd requests in flight, polling for completions,
//! until its count is done; a row's time runs from its "blk start" line to its
//! "blk end" line as the host reads them from the VMM's stdout (the boot is outside).
//!   4 KiB random read / write, qd 1 and 32: IOPS, at random block-aligned offsets.
//!   1 MiB sequential read / write, qd 1 and 32: MB/s (10^6 bytes), wrapping at the
//!   image's end.
//!
//! virtio-net: each VMM's guest (net mode: answers ARP and ICMP echo, polling) on a
//! tap of its own, both on one bridge with the host's address 10.0.77.1/24; QEMU's
//! tap has vhost=off (a vhost=on column is added where /dev/vhost-net exists).
//!   ping RTT median / p99: 500 pings 2 ms apart from the host, per-reply times.
//!   flood: `ping -f -c 20000`, replies per second (received over ping's own elapsed
//!   time) and the loss. A flood ping sends its next request when the reply is back
//!   (or after 10 ms), so this is round trips per second, one at a time.
//!
//! Migration over loopback in the root namespace, the target on the same host with
//! the same disk file and a second tap on the same bridge (drover-vmm `receive
//! --tap`, QEMU's target its own -netdev). The test guest runs one workload at a
//! time, so no guest keeps its disk busy and answers pings at once: two rows have
//! both devices with one of them busy (4 KiB random writes at qd 32 that never end;
//! pings every 5 ms from before the migration to 0.5 s after it), and a row without
//! devices (the guest spinning, as the device workloads poll) is the baseline.
//!   total, downtime: drover-vmm's from the source's "migration completed" line, with
//!   its defaults; QEMU's from query-migrate (whole milliseconds) of its own live
//!   migration, its bandwidth cap lifted and its defaults otherwise (300 ms downtime
//!   limit, announce after the switch). Neither target faults its memory in first.
//!   QEMU flushes the image (one fdatasync) when it stops the source and drover-vmm
//!   does not, so with the disk busy QEMU's downtime holds the write-back of what
//!   the guest wrote into the page cache (about 130 of its 140 ms under strace here).
//!   down - none: the row's downtime less the same VMM's without devices (the cost of
//!   quiescing the devices at the switch-over).
//!   pings lost: requests without a reply, the last one (maybe in flight) aside.
//!
//! The taps and the bridge (dvbench0-2 on dvbenchbr) are removed at the end, also after
//! a panic; a run killed by a signal leaves them, and the next run removes them first.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed unwrap is a failed run

mod common;

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{MEMORY_MIB, median, percentile};

const DISK_MIB: u64 = 256;
const BRIDGE: &str = "dvbenchbr";
/// drover-vmm's tap, QEMU's, and the migration targets'.
const TAPS: [&str; 3] = ["dvbench0", "dvbench1", "dvbench2"];
const HOST_NET: &str = "10.0.77.";

/// A guest's place on the bridge.
#[derive(Clone, Copy)]
struct Nic {
    tap: &'static str,
    mac: &'static str,
    ip: &'static str,
}

const DROVER_NIC: Nic = Nic { tap: TAPS[0], mac: "52:54:00:77:00:02", ip: "10.0.77.2" };
const QEMU_NIC: Nic = Nic { tap: TAPS[1], mac: "52:54:00:77:00:03", ip: "10.0.77.3" };
/// The migrated VM of either VMM: a MAC and address of its own, so that no ARP or
/// bridge entry left by the net rows applies to it.
const MIGRATING_NIC: Nic = Nic { tap: TAPS[0], mac: "52:54:00:77:00:04", ip: "10.0.77.4" };
const TARGET_TAP: &str = TAPS[2];

/// What every measurement needs.
struct Bench {
    vmm: PathBuf,
    guest: PathBuf,
    cpu: &'static str,
    disk: PathBuf,
    runs: usize,
}

/// A child process killed and reaped on drop, so that a panic leaves no VM running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch file removed on drop (the disk image is 256 MiB).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("drover-virtiobench-{name}-{}", std::process::id()))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn log_file(path: &Path) -> File {
    File::create(path).unwrap()
}

/// Waits until `path` holds `text`; fails at once, with `log`, if `vm` ended first.
fn wait_for(path: &Path, text: &str, vm: &mut Proc, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if read(path).contains(text) {
            return;
        }
        if let Some(status) = vm.0.try_wait().unwrap() {
            // It may have written the text just before it ended.
            assert!(read(path).contains(text), "the VM ended ({status}) before {text:?}:\n{}", read(log));
            return;
        }
        assert!(Instant::now() < deadline, "no {text:?} in {} after 60 s:\n{}", path.display(), read(log));
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// The disk image: every byte written (pseudo-random words), so that reads are of
/// data in the page cache rather than of holes.
fn make_disk(path: &Path) -> Scratch {
    let mut f = BufWriter::with_capacity(1 << 20, File::create(path).unwrap());
    for i in 0..(DISK_MIB << 20) / 8 {
        f.write_all(&splitmix64(i).to_le_bytes()).unwrap();
    }
    f.flush().unwrap();
    Scratch(path.to_path_buf())
}

fn qemu_disk_args(disk: &Path) -> [String; 4] {
    [
        "-drive".into(),
        format!("id=d0,file={},format=raw,if=none,cache=writeback,aio=threads", disk.display()),
        "-device".into(),
        "virtio-blk-device,drive=d0".into(),
    ]
}

fn qemu_nic_args(nic: Nic, tap: &str, vhost: bool) -> [String; 4] {
    let vhost = if vhost { "on" } else { "off" };
    [
        "-netdev".into(),
        format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost={vhost}"),
        "-device".into(),
        format!("virtio-net-device,netdev=n0,mac={}", nic.mac),
    ]
}

fn drover_nic_args(nic: Nic) -> [String; 2] {
    ["--nic".into(), format!("{},mac={}", nic.tap, nic.mac)]
}

fn ratio(r: f64) -> String {
    if r.is_finite() { format!("{r:.2}x") } else { "-".into() }
}

// ---- virtio-blk ----

struct BlkCase {
    name: &'static str,
    write: bool,
    seq: bool,
    bs: u64,
    qd: u32,
    ops: u64,
}

impl BlkCase {
    fn cmdline(&self) -> String {
        format!(
            "drover.mode=blkbench drover.op={} drover.seq={} drover.bs={} drover.qd={} drover.ops={}",
            if self.write { "write" } else { "read" },
            u8::from(self.seq),
            self.bs,
            self.qd,
            self.ops
        )
    }

    /// IOPS for the 4 KiB rows, MB/s for the 1 MiB ones.
    fn figure(&self, t: Duration) -> f64 {
        let per_s = self.ops as f64 / t.as_secs_f64();
        if self.bs == 4096 { per_s } else { per_s * self.bs as f64 / 1e6 }
    }
}

/// Runs a blkbench guest to its end: the time between its "blk start" and "blk
/// end" lines as they reach us (`ok`: the VMM's exit status for a guest's 0).
fn time_blkbench(mut cmd: Command, ok: i32, log: &Path) -> Duration {
    let child = cmd.stdout(Stdio::piped()).stderr(log_file(log)).spawn().expect("spawn the VMM");
    let mut vm = Proc(child);
    let (mut start, mut end, mut serial) = (None, None, String::new());
    for line in BufReader::new(vm.0.stdout.take().unwrap()).lines() {
        let (line, now) = (line.unwrap(), Instant::now());
        if line.contains("blk start") {
            start = Some(now);
        } else if line.contains("blk end") {
            end = Some(now);
        }
        serial.push_str(&line);
        serial.push('\n');
    }
    let status = vm.0.wait().unwrap();
    assert_eq!(status.code(), Some(ok), "{serial}{}", read(log));
    end.expect("no \"blk end\"") - start.expect("no \"blk start\"")
}

fn blk_drover(b: &Bench, case: &BlkCase) -> f64 {
    let mut cmd = common::drover(&b.vmm, &b.guest, 1, &case.cmdline());
    cmd.arg("--disk").arg(&b.disk);
    case.figure(time_blkbench(cmd, 0, &tmp("blk-drover.log")))
}

fn blk_qemu(b: &Bench, case: &BlkCase) -> f64 {
    let mut cmd = common::qemu_virtio(&b.guest, 1, &case.cmdline(), b.cpu, "stdio");
    cmd.args(qemu_disk_args(&b.disk));
    // isa-debug-exit ends QEMU with (value << 1) | 1: the guest's 0 is 1.
    case.figure(time_blkbench(cmd, 1, &tmp("blk-qemu.log")))
}

fn blk_section(b: &Bench) {
    let (kib4, mib1) = (4096, 1 << 20);
    let case = |name, write, seq, bs, qd, ops| BlkCase { name, write, seq, bs, qd, ops };
    // Counts that take a few hundred ms on the slower VMM here, far above the serial
    // line's latency.
    let cases = [
        case("4 KiB random read, qd 1 (IOPS)", false, false, kib4, 1, 10_000),
        case("4 KiB random read, qd 32 (IOPS)", false, false, kib4, 32, 50_000),
        case("4 KiB random write, qd 1 (IOPS)", true, false, kib4, 1, 10_000),
        case("4 KiB random write, qd 32 (IOPS)", true, false, kib4, 32, 50_000),
        case("1 MiB sequential read, qd 1 (MB/s)", false, true, mib1, 1, 1024),
        case("1 MiB sequential read, qd 32 (MB/s)", false, true, mib1, 32, 1024),
        case("1 MiB sequential write, qd 1 (MB/s)", true, true, mib1, 1, 1024),
        case("1 MiB sequential write, qd 32 (MB/s)", true, true, mib1, 32, 1024),
    ];
    println!("\nvirtio-blk: {DISK_MIB} MiB raw image, the same file for both, through the host page cache");
    println!("{:<40} {:>12} {:>12} {:>9}", "", "drover", "qemu", "d/q");
    for case in &cases {
        let (mut d, mut q) = (Vec::new(), Vec::new());
        for _ in 0..b.runs {
            d.push(blk_drover(b, case));
            q.push(blk_qemu(b, case));
        }
        let (d, q) = (median(d), median(q));
        println!("{:<40} {d:>12.0} {q:>12.0} {:>9}", case.name, ratio(d / q));
    }
}

// ---- the network ----

/// Runs a shell command; its stdout, or why it failed.
fn sh(cmd: &str) -> Result<String, String> {
    let out = Command::new("sh").args(["-c", cmd]).output().map_err(|e| format!("sh: {e}"))?;
    if !out.status.success() {
        return Err(format!("`{cmd}`: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The bridge with the host's address and the three taps on it; removed on drop.
struct Network;

impl Network {
    fn new() -> Result<Network, String> {
        Network::remove();
        if let Some(route) = sh("ip -4 route")?.lines().find(|l| l.starts_with(HOST_NET)) {
            return Err(format!("{HOST_NET}0/24 is routed here already ({route})"));
        }
        // Made before the links, so that a failure part-way removes what was made.
        let net = Network;
        sh(&format!("ip link add {BRIDGE} type bridge"))?;
        no_ipv6(BRIDGE);
        sh(&format!("ip addr add {HOST_NET}1/24 dev {BRIDGE} && ip link set {BRIDGE} up"))?;
        for tap in TAPS {
            sh(&format!("ip tuntap add dev {tap} mode tap"))?;
            no_ipv6(tap);
            sh(&format!("ip link set {tap} master {BRIDGE} up"))?;
        }
        Ok(net)
    }

    fn remove() {
        for link in TAPS.iter().chain([&BRIDGE]) {
            let _ = Command::new("ip").args(["link", "del", link]).stderr(Stdio::null()).status();
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        Network::remove();
    }
}

/// Keeps the host's IPv6 (router solicitations, MLD) off the links: frames the guests
/// would only drop, at random moments of a measurement. Best effort.
fn no_ipv6(link: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{link}/disable_ipv6"), "1");
}

/// `ping ARGS`: its stdout, whatever its exit status (1 when replies were missing).
fn ping(args: &str) -> String {
    let out = Command::new("ping").args(args.split_whitespace()).output().expect("run ping (iputils-ping)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pings `ip` until it answers (ARP resolved, the bridge has learnt its port).
fn wait_reachable(ip: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ping(&format!("-c 1 -W 1 {ip}")).contains(" 1 received") {
        assert!(Instant::now() < deadline, "{ip} does not answer pings");
    }
}

/// Per-reply round trips in microseconds.
fn rtts_us(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect()
}

/// `(transmitted, received, elapsed ms)` from ping's summary.
fn summary(out: &str) -> (u64, u64, f64) {
    let line = out.lines().find(|l| l.contains("packets transmitted")).unwrap_or_else(|| panic!("{out}"));
    let word = |i: usize| line.split_whitespace().nth(i).unwrap().parse::<u64>().unwrap();
    let time = line.rsplit("time ").next().unwrap().trim_end_matches("ms").trim().parse().unwrap();
    (word(0), word(3), time)
}

/// A pinger every 5 ms, from once the guest answers until stopped.
struct Pinger {
    ping: Proc,
    out: PathBuf,
}

impl Pinger {
    fn start(ip: &str) -> Pinger {
        wait_reachable(ip);
        let out = tmp("ping.out");
        let child = Command::new("ping").args(["-i", "0.005", ip]).stdout(log_file(&out)).spawn().unwrap();
        Pinger { ping: Proc(child), out }
    }

    /// Stops it: the requests without a reply, the last (maybe in flight) aside.
    fn stop(mut self) -> f64 {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.ping.0.id() as i32, libc::SIGINT) };
        self.ping.0.wait().unwrap();
        let out = read(&self.out);
        let (sent, _, _) = summary(&out);
        let answered: HashSet<u64> = out
            .lines()
            .filter(|l| l.contains("time=") && !l.contains("DUP"))
            .filter_map(|l| l.split("icmp_seq=").nth(1)?.split_whitespace().next()?.parse().ok())
            .collect();
        (1..sent).filter(|seq| !answered.contains(seq)).count() as f64
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.out);
    }
}

// ---- virtio-net ----

#[derive(Clone, Copy)]
struct NetFigures {
    rtt_median_us: f64,
    rtt_p99_us: f64,
    flood_per_s: f64,
    flood_loss_percent: f64,
}

/// Starts `cmd` (serial output into `serial`) and waits for the guest's NIC.
fn boot_net(mut cmd: Command, serial: &Path, log: &Path) -> Proc {
    let _ = std::fs::remove_file(serial);
    let mut vm = Proc(cmd.stdout(Stdio::null()).stderr(log_file(log)).spawn().expect("spawn the VMM"));
    wait_for(serial, "net up", &mut vm, log);
    vm
}

/// The ping figures against a running guest at `ip`.
fn measure_net(ip: &str) -> NetFigures {
    wait_reachable(ip);
    let rtts = rtts_us(&ping(&format!("-c 500 -i 0.002 -W 1 {ip}")));
    assert!(rtts.len() > 400, "only {} of 500 pings came back from {ip}", rtts.len());
    let (sent, received, ms) = summary(&ping(&format!("-f -c 20000 -W 1 {ip}")));
    NetFigures {
        rtt_median_us: median(rtts.clone()),
        rtt_p99_us: percentile(rtts, 99.0),
        flood_per_s: received as f64 / (ms / 1000.0),
        flood_loss_percent: 100.0 * (sent - received) as f64 / sent as f64,
    }
}

fn net_drover(b: &Bench) -> NetFigures {
    let (serial, log) = (tmp("net-drover.serial"), tmp("net-drover.log"));
    let cmdline = format!("drover.mode=net drover.ip={}", DROVER_NIC.ip);
    let mut cmd = common::drover(&b.vmm, &b.guest, 1, &cmdline);
    cmd.args(drover_nic_args(DROVER_NIC)).arg("--serial").arg(&serial);
    let _vm = boot_net(cmd, &serial, &log);
    measure_net(DROVER_NIC.ip)
}

fn net_qemu(b: &Bench, vhost: bool) -> NetFigures {
    let (serial, log) = (tmp("net-qemu.serial"), tmp("net-qemu.log"));
    let cmdline = format!("drover.mode=net drover.ip={}", QEMU_NIC.ip);
    let mut cmd = common::qemu_virtio(&b.guest, 1, &cmdline, b.cpu, &format!("file:{}", serial.display()));
    cmd.args(qemu_nic_args(QEMU_NIC, QEMU_NIC.tap, vhost));
    let _vm = boot_net(cmd, &serial, &log);
    measure_net(QEMU_NIC.ip)
}

fn net_section(b: &Bench) {
    // QEMU's vhost-net, where the host has it: a second QEMU column.
    let vhosts: &[bool] = if Path::new("/dev/vhost-net").exists() { &[false, true] } else { &[false] };
    let (mut d, mut q) = (Vec::new(), vec![Vec::new(); vhosts.len()]);
    for _ in 0..b.runs {
        d.push(net_drover(b));
        for (figures, vhost) in q.iter_mut().zip(vhosts) {
            figures.push(net_qemu(b, *vhost));
        }
    }
    println!("\nvirtio-net: a tap each on one bridge, ping from the host to the guest's echo");
    print!("{:<40} {:>12} {:>12} {:>9}", "", "drover", "qemu", "ratio");
    if vhosts.len() > 1 {
        print!(" {:>12} {:>9}", "qemu vhost", "ratio");
    }
    println!();
    let m = |v: &[NetFigures], f: fn(&NetFigures) -> f64| median(v.iter().map(f).collect());
    let rows = [
        NetRow {
            name: "ping RTT median (us, ratio q/d)",
            figure: |f| f.rtt_median_us,
            decimals: 1,
            better: Better::Less,
        },
        NetRow { name: "ping RTT p99 (us, ratio q/d)", figure: |f| f.rtt_p99_us, decimals: 1, better: Better::Less },
        NetRow {
            name: "flood ping (replies/s, ratio d/q)",
            figure: |f| f.flood_per_s,
            decimals: 0,
            better: Better::More,
        },
        NetRow { name: "flood ping loss (%)", figure: |f| f.flood_loss_percent, decimals: 2, better: Better::Neither },
    ];
    for row in rows {
        let (dv, decimals) = (m(&d, row.figure), row.decimals);
        print!("{:<40} {dv:>12.decimals$}", row.name);
        for q in &q {
            let qv = m(q, row.figure);
            // Oriented so that above 1 means drover-vmm does better.
            let r = match row.better {
                Better::More => dv / qv,
                Better::Less => qv / dv,
                Better::Neither => f64::NAN,
            };
            print!(" {qv:>12.decimals$} {:>9}", ratio(r));
        }
        println!();
    }
}

/// Which way a figure is better: the direction of its ratio.
enum Better {
    More,
    Less,
    Neither,
}

/// A line of the virtio-net table.
struct NetRow {
    name: &'static str,
    figure: fn(&NetFigures) -> f64,
    decimals: usize,
    better: Better,
}

// ---- migration ----

struct MigCase {
    name: &'static str,
    cmdline: String,
    /// Serial text that says the workload runs.
    ready: &'static str,
    devices: bool,
    ping: bool,
}

#[derive(Clone, Copy)]
struct Moved {
    total_ms: f64,
    downtime_ms: f64,
    /// NaN where nothing pinged the guest.
    lost: f64,
}

/// The pinger where the case has one, started once the guest answers, and a moment
/// of pings before the migration starts.
fn start_pinger(case: &MigCase) -> Option<Pinger> {
    // The last run's target taught the bridge the VM's MAC on the target's tap, and
    // a closed tap keeps its entries until they age out (5 min); this guest only ever
    // answers, so it would never teach the bridge its port on the source's tap.
    sh(&format!("ip link set {BRIDGE} type bridge fdb_flush")).unwrap();
    let pinger = case.ping.then(|| Pinger::start(MIGRATING_NIC.ip));
    std::thread::sleep(Duration::from_millis(300));
    pinger
}

/// Half a second of pings after the switch-over, then the count lost.
fn pings_lost(pinger: Option<Pinger>) -> f64 {
    pinger.map_or(f64::NAN, |p| {
        std::thread::sleep(Duration::from_millis(500));
        p.stop()
    })
}

/// A figure from the source's "migration completed" log line.
fn figure(line: &str, name: &str) -> f64 {
    let at = line.find(&format!("{name}=")).unwrap_or_else(|| panic!("no {name} in {line}")) + name.len() + 1;
    line[at..].chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse().unwrap()
}

fn drover_migrate(b: &Bench, case: &MigCase, key: &Path) -> Moved {
    let (serial, log, socket, target_log) =
        (tmp("mig-d.serial"), tmp("mig-d.log"), tmp("mig-d.sock"), tmp("mig-d-target.log"));
    for p in [&serial, &socket] {
        let _ = std::fs::remove_file(p);
    }
    let mut target = Command::new(&b.vmm);
    target.args(["receive", "--listen", "127.0.0.1:0", "--serial", "null", "--secret-file"]).arg(key);
    if case.devices {
        target.args(["--tap", TARGET_TAP]);
    }
    let mut target = Proc(target.stderr(log_file(&target_log)).spawn().unwrap());
    wait_for(&target_log, "waiting for the migration source", &mut target, &target_log);
    let mut source = common::drover(&b.vmm, &b.guest, 1, &case.cmdline);
    source.arg("--serial").arg(&serial).arg("--api-socket").arg(&socket);
    if case.devices {
        source.arg("--disk").arg(&b.disk).args(drover_nic_args(MIGRATING_NIC));
    }
    let mut source = Proc(source.stdout(Stdio::null()).stderr(log_file(&log)).spawn().unwrap());
    wait_for(&serial, case.ready, &mut source, &log);
    let pinger = start_pinger(case);
    // The port the kernel gave the target, from its log.
    let listening = read(&target_log);
    let at = listening.find("address=").unwrap() + "address=".len();
    let destination: String = listening[at..].chars().take_while(|c| !c.is_whitespace()).collect();
    let body = serde_json::json!({"destination": destination, "secretFile": key}).to_string();
    let (code, reply) = drover_vmm_api::client::request(&socket, "PUT", "/vm/migrate", Some(&body)).unwrap();
    assert_eq!(code, 204, "{reply}");
    wait_for(&log, "migration completed", &mut source, &log);
    let done = read(&log);
    let line = done.lines().find(|l| l.contains("migration completed")).unwrap();
    let (total_ms, downtime_ms) = (figure(line, "total_ms"), figure(line, "downtime_us") / 1000.0);
    Moved { total_ms, downtime_ms, lost: pings_lost(pinger) }
}

/// A QMP client: one JSON command per line, answers read until a return or error.
struct Qmp(BufReader<UnixStream>);

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        let mut q = Qmp(BufReader::new(stream));
        let mut greeting = String::new();
        q.0.read_line(&mut greeting).unwrap();
        q.call(serde_json::json!({"execute": "qmp_capabilities"}));
        q
    }

    fn call(&mut self, cmd: serde_json::Value) -> serde_json::Value {
        writeln!(self.0.get_mut(), "{cmd}").unwrap();
        loop {
            let mut line = String::new();
            self.0.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    }
}

/// One QEMU of a migration: serial output to `serial`, QMP on `qmp`, the devices
/// (NIC on `tap`) where the case has them.
fn qemu_migrating(b: &Bench, case: &MigCase, serial: &str, qmp: &Path, tap: &str, log: &Path) -> Command {
    let _ = std::fs::remove_file(qmp);
    let mut c = common::qemu_virtio(&b.guest, 1, &case.cmdline, b.cpu, serial);
    c.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if case.devices {
        c.args(qemu_disk_args(&b.disk)).args(qemu_nic_args(MIGRATING_NIC, tap, false));
    }
    c.stdout(Stdio::null()).stderr(log_file(log));
    c
}

fn qemu_migrate(b: &Bench, case: &MigCase) -> Moved {
    let (serial, src_qmp, dst_qmp) = (tmp("mig-q.serial"), tmp("mig-q-src.qmp"), tmp("mig-q-dst.qmp"));
    let (log, target_log) = (tmp("mig-q.log"), tmp("mig-q-target.log"));
    let _ = std::fs::remove_file(&serial);
    // The target listens once told to; its QMP answers once its memory is there.
    let mut target = qemu_migrating(b, case, "null", &dst_qmp, TARGET_TAP, &target_log);
    let _target = Proc(target.args(["-incoming", "defer"]).spawn().unwrap());
    let mut target_qmp = Qmp::connect(&dst_qmp);
    let file = format!("file:{}", serial.display());
    let mut source = Proc(qemu_migrating(b, case, &file, &src_qmp, MIGRATING_NIC.tap, &log).spawn().unwrap());
    let mut qmp = Qmp::connect(&src_qmp);
    wait_for(&serial, case.ready, &mut source, &log);
    let pinger = start_pinger(case);
    // Port 0: the kernel picks a free one, which the target then reports.
    let incoming =
        target_qmp.call(serde_json::json!({"execute": "migrate-incoming", "arguments": {"uri": "tcp:127.0.0.1:0"}}));
    assert!(incoming.get("error").is_none(), "QEMU target: {incoming}");
    let listening = target_qmp.call(serde_json::json!({"execute": "query-migrate"}));
    let port = &listening["return"]["socket-address"][0]["port"];
    let port = port.as_str().map(str::to_string).unwrap_or_else(|| port.to_string());
    // Lift QEMU 7.2's 32 MiB/s default cap, as the migration bench does.
    qmp.call(serde_json::json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 100u64 << 30}}));
    qmp.call(serde_json::json!({"execute": "migrate", "arguments": {"uri": format!("tcp:127.0.0.1:{port}")}}));
    let deadline = Instant::now() + Duration::from_secs(120);
    let info = loop {
        let r = qmp.call(serde_json::json!({"execute": "query-migrate"}));
        let status = r["return"]["status"].as_str().unwrap_or("");
        if status == "completed" || status == "failed" || Instant::now() > deadline {
            break r["return"].clone();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(info["status"], "completed", "QEMU's migration: {info}\n{}", read(&log));
    let ms = |name: &str| info[name].as_f64().unwrap_or(f64::NAN);
    Moved { total_ms: ms("total-time"), downtime_ms: ms("downtime"), lost: pings_lost(pinger) }
}

fn migration_section(b: &Bench) {
    let key = Scratch(tmp("key"));
    std::fs::write(&key.0, "benchmark secret").unwrap();
    let cases = [
        MigCase {
            name: "no devices, guest spinning",
            cmdline: "drover.mode=spin".into(),
            ready: "all cpus up",
            devices: false,
            ping: false,
        },
        MigCase {
            name: "disk + NIC, disk busy (4K wr qd32)",
            cmdline: "drover.mode=blkbench drover.op=write drover.qd=32 drover.ops=1000000000000".into(),
            ready: "blk start",
            devices: true,
            ping: false,
        },
        MigCase {
            name: "disk + NIC, NIC pinged every 5 ms",
            cmdline: format!("drover.mode=net drover.ip={}", MIGRATING_NIC.ip),
            ready: "net up",
            devices: true,
            ping: true,
        },
    ];
    let mut results = Vec::new();
    for case in &cases {
        let (mut d, mut q) = (Vec::new(), Vec::new());
        for _ in 0..b.runs {
            d.push(drover_migrate(b, case, &key.0));
            q.push(qemu_migrate(b, case));
        }
        results.push((d, q));
    }
    println!(
        "\nlive migration on loopback, {MEMORY_MIB} MiB, 1 vCPU (ratios q/d: above 1, drover-vmm takes less time)"
    );
    println!(
        "{:<40} {:>8} {:>8} {:>7} | {:>7} {:>6} {:>7} | {:>11} {:>6} | {:>10} {:>5}",
        "", "total ms", "qemu", "ratio", "down ms", "qemu", "ratio", "down - none", "qemu", "pings lost", "qemu"
    );
    let m = |v: &[Moved], f: fn(&Moved) -> f64| median(v.iter().map(f).collect());
    let down = |v: &[Moved]| m(v, |f| f.downtime_ms);
    let (none_d, none_q) = (down(&results[0].0), down(&results[0].1));
    let lost = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.0}") };
    for (case, (d, q)) in cases.iter().zip(&results) {
        let (dt, qt) = (m(d, |f| f.total_ms), m(q, |f| f.total_ms));
        let (dd, qd) = (down(d), down(q));
        // QEMU reports whole milliseconds: 0 there means under one.
        let down_ratio = if dd > 0.0 && qd > 0.0 { ratio(qd / dd) } else { "-".into() };
        println!(
            "{:<40} {dt:>8.0} {qt:>8.0} {:>7} | {dd:>7.1} {qd:>6.0} {down_ratio:>7} | {:>+11.1} {:>+6.0} | {:>10} {:>5}",
            case.name,
            ratio(qt / dt),
            dd - none_d,
            qd - none_q,
            lost(m(d, |f| f.lost)),
            lost(m(q, |f| f.lost)),
        );
    }
}

/// Whether DROVER_BENCH_PARTS (comma-separated; unset: all) names `part`.
fn wanted(part: &str) -> bool {
    std::env::var("DROVER_BENCH_PARTS").map_or(true, |v| v.split(',').any(|p| p.trim() == part))
}

fn qemu_version() -> String {
    let out = Command::new("qemu-system-x86_64").arg("--version").output().expect("qemu-system-x86_64");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().next().unwrap_or("").trim_start_matches("QEMU emulator version ").to_string()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = common::runs().max(1);
    let (vmm, guest) = common::setup("virtio");
    let guest = Scratch(guest);
    let cpu = common::qemu_cpu(&guest.0);
    let disk = make_disk(&tmp("disk.img"));
    let b = Bench { vmm, guest: guest.0.clone(), cpu, disk: disk.0.clone(), runs };
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "virtio devices, drover-vmm vs QEMU {} microvm (-cpu {cpu}), 1 vCPU, {MEMORY_MIB} MiB, {host} host CPUs, median of {runs} runs",
        qemu_version()
    );
    println!("(d/q: drover/QEMU; every ratio is above 1 where drover-vmm does better)");
    if wanted("blk") {
        blk_section(&b);
    }
    if wanted("net") || wanted("migration") {
        match Network::new() {
            Ok(_net) => {
                if wanted("net") {
                    net_section(&b);
                }
                if wanted("migration") {
                    migration_section(&b);
                }
            }
            Err(e) => println!("\nvirtio-net and migration skipped: {e} (they need root, iproute2 and /dev/net/tun)"),
        }
    }
    remove_scratch_files();
}

/// The serial outputs, logs and sockets of this run (a failed run keeps them: its
/// panic names what they said).
fn remove_scratch_files() {
    let suffix = format!("-{}", std::process::id());
    for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("drover-virtiobench-") && name.ends_with(&suffix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
