//! Helpers for tests that run `drover-vmm` with the test guest on this host's KVM.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use drover_vmm_api::client::request;

pub const VMM: &str = env!("CARGO_BIN_EXE_drover-vmm");

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

/// A figure from the source's "migration completed" log line (logs are plain text
/// when stderr is not a terminal).
pub fn figure(log: &str, name: &str) -> u64 {
    let line =
        log.lines().find(|l| l.contains("migration completed")).unwrap_or_else(|| panic!("no completion line:\n{log}"));
    let at = line.find(&format!("{name}=")).unwrap_or_else(|| panic!("no {name} in {line}")) + name.len() + 1;
    line[at..].chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse().unwrap()
}

/// What migration tests share: a drover-vmm process with its serial output, log and
/// control socket in files, and two network namespaces as hosts.
/// `(digest, max gap between rounds in TSC cycles)` from the guest's output.
pub fn result(serial: &str) -> (String, u64) {
    let line = serial
        .lines()
        .find(|l| l.starts_with("drover-guest: digest"))
        .unwrap_or_else(|| panic!("no digest in:\n{serial}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    (words[2].to_string(), words[4].parse().unwrap())
}

pub fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("drover-mig-{name}-{}", std::process::id()))
}

pub fn secret_file(name: &str, secret: &str) -> PathBuf {
    let path = tmp(&format!("{name}.key"));
    std::fs::write(&path, secret).unwrap();
    path
}

pub struct Vmm {
    pub child: Child,
    pub serial: PathBuf,
    pub log: PathBuf,
    pub socket: PathBuf,
}

impl Vmm {
    pub fn spawn(mut cmd: Command, name: &str) -> Vmm {
        let (serial, log, socket) =
            (tmp(&format!("{name}.serial")), tmp(&format!("{name}.log")), tmp(&format!("{name}.sock")));
        let _ = std::fs::remove_file(&serial);
        cmd.args(["--serial", serial.to_str().unwrap(), "--api-socket", socket.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        Vmm { child: cmd.spawn().unwrap(), serial, log, socket }
    }

    pub fn run(name: &str, vcpus: u32, cmdline: &str) -> Vmm {
        Vmm::run_in(None, name, vcpus, cmdline)
    }

    /// `run`, inside network namespace `netns` when given.
    pub fn run_in(netns: Option<&str>, name: &str, vcpus: u32, cmdline: &str) -> Vmm {
        Vmm::run_with(netns, name, vcpus, cmdline, &[])
    }

    /// `run_in` with `extra` arguments to `drover-vmm run` (devices).
    pub fn run_with(netns: Option<&str>, name: &str, vcpus: u32, cmdline: &str, extra: &[&str]) -> Vmm {
        let mut cmd = in_netns(netns);
        cmd.args(["run", "--vcpus", &vcpus.to_string(), "--memory-mib", "96", "--kernel", GUEST, "--cmdline", cmdline]);
        cmd.args(extra);
        Vmm::spawn(cmd, name)
    }

    /// A target listening on a port of 127.0.0.1 the kernel picks; its address is
    /// `listen_address()`. (A fixed port can collide with a client's ephemeral port.)
    pub fn receive(name: &str, key: &std::path::Path) -> Vmm {
        Vmm::receive_with(None, name, "127.0.0.1", key, &[])
    }

    /// A target listening on `host` (inside `netns` when given), with `extra`
    /// arguments to `drover-vmm receive`.
    pub fn receive_with(netns: Option<&str>, name: &str, host: &str, key: &std::path::Path, extra: &[&str]) -> Vmm {
        let mut cmd = in_netns(netns);
        cmd.args(["receive", "--listen", &format!("{host}:0"), "--secret-file", key.to_str().unwrap()]).args(extra);
        Vmm::spawn(cmd, name).listening()
    }

    /// A target that expects a 96 MiB VM with `vcpus` and refuses another shape;
    /// with `prefault`, it faults its memory in before it listens.
    pub fn receive_expecting(name: &str, key: &std::path::Path, vcpus: u32, prefault: bool) -> Vmm {
        let expected = tmp(&format!("{name}.json"));
        std::fs::write(&expected, format!(r#"{{"vcpus": {vcpus}, "memoryMib": 96, "kernel": "{GUEST}"}}"#)).unwrap();
        let config = expected.to_str().unwrap();
        let args = ["--config", config, "--prefault"];
        let vmm = Vmm::receive_with(None, name, "127.0.0.1", key, if prefault { &args } else { &args[..2] });
        if prefault {
            assert!(vmm.log().contains("guest memory faulted in"), "{}", vmm.log());
        }
        vmm
    }

    /// A target must end with status 1 and never have run the guest.
    pub fn assert_refused(&mut self) {
        assert_eq!(self.wait(), Some(1), "the target must refuse:\n{}", self.log());
        assert!(self.serial().is_empty(), "the target ran something:\n{}", self.serial());
    }

    /// A source must finish the workload itself, with the digest of an unmoved run.
    pub fn assert_finishes_with(&mut self, want: &str) {
        assert_eq!(self.wait(), Some(0), "{}", self.log());
        assert_eq!(result(&self.serial()).0, want, "the source lost work");
    }

    /// Waits until a receiving VMM listens; fails at once, with its log, if it ended.
    pub fn listening(mut self) -> Vmm {
        wait_until(
            || {
                if let Some(status) = self.child.try_wait().unwrap() {
                    panic!("the target ended ({status}) before it listened:\n{}", self.log());
                }
                self.log().contains("waiting for the migration source")
            },
            "target listening",
        );
        self
    }

    /// The address a receiving VMM listens on, from its "waiting" log line.
    pub fn listen_address(&self) -> String {
        let log = self.log();
        let line = log.lines().find(|l| l.contains("waiting for the migration source")).unwrap();
        let at = line.find("address=").unwrap_or_else(|| panic!("no address in {line}")) + "address=".len();
        line[at..].split_whitespace().next().unwrap().to_string()
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_round(&self, round: u32) {
        wait_until(|| self.serial().contains(&format!("round {round}\n")), &format!("round {round}"));
    }

    pub fn migrate(&self, destination: &str, key: &std::path::Path) -> (u16, String) {
        self.migrate_within(destination, key, 30)
    }

    pub fn migrate_within(&self, destination: &str, key: &std::path::Path, max_downtime_ms: u64) -> (u16, String) {
        self.migrate_on(destination, key, max_downtime_ms, None)
    }

    /// A migration on `lanes` connections (the VMM's default when `None`).
    pub fn migrate_on(
        &self,
        destination: &str,
        key: &std::path::Path,
        max_downtime_ms: u64,
        lanes: Option<u32>,
    ) -> (u16, String) {
        let lanes = lanes.map(|n| format!(r#", "lanes": {n}"#)).unwrap_or_default();
        let body = format!(
            r#"{{"destination": "{destination}", "secretFile": "{}", "maxDowntimeMs": {max_downtime_ms}{lanes}}}"#,
            key.display()
        );
        request(&self.socket, "PUT", "/vm/migrate", Some(&body)).unwrap()
    }

    pub fn migration(&self) -> serde_json::Value {
        serde_json::from_str(&request(&self.socket, "GET", "/vm/migration", None).unwrap().1).unwrap()
    }

    pub fn wait(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "VMM did not end:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// drover-vmm, run inside a network namespace when one is given.
pub fn in_netns(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns, VMM]);
            cmd
        }
        None => Command::new(VMM),
    }
}

/// Two network namespaces joined by a veth pair, each with its own address, like
/// two hosts; removed on drop.
pub struct TwoHosts {
    pub names: [String; 2],
    pub addresses: [String; 2],
}

impl TwoHosts {
    #[allow(clippy::new_without_default)] // it creates namespaces: not a default value
    pub fn new() -> TwoHosts {
        let id = std::process::id() % 10000;
        let names = [format!("drvm{id}a"), format!("drvm{id}b")];
        let octet = 10 + (id % 200);
        let addresses = [format!("10.213.{octet}.1"), format!("10.213.{octet}.2")];
        let sh = |cmd: String| {
            let out = Command::new("sh").args(["-c", &cmd]).output().expect("sh");
            assert!(
                out.status.success(),
                "`{cmd}` failed (needs root and iproute2): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for (name, addr) in names.iter().zip(&addresses) {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            sh(format!("ip netns add {name} && ip -n {name} link set lo up"));
            let _ = addr;
        }
        let (a, b) = (&names[0], &names[1]);
        sh(format!(
            "ip link add {a}v type veth peer name {b}v && ip link set {a}v netns {a} && ip link set {b}v netns {b}"
        ));
        sh(format!("ip -n {a} addr add {}/24 dev {a}v && ip -n {a} link set {a}v up", addresses[0]));
        sh(format!("ip -n {b} addr add {}/24 dev {b}v && ip -n {b} link set {b}v up", addresses[1]));
        TwoHosts { names, addresses }
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

pub fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
