//! What the operator does for one VirtualMachineMigration (pure): admit it (the
//! core's migration admission), fail it (a bad request, a timeout, a deletion),
//! or clean up after it; and the operator's part of its status.

use drover_core::migration::Admission;
use drover_crds::contract::{conditions, reasons};
use drover_crds::migration::{MigrationPhase, VirtualMachineMigration, VirtualMachineMigrationStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::writes::{condition, time_ms};

/// The operator's fields of a migration's status (every write carries all of them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mine {
    /// Only Pending, Scheduled, and Failed when the operator fails it.
    pub phase: Option<MigrationPhase>,
    pub source_node: Option<String>,
    pub target_node: Option<String>,
    pub secret_name: Option<String>,
    pub target_cpus: Option<String>,
    pub approved: Option<Condition>,
    /// Succeeded=False, when the operator fails the migration.
    pub succeeded: Option<Condition>,
    pub failure_message: Option<String>,
    pub completion_time: Option<Time>,
}

impl Mine {
    /// The operator's part of `status`: phases the agents set are theirs, and so is
    /// the outcome unless the operator wrote it (its Approved condition says so).
    pub fn of(status: Option<&VirtualMachineMigrationStatus>) -> Self {
        let Some(s) = status else { return Self::default() };
        let approved = s.conditions.get(conditions::APPROVED).cloned();
        let refused_by_me = approved.as_ref().is_some_and(|c| c.status == "False")
            && s.phase == Some(MigrationPhase::Failed)
            || s.conditions.get(conditions::SUCCEEDED).is_some_and(|c| {
                [
                    reasons::CANCELLED,
                    reasons::TIMED_OUT,
                    reasons::REFUSED,
                    reasons::SOURCE_HOST_FAILED,
                    reasons::TARGET_HOST_FAILED,
                ]
                .contains(&c.reason.as_str())
            });
        Self {
            phase: s.phase.filter(|p| {
                matches!(p, MigrationPhase::Pending | MigrationPhase::Scheduled)
                    || (*p == MigrationPhase::Failed && refused_by_me)
            }),
            source_node: s.source_node.clone(),
            target_node: s.target_node.clone(),
            secret_name: s.secret_name.clone(),
            target_cpus: s.target_cpus.clone(),
            approved,
            succeeded: s.conditions.get(conditions::SUCCEEDED).filter(|_| refused_by_me).cloned(),
            failure_message: s.failure_message.clone().filter(|_| refused_by_me),
            completion_time: s.completion_time.clone().filter(|_| refused_by_me),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut status = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            if !v.is_null() {
                status.insert(k.into(), v);
            }
        };
        put("phase", serde_json::to_value(self.phase).unwrap_or_default());
        put("sourceNode", serde_json::json!(self.source_node));
        put("targetNode", serde_json::json!(self.target_node));
        put("secretName", serde_json::json!(self.secret_name));
        put("targetCpus", serde_json::json!(self.target_cpus));
        put("failureMessage", serde_json::json!(self.failure_message));
        put("completionTime", serde_json::to_value(&self.completion_time).unwrap_or_default());
        let conditions: Vec<&Condition> = [&self.approved, &self.succeeded].into_iter().flatten().collect();
        if !conditions.is_empty() {
            put("conditions", serde_json::to_value(conditions).unwrap_or_default());
        }
        serde_json::Value::Object(status)
    }
}

/// Where a migration stands for the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Not approved yet: admission decides.
    Waiting,
    /// Approved, the agents carry it.
    Underway,
    /// Ended: clean up.
    Finished,
}

pub fn stage(m: &VirtualMachineMigration) -> Stage {
    match m.status.as_ref().and_then(|s| s.phase) {
        None | Some(MigrationPhase::Pending) => Stage::Waiting,
        Some(MigrationPhase::Scheduled | MigrationPhase::Running | MigrationPhase::Switchover) => Stage::Underway,
        Some(MigrationPhase::Succeeded | MigrationPhase::Failed) => Stage::Finished,
    }
}

/// The migration's time limit, from its spec or the VMM's default.
pub fn timeout_ms(m: &VirtualMachineMigration) -> u64 {
    u64::from(m.spec.timeout_seconds.unwrap_or(600)) * 1000
}

/// The operator's status after admission answered; `secret` names the Secret an
/// approval made.
pub fn admitted(m: &VirtualMachineMigration, admission: &Admission, secret: &str, now: Time) -> Mine {
    let generation = m.metadata.generation;
    let mut mine = Mine::of(m.status.as_ref());
    match admission {
        Admission::Approve { source, target, cpus, why } => {
            mine.phase = Some(MigrationPhase::Scheduled);
            mine.source_node = Some(source.clone());
            mine.target_node = Some(target.clone());
            mine.secret_name = Some(secret.to_string());
            mine.target_cpus = cpus.as_ref().map(|c| c.to_string());
            set(&mut mine.approved, condition(conditions::APPROVED, true, reasons::APPROVED, why.clone(), generation));
        }
        Admission::Wait { why } => {
            mine.phase = Some(MigrationPhase::Pending);
            set(&mut mine.approved, condition(conditions::APPROVED, false, reasons::WAITING, why.clone(), generation));
        }
        Admission::Refuse { why } => {
            fail(&mut mine, reasons::REFUSED, why.clone(), generation, now);
            set(&mut mine.approved, condition(conditions::APPROVED, false, reasons::REFUSED, why.clone(), generation));
        }
    }
    mine
}

/// Whether an approved migration lost one of its hosts (`failed` says which
/// hosts are failed): the reason and the message it fails with. The source's
/// failure comes first: then HA decides about the VM, once the target has said
/// whether its VMM runs it.
pub fn host_failed(m: &VirtualMachineMigration, failed: &dyn Fn(&str) -> bool) -> Option<(&'static str, String)> {
    let status = m.status.as_ref()?;
    if let Some(source) = status.source_node.as_deref().filter(|h| failed(h)) {
        let target = status.target_node.as_deref().unwrap_or("the target");
        return Some((
            reasons::SOURCE_HOST_FAILED,
            format!(
                "its source host {source} failed (no heartbeat) before the migration finished; the VM stays with {target} if its VMM runs it there (status.targetState), else HA restarts it"
            ),
        ));
    }
    let target = status.target_node.as_deref().filter(|h| failed(h))?;
    Some((
        reasons::TARGET_HOST_FAILED,
        format!(
            "its target host {target} failed (no heartbeat) before the migration finished; the VM stays on its source"
        ),
    ))
}

/// The operator ends a migration as failed (refused, cancelled, timed out): the VM
/// stays on its source.
pub fn fail(mine: &mut Mine, reason: &str, why: String, generation: Option<i64>, now: Time) {
    mine.phase = Some(MigrationPhase::Failed);
    set(&mut mine.succeeded, condition(conditions::SUCCEEDED, false, reason, why.clone(), generation));
    mine.failure_message = Some(why);
    mine.completion_time = Some(now);
}

fn set(slot: &mut Option<Condition>, new: Condition) {
    crate::vm::mine::Mine::set(slot, new);
}

/// Whether a waiting or underway migration has run out of time at `now_ms`: a
/// migration that waits (for a slot, a target) or whose target never got ready
/// counts from its creation; once the source sends, the VMM enforces the limit.
pub fn timed_out(m: &VirtualMachineMigration, now_ms: u64) -> bool {
    let created = m.metadata.creation_timestamp.as_ref().map(time_ms).unwrap_or(now_ms);
    let sending =
        matches!(m.status.as_ref().and_then(|s| s.phase), Some(MigrationPhase::Running | MigrationPhase::Switchover));
    !sending && now_ms.saturating_sub(created) > timeout_ms(m)
}

/// Finished migrations of one VM beyond the `keep` newest: to delete.
pub fn prunable(migrations: &[std::sync::Arc<VirtualMachineMigration>], keep: usize) -> Vec<String> {
    let mut finished: Vec<&VirtualMachineMigration> =
        migrations.iter().map(|m| m.as_ref()).filter(|m| stage(m) == Stage::Finished).collect();
    let when = |m: &VirtualMachineMigration| {
        m.status
            .as_ref()
            .and_then(|s| s.completion_time.as_ref().map(time_ms))
            .or(m.metadata.creation_timestamp.as_ref().map(time_ms))
            .unwrap_or(0)
    };
    finished.sort_by_key(|m| std::cmp::Reverse(when(m)));
    finished.iter().skip(keep).filter_map(|m| m.metadata.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(status: serde_json::Value, created: &str) -> VirtualMachineMigration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": { "name": "m", "namespace": "ns", "generation": 1, "creationTimestamp": created },
            "spec": { "vmName": "db", "timeoutSeconds": 60 },
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn approval_reserves_and_names_everything_the_agents_need() {
        let m = migration(serde_json::json!({}), "2026-01-01T00:00:00Z");
        let approve = Admission::Approve {
            source: "h1".into(),
            target: "h2".into(),
            cpus: Some(drover_topology::CpuSet::parse("2-3").unwrap()),
            why: "to h2 (score 80)".into(),
        };
        let mine = admitted(&m, &approve, "m-key", crate::writes::now());
        let json = mine.to_json();
        assert_eq!(json["phase"], "Scheduled");
        assert_eq!((json["sourceNode"].as_str(), json["targetNode"].as_str()), (Some("h1"), Some("h2")));
        assert_eq!((json["secretName"].as_str(), json["targetCpus"].as_str()), (Some("m-key"), Some("2-3")));
        assert_eq!(json["conditions"][0]["reason"], "Approved");
    }

    #[test]
    fn a_refusal_fails_the_migration_and_says_why() {
        let m = migration(serde_json::json!({}), "2026-01-01T00:00:00Z");
        let mine = admitted(&m, &Admission::Refuse { why: "VM db is not running".into() }, "", crate::writes::now());
        assert_eq!(mine.phase, Some(MigrationPhase::Failed));
        assert_eq!(mine.failure_message.as_deref(), Some("VM db is not running"));
        assert_eq!(mine.succeeded.as_ref().unwrap().reason, "Refused");
        // Read back, the operator still owns its outcome (later writes keep it).
        let status: VirtualMachineMigrationStatus = serde_json::from_value(mine.to_json()).unwrap();
        assert_eq!(Mine::of(Some(&status)), mine);
    }

    #[test]
    fn the_agents_phases_are_not_the_operators() {
        let status: VirtualMachineMigrationStatus = serde_json::from_value(serde_json::json!({
            "phase": "Failed", "failureMessage": "the target VMM ended",
            "conditions": [
                { "type": "Approved", "status": "True", "reason": "Approved", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z" },
                { "type": "Succeeded", "status": "False", "reason": "Failed", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z" }
            ]
        }))
        .unwrap();
        let mine = Mine::of(Some(&status));
        assert_eq!((mine.phase, mine.failure_message, mine.succeeded), (None, None, None));
    }

    #[test]
    fn a_migration_fails_when_its_source_or_target_host_fails() {
        let m: VirtualMachineMigration = serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": { "name": "m", "namespace": "ns" },
            "spec": { "vmName": "db" },
            "status": { "phase": "Running", "sourceNode": "h1", "targetNode": "h2" }
        }))
        .unwrap();
        assert_eq!(host_failed(&m, &|_| false), None);
        let (reason, why) = host_failed(&m, &|h| h == "h1").unwrap();
        assert_eq!(reason, reasons::SOURCE_HOST_FAILED);
        assert!(why.contains("source host h1 failed"), "{why}");
        assert_eq!(host_failed(&m, &|h| h == "h2").unwrap().0, reasons::TARGET_HOST_FAILED);
        assert_eq!(host_failed(&m, &|_| true).unwrap().0, reasons::SOURCE_HOST_FAILED);
        // The operator keeps owning the phase it wrote.
        let mut failed = Mine::of(m.status.as_ref());
        fail(&mut failed, reasons::SOURCE_HOST_FAILED, why, None, crate::writes::now());
        let mut status = m.status.clone().unwrap();
        status.phase = failed.phase;
        status.conditions.set(failed.succeeded.clone().unwrap());
        assert_eq!(Mine::of(Some(&status)).phase, Some(MigrationPhase::Failed));
    }

    #[test]
    fn waiting_counts_against_the_timeout_sending_does_not() {
        let t0 =
            time_ms(&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-01-01T00:00:00Z".parse().unwrap()));
        let waiting = migration(serde_json::json!({ "phase": "Pending" }), "2026-01-01T00:00:00Z");
        assert!(!timed_out(&waiting, t0 + 60_000));
        assert!(timed_out(&waiting, t0 + 60_001));
        let running = migration(serde_json::json!({ "phase": "Running" }), "2026-01-01T00:00:00Z");
        assert!(!timed_out(&running, t0 + 600_000), "the VMM enforces it while it sends");
    }

    #[test]
    fn only_finished_migrations_beyond_the_newest_are_pruned() {
        let done = |name: &str, at: &str| {
            let mut m = migration(serde_json::json!({ "phase": "Succeeded", "completionTime": at }), at);
            m.metadata.name = Some(name.into());
            std::sync::Arc::new(m)
        };
        let list = vec![
            done("a", "2026-01-01T00:00:01Z"),
            done("b", "2026-01-01T00:00:03Z"),
            done("c", "2026-01-01T00:00:02Z"),
            std::sync::Arc::new(migration(serde_json::json!({ "phase": "Running" }), "2026-01-01T00:00:00Z")),
        ];
        assert_eq!(prunable(&list, 2), vec!["a".to_string()]);
        assert!(prunable(&list, 5).is_empty());
    }
}
