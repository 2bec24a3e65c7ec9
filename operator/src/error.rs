//! The operator's one error type.

/// What can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A flag or setting that cannot work.
    #[error("{0}")]
    Config(String),
    /// Leader election failed.
    #[error("leader election: {0}")]
    Leader(#[from] kube_lease_manager::LeaseManagerError),
    /// A serialization that cannot fail did.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// Something of the process itself (a socket, a task).
    #[error("{0}")]
    Io(String),
}

impl Error {
    /// Someone else wrote first: look again, not a failure.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 409)
    }

    /// The object is gone.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 404)
    }
}
