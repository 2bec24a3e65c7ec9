//! The control API on a running VM: status, pause/resume, and changes of host CPUs
//! and priority that apply to the running vCPU threads while the guest keeps running.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::GUEST;
use drover_vmm_api::client::request;

struct Vm {
    child: Child,
    socket: PathBuf,
    serial: PathBuf,
}

impl Vm {
    /// Starts a spinning guest (CPU 0 prints a tick about every 2^29 TSC cycles).
    fn start(name: &str, extra: &[&str]) -> Vm {
        let vm = Vm::start_mode(name, "spin", extra);
        vm.wait_for_ticks(1);
        vm
    }

    /// Starts the test guest in a `drover.mode`, without waiting for it.
    fn start_mode(name: &str, mode: &str, extra: &[&str]) -> Vm {
        let dir = std::env::temp_dir();
        let socket = dir.join(format!("drover-api-{name}-{}.sock", std::process::id()));
        let serial = dir.join(format!("drover-api-{name}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&serial);
        let child = Command::new(env!("CARGO_BIN_EXE_drover-vmm"))
            .args(["run", "--memory-mib", "64", "--kernel", GUEST, "--name", name])
            .args(["--cmdline", &format!("drover.mode={mode}")])
            .args(["--api-socket", socket.to_str().unwrap(), "--serial", serial.to_str().unwrap()])
            .args(extra)
            .spawn()
            .expect("spawn drover-vmm");
        Vm { child, socket, serial }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the guest has printed `text`.
    fn wait_for_serial(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.serial().contains(text) {
            assert!(Instant::now() < deadline, "guest never printed {text:?}: {:?}", self.serial());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The VMM's exit code once it ends, if that is within `limit`.
    fn exit_within(&mut self, limit: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        request(&self.socket, method, path, body).expect("API request")
    }

    fn status(&self) -> serde_json::Value {
        let (code, body) = self.call("GET", "/vm", None);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("JSON status")
    }

    fn ticks(&self) -> usize {
        std::fs::read_to_string(&self.serial).unwrap_or_default().matches("drover-guest: tick").count()
    }

    fn wait_for_ticks(&self, at_least: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.ticks() < at_least {
            assert!(
                Instant::now() < deadline,
                "guest did not reach {at_least} ticks: {:?}",
                std::fs::read_to_string(&self.serial)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn tids(&self) -> Vec<i64> {
        self.status()["vcpus"].as_array().unwrap().iter().map(|v| v["tid"].as_i64().unwrap()).collect()
    }

    fn allowed_cpus(&self, tid: i64) -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", self.child.id())).unwrap();
        status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string()
    }

    fn shutdown(mut self) -> Option<i32> {
        let (code, body) = self.call("PUT", "/vm/shutdown", None);
        assert_eq!(code, 204, "{body}");
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn host_cpus() -> Vec<u32> {
    drover_hypervisor::affinity::current_affinity().unwrap().iter().collect()
}

#[test]
fn status_describes_the_running_vm() {
    let vm = Vm::start("status", &["--vcpus", "2"]);
    let s = vm.status();
    assert_eq!(s["state"], "running");
    assert_eq!(s["memoryMib"], 64);
    assert!(s["bootTimeMs"].as_u64().is_some(), "{s}");
    assert_eq!(s["vcpus"].as_array().unwrap().len(), 2);
    for v in s["vcpus"].as_array().unwrap() {
        assert!(v["tid"].as_i64().unwrap() > 0 && v["lastHostCpu"].is_u64(), "{v}");
    }
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let vm = Vm::start("pause", &["--vcpus", "2"]);
    let (code, body) = vm.call("PUT", "/vm/pause", None);
    assert_eq!(code, 204, "{body}");
    assert_eq!(vm.status()["state"], "paused");
    let before = vm.ticks();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(vm.ticks(), before, "the guest ran while paused");
    vm.call("PUT", "/vm/resume", None);
    vm.wait_for_ticks(before + 2);
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn host_cpus_change_while_the_guest_runs() {
    let cpus = host_cpus();
    let last = *cpus.last().unwrap();
    let vm = Vm::start("cpus", &["--vcpus", "2", "--host-cpus", &cpus[0].to_string()]);
    for tid in vm.tids() {
        assert_eq!(vm.allowed_cpus(tid), cpus[0].to_string());
    }
    let (code, body) = vm.call("PATCH", "/vm/cpus", Some(&format!(r#"{{"hostCpus": "{last}"}}"#)));
    assert_eq!(code, 204, "{body}");
    for tid in vm.tids() {
        assert_eq!(vm.allowed_cpus(tid), last.to_string(), "thread {tid} did not move");
    }
    let s = vm.status();
    assert!(s["cpusChangedAtMs"].as_u64().is_some());
    assert!(s["vcpus"].as_array().unwrap().iter().all(|v| v["hostCpus"] == *last.to_string()), "{s}");
    // The guest keeps running on its new CPUs.
    let ticks = vm.ticks();
    vm.wait_for_ticks(ticks + 2);
    // A CPU list naming absent CPUs is refused, and nothing moves.
    let (code, body) = vm.call("PATCH", "/vm/cpus", Some(r#"{"hostCpus": "4000"}"#));
    assert_eq!(code, 400);
    assert!(body.contains("CPU 4000 is not available"), "{body}");
    assert_eq!(vm.allowed_cpus(vm.tids()[0]), last.to_string());
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn dedicated_vcpus_get_a_cpu_each() {
    let cpus = host_cpus();
    let n = cpus.len().min(2);
    let vm = Vm::start("dedicated", &["--vcpus", &n.to_string(), "--dedicated", "--allow-siblings"]);
    let mut pinned: Vec<String> = vm.tids().iter().map(|t| vm.allowed_cpus(*t)).collect();
    pinned.sort();
    pinned.dedup();
    assert_eq!(pinned.len(), n, "each vCPU on its own CPU: {pinned:?}");
    assert!(pinned.iter().all(|p| !p.contains(',') && !p.contains('-')), "{pinned:?}");
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn priority_changes_while_the_guest_runs() {
    let vm = Vm::start("priority", &["--vcpus", "2", "--shares", "2000"]);
    // The priority is applied off the start-up path, within moments of the start.
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = vm.status();
        if !s["priorityMechanism"].as_str().unwrap().starts_with("none") || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(s["shares"], 2000);
    let mechanism = s["priorityMechanism"].as_str().unwrap().to_string();
    let check = |shares: u32| {
        if let Some(dir) = mechanism.strip_prefix("cgroup v1 cpu.shares in ") {
            let value = std::fs::read_to_string(Path::new(dir).join("cpu.shares")).unwrap();
            assert_eq!(value.trim(), (shares as u64 * 1024 / 1000).to_string());
            let tasks = std::fs::read_to_string(Path::new(dir).join("tasks")).unwrap();
            for tid in vm.tids() {
                assert!(tasks.lines().any(|t| t == tid.to_string()), "vCPU thread {tid} not in {dir}");
            }
        } else if let Some(dir) = mechanism.strip_prefix("cgroup v2 cpu.weight in ") {
            let value = std::fs::read_to_string(Path::new(dir).join("cpu.weight")).unwrap();
            assert_eq!(value.trim(), (shares / 10).to_string());
        } else {
            assert_eq!(mechanism, "thread nice values", "priority never applied");
            for tid in vm.tids() {
                let stat = std::fs::read_to_string(format!("/proc/{}/task/{tid}/stat", vm.child.id())).unwrap();
                let nice: i32 =
                    stat[stat.rfind(')').unwrap() + 2..].split_whitespace().nth(16).unwrap().parse().unwrap();
                assert_eq!(nice, drover_hypervisor::priority::nice_for(shares));
            }
        }
    };
    check(2000);
    let (code, body) = vm.call("PATCH", "/vm/priority", Some(r#"{"shares": 500}"#));
    assert_eq!(code, 204, "{body}");
    check(500);
    assert!(vm.status()["priorityChangedAtMs"].as_u64().is_some());
    let ticks = vm.ticks();
    vm.wait_for_ticks(ticks + 2);
    let (code, _) = vm.call("PATCH", "/vm/priority", Some(r#"{"shares": 0}"#));
    assert_eq!(code, 400);
    let group = mechanism.strip_prefix("cgroup v1 cpu.shares in ").map(PathBuf::from);
    assert_eq!(vm.shutdown(), Some(0));
    if let Some(dir) = group {
        assert!(!dir.exists(), "the VM's cgroup {} outlived it", dir.display());
    }
}

#[test]
fn guest_memory_follows_the_numa_policy() {
    for (policy, shown) in [("Strict", "bind:0"), ("Preferred", "prefer:0"), ("Interleave", "interleave:0")] {
        let vm = Vm::start(&format!("numa-{policy}"), &["--vcpus", "1", "--numa-policy", policy, "--numa-nodes", "0"]);
        let maps = std::fs::read_to_string(format!("/proc/{}/numa_maps", vm.child.id())).unwrap();
        assert!(
            maps.lines().any(|l| l.contains(shown) && l.contains("anon=")),
            "{policy}: no `{shown}` mapping in numa_maps:\n{maps}"
        );
        assert_eq!(vm.status()["numaNodes"], "0");
        assert_eq!(vm.shutdown(), Some(0));
    }
}

#[test]
fn unknown_requests_and_bad_bodies_get_clear_errors() {
    let vm = Vm::start("errors", &["--vcpus", "1"]);
    let (code, body) = vm.call("GET", "/nope", None);
    assert_eq!(code, 404);
    assert!(body.contains("no such request"), "{body}");
    let (code, body) = vm.call("PATCH", "/vm/cpus", Some(r#"{"cpus": "0"}"#));
    assert_eq!(code, 400);
    assert!(body.contains("unknown field `cpus`"), "{body}");
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn ctrl_alt_del_asks_the_guest_to_shut_down_and_it_powers_off_cleanly() {
    let mut vm = Vm::start("ctrl-alt-del", &["--vcpus", "2"]);
    let asked = Instant::now();
    let (code, body) = vm.call("PUT", "/vm/ctrl-alt-del", None);
    assert_eq!(code, 204, "{body}");
    // The guest polls its keyboard about every millisecond; the rest is its exit.
    let exit = vm.exit_within(Duration::from_secs(5));
    println!("figure: ctrl-alt-del -> VMM exited in {} ms", asked.elapsed().as_millis());
    assert_eq!(exit, Some(Some(0)), "the VMM did not end with the clean power-off status: {:?}", vm.serial());
    // The guest powered off (not the VMM on its own): it says why.
    assert!(vm.serial().contains("drover-guest: ctrl-alt-del, powering off"), "{:?}", vm.serial());
}

#[test]
fn a_guest_that_ignores_ctrl_alt_del_runs_on_and_a_second_request_says_so() {
    // The idle guest halts every CPU and never reads its keyboard.
    let mut vm = Vm::start_mode("ignores-ctrl-alt-del", "idle", &["--vcpus", "1"]);
    vm.wait_for_serial("drover-guest: idle");
    let (code, body) = vm.call("PUT", "/vm/ctrl-alt-del", None);
    assert_eq!(code, 204, "{body}");
    assert_eq!(vm.exit_within(Duration::from_millis(500)), None, "the VM runs on");
    let (code, body) = vm.call("PUT", "/vm/ctrl-alt-del", None);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("has not read the keys"), "{body}");
    assert_eq!(vm.shutdown(), Some(0));
}
