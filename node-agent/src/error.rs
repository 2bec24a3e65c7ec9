//! The agent's one error type.

/// What can go wrong in the agent. Messages name the object, file or field involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Io(String),
    /// A VirtualMachine's spec cannot run on this host (missing file, bad value).
    #[error("{0}")]
    Config(String),
    /// A VMM's control API refused a request or could not be reached
    /// (`drover_vmm_api::Error::Refused` carries the HTTP status to branch on).
    #[error("VMM control API: {0}")]
    Vmm(#[from] drover_vmm_api::Error),
    /// A reference to another object does not resolve (missing Secret, missing VM).
    #[error("{0}")]
    Reference(String),
    /// Every port of the migration range (`--migration-ports`) is taken.
    #[error("no free migration port in {low}-{high}")]
    NoFreePort { low: u16, high: u16 },
    /// The host does not hold its heartbeat lease: no VM may start.
    #[error("this host does not hold its heartbeat lease; VMs start again once it does")]
    NotLeased,
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(what: impl std::fmt::Display, e: std::io::Error) -> Self {
        Error::Io(format!("{what}: {e}"))
    }

    /// A write conflict (someone else wrote first): not a failure, just a reason to
    /// look again.
    pub fn is_conflict(&self) -> bool {
        self.api_code() == Some(409)
    }

    /// The object is gone.
    pub fn is_not_found(&self) -> bool {
        self.api_code() == Some(404)
    }

    fn api_code(&self) -> Option<u16> {
        match self {
            Error::Kube(kube::Error::Api(status)) => Some(status.code),
            _ => None,
        }
    }
}
