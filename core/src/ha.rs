//! What HA does with the VMs of failed hosts: restart them elsewhere, High
//! priority first, through the same placement as a first start (rules, NUMA,
//! Dedicated CPUs), or say why not.
//!
//! A host is failed once its Lease has not changed for the lease duration on the
//! operator's clock (see `HostHealth::Failed`); its agent powered its VMs off before
//! that. The one case where a VM may still run is a migration in flight: its
//! target may have resumed it. Such a VM waits until the target's agent has said
//! what its VMM does (`TargetState`), unless the target's host failed too. Even a
//! target that never listened is waited for: its receiving VMM may exist, and were
//! the VM restarted on that very host, its agent would take that VMM for the
//! migration's hand-over. Its agent answers within a look once the migration has
//! failed (it powers that VMM off and says `Stopped`).
//!
//! | the VM | HA |
//! | --- | --- |
//! | its pool has HA off | left as it is (`LeaveHaOff`) |
//! | `restartPriority: Disabled` | not restarted (`NotRestarted`) |
//! | its run strategy does not keep it running | not restarted |
//! | moving, the target may run it | waits for the target's word |
//! | moving, the target runs it | waits: its status moves to the target |
//! | otherwise | placed elsewhere, or waits for room with placement's reasons |
//!
//! Decisions come in restart order (priority, then name) and each placement is
//! committed before the next, so with room for only some, the High ones get it.

use crate::placement::{Cluster, Placement};
use crate::snapshot::{RestartPriority, TargetState, Vm, VmKey};

/// A VM whose host failed while it ran (or was on its way to).
#[derive(Clone, Debug)]
pub struct Stranded<'a> {
    pub vm: &'a Vm,
    /// The migration that was moving it, if any.
    pub moving: Option<Moving>,
}

/// A migration in flight when the VM's host failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moving {
    pub migration: String,
    /// The host it went to, once approved.
    pub target: Option<String>,
    /// The target's host failed too (its heartbeat, on the operator's clock:
    /// whether or not its Node is still there to read).
    pub target_failed: bool,
    /// What the target's agent says of its VMM.
    pub target_state: Option<TargetState>,
}

/// What HA does with one VM.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Start it on the placement's host.
    Restart(Placement),
    /// Not now: no room, or a migration's outcome is not known yet.
    Wait(String),
    /// Never (it is marked Failed with the reason).
    NotRestarted(String),
    /// Its pool has HA off: it is left as it is (marked Unknown).
    LeaveHaOff(String),
}

/// HA's decision for one VM.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub vm: VmKey,
    pub host: String,
    pub priority: RestartPriority,
    pub verdict: Verdict,
}

/// HA's decisions for `stranded`, in restart order; restarts are committed to
/// `cluster`, so what comes after sees them.
pub fn plan(cluster: &mut Cluster, stranded: &[Stranded]) -> Vec<Decision> {
    let mut order: Vec<&Stranded> = stranded.iter().collect();
    order.sort_by(|a, b| b.vm.ha.priority.cmp(&a.vm.ha.priority).then_with(|| a.vm.key.cmp(&b.vm.key)));
    order.into_iter().map(|s| decide(cluster, s)).collect()
}

fn decide(cluster: &mut Cluster, s: &Stranded) -> Decision {
    let vm = s.vm;
    let host = vm.host.clone().unwrap_or_default();
    let decision = |verdict| Decision { vm: vm.key.clone(), host: host.clone(), priority: vm.ha.priority, verdict };
    let settings = cluster.host(&host).map(|h| cluster.snapshot().ha_of(h)).unwrap_or_default();
    if !settings.enabled {
        return decision(Verdict::LeaveHaOff(format!(
            "its host {host} failed; HA is off for its HostPolicy, so it is left as it is"
        )));
    }
    if vm.ha.priority == RestartPriority::Disabled {
        return decision(Verdict::NotRestarted(format!(
            "its host {host} failed; HA does not restart it (spec.ha.restartPriority is Disabled)"
        )));
    }
    if !vm.ha.keeps_running {
        return decision(Verdict::NotRestarted(format!(
            "its host {host} failed; HA restarts only VMs whose runStrategy keeps them running (Always, RerunOnFailure)"
        )));
    }
    if let Some(m) = &s.moving
        && let Some(why) = outcome_pending(m)
    {
        return decision(Verdict::Wait(why));
    }
    let mut elsewhere = vm.clone();
    cluster.release(vm);
    elsewhere.host = None;
    elsewhere.holds = false;
    match cluster.place(&elsewhere) {
        Ok(placement) => {
            cluster.commit(&elsewhere, &placement);
            decision(Verdict::Restart(placement))
        }
        Err(none) => {
            decision(Verdict::Wait(format!("its host {host} failed; no host can take it yet: {}", none.message())))
        }
    }
}

/// Why a VM moving when its host failed cannot restart yet, if it cannot.
fn outcome_pending(m: &Moving) -> Option<String> {
    let Some(target) = &m.target else { return None };
    match m.target_state {
        Some(TargetState::Running) => Some(format!(
            "migration {} handed it over: its VMM on {target} runs it, and the VM's status moves there",
            m.migration
        )),
        _ if m.target_failed => None,
        Some(TargetState::Stopped) => None,
        _ => Some(format!(
            "migration {} was moving it to {target}: HA waits for {target} to say whether its VMM runs the VM",
            m.migration
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{HaSettings, Host, HostHealth, Key, Rule, RuleKind, Snapshot, VmHa};

    fn host(name: &str, cpus: u32, health: HostHealth) -> Host {
        Host { health, ..crate::fixtures::host(name, cpus, u64::from(cpus), 64 * 1024) }
    }

    fn failed() -> HostHealth {
        HostHealth::Failed("no heartbeat for 3.1 s".into())
    }

    fn vm(name: &str, vcpus: u32, on: &str, priority: RestartPriority) -> Vm {
        Vm { ha: VmHa { priority, keeps_running: true }, ..crate::fixtures::vm(name, vcpus, 512, Some(on)) }
    }

    fn snapshot(hosts: Vec<Host>, vms: Vec<Vm>) -> Snapshot {
        Snapshot { hosts, vms, ..Default::default() }
    }

    fn stranded(s: &Snapshot) -> Vec<Stranded<'_>> {
        s.vms
            .iter()
            .filter(|v| v.host.as_deref().is_some_and(|h| s.hosts.iter().any(|x| x.name == h && x.health.is_failed())))
            .map(|vm| Stranded { vm, moving: None })
            .collect()
    }

    fn verdicts(s: &Snapshot, stranded: &[Stranded]) -> Vec<(String, Verdict)> {
        let mut cluster = Cluster::new(s);
        plan(&mut cluster, stranded).into_iter().map(|d| (d.vm.name, d.verdict)).collect()
    }

    #[test]
    fn high_priority_vms_restart_first_and_low_ones_wait_with_the_reason() {
        // h1 failed with 3 VMs of 2 vCPUs; h2 has room for two.
        let s = snapshot(
            vec![host("h1", 8, failed()), host("h2", 4, HostHealth::Ready)],
            vec![
                vm("low", 2, "h1", RestartPriority::Low),
                vm("high", 2, "h1", RestartPriority::High),
                vm("medium", 2, "h1", RestartPriority::Medium),
            ],
        );
        let out = verdicts(&s, &stranded(&s));
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["high", "medium", "low"]);
        assert!(matches!(&out[0].1, Verdict::Restart(p) if p.host == "h2"));
        assert!(matches!(&out[1].1, Verdict::Restart(p) if p.host == "h2"));
        let Verdict::Wait(why) = &out[2].1 else { panic!("{:?}", out[2]) };
        assert!(why.contains("no host can take it yet: 0/2 hosts can run low"), "{why}");
    }

    #[test]
    fn disabled_vms_stay_down_and_pools_without_ha_are_left() {
        let mut s = snapshot(
            vec![host("h1", 4, failed()), host("h2", 4, HostHealth::Ready)],
            vec![vm("off", 1, "h1", RestartPriority::Disabled), vm("manual", 1, "h1", RestartPriority::High)],
        );
        s.vms[1].ha.keeps_running = false;
        let out = verdicts(&s, &stranded(&s));
        assert!(out.iter().all(|(_, v)| matches!(v, Verdict::NotRestarted(_))), "{out:?}");
        s.ha.insert(
            "pool".into(),
            HaSettings { enabled: false, admission_control: false, host_failures_to_tolerate: 0 },
        );
        let out = verdicts(&s, &stranded(&s));
        assert!(out.iter().all(|(_, v)| matches!(v, Verdict::LeaveHaOff(_))), "{out:?}");
    }

    #[test]
    fn restarts_keep_required_rules() {
        // a and b must not share a host; b runs on h2, so a cannot go there.
        let mut s = snapshot(
            vec![host("h1", 4, failed()), host("h2", 4, HostHealth::Ready), host("h3", 4, HostHealth::Ready)],
            vec![vm("a", 1, "h1", RestartPriority::High), vm("b", 1, "h2", RestartPriority::High)],
        );
        s.rules.push(Rule {
            key: Key::new("ns", "spread"),
            kind: RuleKind::VmVmAntiAffinity,
            required: true,
            vms: [Key::new("ns", "a"), Key::new("ns", "b")].into(),
            hosts: Default::default(),
        });
        let out = verdicts(&s, &stranded(&s));
        assert!(matches!(&out[0].1, Verdict::Restart(p) if p.host == "h3"), "{out:?}");
        s.hosts.pop();
        let out = verdicts(&s, &stranded(&s));
        let Verdict::Wait(why) = &out[0].1 else { panic!("{out:?}") };
        assert!(why.contains("rule spread"), "{why}");
    }

    #[test]
    fn a_vm_caught_mid_migration_waits_for_its_targets_word() {
        let s = snapshot(
            vec![host("h1", 4, failed()), host("h2", 4, HostHealth::Ready), host("h3", 4, failed())],
            vec![vm("a", 1, "h1", RestartPriority::Medium)],
        );
        let moving = |target: &str, target_failed, state| Moving {
            migration: "m".into(),
            target: Some(target.into()),
            target_failed,
            target_state: state,
        };
        let table = [
            // (target, its host failed, target state) -> restarts now?
            // Not listening yet, or listening: the target's receiving VMM may exist.
            ("h2", false, None, false),
            ("h2", false, Some(TargetState::Receiving), false),
            ("h2", false, Some(TargetState::Stopped), true),
            ("h2", false, Some(TargetState::Running), false),
            ("h3", true, Some(TargetState::Receiving), true),
            ("h3", true, None, true),
            // A target whose Node is gone (or unreadable) but whose heartbeat goes
            // on: it may run the VM, so HA waits for its word.
            ("gone", false, None, false),
            ("gone", true, None, true),
        ];
        for (target, target_failed, state, restarts) in table {
            let st = [Stranded { vm: &s.vms[0], moving: Some(moving(target, target_failed, state)) }];
            let out = verdicts(&s, &st);
            assert_eq!(
                matches!(out[0].1, Verdict::Restart(_)),
                restarts,
                "{target} failed {target_failed} {state:?}: {out:?}"
            );
            if let Verdict::Wait(why) = &out[0].1 {
                assert!(why.contains("migration m"), "{why}");
            }
        }
    }

    #[test]
    fn the_same_snapshot_gives_the_same_plan() {
        let s = snapshot(
            vec![host("h1", 8, failed()), host("h2", 4, HostHealth::Ready), host("h3", 4, HostHealth::Ready)],
            (0..6).map(|i| vm(&format!("v{i}"), 1 + i % 2, "h1", RestartPriority::Medium)).collect(),
        );
        assert_eq!(verdicts(&s, &stranded(&s)), verdicts(&s, &stranded(&s)));
    }
}
