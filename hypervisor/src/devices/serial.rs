//! COM1, a 16550A UART (vm-superio), whose interrupt is KVM's GSI 4 through an eventfd.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the serial interrupt by signalling the eventfd KVM listens on (irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// The serial port with its output.
pub type SerialPort = Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// The legacy IRQ (and KVM GSI) of COM1.
pub const COM1_GSI: u32 = 4;
