//! HA when hosts fail while VMs move, on the real control plane with netns hosts,
//! real agents, real VMMs and a real operator: a VM never runs twice, whatever
//! fails and when.
//!
//! Each test samples every host's processes every 50 ms (`drover_e2e::overlap`)
//! and fails if two VMMs ever ran one VM's guest at once. The migrating VM runs the
//! digest workload: it must end with the digest of an undisturbed run, either
//! continued across the migration (its last host's console starts mid-run) or
//! restarted from scratch by HA (its console starts at round 1) — never resumed
//! from a partial state.
//!
//! - source host stopped mid-transfer: the migration fails `SourceHostFailed`, the
//!   target's receiving VMM stops, HA restarts the VM;
//! - source host stopped just after the switch-over, with its agent frozen so it
//!   never recorded the hand-over: the target takes the VM over, HA restarts nothing;
//! - target host stopped mid-transfer: the migration fails `TargetHostFailed`, the VM
//!   keeps running on its source;
//! - target host stopped just after the switch-over: HA restarts the VM once;
//! - the source agent killed and left dead mid-migration (a send that outlasts the
//!   lease): its monitors fence the source VMM by the lease's end, the target says
//!   its VMM never ran the guest, and HA runs the VM again once;
//! - the operator leader killed as it declares a host failed and restarts its VMs,
//!   and again before it has seen a failure: the standby carries on from what the
//!   API server holds (timing the failure on its own clock), each VM restarted once
//!   per failure;
//! - an isolated host healing after its VM was restarted elsewhere: its agent
//!   starts nothing and clears what is left.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use drover_e2e::hosts::{Host, HostOptions, unique_name};
use drover_e2e::operator::{Operator, leader};
use drover_e2e::overlap::{Role, Sampler};
use drover_e2e::vms::*;
use serde_json::Value;

/// A workload whose pre-copy takes seconds (128 MiB dirtied without pause): room
/// to fail a host mid-transfer. The buffer lies at 32 MiB in the guest.
const SLOW: Workload = Workload { vm_mib: 192, mem_mib: 128, rounds: 600 };
/// A workload whose migration converges at once (8 MiB working set).
const QUICK: Workload = Workload { vm_mib: 192, mem_mib: 8, rounds: 4000 };
/// A workload whose first pass alone outlasts a 3 s lease on this machine (512 MiB
/// dirtied without pause): a source VMM left without its agent is fenced first.
const HEAVY: Workload = Workload { vm_mib: 640, mem_mib: 512, rounds: 120 };

#[derive(Clone, Copy)]
struct Workload {
    vm_mib: u32,
    mem_mib: u32,
    rounds: u32,
}

impl Workload {
    fn cmdline(self) -> String {
        format!("drover.mode=digest drover.rounds={} drover.mem={}", self.rounds, self.mem_mib)
    }

    /// The digest of an undisturbed run (a plain VMM run, once per workload).
    fn reference(self) -> String {
        static DIGESTS: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
        let mut digests = DIGESTS.lock().unwrap_or_else(|p| p.into_inner());
        digests.entry(self.cmdline()).or_insert_with(|| reference_digest(1, self.vm_mib, &self.cmdline())).clone()
    }
}

fn digest_vm(ns: &str, name: &str, work: Workload) -> String {
    format!(
        "apiVersion: drover.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  runStrategy: RerunOnFailure\n  cpu: {{vcpus: 1}}\n  memory: {{size: {}Mi}}\n  \
         boot: {{kernel: {}, cmdline: \"{}\"}}\n  ha: {{restartPriority: High}}\n",
        work.vm_mib,
        guest_image().display(),
        work.cmdline()
    )
}

fn idle_vm(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: drover.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  cpu: {{vcpus: 1}}\n  memory: {{size: 32Mi}}\n  boot: {{kernel: {}, cmdline: \"drover.mode=idle\"}}\n  \
         ha: {{restartPriority: High}}\n",
        guest_image().display()
    )
}

fn migration(ns: &str, name: &str, vm: &str, target: &str) -> String {
    format!(
        "apiVersion: drover.dev/v1alpha1\nkind: VirtualMachineMigration\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{vmName: {vm}, targetNode: {target}}}\n"
    )
}

fn migration_status(ns: &str, name: &str) -> Value {
    get(ns, "vmim", name)["status"].clone()
}

/// Every condition's reason and message, for asserting on why something ended.
fn reasons(status: &Value) -> String {
    status["conditions"]
        .as_array()
        .map(|cs| cs.iter().map(|c| format!("{}: {} ", c["reason"], c["message"])).collect())
        .unwrap_or_default()
}

/// The rounds the run that printed the digest went through, from a console log
/// that may hold earlier runs too (each starts again at round 1, or a migrated one
/// at the round it came with): the last unbroken sequence before the digest.
fn last_run(serial: &str) -> Vec<u64> {
    let mut run: Vec<u64> = Vec::new();
    for line in serial.lines() {
        if line.starts_with("drover-guest: digest ") {
            break;
        }
        let Some(n) = line.strip_prefix("drover-guest: round ").and_then(|n| n.trim().parse().ok()) else { continue };
        if run.last().is_some_and(|last| *last + 1 != n) {
            run.clear();
        }
        run.push(n);
    }
    run
}

/// A VM's whole console log on a host (up to the agent's 4 MiB).
fn whole_console(host: &Host, ns: &str, vm: &str) -> String {
    agent_get(host, &format!("/vms/{ns}/{vm}/console?bytes={}", 4 << 20)).map(|(_, body)| body).unwrap_or_default()
}

/// Polls a file every 5 ms until it contains `needle`.
fn wait_in_file(path: &std::path::Path, needle: &str, timeout: Duration) {
    let start = Instant::now();
    while !std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {needle:?} in {}", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One scenario's cluster: hosts, an operator, the sampler, and the digest VM
/// `v` running its workload on `source`, about to move to `target`.
struct Moving {
    ns: String,
    hosts: Vec<Host>,
    _op: Operator,
    sampler: Sampler,
    uid: String,
    source: String,
    target: String,
    want: String,
    rounds: u32,
}

impl Moving {
    fn new(prefix: &str, hosts: usize, work: Workload) -> Moving {
        Moving::with(prefix, hosts, work, &HostOptions::default())
    }

    fn with(prefix: &str, hosts: usize, work: Workload, options: &HostOptions) -> Moving {
        let want = work.reference();
        let ns = namespace(prefix);
        let hosts: Vec<Host> = (0..hosts).map(|_| Host::add_with(&unique_name(prefix), options)).collect();
        let op = Operator::start("op-1", &ns, &[]);
        let sampler = Sampler::start();
        apply(&digest_vm(&ns, "v", work));
        let status = wait_phase(&ns, "v", "Running", Duration::from_secs(40));
        let source = status["nodeName"].as_str().unwrap().to_string();
        let target = hosts.iter().map(Host::name).find(|h| *h != source).unwrap().to_string();
        let uid = uid(&ns, "v");
        // The workload has touched its buffer: the transfer carries all of it.
        let host = host_named(&hosts, &source);
        wait_for("the workload under way", Duration::from_secs(60), || {
            console(host, &ns, "v").contains("drover-guest: round 2").then_some(())
        });
        Moving { ns, hosts, _op: op, sampler, uid, source, target, want, rounds: work.rounds }
    }

    fn host(&self, name: &str) -> &Host {
        host_named(&self.hosts, name)
    }

    /// Asks for the move; returns once the source VMM has connected to the
    /// target's (the transfer is under way).
    fn start_moving(&self) {
        apply(&migration(&self.ns, "move", "v", &self.target));
        let log = self.host(&self.target).runtime_dir().join("vms").join(&self.uid).join("vmm.log");
        wait_in_file(&log, "migration source authenticated", Duration::from_secs(30));
    }

    /// Waits until the target's receiving VMM runs the guest (its API answers).
    fn wait_switched_over(&self) {
        let target = self.target.clone();
        self.sampler.wait(&self.uid, "the target to run the guest", Duration::from_secs(60), |runners| {
            runners.iter().any(|r| r.role == Role::Receive && r.host == target)
        });
    }

    /// Waits for the migration to end; returns its status.
    fn migration_end(&self) -> Value {
        wait_for("the migration to end", Duration::from_secs(60), || {
            let s = migration_status(&self.ns, "move");
            (s["phase"] == "Succeeded" || s["phase"] == "Failed").then_some(s)
        })
    }

    /// Waits for the workload to finish; checks its digest, and whether the console
    /// of the host it finished on starts at round 1 (`from_scratch`: it started
    /// there, booted or restarted) or mid-run (it came there by migration).
    /// Returns that host.
    fn workload_ends(&self, from_scratch: bool) -> String {
        let status = wait_phase(&self.ns, "v", "Stopped", Duration::from_secs(180));
        assert_eq!(status["lastExit"], "guest powered off", "{status}");
        let node = status["nodeName"].as_str().unwrap().to_string();
        let serial = whole_console(self.host(&node), &self.ns, "v");
        assert_eq!(digest_of(&serial).as_deref(), Some(self.want.as_str()), "{node}'s console:\n{serial}");
        let run = last_run(&serial);
        let (first, last) = (run.first().copied().unwrap_or(0), run.last().copied().unwrap_or(0));
        assert_eq!(last, u64::from(self.rounds), "the digest follows the last round on {node}:\n{serial}");
        if from_scratch {
            assert_eq!(first, 1, "started on {node}, yet its last run does not start from scratch:\n{serial}");
        } else {
            assert!(first > 1, "migrated to {node}, yet its last run starts at round 1:\n{serial}");
        }
        println!("figure: the workload finished on {node}: rounds {first}..{last} there, digest as undisturbed");
        node
    }

    /// The sampler's verdict: never two VMMs running the VM at once.
    fn never_twice(&self) {
        println!("figure: sampler: {}", self.sampler.summary());
        let runs: Vec<String> = self
            .sampler
            .runs(&self.uid)
            .iter()
            .map(|r| {
                format!(
                    "{} {:?} pid {} {}..{} ms",
                    r.runner.host,
                    r.runner.role,
                    r.runner.pid,
                    r.first_seen.as_millis(),
                    r.last_seen.as_millis()
                )
            })
            .collect();
        println!("figure: VMMs that ran the VM: {runs:?}");
        assert!(self.sampler.samples() > 20, "the sampler sampled: {}", self.sampler.summary());
        assert!(self.sampler.overlaps().is_empty(), "a VM ran twice: {:?}", self.sampler.overlaps());
        assert_eq!(self.sampler.max_at_once(&self.uid), 1, "{runs:?}");
    }
}

#[test]
fn source_host_stopped_mid_transfer_the_vm_restarts_once_from_scratch() {
    let _serial = serial();
    let m = Moving::new("ha-src-mid", 3, SLOW);
    m.start_moving();
    let stopped = Instant::now();
    m.host(&m.source).stop();
    let migration = m.migration_end();
    assert_eq!(migration["phase"], "Failed", "{migration}");
    assert!(reasons(&migration).contains("SourceHostFailed"), "{migration}");
    let status = wait_for("the VM running again", Duration::from_secs(30), || {
        let s = vm_status(&m.ns, "v");
        (s["phase"] == "Running" && s["nodeName"] != m.source.as_str()).then_some(s)
    });
    println!(
        "figure: source stopped mid-transfer -> VM Running on {} in {} ms",
        status["nodeName"],
        stopped.elapsed().as_millis()
    );
    assert_eq!(status["restartCount"], 1, "{status}");
    m.workload_ends(true);
    m.never_twice();
    m.host(&m.source).start();
}

#[test]
fn source_host_stopped_after_the_switch_over_the_target_keeps_the_vm_and_nothing_restarts() {
    let _serial = serial();
    // A 20 s lease: the frozen source agent's VMM is not fenced while it sends.
    let options = HostOptions { agent_args: vec!["--lease-duration-seconds=20".into()], ..Default::default() };
    let m = Moving::with("ha-src-after", 2, QUICK, &options);
    m.start_moving();
    // The source agent frozen as the send starts: it never sees its VMM hand the
    // VM over, so it never moves the VM's status.
    signal(m.host(&m.source).agent_pid().expect("source agent"), "STOP");
    let frozen = Instant::now();
    m.wait_switched_over();
    m.host(&m.source).stop();
    wait_for("the target to hold the VM", Duration::from_secs(30), || {
        let s = vm_status(&m.ns, "v");
        (s["phase"] == "Running" && s["nodeName"] == m.target.as_str()).then_some(())
    });
    println!(
        "figure: source frozen at the send, stopped after the switch-over -> VM reported on the target in {} ms",
        frozen.elapsed().as_millis()
    );
    let migration = wait_for("the target's word", Duration::from_secs(30), || {
        let s = migration_status(&m.ns, "move");
        (s["targetState"] == "Running").then_some(s)
    });
    // The source host is declared failed (20 s after its last renewal): HA must
    // not restart the VM, which runs on.
    wait_for("the source declared failed", Duration::from_secs(40), || {
        let node = get("", "node", &m.source);
        node["metadata"]["annotations"]["drover.dev/host-health"].as_str()?.starts_with("Failed").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let status = vm_status(&m.ns, "v");
    assert_eq!(status["nodeName"], m.target.as_str(), "{status}");
    assert_eq!(status["restartCount"].as_i64().unwrap_or(0), 0, "HA restarted a VM that ran on: {status} {migration}");
    assert_eq!(m.workload_ends(false), m.target);
    m.never_twice();
    m.host(&m.source).start();
}

#[test]
fn target_host_stopped_mid_transfer_the_vm_runs_on_at_its_source() {
    let _serial = serial();
    let m = Moving::new("ha-dst-mid", 2, SLOW);
    m.start_moving();
    m.host(&m.target).stop();
    let migration = m.migration_end();
    assert_eq!(migration["phase"], "Failed", "{migration}");
    assert!(reasons(&migration).contains("TargetHostFailed"), "{migration}");
    // The VM reads Migrating until its source agent has cancelled the send (it
    // sees the migration failed at its next look), then Running where it was.
    let status = wait_for("the VM Running on its source", Duration::from_secs(20), || {
        let s = vm_status(&m.ns, "v");
        (s["phase"] == "Running").then_some(s)
    });
    assert_eq!(status["nodeName"], m.source.as_str(), "{status}");
    assert!(status["restartCount"].as_i64().unwrap_or(0) == 0, "{status}");
    // Never moved: it finishes where it started.
    assert_eq!(m.workload_ends(true), m.source);
    m.never_twice();
    m.host(&m.target).start();
}

#[test]
fn target_host_stopped_after_the_switch_over_the_vm_restarts_once() {
    let _serial = serial();
    let m = Moving::new("ha-dst-after", 2, QUICK);
    m.start_moving();
    m.wait_switched_over();
    let stopped = Instant::now();
    m.host(&m.target).stop();
    let status = wait_for("the VM running again", Duration::from_secs(40), || {
        let s = vm_status(&m.ns, "v");
        (s["phase"] == "Running" && s["nodeName"] == m.source.as_str()).then_some(s)
    });
    println!(
        "figure: target stopped after the switch-over -> VM Running on the source in {} ms",
        stopped.elapsed().as_millis()
    );
    assert_eq!(status["restartCount"], 1, "{status}");
    let migration = migration_status(&m.ns, "move");
    println!(
        "figure: the migration says: phase {} targetState {} {}",
        migration["phase"],
        migration["targetState"],
        reasons(&migration)
    );
    m.workload_ends(true);
    m.never_twice();
    m.host(&m.target).start();
}

#[test]
fn source_agent_killed_mid_migration_its_vmm_is_fenced_and_the_vm_runs_once() {
    let _serial = serial();
    let m = Moving::new("ha-agent-dead", 3, HEAVY);
    let source = m.host(&m.source);
    let vmm = vmm_pid(source, &m.uid).expect("source VMM");
    m.start_moving();
    let lease = get("drover-system", "lease", &m.source);
    kill_9(source.agent_pid().expect("source agent"));
    let killed = Instant::now();
    let deadline = Duration::from_secs(lease["spec"]["leaseDurationSeconds"].as_u64().unwrap());
    wait_for("the source VMM to be gone", deadline + Duration::from_secs(2), || (!alive(vmm)).then_some(()));
    println!(
        "figure: source agent killed -> source VMM gone in {} ms (lease {deadline:?})",
        killed.elapsed().as_millis()
    );
    let status = wait_for("the VM running again", Duration::from_secs(40), || {
        let s = vm_status(&m.ns, "v");
        (s["phase"] == "Running" && s["nodeName"] != m.source.as_str()).then_some(s)
    });
    println!(
        "figure: source agent killed -> VM Running on {} in {} ms",
        status["nodeName"],
        killed.elapsed().as_millis()
    );
    let migration = m.migration_end();
    println!(
        "figure: the migration says: phase {} targetState {} {}",
        migration["phase"],
        migration["targetState"],
        reasons(&migration)
    );
    // The send could not finish before the fence: the target never ran the guest,
    // said so, and HA restarted the VM once, from scratch.
    assert_eq!(migration["phase"], "Failed", "{migration}");
    assert_eq!(migration["targetState"], "Stopped", "{migration}");
    assert!(reasons(&migration).contains("SourceHostFailed"), "{migration}");
    assert_eq!(status["restartCount"], 1, "{status}");
    m.workload_ends(true);
    m.never_twice();
    m.host(&m.source).stop();
    m.host(&m.source).start();
}

#[test]
fn a_standby_finishes_the_ha_restarts_of_a_killed_leader_each_vm_restarted_once() {
    let _serial = serial();
    let ns = namespace("ha-leader");
    let hosts: Vec<Host> = (0..3).map(|_| Host::add(&unique_name("ha-lead"))).collect();
    // Room for 8 VMs per host: a HostPolicy with CPU overcommit, no admission control.
    let pool = unique_name("lead-pool");
    for h in &hosts {
        kubectl(&["label", "node", h.name(), &format!("drover.dev/pool={pool}"), "--overwrite"]);
    }
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: {pool}}}\nspec:\n  nodeSelector: {{matchLabels: {{drover.dev/pool: {pool}}}}}\n  \
         capacity: {{cpuOvercommitRatio: 4}}\n  ha: {{admissionControl: false}}\n"
    ));
    let mut ops = [Operator::start("op-1", &ns, &[]), Operator::start("op-2", &ns, &[])];
    let first = wait_for("a leader", Duration::from_secs(20), || leader(&ns));
    // Every VM on hosts[0]: the others cordoned while they are placed.
    for h in &hosts[1..] {
        kubectl(&["cordon", h.name()]);
    }
    let names: Vec<String> = (1..=6).map(|i| format!("vm-{i}")).collect();
    for name in &names {
        apply(&idle_vm(&ns, name));
    }
    for name in &names {
        wait_phase(&ns, name, "Running", Duration::from_secs(60));
        assert_eq!(node_of(&ns, name), hosts[0].name());
    }
    for h in &hosts[1..] {
        kubectl(&["uncordon", h.name()]);
    }
    let uids: BTreeMap<String, String> = names.iter().map(|n| (n.clone(), uid(&ns, n))).collect();
    let sampler = Sampler::start();

    hosts[0].stop();
    let stopped = Instant::now();
    // The leader dies as it declares the host failed and starts the restarts.
    wait_for("the host declared failed", Duration::from_secs(20), || {
        let node = get("", "node", hosts[0].name());
        node["metadata"]["annotations"]["drover.dev/host-health"].as_str()?.starts_with("Failed").then_some(())
    });
    let leader_index = ops.iter().position(|o| o.identity == first).unwrap();
    ops[leader_index].kill9();
    let restarted_before: usize =
        names.iter().filter(|n| vm_status(&ns, n)["restartCount"].as_i64().unwrap_or(0) > 0).count();
    println!(
        "figure: leader killed {} ms after the host stopped, {restarted_before} of {} VMs restarted by then",
        stopped.elapsed().as_millis(),
        names.len()
    );
    let second = wait_for("a new leader", Duration::from_secs(20), || leader(&ns).filter(|l| *l != first));
    for name in &names {
        wait_for(&format!("{name} running again"), Duration::from_secs(60), || {
            let s = vm_status(&ns, name);
            (s["phase"] == "Running" && s["nodeName"] != hosts[0].name()).then_some(())
        });
    }
    println!(
        "figure: every VM Running again {} ms after the host stopped ({second} leads)",
        stopped.elapsed().as_millis()
    );
    std::thread::sleep(Duration::from_secs(2));
    for name in &names {
        let s = vm_status(&ns, name);
        assert_eq!(s["restartCount"], 1, "{name} restarted once: {s}");
        assert_eq!(s["phase"], "Running", "{name}: {s}");
    }
    assert!(sampler.overlaps().is_empty(), "a VM ran twice: {:?}", sampler.overlaps());

    // Again, with the leader killed before it has even seen the host fail: the
    // standby (the killed replica, back) times the failure on its own clock and
    // does every restart.
    ops[leader_index].restart();
    hosts[0].start();
    wait_for("the first host Ready again", Duration::from_secs(20), || {
        let node = get("", "node", hosts[0].name());
        (node["metadata"]["annotations"]["drover.dev/host-health"] == "Ready").then_some(())
    });
    let busiest = (1..3).max_by_key(|i| names.iter().filter(|n| node_of(&ns, n) == hosts[*i].name()).count()).unwrap();
    let moved: Vec<&String> = names.iter().filter(|n| node_of(&ns, n) == hosts[busiest].name()).collect();
    hosts[busiest].stop();
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let second_index = ops.iter().position(|o| o.identity == second).unwrap();
    ops[second_index].kill9();
    for name in &names {
        wait_for(&format!("{name} running again"), Duration::from_secs(60), || {
            let s = vm_status(&ns, name);
            (s["phase"] == "Running" && s["nodeName"] != hosts[busiest].name()).then_some(())
        });
    }
    let third = leader(&ns).unwrap_or_default();
    println!(
        "figure: leader killed 1 s after a host stopped: its {} VMs Running again {} ms after the stop ({third} leads)",
        moved.len(),
        stopped.elapsed().as_millis()
    );
    std::thread::sleep(Duration::from_secs(2));
    for name in &names {
        let s = vm_status(&ns, name);
        let want = if moved.contains(&name) { 2 } else { 1 };
        assert_eq!(s["restartCount"], want, "{name} restarted once per failure: {s}");
    }
    println!("figure: sampler: {}", sampler.summary());
    assert!(sampler.overlaps().is_empty(), "a VM ran twice: {:?}", sampler.overlaps());
    for (name, uid) in &uids {
        assert_eq!(sampler.max_at_once(uid), 1, "{name}: {:?}", sampler.runs(uid));
    }
    hosts[busiest].start();
    kubectl(&["delete", "hostpolicy", &pool]);
}

#[test]
fn an_isolated_host_healing_after_its_vm_restarted_elsewhere_starts_nothing_and_clears_what_is_left() {
    let _serial = serial();
    let ns = namespace("ha-heal");
    let hosts = [Host::add(&unique_name("ha-heal")), Host::add(&unique_name("ha-heal"))];
    let _op = Operator::start("op-1", &ns, &[]);
    apply(&idle_vm(&ns, "v"));
    let status = wait_phase(&ns, "v", "Running", Duration::from_secs(30));
    let first = host_named(&hosts, status["nodeName"].as_str().unwrap());
    let other = hosts.iter().find(|h| h.name() != first.name()).unwrap();
    let uid = uid(&ns, "v");
    let sampler = Sampler::start();

    first.isolate();
    let isolated = Instant::now();
    wait_for("the VM running on the other host", Duration::from_secs(20), || {
        let s = vm_status(&ns, "v");
        (s["phase"] == "Running" && s["nodeName"] == other.name()).then_some(())
    });
    println!("figure: host isolated -> VM Running on the other host in {} ms", isolated.elapsed().as_millis());
    first.heal();
    wait_for("the healed host Ready again", Duration::from_secs(20), || {
        let node = get("", "node", first.name());
        (node["metadata"]["annotations"]["drover.dev/host-health"] == "Ready").then_some(())
    });
    let dir = first.runtime_dir().join("vms").join(&uid);
    wait_for("the healed host to clear what is left", Duration::from_secs(20), || (!dir.exists()).then_some(()));
    std::thread::sleep(Duration::from_secs(3));
    let s = vm_status(&ns, "v");
    assert_eq!((s["phase"].as_str(), s["nodeName"].as_str()), (Some("Running"), Some(other.name())), "{s}");
    assert_eq!(s["restartCount"], 1, "{s}");
    assert!(vmm_pid(first, &uid).is_none(), "the healed host runs no copy");
    let runs = sampler.runs(&uid);
    assert!(runs.iter().all(|r| r.runner.host == first.name() || r.runner.host == other.name()), "{runs:?}");
    println!("figure: sampler: {}", sampler.summary());
    assert!(sampler.overlaps().is_empty(), "a VM ran twice: {:?}", sampler.overlaps());
    assert_eq!(sampler.max_at_once(&uid), 1, "{runs:?}");
}
