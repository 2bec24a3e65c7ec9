//! The VMM's one error type. Each message says what to fix; variants a caller
//! branches on (the control API's status codes, a throttle that skips a cycle)
//! are typed, the rest carry their context as text and their cause as a source.

use std::time::Duration;

use crate::migration::channel::ChannelError;
use crate::migration::wire::WireError;

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open {path}: {source} (is the kvm module loaded, and may this user open it?)")]
    KvmOpen { path: String, source: kvm_ioctls::Error },
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    /// The configuration or a request is wrong; the message names the field.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The kernel cannot be loaded.
    #[error("kernel {path}: {why}")]
    Kernel { path: String, why: String },
    /// Guest memory cannot be set up, read or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A live migration failed.
    #[error("migration: {0}")]
    Migration(String),
    /// The migration stream is wrong (another version, corrupt, out of order).
    #[error("migration: {0}")]
    Wire(#[from] WireError),
    /// The migration channel refused the peer or was damaged.
    #[error("migration: {0}")]
    Channel(#[from] ChannelError),
    /// A migration was asked for while one runs (or after one handed the VM over).
    #[error("a migration is already under way")]
    MigrationUnderWay,
    /// A cancel was asked for with no migration running.
    #[error("migration: no migration is running")]
    NoMigration,
    /// A cancel came after the point of no return: the target has the VM.
    #[error("migration: too late to cancel: the target has the VM")]
    HandedOver,
    /// Ctrl+Alt+Del was asked for while the guest has not read the keys typed
    /// before (it has no keyboard driver, or is not listening yet).
    #[error("the guest has not read the keys typed before (has it a keyboard driver?)")]
    KeyboardFull,
    /// Saving or restoring VM state failed.
    #[error("VM state: {0}")]
    State(String),
    /// Some vCPU threads did not stop in time.
    #[error("only {parked} of {vcpus} vCPUs paused within {}", human(*.waited))]
    PauseTimedOut { parked: u32, vcpus: u32, waited: Duration },
    /// The host's CPU topology cannot be read from sysfs.
    #[error("host topology: {0}")]
    Topology(#[source] drover_topology::Error),
    /// A system call or file operation failed; `what` says on what.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// A control API request whose body is not what the request takes.
    #[error("body: {0}")]
    Body(#[source] serde_json::Error),
    /// A control API request whose body is larger than any request takes.
    #[error("body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// A control API request the VMM does not know.
    #[error("no such request: {method} {path}")]
    NoSuchRequest { method: String, path: String },
    /// A control API reply that could not be encoded.
    #[error("encoding the reply: {0}")]
    Reply(#[source] serde_json::Error),
    /// Something that cannot happen did (a helper thread panicked, no randomness).
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// An I/O failure on `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }

    /// The last OS error, on `what` (after a libc call that failed).
    pub fn last_os_error(what: impl Into<String>) -> Self {
        Self::io(what, std::io::Error::last_os_error())
    }
}

impl From<drover_vmm_api::Error> for Error {
    fn from(e: drover_vmm_api::Error) -> Self {
        match e {
            drover_vmm_api::Error::Config(why) => Error::Config(why),
            other => Error::Internal(other.to_string()),
        }
    }
}

/// `5 s`, `50 ms`.
fn human(d: Duration) -> String {
    if d.subsec_nanos() == 0 { format!("{} s", d.as_secs()) } else { format!("{} ms", d.as_millis()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_errors_keep_the_messages_callers_know() {
        assert_eq!(Error::MigrationUnderWay.to_string(), "a migration is already under way");
        assert_eq!(Error::HandedOver.to_string(), "migration: too late to cancel: the target has the VM");
        assert_eq!(Error::NoMigration.to_string(), "migration: no migration is running");
        let paused = Error::PauseTimedOut { parked: 1, vcpus: 4, waited: Duration::from_secs(5) };
        assert_eq!(paused.to_string(), "only 1 of 4 vCPUs paused within 5 s");
        let io = Error::io("control socket /x", std::io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(io.to_string(), "control socket /x: Permission denied (os error 13)");
        assert!(std::error::Error::source(&io).is_some(), "the cause is kept");
        let wire = Error::from(WireError::BadMagic);
        assert_eq!(wire.to_string(), "migration: not a Drover migration stream (bad magic)");
    }
}
