//! Kubernetes Events for what the agent does to a VM (`kubectl describe vm` and
//! `kubectl get events` show them). Best effort: an event that cannot be written is
//! logged and dropped, never holding up the VM.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

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

/// Publishes the agent's events.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

impl Events {
    pub fn new(client: kube::Client, node: &str) -> Self {
        let reporter = Reporter { controller: "drover-agent".into(), instance: Some(node.into()) };
        Self { recorder: Recorder::new(client, reporter) }
    }

    /// A normal event on `object`.
    pub fn normal<K: Resource<DynamicType = ()>>(&self, object: &K, reason: &str, action: &str, note: String) {
        self.publish(object, EventType::Normal, reason, action, note);
    }

    /// A warning on `object`.
    pub fn warning<K: Resource<DynamicType = ()>>(&self, object: &K, reason: &str, action: &str, note: String) {
        self.publish(object, EventType::Warning, reason, action, note);
    }

    fn publish<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let reference = object.object_ref(&());
        // Events are capped at 1 KiB of note by the API server.
        let note: String = note.chars().take(1000).collect();
        let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::debug!(
                    "event {} on {:?}/{:?} not written: {e}",
                    event.reason,
                    reference.namespace,
                    reference.name
                );
            }
        });
    }
}
