//! The exit device through which a guest ends its VM: a write to port 0x501
//! (QEMU's isa-debug-exit default, so the same guest runs under both) powers it
//! off (0) or reports a failure (any other value).

use crate::exit::VmExit;

/// The exit device's port.
pub const EXIT_PORT: u16 = 0x501;

/// The outcome a value written to the exit device stands for.
pub fn from_guest(value: u8) -> VmExit {
    if value == 0 { VmExit::Shutdown } else { VmExit::GuestFailure(value) }
}
