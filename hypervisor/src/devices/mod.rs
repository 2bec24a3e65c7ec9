//! Port-I/O devices: the COM1 serial port (vm-superio), the i8042 controller (only
//! its CPU-reset line) and the exit device at port 0x501 (QEMU's isa-debug-exit
//! port, so the same guest runs under both). The PIC, PIT and IOAPIC are KVM's own.
//!
//! Devices know nothing of the VMM around them: a device that ends the VM (a reset,
//! the guest's exit) sends its outcome down the VMM's exit channel, as Firecracker's
//! i8042 signals its reset eventfd, and the serial port notes the guest's first
//! output in a cell of its own. Whoever reads them holds the bus, never the reverse.

pub mod debug_exit;
pub mod i8042;
pub mod serial;

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use crate::exit::VmExit;

const COM1: std::ops::RangeInclusive<u16> = 0x3f8..=0x3ff;
const I8042: [u16; 2] = [0x60, 0x64];
const EXIT_PORTS: std::ops::RangeInclusive<u16> = debug_exit::EXIT_PORT..=debug_exit::EXIT_PORT + 1;

/// Every port-I/O device, dispatched by port from the vCPU threads.
pub struct PioBus {
    serial: Mutex<serial::SerialPort>,
    /// When the guest first wrote to COM1 (its boot time, as the control API reports it).
    first_output: Arc<serial::FirstOutput>,
    /// Where a device that ends the VM says so.
    exits: Sender<VmExit>,
}

impl PioBus {
    pub fn new(serial: serial::SerialPort, first_output: Arc<serial::FirstOutput>, exits: Sender<VmExit>) -> Self {
        Self { serial: Mutex::new(serial), first_output, exits }
    }

    /// A guest write to `port`.
    pub fn write(&self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if COM1.contains(&port) {
            if port == *COM1.start() {
                self.first_output.note();
            }
            // An output that fails (a closed pipe, a full disk) must not stop the guest.
            if let Err(e) = self.with_serial(|s| s.write((port - COM1.start()) as u8, value)) {
                tracing::debug!("serial output: {e:?}");
            }
        } else if I8042.contains(&port) {
            if let Some(exit) = i8042::write(port, value) {
                self.end(exit);
            }
        } else if EXIT_PORTS.contains(&port) {
            self.end(debug_exit::from_guest(value));
        }
        // Other ports (POST code 0x80, probes of absent hardware) are ignored, as on a PC.
    }

    /// A guest read from `port`; absent devices float high (0xff), as on a PC.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let value = if COM1.contains(&port) {
            self.with_serial(|s| s.read((port - COM1.start()) as u8))
        } else if I8042.contains(&port) {
            i8042::read(port)
        } else {
            0xff
        };
        data.fill(value);
    }

    /// The serial port's state, for snapshots and migration.
    pub fn serial_state(&self) -> crate::state::SerialState {
        self.with_serial(|s| (&s.state()).into())
    }

    fn end(&self, exit: VmExit) {
        // No receiver means the VM has ended already, for another reason.
        let _ = self.exits.send(exit);
    }

    fn with_serial<T>(&self, f: impl FnOnce(&mut serial::SerialPort) -> T) -> T {
        // A vCPU that panicked while holding the lock leaves the serial state usable.
        let mut serial = self.serial.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut serial)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn bus() -> (PioBus, mpsc::Receiver<VmExit>, Arc<serial::FirstOutput>) {
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out: Box<dyn std::io::Write + Send> = Box::new(std::io::sink());
        let serial = vm_superio::Serial::new(serial::IrqTrigger(irq), out);
        let (exits, events) = mpsc::channel();
        let first = Arc::new(serial::FirstOutput::default());
        (PioBus::new(serial, first.clone(), exits), events, first)
    }

    #[test]
    fn devices_that_end_the_vm_say_so_on_the_exit_channel() {
        let (bus, events, _) = bus();
        bus.write(0x80, &[1]); // a POST code: nothing
        assert!(events.try_recv().is_err());
        bus.write(0x64, &[0xfe]);
        assert_eq!(events.try_recv().unwrap(), VmExit::Reset);
        bus.write(debug_exit::EXIT_PORT, &[0]);
        assert_eq!(events.try_recv().unwrap(), VmExit::Shutdown);
        bus.write(debug_exit::EXIT_PORT, &[3]);
        assert_eq!(events.try_recv().unwrap(), VmExit::GuestFailure(3));
    }

    #[test]
    fn the_first_serial_byte_is_timed_once() {
        let (bus, _, first) = bus();
        assert!(first.at().is_none());
        bus.write(0x3f9, &[0]); // interrupt enable: not output
        assert!(first.at().is_none());
        bus.write(0x3f8, b"a");
        let at = first.at().unwrap();
        bus.write(0x3f8, b"b");
        assert_eq!(first.at(), Some(at));
    }
}
