//! virtio-blk and virtio-net with real KVM guests. The test guest's `disk` workload
//! rewrites every block of its disk over many rounds and prints a digest: the
//! digest and the image's bytes must equal what a model in Rust computes from the
//! image it started with, however the run was interrupted (snapshot and restore,
//! live migration between two hosts). Its `net` workload answers ARP and ICMP echo:
//! pings must come back whole, and must keep coming back across a live migration,
//! because the target announces the VM's MAC. The same guest image runs against
//! QEMU's virtio-mmio devices, which checks the guest's driver against a reference.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use drover_vmm_api::client::request;
use sha2::{Digest, Sha256};

/// Words per 4 KiB block, as the guest's disk workload counts them.
const WORDS: usize = 512;

/// Tests that run two VMs or time a migration: one at a time on a 2-CPU machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serialize() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// An image of `blocks` 4 KiB blocks that is not all zeros (so that reads matter).
fn seeded_image(path: &Path, blocks: usize) -> Vec<u8> {
    let bytes: Vec<u8> = (0..blocks * WORDS).flat_map(|i| splitmix64(i as u64 ^ 0x5eed).to_le_bytes()).collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// The guest's `disk` workload over `image`: its digest and the image it leaves.
fn disk_model(image: &[u8], rounds: u64) -> (String, Vec<u8>) {
    let mut words: Vec<u64> = image.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    let blocks = words.len() / WORDS;
    for r in 0..rounds {
        for b in 0..blocks {
            for i in 0..WORDS {
                let k = b * WORDS + i;
                words[k] = splitmix64(words[k] ^ r.wrapping_mul(0x100000001b3).wrapping_add(k as u64));
            }
        }
    }
    let digest = words.iter().fold(0u64, |d, w| splitmix64(d ^ w));
    (format!("{digest:016x}"), words.iter().flat_map(|w| w.to_le_bytes()).collect())
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest the guest printed.
fn disk_digest(serial: &str) -> String {
    let line = serial
        .lines()
        .find(|l| l.starts_with("drover-guest: disk digest"))
        .unwrap_or_else(|| panic!("no disk digest in:\n{serial}"));
    line.split_whitespace().nth(3).unwrap().to_string()
}

fn disk_cmdline(rounds: u64) -> String {
    format!("drover.mode=disk drover.rounds={rounds}")
}

/// Asserts that the image file now holds exactly what the model says.
fn assert_image_is(path: &Path, want: &[u8]) {
    let got = std::fs::read(path).unwrap();
    assert_eq!(sha256(&got), sha256(want), "the image differs from the model ({})", path.display());
}

fn image_path(name: &str) -> PathBuf {
    tmp(&format!("{name}.img"))
}

#[test]
fn disk_workload_gives_the_models_digest_and_image_on_one_and_four_vcpus() {
    for vcpus in [1, 4] {
        let image = image_path(&format!("model{vcpus}"));
        let start = seeded_image(&image, 256);
        let (want, want_image) = disk_model(&start, 5);
        let disk = image.to_str().unwrap();
        let out = run_vmm(&[
            "--vcpus",
            &vcpus.to_string(),
            "--memory-mib",
            "64",
            "--kernel",
            GUEST,
            "--disk",
            disk,
            "--cmdline",
            &disk_cmdline(5),
        ]);
        let serial = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{serial}\n{}", stderr(&out));
        // An out-of-range read reaches the guest as VIRTIO_BLK_S_IOERR (1).
        assert!(serial.contains("disk of 2048 sectors, read past its end: status 1"), "{serial}");
        assert_eq!(disk_digest(&serial), want, "{vcpus} vCPUs");
        assert_image_is(&image, &want_image);
        let _ = std::fs::remove_file(&image);
    }
}

#[test]
fn a_read_only_disk_fails_the_guests_write_and_stays_unchanged() {
    let image = image_path("ro");
    let start = seeded_image(&image, 64);
    let disk = format!("{},ro", image.display());
    let out = run_vmm(&[
        "--vcpus",
        "1",
        "--memory-mib",
        "64",
        "--kernel",
        GUEST,
        "--disk",
        &disk,
        "--cmdline",
        &disk_cmdline(1),
    ]);
    let serial = stdout(&out);
    assert!(serial.contains("sectors, read-only"), "the device must offer VIRTIO_BLK_F_RO:\n{serial}");
    assert!(serial.contains("disk: a write failed"), "{serial}");
    assert_eq!(out.status.code(), Some(5), "the guest's exit status for a failed request:\n{}", stderr(&out));
    assert_eq!(std::fs::read(&image).unwrap(), start, "a read-only disk was written");
    let _ = std::fs::remove_file(&image);
}

#[test]
fn a_missing_disk_is_refused_naming_the_field() {
    let out = run_vmm(&["--vcpus", "1", "--memory-mib", "64", "--kernel", GUEST, "--disk", "/nonexistent/disk.img"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("disks[0]") && err.contains("/nonexistent/disk.img"), "{err}");
}

/// QEMU's microvm with virtio-mmio devices in virtio 1.x mode, announced on the
/// command line (which it does only without ACPI), and its exit device.
fn qemu(vcpus: u32, cmdline: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64M"])
        .args(["-smp", &vcpus.to_string(), "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit", "-global", "virtio-mmio.force-legacy=false", "-kernel", GUEST])
        .args(["-append", &format!("{cmdline} drover.cpus={vcpus}")]);
    c
}

#[test]
fn the_guests_disk_driver_gives_the_same_result_on_qemus_device() {
    let image = image_path("qemu");
    let start = seeded_image(&image, 256);
    let (want, want_image) = disk_model(&start, 3);
    let out = qemu(2, &disk_cmdline(3))
        .args(["-drive", &format!("id=d0,file={},format=raw,if=none", image.display())])
        .args(["-device", "virtio-blk-device,drive=d0"])
        .output()
        .expect("run qemu-system-x86_64 (e2e/install-prereqs installs Debian's qemu-system-x86)");
    let serial = stdout(&out);
    // isa-debug-exit ends QEMU with (value << 1) | 1: the guest's 0 is 1.
    assert_eq!(out.status.code(), Some(1), "{serial}\n{}", stderr(&out));
    assert!(serial.contains("read past its end: status 1"), "{serial}");
    assert_eq!(disk_digest(&serial), want);
    assert_image_is(&image, &want_image);
    let _ = std::fs::remove_file(&image);
}

fn wait_for_rounds(vm: &Vmm, round: u32) {
    wait_until(
        || {
            if vm.serial().contains("disk digest") {
                panic!("the workload ended before round {round} was seen; make it longer:\n{}", vm.serial());
            }
            vm.serial().contains(&format!("round {round}\n"))
        },
        &format!("round {round}"),
    );
}

fn snapshot_and_restore_mid_workload(vcpus: u32) {
    let _one = serialize();
    let rounds = 40;
    let image = image_path(&format!("snap{vcpus}"));
    let start = seeded_image(&image, 512);
    let (want, want_image) = disk_model(&start, rounds);
    let disk = image.to_str().unwrap();
    let mut vm = Vmm::run_with(None, &format!("snap{vcpus}"), vcpus, &disk_cmdline(rounds), &["--disk", disk]);
    wait_for_rounds(&vm, 3);
    let dir = tmp(&format!("snap{vcpus}.snapshot"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(request(&vm.socket, "PUT", "/vm/pause", None).unwrap().0, 204);
    let (code, body) =
        request(&vm.socket, "PUT", "/vm/snapshot", Some(&format!(r#"{{"path": "{}"}}"#, dir.display()))).unwrap();
    assert_eq!(code, 200, "{body}");
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
    assert!(!vm.serial().contains("digest"), "the workload finished before the snapshot");

    let restored =
        Command::new(VMM).args(["restore", "--from", dir.to_str().unwrap()]).output().expect("run drover-vmm restore");
    let serial = stdout(&restored);
    assert_eq!(restored.status.code(), Some(0), "{serial}\n{}", stderr(&restored));
    assert!(!serial.contains("cpu 0 up"), "the restored VM booted again:\n{serial}");
    assert_eq!(disk_digest(&serial), want, "the restored VM computed something else");
    assert_image_is(&image, &want_image);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&image);
}

#[test]
fn snapshot_and_restore_mid_disk_workload_one_vcpu() {
    snapshot_and_restore_mid_workload(1);
}

#[test]
fn snapshot_and_restore_mid_disk_workload_four_vcpus() {
    snapshot_and_restore_mid_workload(4);
}

/// The disk on storage both hosts see (here: one file system), the VM moved from
/// one network namespace to the other mid-workload.
fn migrate_mid_workload(vcpus: u32) {
    let _one = serialize();
    let rounds = 60;
    let hosts = TwoHosts::new();
    let image = image_path(&format!("mig{vcpus}"));
    let start = seeded_image(&image, 512);
    let (want, want_image) = disk_model(&start, rounds);
    let key = secret_file(&format!("blk{vcpus}"), "virtio migration secret");
    let name = format!("blk{vcpus}");
    let mut target =
        Vmm::receive_with(Some(&hosts.names[1]), &format!("{name}-target"), &hosts.addresses[1], &key, &[]);
    let disk = image.to_str().unwrap();
    let mut source = Vmm::run_with(Some(&hosts.names[0]), &name, vcpus, &disk_cmdline(rounds), &["--disk", disk]);
    wait_for_rounds(&source, 3);
    let (code, body) = source.migrate(&target.listen_address(), &key);
    assert_eq!(code, 204, "{body}");
    assert_eq!(source.wait(), Some(6), "source exit status (6 = migrated away):\n{}", source.log());
    assert_eq!(target.wait(), Some(0), "{}", target.log());
    let serial = target.serial();
    assert!(!serial.contains("cpu 0 up"), "the target booted the guest again");
    assert!(serial.contains("round"), "the guest made no progress on the target:\n{serial}");
    assert_eq!(disk_digest(&serial), want, "the migrated guest computed something else");
    assert_image_is(&image, &want_image);
    let _ = std::fs::remove_file(&image);
}

#[test]
fn disk_workload_survives_migration_between_two_hosts_one_vcpu() {
    migrate_mid_workload(1);
}

#[test]
fn disk_workload_survives_migration_between_two_hosts_four_vcpus() {
    migrate_mid_workload(4);
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed (needs root, iproute2 and iputils-ping): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, removed on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&format!("ip netns add {name} && ip -n {name} link set lo up"));
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// `(transmitted, received)` from ping's summary; panics on a reply whose data
/// differs from the request's (ping prints "wrong data byte").
fn ping_counts(output: &str) -> (u64, u64) {
    assert!(!output.contains("wrong data"), "a reply came back changed:\n{output}");
    let line = output.lines().find(|l| l.contains("packets transmitted")).unwrap_or_else(|| panic!("{output}"));
    let n = |i: usize| line.split_whitespace().nth(i).unwrap().parse::<u64>().unwrap();
    (n(0), n(3))
}

#[test]
fn ping_from_the_host_gets_every_reply_with_intact_data() {
    let ns = Netns::new(format!("drvnet{}", std::process::id() % 10000));
    let n = &ns.0;
    sh(&format!("ip -n {n} tuntap add dev tap0 mode tap && ip -n {n} addr add 10.88.0.1/24 dev tap0"));
    sh(&format!("ip -n {n} link set tap0 up"));
    let vm = Vmm::run_with(
        Some(n),
        "ping",
        1,
        "drover.mode=net drover.ip=10.88.0.2",
        &["--nic", "tap0,mac=52:54:00:88:00:02"],
    );
    wait_until(|| vm.serial().contains("net up, mac 52:54:00:88:00:02 ip 10.88.0.2"), "the guest's NIC");
    let out = sh(&format!("ip netns exec {n} ping -c 200 -i 0.01 -s 1400 -p 5aa5c33c0ff0 -W 1 10.88.0.2 || true"));
    assert_eq!(ping_counts(&out), (200, 200), "{out}");
}

/// An L2 segment like a cluster's VM network: a switch (a bridge in its own
/// namespace) with a client on one port and two hosts on others; each host has a
/// bridge with its uplink to the switch and the VM's tap. The hosts also have
/// their own link for the migration (TwoHosts).
struct VmNetwork {
    hosts: TwoHosts,
    switch: Netns,
    client: Netns,
}

const VM_MAC: &str = "52:54:00:77:00:02";
const VM_IP: &str = "10.77.0.2";

impl VmNetwork {
    fn new() -> VmNetwork {
        let hosts = TwoHosts::new();
        let id = std::process::id() % 10000;
        let switch = Netns::new(format!("drvsw{id}"));
        let client = Netns::new(format!("drvcl{id}"));
        let (s, c) = (&switch.0, &client.0);
        sh(&format!("ip -n {s} link add sw0 type bridge && ip -n {s} link set sw0 up"));
        sh(&format!("ip link add {c}u type veth peer name eth0 netns {c} && ip link set {c}u netns {s}"));
        sh(&format!("ip -n {s} link set {c}u master sw0 up && ip -n {c} addr add 10.77.0.1/24 dev eth0"));
        sh(&format!("ip -n {c} link set eth0 up"));
        for (i, h) in hosts.names.iter().enumerate() {
            let port = format!("{s}p{i}");
            sh(&format!("ip link add {port} type veth peer name up0 netns {h} && ip link set {port} netns {s}"));
            sh(&format!("ip -n {s} link set {port} master sw0 up"));
            sh(&format!("ip -n {h} link add br0 type bridge && ip -n {h} link set br0 up"));
            sh(&format!("ip -n {h} link set up0 master br0 up"));
            // A different tap name on each host: the target is told its own.
            sh(&format!("ip -n {h} tuntap add dev tap{i} mode tap && ip -n {h} link set tap{i} master br0 up"));
        }
        VmNetwork { hosts, switch, client }
    }

    /// The switch port (0 or 1, the host) its forwarding table has for the VM's MAC.
    fn switch_port(&self) -> Option<usize> {
        let s = &self.switch.0;
        let fdb = sh(&format!("bridge -n {s} fdb show br sw0"));
        let line = fdb.lines().find(|l| l.starts_with(VM_MAC))?;
        (0..2).find(|i| line.contains(&format!("dev {s}p{i} ")))
    }
}

/// Pings the VM from the client every 10 ms while it migrates from host 0 to host
/// 1; returns (pings lost, the migration's downtime in ms, how long after the
/// switch-over the switch learnt the VM's new port, if it did within 3 s).
fn ping_across_migration(announce: bool) -> (u64, u64, Option<Duration>) {
    let net = VmNetwork::new();
    let (a, b) = (&net.hosts.names[0], &net.hosts.names[1]);
    let key = secret_file("net", "virtio-net migration secret");
    let extra: &[&str] = if announce { &["--tap", "tap1"] } else { &["--tap", "tap1", "--no-announce"] };
    let target = Vmm::receive_with(Some(b), "net-target", &net.hosts.addresses[1], &key, extra);
    let nic = format!("tap0,mac={VM_MAC}");
    let mut source =
        Vmm::run_with(Some(a), "net-source", 1, &format!("drover.mode=net drover.ip={VM_IP}"), &["--nic", &nic]);
    wait_until(|| source.serial().contains("net up"), "the guest's NIC");
    let c = net.client.0.clone();
    // 600 pings, 6 s: the migration starts after 1 s and takes well under 2.
    let pinger =
        std::thread::spawn(move || sh(&format!("ip netns exec {c} ping -c 600 -i 0.01 -W 1 -p 77aa {VM_IP} || true")));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(net.switch_port(), Some(0), "the switch must know the VM on host 0 first");
    let (code, body) = source.migrate(&target.listen_address(), &key);
    assert_eq!(code, 204, "{body}");
    assert_eq!(source.wait(), Some(6), "source exit status (6 = migrated away):\n{}", source.log());
    let switched = Instant::now();
    let mut learnt = None;
    while switched.elapsed() < Duration::from_secs(3) {
        if net.switch_port() == Some(1) {
            learnt = Some(switched.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (sent, received) = ping_counts(&pinger.join().unwrap());
    let downtime = figure(&source.log(), "downtime_ms");
    eprintln!(
        "announce {announce}: {} of {sent} pings lost, downtime {downtime} ms, switch learnt after {learnt:?}",
        sent - received
    );
    drop(target);
    (sent - received, downtime, learnt)
}

#[test]
fn ping_keeps_answering_across_a_live_migration_and_the_switch_learns_at_once() {
    let _one = serialize();
    let (lost, downtime_ms, learnt) = ping_across_migration(true);
    let learnt = learnt.expect("the switch did not learn the VM's new port within 3 s");
    assert!(learnt < Duration::from_secs(1), "the switch learnt the new port after {learnt:?}");
    // One ping per 10 ms of downtime, plus two in flight at either edge.
    let allowed = downtime_ms / 10 + 4;
    assert!(lost <= allowed, "{lost} pings lost, downtime {downtime_ms} ms (allowed {allowed})");
}

#[test]
fn without_the_announcement_the_migrated_vm_is_unreachable_for_a_while() {
    let _one = serialize();
    let (lost, downtime_ms, learnt) = ping_across_migration(false);
    // The switch still sends the VM's frames to host 0 until the client's ARP
    // entry goes stale and it asks again (seconds): this is what the RARP fixes.
    assert!(learnt.is_none() || learnt > Some(Duration::from_secs(1)), "learnt at {learnt:?} without an announcement");
    assert!(lost > downtime_ms / 10 + 50, "only {lost} pings lost without an announcement (downtime {downtime_ms} ms)");
}
