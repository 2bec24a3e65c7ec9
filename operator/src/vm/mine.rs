//! The part of a VM's status the operator owns, read from and written to the
//! status as one piece: server-side apply removes what the operator owned and
//! leaves out, so every write carries all of it.

use drover_crds::contract::{conditions, reasons};
use drover_crds::vm::{StartFailure, VirtualMachineStatus, VmPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// The operator's fields of a VM's status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mine {
    pub node_name: Option<String>,
    /// Only the phases the operator sets (Pending, Scheduled, Stopping, Unknown, and
    /// Stopped for a VM with no host); the agent owns the rest.
    pub phase: Option<VmPhase>,
    pub allocated_cpus: Option<String>,
    pub restart_count: Option<i32>,
    pub start_failure: Option<StartFailure>,
    pub scheduled: Option<Condition>,
    pub restart_required: Option<Condition>,
    /// Ready, only as the operator writes it (a VM that has no host and should not run).
    pub ready: Option<Condition>,
}

/// Whether `phase` is one the operator writes.
pub fn operator_phase(phase: VmPhase, has_host: bool) -> bool {
    matches!(phase, VmPhase::Pending | VmPhase::Scheduled | VmPhase::Stopping | VmPhase::Unknown)
        || (phase == VmPhase::Stopped && !has_host)
}

impl Mine {
    /// The operator's part of `status` as it is.
    pub fn of(status: Option<&VirtualMachineStatus>) -> Self {
        let Some(s) = status else { return Self::default() };
        let has_host = s.node_name.is_some();
        Self {
            node_name: s.node_name.clone(),
            phase: s.phase.filter(|p| operator_phase(*p, has_host)),
            allocated_cpus: s.allocated_cpus.clone(),
            restart_count: s.restart_count,
            start_failure: s.start_failure.clone(),
            scheduled: s.conditions.get(conditions::SCHEDULED).cloned(),
            restart_required: s.conditions.get(conditions::RESTART_REQUIRED).cloned(),
            ready: s.conditions.get(conditions::READY).filter(|c| c.reason == reasons::NOT_REQUESTED).cloned(),
        }
    }

    /// Sets a condition, keeping its transition time while its status holds.
    pub fn set(slot: &mut Option<Condition>, new: Condition) {
        match slot {
            Some(old) if old.status == new.status => {
                let since = old.last_transition_time.clone();
                *old = Condition { last_transition_time: since, ..new };
            }
            _ => *slot = Some(new),
        }
    }

    /// `status` with these fields in place (what the write will make of it).
    pub fn apply_to(&self, status: &mut VirtualMachineStatus) {
        status.node_name = self.node_name.clone();
        if let Some(phase) = self.phase {
            status.phase = Some(phase);
        }
        status.allocated_cpus = self.allocated_cpus.clone();
        status.restart_count = self.restart_count;
        status.start_failure = self.start_failure.clone();
        for c in [&self.scheduled, &self.restart_required, &self.ready].into_iter().flatten() {
            status.conditions.set(c.clone());
        }
    }

    /// The status object to apply.
    pub fn to_json(&self) -> serde_json::Value {
        let mut status = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            if !v.is_null() {
                status.insert(k.into(), v);
            }
        };
        put("nodeName", serde_json::json!(self.node_name));
        put("phase", serde_json::to_value(self.phase).unwrap_or_default());
        put("allocatedCpus", serde_json::json!(self.allocated_cpus));
        put("restartCount", serde_json::json!(self.restart_count));
        put("startFailure", serde_json::to_value(&self.start_failure).unwrap_or_default());
        let conditions: Vec<&Condition> =
            [&self.scheduled, &self.restart_required, &self.ready].into_iter().flatten().collect();
        if !conditions.is_empty() {
            put("conditions", serde_json::to_value(conditions).unwrap_or_default());
        }
        serde_json::Value::Object(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_reads_back_only_its_own_fields() {
        let status: VirtualMachineStatus = serde_json::from_value(serde_json::json!({
            "phase": "Running", "nodeName": "h1", "restartCount": 2, "hostCpus": "0-1",
            "conditions": [
                { "type": "Ready", "status": "True", "reason": "Running", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z" },
                { "type": "Scheduled", "status": "True", "reason": "Placed", "message": "h1", "lastTransitionTime": "2026-01-01T00:00:00Z" }
            ]
        }))
        .unwrap();
        let mine = Mine::of(Some(&status));
        assert_eq!(mine.phase, None, "Running is the agent's");
        assert_eq!(mine.node_name.as_deref(), Some("h1"));
        assert!(mine.ready.is_none() && mine.scheduled.is_some());
        let json = mine.to_json();
        assert_eq!(json["restartCount"], 2);
        assert!(json.get("phase").is_none() && json.get("hostCpus").is_none());
        assert_eq!(json["conditions"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let mut slot = None;
        let mut c = crate::writes::condition("Scheduled", false, "Unschedulable", "a", None);
        c.last_transition_time = crate::writes::ms_time(1000);
        Mine::set(&mut slot, c);
        Mine::set(&mut slot, crate::writes::condition("Scheduled", false, "Unschedulable", "b", None));
        let kept = slot.clone().unwrap();
        assert_eq!((kept.message.as_str(), crate::writes::time_ms(&kept.last_transition_time)), ("b", 1000));
        Mine::set(&mut slot, crate::writes::condition("Scheduled", true, "Placed", "c", None));
        assert!(crate::writes::time_ms(&slot.unwrap().last_transition_time) > 1000);
    }
}
