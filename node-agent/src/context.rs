//! What every controller of the agent shares.

use std::sync::Arc;

use tokio::sync::watch;

use crate::host_facts::HostFacts;
use crate::settings::Settings;
use crate::supervisor::Supervisor;

/// Shared by the controllers.
pub struct Context {
    pub client: kube::Client,
    pub settings: Arc<Settings>,
    pub supervisor: Arc<Supervisor>,
    /// True while the host holds its heartbeat lease (see `heartbeat`).
    pub leased: watch::Receiver<bool>,
    /// The host's facts, once gathered.
    pub facts: watch::Receiver<Option<HostFacts>>,
    /// Kubernetes Events.
    pub events: crate::events::Events,
}

impl Context {
    pub fn leased(&self) -> bool {
        *self.leased.borrow()
    }

    pub fn facts(&self) -> Option<HostFacts> {
        self.facts.borrow().clone()
    }

    pub fn node(&self) -> &str {
        &self.settings.node
    }

    pub fn manager(&self) -> String {
        self.settings.field_manager()
    }
}
