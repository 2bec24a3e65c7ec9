//! `drover-vmm`'s exit statuses: how one VMM process ended, as the VMM sets it and
//! as the agent (through the VM's monitor) reads it back.

use serde::{Deserialize, Serialize};

/// How a `drover-vmm` process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExitStatus {
    /// 0: the guest shut down, or the VM was powered off through the API.
    PoweredOff,
    /// 1: the VMM failed (no `/dev/kvm`, a kernel it cannot load, a configuration
    /// it refuses, a KVM error while running); its log's last line says what.
    VmmError,
    /// 2: the command line was wrong (unknown flag, missing argument).
    Usage,
    /// 3: the guest asked for a reset (a reboot).
    Reset,
    /// 4: the guest crashed in a way the CPU or KVM reports (triple fault,
    /// emulation failure, failed VM entry).
    GuestFault,
    /// 5: the guest reported a failure through the exit port (0x501).
    GuestFailure,
    /// 6: the VM moved to another host by live migration and runs there.
    MigratedOut,
}

impl ExitStatus {
    /// Every status, in code order.
    pub const ALL: [ExitStatus; 7] = [
        Self::PoweredOff,
        Self::VmmError,
        Self::Usage,
        Self::Reset,
        Self::GuestFault,
        Self::GuestFailure,
        Self::MigratedOut,
    ];

    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Self::PoweredOff => 0,
            Self::VmmError => 1,
            Self::Usage => 2,
            Self::Reset => 3,
            Self::GuestFault => 4,
            Self::GuestFailure => 5,
            Self::MigratedOut => 6,
        }
    }

    /// The status an exit code stands for; `None` for codes `drover-vmm` never uses.
    pub fn from_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| i32::from(s.code()) == code)
    }

    /// What it means, in words, for status messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::PoweredOff => "guest powered off",
            Self::VmmError => "VMM error (see the VMM log)",
            Self::Usage => "VMM refused its command line (see the VMM log)",
            Self::Reset => "guest reset",
            Self::GuestFault => "guest fault (triple fault or internal error)",
            Self::GuestFailure => "guest reported a failure",
            Self::MigratedOut => "migrated away",
        }
    }

    /// The VMM ended as intended: the guest powered off or the VM moved away.
    pub fn is_success(self) -> bool {
        matches!(self, Self::PoweredOff | Self::MigratedOut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_distinct() {
        for status in ExitStatus::ALL {
            assert_eq!(ExitStatus::from_code(i32::from(status.code())), Some(status));
        }
        let codes: std::collections::BTreeSet<u8> = ExitStatus::ALL.iter().map(|s| s.code()).collect();
        assert_eq!(codes, (0..=6).collect());
        assert_eq!(ExitStatus::from_code(7), None);
        assert_eq!(ExitStatus::from_code(-1), None);
    }

    #[test]
    fn code_2_is_the_command_line_as_clap_reports_it() {
        // clap exits with 2 on a usage error; the VMM's own refusals are 1.
        assert_eq!(ExitStatus::from_code(2), Some(ExitStatus::Usage));
        assert!(ExitStatus::Usage.describe().contains("command line"));
    }
}
