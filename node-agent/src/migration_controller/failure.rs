//! A migration that failed: the status that says so, and what the log and the
//! Event say. Either end may fail it; the VM keeps running on its source.

use drover_crds::contract::{conditions, reasons};
use drover_crds::migration::{MigrationPhase, VirtualMachineMigrationStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::conditions::condition;

/// Why a migration failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The Succeeded condition's reason (and the Event's).
    pub reason: &'static str,
    pub why: String,
}

impl Failure {
    /// The target could not get ready to receive.
    pub fn target(why: impl Into<String>) -> Self {
        Failure { reason: reasons::TARGET_NOT_READY, why: why.into() }
    }

    /// The source could not send, or the send failed.
    pub fn source(why: impl Into<String>) -> Self {
        Failure { reason: reasons::MIGRATION_FAILED, why: why.into() }
    }

    /// `status`, failed for this reason.
    pub fn status(
        &self,
        mut status: VirtualMachineMigrationStatus,
        generation: Option<i64>,
        now: Time,
    ) -> VirtualMachineMigrationStatus {
        status.phase = Some(MigrationPhase::Failed);
        status.completion_time = Some(now.clone());
        status.conditions.set(condition(conditions::SUCCEEDED, false, self.reason, self.why.clone(), generation, now));
        status.failure_message = Some(self.why.clone());
        status
    }

    /// The Event's note.
    pub fn note(&self) -> String {
        format!("{} (the VM keeps running on its source)", self.why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_status_says_why_and_when() {
        let now = Time("2026-01-02T03:04:05Z".parse().unwrap());
        let failure = Failure::target("Secret ns/k (status.secretName) not found");
        let status = failure.status(VirtualMachineMigrationStatus::default(), Some(1), now.clone());
        assert_eq!(status.phase, Some(MigrationPhase::Failed));
        assert_eq!(status.completion_time, Some(now));
        assert_eq!(status.failure_message.as_deref(), Some(failure.why.as_str()));
        let cond = status.conditions.get(conditions::SUCCEEDED).unwrap();
        assert_eq!((cond.status.as_str(), cond.reason.as_str()), ("False", reasons::TARGET_NOT_READY));
        assert!(failure.note().ends_with("(the VM keeps running on its source)"));
    }
}
