//! Port-I/O devices: the COM1 serial port (vm-superio), the i8042 controller (only
//! its CPU-reset line) and the exit device at port 0x501 (QEMU's isa-debug-exit
//! port, so the same guest runs under both). The PIC, PIT and IOAPIC are KVM's own.

pub mod exit;
pub mod i8042;
pub mod serial;

use std::sync::{Arc, Mutex};

use crate::control::VmControl;

pub use exit::VmExit;

const COM1: std::ops::RangeInclusive<u16> = 0x3f8..=0x3ff;
const I8042: [u16; 2] = [0x60, 0x64];
const EXIT_PORTS: std::ops::RangeInclusive<u16> = exit::EXIT_PORT..=exit::EXIT_PORT + 1;

/// Every port-I/O device, dispatched by port from the vCPU threads.
pub struct PioBus {
    serial: Mutex<serial::SerialPort>,
    control: Arc<VmControl>,
}

impl PioBus {
    pub fn new(serial: serial::SerialPort, control: Arc<VmControl>) -> Self {
        Self { serial: Mutex::new(serial), control }
    }

    /// A guest write to `port`.
    pub fn write(&self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if COM1.contains(&port) {
            if port == *COM1.start() {
                self.control.note_output();
            }
            // An output that fails (a closed pipe, a full disk) must not stop the guest.
            if let Err(e) = self.with_serial(|s| s.write((port - COM1.start()) as u8, value)) {
                tracing::debug!("serial output: {e:?}");
            }
        } else if I8042.contains(&port) {
            if let Some(exit) = i8042::write(port, value) {
                self.control.end(exit);
            }
        } else if EXIT_PORTS.contains(&port) {
            self.control.end(exit::from_guest(value));
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

    fn with_serial<T>(&self, f: impl FnOnce(&mut serial::SerialPort) -> T) -> T {
        // A vCPU that panicked while holding the lock leaves the serial state usable.
        let mut serial = self.serial.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut serial)
    }
}
