//! HA under host failures repeated 40 times in one run, on the real control plane
//! with netns hosts, real agents, real VMMs and a real operator: 20 host isolations
//! (`host isolate`, then `heal`) and 20 power failures (`host stop`, then `start`),
//! two of one then two of the other, each of the host that runs the High VM, the host back and `Ready`
//! before the next. Over all 40 trials it proves:
//!
//! - no VM ever runs twice: the overlap sampler (every 50 ms, every VMM of the
//!   cluster's hosts, `drover_e2e::overlap`) never sees two VMMs running one VM's
//!   guest at once, and HA restarts each VM exactly once per failure of its host
//!   (its `restartCount`);
//! - the High VM runs elsewhere after every failure (how long it took, from the
//!   failure to `Running` on another host, is a figure per trial);
//! - the Disabled VM, once its host failed, is `Failed` (`HANotRestarted`,
//!   `restartCount` 0) and stays so, and no VMM runs it ever again, through its
//!   host's returns (healed or powered back) and later failures;
//! - the two VMs of a Required anti-affinity rule (`VmVmAntiAffinity`) are never on
//!   one host, neither in any sample nor in their status (the one that fails with
//!   the High VM is restarted each time while the other's host has room for it).
//!
//! Three hosts of 2 vCPUs and no HostPolicy (HA on, no admission control, no CPU
//! overcommit), four idle 1-vCPU VMs: after any failure the two other hosts have
//! 4 free vCPUs for the at most three VMs HA restarts (the Disabled VM, left down,
//! keeps no room), and a host for each VM of the pair.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use drover_e2e::hosts::{Host, unique_name};
use drover_e2e::operator::Operator;
use drover_e2e::overlap::Sampler;
use drover_e2e::vms::*;
use serde_json::Value;

/// Trials of each kind.
const TRIALS_PER_KIND: usize = 20;

/// The VMs HA restarts: the High one and the anti-affinity pair.
const RESTARTED: [&str; 3] = ["high", "pair-1", "pair-2"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Isolate,
    Stop,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Isolate => "isolate",
            Kind::Stop => "stop",
        }
    }
}

fn node_in(status: &Value) -> String {
    status["nodeName"].as_str().unwrap_or_default().to_string()
}

fn health(host: &str) -> String {
    get("", "node", host)["metadata"]["annotations"]["drover.dev/host-health"].as_str().unwrap_or_default().to_string()
}

/// Median (the mean of the middle two for an even count) and max.
fn median_max(values: &[u128]) -> (u128, u128) {
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2 };
    (median, v[n - 1])
}

/// The Disabled VM as it must be once its host `host` failed: `Failed`, marked
/// not restarted by HA, never restarted, no VMM running it, and only the VMM it had
/// before (one run). Its `Ready` reason stays `HANotRestarted` through its host's
/// returns: a healed host's agent reports how the VMM ended (fenced) in `lastExit`
/// and an Event, and keeps HA's reason.
fn assert_left_down(ns: &str, sampler: &Sampler, uid: &str, host: &str, when: &str) {
    let vm = get(ns, "vm", "disabled");
    let s = &vm["status"];
    assert_eq!(s["phase"], "Failed", "{when}: the Disabled VM: {s}");
    assert_eq!(vm["metadata"]["annotations"]["drover.dev/ha-not-restarted"], host, "{when}: {vm}");
    let ready = condition(s, "Ready");
    assert_eq!(ready["reason"], "HANotRestarted", "{when}: the Disabled VM's Ready: {ready}");
    assert_eq!(s["restartCount"].as_u64().unwrap_or(0), 0, "{when}: {s}");
    assert!(sampler.running(uid).is_empty(), "{when}: a VMM runs the Disabled VM: {:?}", sampler.running(uid));
    assert_eq!(sampler.runs(uid).len(), 1, "{when}: the Disabled VM ran again: {:?}", sampler.runs(uid));
}

#[test]
fn forty_host_failures_never_run_a_vm_twice_restart_a_disabled_one_or_join_a_required_pair() {
    let _serial = serial();
    let began = Instant::now();
    let ns = namespace("ha-trials");
    let name = unique_name("trial");
    let hosts: Vec<Host> = (1..=3).map(|i| Host::add(&format!("{name}-{i}"))).collect();
    let sampler = Sampler::start();
    let _op = Operator::start("op-1", &ns, &[]);

    apply(&idle_vm(&ns, "high", "", 1, "  ha: {restartPriority: High}\n"));
    let first = node_in(&wait_phase(&ns, "high", "Running", Duration::from_secs(40)));
    // The Disabled VM on the High VM's host: it fails with it in the first trial.
    apply(&idle_vm(
        &ns,
        "disabled",
        "",
        1,
        &format!("  ha: {{restartPriority: Disabled}}\n  nodeSelector: {{kubernetes.io/hostname: {first}}}\n"),
    ));
    wait_phase(&ns, "disabled", "Running", Duration::from_secs(40));
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: DRSRule\nmetadata: {{name: pair-apart, namespace: {ns}}}\nspec:\n  \
         type: VmVmAntiAffinity\n  enforcement: Required\n  vmSelector: {{matchLabels: {{app: pair}}}}\n"
    ));
    apply(&idle_vm(&ns, "pair-1", "app: pair", 1, ""));
    apply(&idle_vm(&ns, "pair-2", "app: pair", 1, ""));
    let uids: BTreeMap<&str, String> =
        ["high", "disabled", "pair-1", "pair-2"].into_iter().map(|v| (v, uid(&ns, v))).collect();
    sampler.keep_apart(&uids["pair-1"], &uids["pair-2"]);
    for v in ["pair-1", "pair-2"] {
        wait_phase(&ns, v, "Running", Duration::from_secs(40));
    }
    println!("figure: set up (3 hosts, 4 VMs running) in {} ms", began.elapsed().as_millis());

    let mut restarts: BTreeMap<&str, u64> = RESTARTED.iter().map(|v| (*v, 0)).collect();
    let mut disabled_down = false;
    let mut figures: BTreeMap<Kind, Vec<u128>> = BTreeMap::new();
    for trial in 1..=2 * TRIALS_PER_KIND {
        // Two isolations, two stops, ...: HA moves the High VM back and forth between
        // two hosts (with it the pair VM that shares its host, kept off the third
        // host, where the other pair VM runs, by the rule alone: that host has a
        // free vCPU), so each of those two fails both ways, the Disabled VM's host
        // included.
        let kind = if (trial - 1) / 2 % 2 == 0 { Kind::Isolate } else { Kind::Stop };
        let before: BTreeMap<&str, Value> = RESTARTED.iter().map(|v| (*v, vm_status(&ns, v))).collect();
        let failed_name = node_in(&before["high"]);
        let failed = host_named(&hosts, &failed_name);
        let there: Vec<&str> = RESTARTED.iter().copied().filter(|v| node_in(&before[v]) == failed_name).collect();
        let disabled_there = !disabled_down && failed_name == first;

        let command = Instant::now();
        match kind {
            Kind::Isolate => failed.isolate(),
            Kind::Stop => failed.stop(),
        }
        // Timed from when the script that fails the host returned.
        let failed_at = Instant::now();
        let command_ms = (failed_at - command).as_millis();
        let failed_sample = sampler.now();
        let status =
            wait_for(&format!("trial {trial}: high Running off {failed_name}"), Duration::from_secs(30), || {
                let s = vm_status(&ns, "high");
                (s["phase"] == "Running" && !node_in(&s).is_empty() && node_in(&s) != failed_name).then_some(s)
            });
        let ms = failed_at.elapsed().as_millis();
        let to = node_in(&status);
        assert_eq!(condition(&status, "Scheduled")["reason"], "HARestarted", "trial {trial}: {status}");
        sampler.wait(&uids["high"], &format!("trial {trial}: high's VMM on {to}"), Duration::from_secs(10), |r| {
            r.iter().any(|r| r.host == to)
        });
        let vmm_ms = sampler
            .runs(&uids["high"])
            .iter()
            .find(|r| r.runner.host == to && r.first_seen >= failed_sample)
            .map(|r| (r.first_seen - failed_sample).as_millis())
            .unwrap_or_default();
        for v in &there {
            *restarts.get_mut(v).unwrap() += 1;
        }
        if disabled_there {
            let s = wait_phase(&ns, "disabled", "Failed", Duration::from_secs(20));
            assert_eq!(condition(&s, "Ready")["reason"], "HANotRestarted", "{s}");
            disabled_down = true;
        }
        assert!(disabled_down, "trial {trial}: the Disabled VM's host {first} failed in trial 1");
        // The pair runs again, apart, off the failed host.
        let pair = wait_for(&format!("trial {trial}: the pair running apart"), Duration::from_secs(30), || {
            let (a, b) = (vm_status(&ns, "pair-1"), vm_status(&ns, "pair-2"));
            let ok = [&a, &b].iter().all(|s| s["phase"] == "Running" && node_in(s) != failed_name);
            ok.then_some((node_in(&a), node_in(&b)))
        });
        assert_ne!(pair.0, pair.1, "trial {trial}: the pair on one host");

        match kind {
            Kind::Isolate => failed.heal(),
            Kind::Stop => failed.start(),
        }
        wait_for(&format!("trial {trial}: {failed_name} Ready again"), Duration::from_secs(30), || {
            (health(&failed_name) == "Ready").then_some(())
        });
        // What the restarted VMs left on it is cleared (an isolated host's agent
        // clears it once healed; a stopped host's runtime dir is gone).
        for v in &there {
            let dir = failed.runtime_dir().join("vms").join(&uids[v]);
            wait_for(&format!("trial {trial}: {failed_name} clearing {v}"), Duration::from_secs(30), || {
                (!dir.exists()).then_some(())
            });
        }

        for v in RESTARTED {
            let s = vm_status(&ns, v);
            assert_eq!(s["restartCount"].as_u64().unwrap_or(0), restarts[v], "trial {trial}: {v} restarts: {s}");
        }
        assert_eq!(restarts["high"], trial as u64);
        assert_left_down(&ns, &sampler, &uids["disabled"], &first, &format!("trial {trial}"));
        assert!(sampler.overlaps().is_empty(), "trial {trial}: a VM ran twice: {:?}", sampler.overlaps());
        assert!(sampler.together().is_empty(), "trial {trial}: the pair on one host: {:?}", sampler.together());
        println!(
            "figure: trial {trial} {}: host {failed_name} failed -> high Running on {to} in {ms} ms (its VMM seen at \
             {vmm_ms} ms; the host command took {command_ms} ms; moved with it: {:?}; pair on {} and {})",
            kind.name(),
            there.iter().filter(|v| **v != "high").collect::<Vec<_>>(),
            pair.0,
            pair.1
        );
        figures.entry(kind).or_default().push(ms);
    }

    // Quiet for a moment: nothing starts anything afterwards either.
    std::thread::sleep(Duration::from_secs(3));
    assert_left_down(&ns, &sampler, &uids["disabled"], &first, "at the end");
    println!("figure: the Disabled VM at the end: Failed, restartCount 0, Ready reason HANotRestarted");
    for (kind, ms) in &figures {
        let (median, max) = median_max(ms);
        println!(
            "figure: {} x{}: failure -> High VM Running elsewhere median {median} ms, max {max} ms",
            kind.name(),
            ms.len()
        );
    }
    println!("figure: sampler: {}", sampler.summary());
    let overlaps = sampler.overlaps();
    println!(
        "figure: overlaps {}, anti-affinity breaks {}, restarts {restarts:?}, whole test {} s",
        overlaps.len(),
        sampler.together().len(),
        began.elapsed().as_secs()
    );
    assert!(overlaps.is_empty(), "a VM ran twice: {overlaps:?}");
    assert!(sampler.together().is_empty(), "the pair on one host: {:?}", sampler.together());
    for (v, uid) in &uids {
        assert_eq!(sampler.max_at_once(uid), 1, "{v}: {:?}", sampler.runs(uid));
    }
    assert_eq!(figures.values().map(Vec::len).sum::<usize>(), 2 * TRIALS_PER_KIND);
}
