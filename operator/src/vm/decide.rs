//! What the operator does for one VM (pure): the run strategy's decision from
//! `drover-core`, turned into the operator's status fields, Events, a request to
//! consume and when to look again. A decision that needs a host is finished by
//! [`with_placement`] once placement has answered.

use std::time::Duration;

use drover_core::lifecycle::{self, Action, Backoff, Ended, Observed, PowerRequest};
use drover_core::placement::{Placement, Unschedulable};
use drover_core::snapshot::Host;
use drover_crds::contract::{annotations, conditions, reasons};
use drover_crds::vm::{StartFailure, VirtualMachine, VmPhase};
use kube::ResourceExt;

use super::mine::Mine;
pub use crate::events::Note;
use crate::events::reasons as event_reasons;
use crate::snapshot::{phase, strategy};
use crate::writes::{condition, ms_time, time_ms};

/// Placement a plan waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeedsHost {
    /// A first placement (or again, after its host failed before it started).
    First,
    /// A restart away from the host it stopped on (`failures` in a row).
    Restart { failures: u32 },
}

/// What to do for one VM.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The operator's status fields as they should be.
    pub mine: Mine,
    pub notes: Vec<Note>,
    /// Remove the request annotation (after the status write).
    pub consume_request: bool,
    /// Remove the stopped-for-maintenance annotation.
    pub clear_maintenance_mark: bool,
    /// Look again after this long.
    pub requeue: Option<Duration>,
    /// Placement must answer before the plan is complete.
    pub needs_host: Option<NeedsHost>,
    /// Why, for logs.
    pub why: String,
}

/// What the operator knows of a VM's host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostState {
    pub ready: bool,
    pub takes_vms: bool,
    pub maintenance: bool,
}

impl HostState {
    pub fn of(host: Option<&Host>) -> Self {
        host.map(|h| Self {
            ready: h.health.is_ready(),
            takes_vms: h.health.is_ready() && h.schedulable && !h.maintenance,
            maintenance: h.maintenance,
        })
        .unwrap_or_default()
    }
}

/// How the VM last ended, from the agent's Ready condition (its transition time is
/// when it ended) and when it had started.
pub fn ended(vm: &VirtualMachine) -> Option<Ended> {
    let status = vm.status.as_ref()?;
    if !matches!(status.phase, Some(VmPhase::Stopped | VmPhase::Failed)) {
        return None;
    }
    let ready = status.conditions.get(conditions::READY)?;
    let at_ms = time_ms(&ready.last_transition_time);
    let started = status.started_at.as_ref().map(time_ms);
    Some(Ended {
        clean: status.phase == Some(VmPhase::Stopped),
        at_ms,
        ran_ms: started.map(|s| at_ms.saturating_sub(s)),
    })
}

/// The maintenance mark on a VM: the host and whether it is to restart elsewhere.
pub fn maintenance_mark(vm: &VirtualMachine) -> Option<(String, bool)> {
    let value = vm.annotations().get(annotations::STOPPED_FOR_MAINTENANCE)?;
    let (host, action) = value.split_once('/')?;
    Some((host.to_string(), action == "Restart"))
}

/// What the core needs to know of `vm`.
pub fn observe(vm: &VirtualMachine, host: HostState) -> Observed {
    let status = vm.status.as_ref();
    let mark = maintenance_mark(vm);
    Observed {
        strategy: strategy(&vm.spec),
        phase: status.and_then(|s| s.phase).map(phase),
        host: status.and_then(|s| s.node_name.clone()),
        host_takes_vms: host.takes_vms,
        host_ready: host.ready,
        ended: ended(vm),
        request: vm.annotations().get(annotations::REQUEST).and_then(|r| PowerRequest::parse(r)),
        failures: status.and_then(|s| s.start_failure.as_ref()).map_or(0, |f| f.consecutive_fail_count.max(0) as u32),
        held_by_maintenance: mark.as_ref().is_some_and(|(_, restart)| !restart) && host.maintenance,
        maintenance_restart: mark.is_some_and(|(_, restart)| restart),
        deleting: vm.metadata.deletion_timestamp.is_some(),
    }
}

/// Decides for `vm` whose host is in `host` state, at `now_ms`.
pub fn decide(vm: &VirtualMachine, host: HostState, now_ms: u64, backoff: &Backoff) -> Plan {
    let observed = observe(vm, host);
    if let Some(failed) = vm.annotations().get(annotations::HA_NOT_RESTARTED)
        && !observed.phase.is_some_and(|p| p.is_active())
        && !observed.deleting
    {
        // HA left it when its host failed (restartPriority Disabled): the run
        // strategy must not undo that, even once the host is back.
        return Plan {
            mine: Mine::of(vm.status.as_ref()),
            notes: Vec::new(),
            consume_request: false,
            clear_maintenance_mark: false,
            requeue: None,
            needs_host: None,
            why: format!(
                "left stopped by HA after its host {failed} failed; remove the {} annotation to start it again",
                annotations::HA_NOT_RESTARTED
            ),
        };
    }
    let decision = lifecycle::decide(&observed, now_ms, backoff);
    let current = Mine::of(vm.status.as_ref());
    let generation = vm.metadata.generation;
    let mut plan = Plan {
        mine: current.clone(),
        notes: Vec::new(),
        consume_request: decision.consume_request,
        clear_maintenance_mark: false,
        requeue: None,
        needs_host: None,
        why: decision.why.clone(),
    };
    let node = observed.host.clone().unwrap_or_default();
    match decision.action {
        Action::Wait => {
            plan.mine.restart_required = restart_required(vm, current.restart_required.clone());
            // A VM whose maintenance hold is over, or that restarted elsewhere as asked.
            if let Some((mark_host, _)) = maintenance_mark(vm) {
                let running_elsewhere = observed.phase.is_some_and(|p| p.is_active()) && node != mark_host;
                plan.clear_maintenance_mark = running_elsewhere || (!host.maintenance && node == mark_host);
            }
        }
        Action::Place => plan.needs_host = Some(NeedsHost::First),
        Action::RestartElsewhere { failures } => plan.needs_host = Some(NeedsHost::Restart { failures }),
        Action::RestartInPlace { failures } => {
            let count = current.restart_count.unwrap_or(0) + 1;
            plan.mine.phase = Some(VmPhase::Scheduled);
            plan.mine.restart_count = Some(count);
            plan.mine.start_failure =
                (failures > 0).then_some(StartFailure { consecutive_fail_count: failures as i32, retry_after: None });
            plan.mine.restart_required = None;
            let message = format!("starting again on {node} ({}; restart {count})", decision.why);
            Mine::set(
                &mut plan.mine.scheduled,
                condition(conditions::SCHEDULED, true, reasons::PLACED, message.clone(), generation),
            );
            plan.notes.push(Note { warning: false, reason: event_reasons::RESTARTING, action: "Restart", message });
            plan.clear_maintenance_mark = maintenance_mark(vm).is_some();
        }
        Action::BackOff { until_ms, failures } => {
            plan.mine.start_failure = Some(StartFailure {
                consecutive_fail_count: failures.saturating_sub(1) as i32,
                retry_after: Some(ms_time(until_ms)),
            });
            let message = format!(
                "failure {failures} in a row: restarting on {node} after a {} s backoff",
                backoff.delay_ms(failures).div_ceil(1000)
            );
            let changed = current.scheduled.as_ref().is_none_or(|c| c.message != message);
            Mine::set(
                &mut plan.mine.scheduled,
                condition(conditions::SCHEDULED, false, reasons::BACK_OFF, message.clone(), generation),
            );
            if changed {
                plan.notes.push(Note { warning: true, reason: reasons::BACK_OFF, action: "Restart", message });
            }
            plan.requeue = Some(Duration::from_millis(until_ms.saturating_sub(now_ms).max(50)));
        }
        Action::Stop if vm.status.as_ref().is_some_and(|s| s.migration.is_some()) => {
            // Stopping a VM in the middle of a switch-over could leave it stopped on
            // the source while the target runs it: the stop waits for the migration.
            plan.why = format!("{} (after its migration ends)", decision.why);
            plan.consume_request = false;
            plan.requeue = Some(Duration::from_secs(1));
        }
        Action::Stop => {
            plan.mine.phase = Some(VmPhase::Stopping);
            plan.notes.push(Note {
                warning: false,
                reason: event_reasons::STOPPING,
                action: "Stop",
                message: format!("stopping on {node}: {}", decision.why),
            });
        }
        Action::MarkStopped => {
            plan.mine.phase = Some(VmPhase::Stopped);
            Mine::set(
                &mut plan.mine.ready,
                condition(conditions::READY, false, reasons::NOT_REQUESTED, decision.why.clone(), generation),
            );
        }
    }
    if plan.consume_request
        && let Some(request) = observed.request
    {
        plan.notes.push(Note {
            warning: false,
            reason: event_reasons::REQUEST,
            action: "Request",
            message: format!("{request:?} requested: {}", decision.why).to_lowercase(),
        });
    }
    plan
}

/// The RestartRequired condition: set while the running VM's restart-only
/// settings differ from its spec, gone otherwise.
fn restart_required(
    vm: &VirtualMachine,
    current: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let status = vm.status.as_ref()?;
    let running = matches!(status.phase, Some(VmPhase::Running | VmPhase::Migrating | VmPhase::Starting));
    let booted = status.booted_with.as_ref().filter(|_| running)?;
    let fields = booted.differences(&vm.spec);
    if fields.is_empty() {
        return None;
    }
    let message = format!(
        "{} changed while the VM runs: it takes effect at the next restart (host CPUs and priority apply live)",
        fields.join(", ")
    );
    let mut slot = current;
    Mine::set(
        &mut slot,
        condition(conditions::RESTART_REQUIRED, true, reasons::SPEC_CHANGED, message, vm.metadata.generation),
    );
    slot
}

/// Completes a plan that needed a host with placement's answer. `shared_cpus` are
/// the CPUs Shared VMs may use on the chosen host (those no Dedicated VM holds).
pub fn with_placement(
    mut plan: Plan,
    vm: &VirtualMachine,
    result: &Result<Placement, Unschedulable>,
    shared_cpus: Option<String>,
) -> Plan {
    let generation = vm.metadata.generation;
    let current = Mine::of(vm.status.as_ref());
    let restart = match plan.needs_host.take() {
        Some(NeedsHost::Restart { failures }) => Some(failures),
        _ => None,
    };
    match result {
        Ok(p) => {
            plan.mine.node_name = Some(p.host.clone());
            plan.mine.phase = Some(VmPhase::Scheduled);
            plan.mine.allocated_cpus = p.cpus.as_ref().map(|c| c.to_string()).or(shared_cpus);
            plan.mine.restart_required = None;
            let mut message = format!("placed on {}", p.message());
            if let Some(failures) = restart {
                let count = current.restart_count.unwrap_or(0) + 1;
                plan.mine.restart_count = Some(count);
                plan.mine.start_failure = (failures > 0)
                    .then_some(StartFailure { consecutive_fail_count: failures as i32, retry_after: None });
                message = format!("{message}; restart {count}");
                plan.clear_maintenance_mark = maintenance_mark(vm).is_some();
            }
            Mine::set(
                &mut plan.mine.scheduled,
                condition(conditions::SCHEDULED, true, reasons::PLACED, message.clone(), generation),
            );
            plan.why = message.clone();
            plan.notes.push(Note { warning: false, reason: reasons::PLACED, action: "Place", message });
        }
        Err(none) => {
            plan.mine.node_name = None;
            plan.mine.phase = Some(VmPhase::Pending);
            plan.mine.allocated_cpus = None;
            // A start request stays until the VM has a host: it is placed as soon
            // as room appears, not forgotten.
            plan.consume_request = false;
            let message = none.message();
            let changed = current.scheduled.as_ref().is_none_or(|c| c.message != message);
            Mine::set(
                &mut plan.mine.scheduled,
                condition(conditions::SCHEDULED, false, reasons::UNSCHEDULABLE, message.clone(), generation),
            );
            plan.why = format!("pending: {message}");
            if changed {
                plan.notes.push(Note { warning: true, reason: reasons::UNSCHEDULABLE, action: "Place", message });
            }
        }
    }
    plan
}

/// The operator's part of a VM's status as it stands.
pub fn decide_current(vm: &VirtualMachine) -> Mine {
    Mine::of(vm.status.as_ref())
}

/// Whether a VM is waiting for something capacity or a host may bring: it has
/// no host and should run, it stopped where it must start again, or it is
/// scheduled on a host whose heartbeat is not fresh (`host_fresh` says).
pub fn waiting(vm: &VirtualMachine, host_fresh: &dyn Fn(&str) -> bool) -> bool {
    let status = vm.status.as_ref();
    let phase = status.and_then(|s| s.phase);
    match phase {
        None | Some(VmPhase::Pending) => true,
        Some(VmPhase::Stopped | VmPhase::Failed) => {
            !matches!(vm.spec.run_strategy, drover_crds::vm::RunStrategy::Halted | drover_crds::vm::RunStrategy::Manual)
        }
        Some(VmPhase::Scheduled) => !status.and_then(|s| s.node_name.as_deref()).is_some_and(host_fresh),
        // On a host gone silent: HA's, the moment it counts as failed.
        phase if crate::ha::stranded_phase(phase) => {
            !status.and_then(|s| s.node_name.as_deref()).is_some_and(host_fresh)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::snapshot::Key;

    fn vm(strategy: &str, status: serde_json::Value, annotations: serde_json::Value) -> VirtualMachine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": { "name": "db", "namespace": "ns", "generation": 3, "annotations": annotations },
            "spec": { "runStrategy": strategy, "cpu": { "vcpus": 2 }, "memory": { "size": "1Gi" }, "boot": { "kernel": "/k" } },
            "status": status
        }))
        .unwrap()
    }

    fn ready_host() -> HostState {
        HostState { ready: true, takes_vms: true, maintenance: false }
    }

    fn ready(reason: &str, at: &str) -> serde_json::Value {
        serde_json::json!([{ "type": "Ready", "status": "False", "reason": reason, "message": "", "lastTransitionTime": at }])
    }

    #[test]
    fn a_new_vm_needs_a_host_and_gets_the_placement_or_the_reason() {
        let v = vm("Always", serde_json::json!({}), serde_json::json!({}));
        let plan = decide(&v, HostState::default(), 0, &Backoff::default());
        assert_eq!(plan.needs_host, Some(NeedsHost::First));
        let placement = Placement {
            host: "h2".into(),
            score: 80,
            cpus: None,
            numa_node: Some(0),
            preferred_broken: vec![],
            feasible: 2,
            runner_up: Some(("h1".into(), 60)),
        };
        let placed = with_placement(plan.clone(), &v, &Ok(placement), Some("0-3".into()));
        assert_eq!(placed.mine.node_name.as_deref(), Some("h2"));
        assert_eq!(placed.mine.phase, Some(VmPhase::Scheduled));
        assert_eq!(placed.mine.allocated_cpus.as_deref(), Some("0-3"));
        let scheduled = placed.mine.scheduled.unwrap();
        assert_eq!((scheduled.status.as_str(), scheduled.reason.as_str()), ("True", "Placed"));
        assert!(scheduled.message.starts_with("placed on h2 (score 80"), "{}", scheduled.message);
        assert_eq!(scheduled.observed_generation, Some(3));

        let none = Unschedulable {
            vm: Key::new("ns", "db"),
            reasons: vec![("h1".into(), drover_core::placement::Reason::Cordoned)],
        };
        let pending = with_placement(plan, &v, &Err(none), None);
        assert_eq!((pending.mine.phase, pending.mine.node_name.clone()), (Some(VmPhase::Pending), None));
        assert_eq!(pending.mine.scheduled.unwrap().message, "0/1 hosts can run db: 1 is cordoned");
        assert!(pending.notes[0].warning);
    }

    #[test]
    fn a_failed_vm_backs_off_then_restarts_in_place_counting_restarts() {
        let status = serde_json::json!({
            "phase": "Failed", "nodeName": "h1", "restartCount": 1,
            "startedAt": "2026-01-01T00:00:00Z",
            "conditions": ready("VmmExited", "2026-01-01T00:00:01Z"),
            "startFailure": { "consecutiveFailCount": 1 }
        });
        let v = vm("Always", status, serde_json::json!({}));
        let failed_at = time_ms(&ms_time(1_767_225_601_000));
        let b = Backoff::default();
        let early = decide(&v, ready_host(), failed_at + 1000, &b);
        assert_eq!(early.needs_host, None);
        assert_eq!(early.mine.scheduled.as_ref().unwrap().reason, "BackOff");
        assert_eq!(early.requeue, Some(Duration::from_millis(3000)), "failure 2 in a row: 4 s from the failure");
        let due = decide(&v, ready_host(), failed_at + 4000, &b);
        assert_eq!(due.mine.phase, Some(VmPhase::Scheduled));
        assert_eq!(due.mine.restart_count, Some(2));
        assert_eq!(due.mine.start_failure.unwrap().consecutive_fail_count, 2);
        assert_eq!(due.notes[0].reason, "Restarting");
    }

    #[test]
    fn manual_vms_wait_for_requests_and_consume_them() {
        let unplaced = vm("Manual", serde_json::json!({}), serde_json::json!({}));
        let plan = decide(&unplaced, HostState::default(), 0, &Backoff::default());
        assert_eq!(plan.mine.phase, Some(VmPhase::Stopped));
        assert_eq!(plan.mine.ready.unwrap().reason, "NotRequested");

        let running = vm(
            "Manual",
            serde_json::json!({ "phase": "Running", "nodeName": "h1" }),
            serde_json::json!({ "drover.dev/request": "stop" }),
        );
        let stop = decide(&running, ready_host(), 0, &Backoff::default());
        assert_eq!((stop.mine.phase, stop.consume_request), (Some(VmPhase::Stopping), true));

        let stopped = vm(
            "Manual",
            serde_json::json!({ "phase": "Stopped", "nodeName": "h1", "conditions": ready("Stopped", "2026-01-01T00:00:00Z") }),
            serde_json::json!({ "drover.dev/request": "start" }),
        );
        let start = decide(&stopped, ready_host(), 0, &Backoff::default());
        assert_eq!((start.mine.phase, start.consume_request), (Some(VmPhase::Scheduled), true));
    }

    #[test]
    fn a_start_request_stays_until_the_vm_has_a_host_and_a_stop_waits_for_a_migration() {
        let stopped = vm(
            "Manual",
            serde_json::json!({ "phase": "Stopped" }),
            serde_json::json!({ "drover.dev/request": "start" }),
        );
        let plan = decide(&stopped, HostState::default(), 0, &Backoff::default());
        assert_eq!((plan.needs_host, plan.consume_request), (Some(NeedsHost::First), true));
        let none = Unschedulable { vm: Key::new("ns", "db"), reasons: vec![] };
        let pending = with_placement(plan, &stopped, &Err(none), None);
        assert_eq!((pending.mine.phase, pending.consume_request), (Some(VmPhase::Pending), false));

        let moving = vm(
            "Manual",
            serde_json::json!({ "phase": "Migrating", "nodeName": "h1", "migration": "db-move" }),
            serde_json::json!({ "drover.dev/request": "stop" }),
        );
        let plan = decide(&moving, ready_host(), 0, &Backoff::default());
        assert_eq!((plan.mine.phase, plan.consume_request), (None, false));
    }

    #[test]
    fn a_spec_change_that_needs_a_restart_is_named() {
        let status = serde_json::json!({
            "phase": "Running", "nodeName": "h1",
            "bootedWith": { "vcpus": 1, "placement": "Shared", "memory": "1Gi", "kernel": "/k" }
        });
        let v = vm("Always", status, serde_json::json!({}));
        let plan = decide(&v, ready_host(), 0, &Backoff::default());
        let c = plan.mine.restart_required.unwrap();
        assert_eq!(c.status, "True");
        assert!(c.message.starts_with("spec.cpu.vcpus changed"), "{}", c.message);
    }

    #[test]
    fn the_stopped_for_maintenance_mark_is_cleared_once_done() {
        let moved = vm(
            "Always",
            serde_json::json!({ "phase": "Running", "nodeName": "h2" }),
            serde_json::json!({ "drover.dev/stopped-for-maintenance": "h1/Restart" }),
        );
        assert!(decide(&moved, ready_host(), 0, &Backoff::default()).clear_maintenance_mark);
        let held = vm(
            "Always",
            serde_json::json!({ "phase": "Stopped", "nodeName": "h1", "conditions": ready("Stopped", "2026-01-01T00:00:00Z") }),
            serde_json::json!({ "drover.dev/stopped-for-maintenance": "h1/Stop" }),
        );
        let in_maintenance = HostState { ready: true, takes_vms: false, maintenance: true };
        let plan = decide(&held, in_maintenance, 0, &Backoff::default());
        assert_eq!((plan.needs_host, plan.mine.phase, plan.clear_maintenance_mark), (None, None, false));
        let over = decide(&held, ready_host(), 0, &Backoff::default());
        assert_eq!(over.mine.phase, Some(VmPhase::Scheduled), "back in service: it starts again where it was");
    }
}
