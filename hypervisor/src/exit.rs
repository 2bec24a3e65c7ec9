//! How a VM ends: the outcomes its vCPUs, devices, control API and migrations
//! report (each through the VMM's one exit channel), and the process exit status
//! each stands for.

pub use drover_vmm_api::ExitStatus;

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (wrote 0 to the exit device).
    Shutdown,
    /// The VM was powered off through the control API.
    PoweredOff,
    /// The guest asked for a reset (i8042 CPU reset, or a KVM reset event).
    Reset,
    /// The guest reported a failure: a non-zero value written to the exit device
    /// (the test guest writes 1..0x7f for workload failures, 0x80 + vector for an
    /// exception it could not handle).
    GuestFailure(u8),
    /// The guest crashed in a way the CPU or KVM reports (triple fault, emulation
    /// failure, failed VM entry).
    Fault(String),
    /// The VM moved to another host by live migration (to this address).
    MigratedOut(String),
    /// The VMM itself failed while running (a KVM ioctl error).
    VmmError(String),
}

impl VmExit {
    /// The process exit status for this outcome (documented in the README).
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            VmExit::Shutdown | VmExit::PoweredOff => ExitStatus::PoweredOff,
            VmExit::VmmError(_) => ExitStatus::VmmError,
            VmExit::Reset => ExitStatus::Reset,
            VmExit::Fault(_) => ExitStatus::GuestFault,
            VmExit::GuestFailure(_) => ExitStatus::GuestFailure,
            VmExit::MigratedOut(_) => ExitStatus::MigratedOut,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Shutdown => write!(f, "guest shut down"),
            VmExit::PoweredOff => write!(f, "powered off through the control API"),
            VmExit::Reset => write!(f, "guest requested a reset"),
            VmExit::GuestFailure(v) if *v >= 0x80 => {
                write!(f, "guest reported an unhandled exception (vector {})", v - 0x80)
            }
            VmExit::GuestFailure(v) => write!(f, "guest reported failure {v}"),
            VmExit::Fault(why) => write!(f, "guest fault: {why}"),
            VmExit::VmmError(why) => write!(f, "VMM error: {why}"),
            VmExit::MigratedOut(to) => write!(f, "migrated to {to}; the VM runs there"),
        }
    }
}
