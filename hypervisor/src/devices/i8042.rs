//! The i8042 keyboard controller, as far as a VM needs it: the CPU-reset command
//! (0xfe on port 0x64) that Linux and BIOSes use to reboot.

use crate::exit::VmExit;

const COMMAND_PORT: u16 = 0x64;
const CMD_RESET_CPU: u8 = 0xfe;

/// A write to the controller; `Some` when it asks for a reset.
pub fn write(port: u16, value: u8) -> Option<VmExit> {
    (port == COMMAND_PORT && value == CMD_RESET_CPU).then_some(VmExit::Reset)
}

/// A read: the status register says "no data, ready for commands"; data reads 0.
pub fn read(_port: u16) -> u8 {
    0
}
