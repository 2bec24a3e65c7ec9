//! Kubernetes Events for what the operator decided (`kubectl describe vm` shows
//! them). Best effort: an Event that cannot be written is logged and dropped,
//! never holding up a decision.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

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

/// Publishes the operator's Events.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

impl Events {
    pub fn new(client: kube::Client, identity: &str) -> Self {
        let reporter = Reporter { controller: "drover-operator".into(), instance: Some(identity.into()) };
        Self { recorder: Recorder::new(client, reporter) }
    }

    pub fn normal<K: Resource<DynamicType = ()>>(&self, object: &K, reason: &str, action: &str, note: String) {
        self.publish(object, EventType::Normal, reason, action, note);
    }

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
        let recorder = self.recorder.clone();
        let event = Event {
            type_,
            reason: reason.into(),
            // The API server caps notes at 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::debug!("event not written: {e}");
            }
        });
    }
}
