//! What a VM's run strategy asks the operator to do now: place it, start it again
//! where it stopped (after a backoff when it failed), stop it, or leave it.
//!
//! | strategy | starts | after a failure | after a clean stop |
//! | --- | --- | --- | --- |
//! | Always | at once | again, with backoff | again, at once |
//! | RerunOnFailure | at once | again, with backoff | stays stopped |
//! | Manual | on a `start` request | stays | stays |
//! | Halted | never (the agent stops it) | stays | stays |
//!
//! Manual VMs take requests (`start`, `stop`, `restart`) through an annotation
//! the operator consumes; a restart stops the VM, then starts it.
//! Starting again goes to the host the VM stopped on while that host takes VMs,
//! so its resources stay where they were; elsewhere through placement otherwise.

use serde::{Deserialize, Serialize};

/// A VM's run strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStrategy {
    Always,
    RerunOnFailure,
    Manual,
    Halted,
}

/// Where a VM is in its life (the status phase).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Scheduled,
    Starting,
    Running,
    Migrating,
    Stopping,
    Stopped,
    Failed,
    Unknown,
}

impl Phase {
    /// Its VMM runs, or is about to.
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Scheduled | Phase::Starting | Phase::Running | Phase::Migrating | Phase::Stopping)
    }
}

/// A request a user made on a Manual VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PowerRequest {
    Start,
    Stop,
    Restart,
}

impl PowerRequest {
    /// The annotation's value: `start`, `stop`, `restart`.
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "start" => Some(Self::Start),
            "stop" => Some(Self::Stop),
            "restart" => Some(Self::Restart),
            _ => None,
        }
    }
}

/// How a VM last ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// The guest powered off, or it was stopped on request: not a failure.
    pub clean: bool,
    /// When it ended (Unix ms).
    pub at_ms: u64,
    /// How long it had run, when known.
    pub ran_ms: Option<u64>,
}

/// Restart backoff after failures: `base × 2^(n-1)` for the n-th failure in a
/// row, at most `max`; a run of `stable` or longer ends the streak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    pub base_ms: u64,
    pub max_ms: u64,
    pub stable_ms: u64,
}

impl Default for Backoff {
    /// 2 s, doubling to 5 min; a minute of running ends a streak (KubeVirt uses
    /// 10 s to 5 min; a VM that failed once is usually worth a quick second try).
    fn default() -> Self {
        Self { base_ms: 2_000, max_ms: 300_000, stable_ms: 60_000 }
    }
}

impl Backoff {
    /// The wait before the `failures`-th restart in a row (`failures` ≥ 1).
    pub fn delay_ms(&self, failures: u32) -> u64 {
        let doublings = failures.saturating_sub(1).min(32);
        self.base_ms.saturating_mul(1u64 << doublings).min(self.max_ms)
    }
}

/// What the operator knows of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub strategy: RunStrategy,
    /// None: never written.
    pub phase: Option<Phase>,
    pub host: Option<String>,
    /// Its host takes VMs (ready, not cordoned, not in maintenance).
    pub host_takes_vms: bool,
    /// Its host is ready (it may be cordoned or in maintenance).
    pub host_ready: bool,
    /// How it last ended, when it is Stopped or Failed.
    pub ended: Option<Ended>,
    /// A Manual VM's pending request.
    pub request: Option<PowerRequest>,
    /// Failures in a row so far (restarts after failure since the last stable run).
    pub failures: u32,
    /// Its host is in maintenance and the VM asks to stay stopped through it.
    pub held_by_maintenance: bool,
    /// It was stopped to start elsewhere (its host's maintenance, `onMaintenance:
    /// Restart`): it starts again whatever its run strategy (Halted aside).
    pub maintenance_restart: bool,
    pub deleting: bool,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing now.
    Wait,
    /// Give it a host (or say why none fits).
    Place,
    /// Start it again on its host.
    RestartInPlace { failures: u32 },
    /// Start it again elsewhere (its host takes no VMs).
    RestartElsewhere { failures: u32 },
    /// Wait for the restart backoff until then (Unix ms).
    BackOff { until_ms: u64, failures: u32 },
    /// Ask its agent to stop it.
    Stop,
    /// Record it as stopped (it has no host and should not run).
    MarkStopped,
}

/// The decision, with why, and whether a request is used up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub why: String,
    pub consume_request: bool,
}

fn decision(action: Action, why: impl Into<String>) -> Decision {
    Decision { action, why: why.into(), consume_request: false }
}

/// Decides for one VM at `now_ms`.
pub fn decide(vm: &Observed, now_ms: u64, backoff: &Backoff) -> Decision {
    if vm.deleting {
        return decision(Action::Wait, "being deleted: its agent stops it");
    }
    let phase = vm.phase;
    let active = phase.is_some_and(Phase::is_active);
    let ended = matches!(phase, Some(Phase::Stopped | Phase::Failed));
    let unplaced = vm.host.is_none() && !active;
    match vm.strategy {
        RunStrategy::Halted => {
            if unplaced && phase != Some(Phase::Stopped) {
                return decision(Action::MarkStopped, "spec.runStrategy is Halted");
            }
            decision(Action::Wait, "spec.runStrategy is Halted: its agent stops it")
        }
        RunStrategy::Manual => {
            let consume = |mut d: Decision| {
                d.consume_request = true;
                d
            };
            if ended && vm.maintenance_restart {
                return start_again(vm, now_ms, backoff, 0, "stopped for its host's maintenance; starting elsewhere");
            }
            match (vm.request, active) {
                (Some(PowerRequest::Stop), true) => consume(decision(Action::Stop, "stop requested")),
                (Some(PowerRequest::Restart), true) if phase != Some(Phase::Stopping) => {
                    // Kept until the VM has stopped: then it starts again.
                    decision(Action::Stop, "restart requested: stopping first")
                }
                (Some(PowerRequest::Restart), true) => decision(Action::Wait, "restart requested: stopping"),
                (Some(PowerRequest::Start | PowerRequest::Restart), false) => {
                    consume(start_again(vm, now_ms, backoff, 0, "start requested"))
                }
                (Some(PowerRequest::Start), true) => consume(decision(Action::Wait, "start requested: it runs")),
                (Some(PowerRequest::Stop), false) => consume(decision(Action::Wait, "stop requested: it is stopped")),
                (None, _) if unplaced && phase != Some(Phase::Stopped) => {
                    decision(Action::MarkStopped, "spec.runStrategy is Manual: waiting for a start request")
                }
                (None, _) => decision(Action::Wait, "spec.runStrategy is Manual"),
            }
        }
        RunStrategy::Always | RunStrategy::RerunOnFailure => {
            if matches!(phase, None | Some(Phase::Pending)) && vm.host.is_none() {
                return decision(Action::Place, "should run and has no host");
            }
            if phase == Some(Phase::Scheduled) && !vm.host_ready {
                // Not started yet (the agent records Starting first), so moving it is safe.
                return decision(Action::Place, "its host is not ready and it has not started there");
            }
            if phase.is_none() || phase == Some(Phase::Pending) {
                // Placed but never written as Scheduled (a crash between writes): schedule it.
                return decision(Action::Place, "placed, not yet scheduled");
            }
            if !ended {
                return decision(Action::Wait, "runs, or is on its way");
            }
            let Some(end) = vm.ended else {
                return decision(Action::Wait, "stopped, how is not known yet");
            };
            if vm.maintenance_restart {
                return start_again(vm, now_ms, backoff, 0, "stopped for its host's maintenance; starting elsewhere");
            }
            if end.clean && vm.strategy == RunStrategy::RerunOnFailure {
                return decision(Action::Wait, "stopped cleanly; RerunOnFailure restarts only after a failure");
            }
            if vm.held_by_maintenance {
                return decision(Action::Wait, "stopped for its host's maintenance (onMaintenance: Stop)");
            }
            if end.clean {
                return start_again(vm, now_ms, backoff, 0, "stopped; runStrategy Always starts it again");
            }
            // A failure: the streak goes on unless it ran long enough.
            let streak = if end.ran_ms.is_some_and(|ran| ran >= backoff.stable_ms) { 0 } else { vm.failures };
            let failures = streak + 1;
            let until = end.at_ms.saturating_add(backoff.delay_ms(failures));
            if now_ms < until {
                return decision(
                    Action::BackOff { until_ms: until, failures },
                    format!("failed {} in a row: waiting {} ms before restarting", failures, until - now_ms),
                );
            }
            start_again(vm, now_ms, backoff, failures, "failed; starting it again")
        }
    }
}

fn start_again(vm: &Observed, _now_ms: u64, _backoff: &Backoff, failures: u32, why: &str) -> Decision {
    match &vm.host {
        Some(_) if vm.host_takes_vms => decision(Action::RestartInPlace { failures }, why),
        Some(host) => decision(
            Action::RestartElsewhere { failures },
            format!("{why}; its host {host} takes no VMs now, so elsewhere"),
        ),
        None => decision(Action::Place, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(strategy: RunStrategy, phase: Option<Phase>, host: Option<&str>) -> Observed {
        Observed {
            strategy,
            phase,
            host: host.map(str::to_string),
            host_takes_vms: true,
            host_ready: true,
            ended: None,
            request: None,
            failures: 0,
            held_by_maintenance: false,
            maintenance_restart: false,
            deleting: false,
        }
    }

    fn ended(mut o: Observed, clean: bool, at_ms: u64, ran_ms: u64) -> Observed {
        o.phase = Some(if clean { Phase::Stopped } else { Phase::Failed });
        o.ended = Some(Ended { clean, at_ms, ran_ms: Some(ran_ms) });
        o
    }

    use Phase::*;
    use RunStrategy::*;

    #[test]
    fn each_strategy_for_a_new_vm() {
        let b = Backoff::default();
        assert_eq!(decide(&vm(Always, None, None), 0, &b).action, Action::Place);
        assert_eq!(decide(&vm(RerunOnFailure, Some(Pending), None), 0, &b).action, Action::Place);
        assert_eq!(decide(&vm(Manual, None, None), 0, &b).action, Action::MarkStopped);
        assert_eq!(decide(&vm(Halted, None, None), 0, &b).action, Action::MarkStopped);
        assert_eq!(decide(&vm(Halted, Some(Stopped), None), 0, &b).action, Action::Wait);
    }

    #[test]
    fn a_clean_stop_restarts_under_always_only() {
        let b = Backoff::default();
        let always = ended(vm(Always, None, Some("h1")), true, 1000, 5000);
        assert_eq!(decide(&always, 1000, &b).action, Action::RestartInPlace { failures: 0 });
        let rerun = ended(vm(RerunOnFailure, None, Some("h1")), true, 1000, 5000);
        assert_eq!(decide(&rerun, 1000, &b).action, Action::Wait);
    }

    #[test]
    fn failures_back_off_exponentially_and_a_stable_run_resets_the_streak() {
        let b = Backoff::default();
        let mut failed = ended(vm(RerunOnFailure, None, Some("h1")), false, 10_000, 100);
        assert_eq!(decide(&failed, 10_500, &b).action, Action::BackOff { until_ms: 12_000, failures: 1 });
        assert_eq!(decide(&failed, 12_000, &b).action, Action::RestartInPlace { failures: 1 });
        failed.failures = 3;
        assert_eq!(decide(&failed, 10_000, &b).action, Action::BackOff { until_ms: 10_000 + 16_000, failures: 4 });
        failed.failures = 40;
        assert_eq!(decide(&failed, 10_000, &b).action, Action::BackOff { until_ms: 10_000 + 300_000, failures: 41 });
        let stable = ended(Observed { failures: 5, ..vm(Always, None, Some("h1")) }, false, 10_000, 120_000);
        assert_eq!(decide(&stable, 12_000, &b).action, Action::RestartInPlace { failures: 1 });
    }

    #[test]
    fn a_host_that_takes_no_vms_sends_restarts_elsewhere() {
        let b = Backoff::default();
        let mut o = ended(vm(Always, None, Some("h1")), true, 0, 1);
        o.host_takes_vms = false;
        assert_eq!(decide(&o, 0, &b).action, Action::RestartElsewhere { failures: 0 });
        o.held_by_maintenance = true;
        assert_eq!(decide(&o, 0, &b).action, Action::Wait);
        let mut rerun = ended(vm(RerunOnFailure, None, Some("h1")), true, 0, 1);
        rerun.host_takes_vms = false;
        rerun.maintenance_restart = true;
        assert_eq!(decide(&rerun, 0, &b).action, Action::RestartElsewhere { failures: 0 }, "onMaintenance: Restart");
    }

    #[test]
    fn a_scheduled_vm_on_a_host_gone_bad_is_placed_again() {
        let b = Backoff::default();
        let mut o = vm(Always, Some(Scheduled), Some("h1"));
        o.host_ready = false;
        assert_eq!(decide(&o, 0, &b).action, Action::Place);
        o.phase = Some(Running);
        assert_eq!(decide(&o, 0, &b).action, Action::Wait, "a running VM on a failed host is HA's business");
    }

    #[test]
    fn manual_requests() {
        let b = Backoff::default();
        let table = [
            (Some(Running), Some(PowerRequest::Stop), Action::Stop, true),
            (Some(Stopped), Some(PowerRequest::Start), Action::RestartInPlace { failures: 0 }, true),
            (None, Some(PowerRequest::Start), Action::Place, true),
            (Some(Running), Some(PowerRequest::Restart), Action::Stop, false),
            (Some(Stopping), Some(PowerRequest::Restart), Action::Wait, false),
            (Some(Stopped), Some(PowerRequest::Restart), Action::RestartInPlace { failures: 0 }, true),
            (Some(Running), Some(PowerRequest::Start), Action::Wait, true),
            (Some(Stopped), Some(PowerRequest::Stop), Action::Wait, true),
            (Some(Failed), None, Action::Wait, false),
            (Some(Running), None, Action::Wait, false),
        ];
        for (phase, request, action, consumed) in table {
            let host = if phase.is_none() { None } else { Some("h1") };
            let o = Observed { request, ..vm(Manual, phase, host) };
            let d = decide(&o, 0, &b);
            assert_eq!((d.action, d.consume_request), (action, consumed), "{phase:?} {request:?}");
        }
        assert_eq!(PowerRequest::parse(" Restart "), Some(PowerRequest::Restart));
        assert_eq!(PowerRequest::parse("reboot"), None);
    }

    #[test]
    fn a_deleted_vm_is_left_to_its_agent() {
        let o = Observed { deleting: true, ..vm(Always, None, None) };
        assert_eq!(decide(&o, 0, &Backoff::default()).action, Action::Wait);
    }
}
