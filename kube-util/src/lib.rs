//! What the agent and the operator share on top of kube-rs: a client built from a
//! kubeconfig file or, without one, the in-cluster configuration or `$KUBECONFIG`;
//! and [`Events`], Kubernetes Events written in the background.

#![forbid(unsafe_code)]

use std::path::Path;

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// A client that could not be built; the message names where the configuration came from.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--kubeconfig {path}: {why}")]
    Kubeconfig { path: String, why: String },
    #[error("no Kubernetes configuration (in-cluster or $KUBECONFIG): {0}")]
    Infer(String),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for `kubeconfig`, or the in-cluster configuration / `$KUBECONFIG`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let bad = |why: String| ClientError::Kubeconfig { path: path.display().to_string(), why };
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| bad(e.to_string()))?
        }
        None => kube::Config::infer().await.map_err(|e| ClientError::Infer(e.to_string()))?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Publishes one component's Events. Best effort: an Event that cannot be written
/// is logged at debug level and dropped, never holding up whoever published it.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

impl Events {
    /// Events reported by `controller` (e.g. `drover-agent`), from `instance` (a
    /// host, a replica).
    pub fn new(client: kube::Client, controller: &str, instance: &str) -> Self {
        let reporter = Reporter { controller: controller.into(), instance: Some(instance.into()) };
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
