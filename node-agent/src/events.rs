//! Kubernetes Events for what the agent does to a VM (`kubectl describe vm` and
//! `kubectl get events` show them). Best effort: an event that cannot be written is
//! logged and dropped, never holding up the VM.

/// Reasons of the agent's Events that are no condition's reason (those are in
/// `drover_crds::contract::reasons`, and Events reuse them).
pub mod reasons {
    /// The agent started a VM's VMM.
    pub const STARTED: &str = "Started";
    /// A VM's VMM ended in failure (its Ready condition says how).
    pub const FAILED: &str = "Failed";
    /// Host CPUs or priority changed on a running VM.
    pub const CPU_CONFIG_CHANGED: &str = "CpuConfigChanged";
    /// A migration ended with the VM on its target.
    pub const SUCCEEDED: &str = "Succeeded";
}

/// Publishes the agent's events (`drover_kube::Events`, reported as `drover-agent`
/// from its host).
pub use drover_kube::Events;

/// The agent's Events publisher for `node`.
pub fn for_node(client: kube::Client, node: &str) -> Events {
    Events::new(client, "drover-agent", node)
}
