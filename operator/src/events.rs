//! Kubernetes Events for what the operator decided (`kubectl describe vm` shows
//! them). Best effort: an Event that cannot be written is logged and dropped,
//! never holding up a decision.

/// Reasons of the operator's Events that are no condition's reason (those are in
/// `drover_crds::contract::reasons`).
pub mod reasons {
    /// A VM was started again (restartCount went up).
    pub const RESTARTING: &str = "Restarting";
    /// A VM was asked to stop.
    pub const STOPPING: &str = "Stopping";
    /// A Manual VM's request was carried out.
    pub const REQUEST: &str = "Request";
    /// A host finished evacuating.
    pub const IN_MAINTENANCE: &str = "InMaintenance";
    /// A host left maintenance.
    pub const BACK_IN_SERVICE: &str = "BackInService";
    /// A host's evacuation made a migration.
    pub const EVACUATING: &str = "Evacuating";
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub message: String,
}

/// Publishes the operator's Events (`drover_kube::Events`, reported as
/// `drover-operator` from its replica).
pub use drover_kube::Events;

/// The operator's Events publisher for replica `identity`.
pub fn for_replica(client: kube::Client, identity: &str) -> Events {
    Events::new(client, "drover-operator", identity)
}
