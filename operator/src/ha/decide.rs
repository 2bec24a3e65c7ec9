//! What the operator writes for a VM of a failed host (pure): the core's HA
//! verdict turned into the VM's new status, an Event, and whether to mark it as
//! left by HA.
//!
//! A restart takes the VM's record over from the dead host's agent: the status is
//! written whole (by merge patch, with the resourceVersion it was decided on), so
//! what that agent wrote last (its `migration`, host CPUs, start time) does not
//! reach the new host's agent.

use drover_core::ha::Verdict;
use drover_core::snapshot::RestartPriority;
use drover_crds::contract::{conditions, reasons};
use drover_crds::vm::{VirtualMachine, VirtualMachineStatus, VmPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::events::Note;
use crate::writes::condition;

/// What to write for one VM.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The VM's status as it should be; `None`: as it is.
    pub status: Option<VirtualMachineStatus>,
    /// Mark it as left by HA (the annotation names the failed host).
    pub mark_not_restarted: Option<String>,
    pub note: Option<Note>,
    /// Why, for logs.
    pub why: String,
}

/// A condition with status Unknown.
fn unknown(type_: &str, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition { status: "Unknown".into(), ..condition(type_, false, reason, message, generation) }
}

/// The plan for `vm` under `verdict`; `shared_cpus` are the CPUs a Shared VM may
/// use on the host a restart chose.
pub fn plan(vm: &VirtualMachine, verdict: &Verdict, priority: RestartPriority, shared_cpus: Option<String>) -> Plan {
    let generation = vm.metadata.generation;
    let old = vm.status.clone().unwrap_or_default();
    let host = old.node_name.clone().unwrap_or_default();
    let mut status = old.clone();
    let mut plan = Plan { status: None, mark_not_restarted: None, note: None, why: String::new() };
    // Conditions::set keeps a condition's transition time while its status holds.
    let set = |status: &mut VirtualMachineStatus, c: Condition| status.conditions.set(c);
    match verdict {
        Verdict::Restart(p) => {
            let count = old.restart_count.unwrap_or(0) + 1;
            let message = format!(
                "HA: its host {host} failed; placed on {} (priority {priority:?}; restart {count})",
                p.message()
            );
            status.phase = Some(VmPhase::Scheduled);
            status.node_name = Some(p.host.clone());
            status.allocated_cpus = p.cpus.as_ref().map(|c| c.to_string()).or(shared_cpus);
            status.restart_count = Some(count);
            status.start_failure = None;
            status.migration = None;
            status.host_cpus = None;
            status.numa_nodes = None;
            status.shares = None;
            status.cpu_changed_at = None;
            status.booted_with = None;
            status.last_exit = Some(format!("its host {host} failed (no heartbeat); restarted elsewhere by HA"));
            // A fresh boot: what the old run reported of its settings is gone.
            status
                .conditions
                .0
                .retain(|c| c.type_ != conditions::RESTART_REQUIRED && c.type_ != conditions::CPU_CONFIG_APPLIED);
            set(
                &mut status,
                condition(conditions::SCHEDULED, true, reasons::HA_RESTARTED, message.clone(), generation),
            );
            set(
                &mut status,
                condition(
                    conditions::READY,
                    false,
                    reasons::HA_RESTARTED,
                    format!("its host {host} failed; starting on {}", p.host),
                    generation,
                ),
            );
            plan.note = Some(Note {
                warning: true,
                reason: reasons::HA_RESTARTED,
                action: "Restart",
                message: message.clone(),
            });
            plan.why = message;
        }
        Verdict::Wait(why) => {
            status.phase = Some(VmPhase::Unknown);
            let changed = old.conditions.get(conditions::SCHEDULED).is_none_or(|c| c.message != *why);
            set(&mut status, condition(conditions::SCHEDULED, false, reasons::HA_WAITING, why.clone(), generation));
            set(
                &mut status,
                unknown(conditions::READY, reasons::HOST_FAILED, format!("its host {host} failed"), generation),
            );
            if changed {
                plan.note =
                    Some(Note { warning: true, reason: reasons::HA_WAITING, action: "Restart", message: why.clone() });
            }
            plan.why = format!("HA waits: {why}");
        }
        Verdict::NotRestarted(why) => {
            status.phase = Some(VmPhase::Failed);
            status.migration = None;
            status.last_exit = Some(why.clone());
            set(&mut status, condition(conditions::READY, false, reasons::HA_NOT_RESTARTED, why.clone(), generation));
            if vm_keeps_running(vm) {
                plan.mark_not_restarted = Some(host.clone());
            }
            plan.note = Some(Note {
                warning: true,
                reason: reasons::HA_NOT_RESTARTED,
                action: "Restart",
                message: why.clone(),
            });
            plan.why = why.clone();
        }
        Verdict::LeaveHaOff(why) => {
            status.phase = Some(VmPhase::Unknown);
            set(&mut status, unknown(conditions::READY, reasons::HOST_FAILED_HA_OFF, why.clone(), generation));
            if old.phase != Some(VmPhase::Unknown) {
                plan.note = Some(Note {
                    warning: true,
                    reason: reasons::HOST_FAILED_HA_OFF,
                    action: "Restart",
                    message: why.clone(),
                });
            }
            plan.why = why.clone();
        }
    }
    if status != old {
        plan.status = Some(status);
    }
    plan
}

/// Whether the run strategy would start it again by itself (so a VM HA left must
/// be marked, or the strategy would undo HA's decision once the host is back).
fn vm_keeps_running(vm: &VirtualMachine) -> bool {
    matches!(vm.spec.run_strategy, drover_crds::vm::RunStrategy::Always | drover_crds::vm::RunStrategy::RerunOnFailure)
}

/// The merge patch that turns `old` into `new` (top-level fields; a field gone is
/// written as null).
pub fn merge_patch(old: &VirtualMachineStatus, new: &VirtualMachineStatus) -> serde_json::Value {
    let old = serde_json::to_value(old).unwrap_or_default();
    let mut patch = serde_json::Map::new();
    let new = serde_json::to_value(new).unwrap_or_default();
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else { return serde_json::Value::Null };
    for (k, v) in new {
        if old.get(k) != Some(v) {
            patch.insert(k.clone(), v.clone());
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        patch.insert(k.clone(), serde_json::Value::Null);
    }
    serde_json::Value::Object(patch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::placement::Placement;

    fn vm(strategy: &str) -> VirtualMachine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": { "name": "db", "namespace": "ns", "generation": 2 },
            "spec": { "runStrategy": strategy, "cpu": { "vcpus": 2 }, "memory": { "size": "1Gi" }, "boot": { "kernel": "/k" } },
            "status": {
                "phase": "Migrating", "nodeName": "h1", "migration": "m1", "hostCpus": "0-3", "restartCount": 1,
                "conditions": [{ "type": "Ready", "status": "True", "reason": "Running", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z" }]
            }
        }))
        .unwrap()
    }

    fn placement(host: &str) -> Placement {
        Placement {
            host: host.into(),
            score: 50,
            cpus: None,
            numa_node: Some(0),
            preferred_broken: vec![],
            feasible: 1,
            runner_up: None,
        }
    }

    #[test]
    fn a_restart_takes_the_record_over_from_the_dead_hosts_agent() {
        let p = plan(&vm("Always"), &Verdict::Restart(placement("h2")), RestartPriority::High, Some("0-7".into()));
        let s = p.status.unwrap();
        assert_eq!((s.phase, s.node_name.as_deref(), s.restart_count), (Some(VmPhase::Scheduled), Some("h2"), Some(2)));
        assert_eq!((s.migration.clone(), s.host_cpus.clone(), s.allocated_cpus.as_deref()), (None, None, Some("0-7")));
        let scheduled = s.conditions.get(conditions::SCHEDULED).unwrap();
        assert_eq!(scheduled.reason, reasons::HA_RESTARTED);
        assert!(
            scheduled.message.contains("its host h1 failed; placed on h2")
                && scheduled.message.contains("priority High")
        );
        assert_eq!(s.conditions.get(conditions::READY).unwrap().status, "False");
        let note = p.note.unwrap();
        assert_eq!(note.reason, reasons::HA_RESTARTED);
        let patch = merge_patch(vm("Always").status.as_ref().unwrap(), &s);
        // Present and null: the merge patch removes the dead agent's mark.
        assert!(patch.get("migration").is_some_and(|v| v.is_null()), "{patch}");
        assert_eq!(patch["nodeName"], "h2");
        assert!(patch.get("hostCpus").is_some_and(|v| v.is_null()));
    }

    #[test]
    fn a_vm_ha_leaves_is_failed_and_marked_when_its_strategy_would_restart_it() {
        let why = "its host h1 failed; HA does not restart it (spec.ha.restartPriority is Disabled)".to_string();
        let p = plan(&vm("Always"), &Verdict::NotRestarted(why.clone()), RestartPriority::Disabled, None);
        let s = p.status.unwrap();
        assert_eq!(s.phase, Some(VmPhase::Failed));
        assert_eq!(s.conditions.get(conditions::READY).unwrap().reason, reasons::HA_NOT_RESTARTED);
        assert_eq!(p.mark_not_restarted.as_deref(), Some("h1"));
        let manual = plan(&vm("Manual"), &Verdict::NotRestarted(why), RestartPriority::Medium, None);
        assert_eq!(manual.mark_not_restarted, None, "a Manual VM waits for a request anyway");
    }

    #[test]
    fn waiting_and_ha_off_leave_the_vm_unknown_where_it_was() {
        let p = plan(&vm("Always"), &Verdict::Wait("no room".into()), RestartPriority::Medium, None);
        let s = p.status.clone().unwrap();
        assert_eq!((s.phase, s.node_name.as_deref()), (Some(VmPhase::Unknown), Some("h1")));
        assert_eq!(s.migration.as_deref(), Some("m1"), "the target may still take it over");
        assert!(p.note.is_some());
        // The same wait again writes nothing new and says nothing.
        let mut again = vm("Always");
        again.status = Some(s);
        let p2 = plan(&again, &Verdict::Wait("no room".into()), RestartPriority::Medium, None);
        assert!(p2.status.is_none() && p2.note.is_none(), "{p2:?}");
        let off = plan(&vm("Always"), &Verdict::LeaveHaOff("HA is off".into()), RestartPriority::Medium, None);
        let s = off.status.unwrap();
        assert_eq!(s.phase, Some(VmPhase::Unknown));
        assert_eq!(s.conditions.get(conditions::READY).unwrap().status, "Unknown");
    }
}
