//! Port-I/O devices: the COM1 serial port (vm-superio), the i8042 controller (its
//! CPU-reset line, and a keyboard that types Ctrl+Alt+Del when the control API asks)
//! and the exit device at port 0x501 (QEMU's isa-debug-exit port, so the same guest
//! runs under both). The PIC, PIT and IOAPIC are KVM's own; the serial port and the
//! keyboard raise their IRQs through irqfds ([`IrqTrigger`]).
//!
//! Devices know nothing of the VMM around them: a device that ends the VM (a reset,
//! the guest's exit) sends its outcome down the VMM's exit channel, as Firecracker's
//! i8042 signals its reset eventfd, and the serial port notes the guest's first
//! output in a cell of its own. Whoever reads them holds the bus, never the reverse.

pub mod debug_exit;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::Error;
use crate::exit::VmExit;

/// Raises a device's interrupt by signalling the eventfd KVM listens on (an irqfd
/// on the device's GSI: KVM pulses the line, an edge, as ISA devices signal).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// The keyboard controller with its interrupt.
pub type Keyboard = i8042::I8042<IrqTrigger>;

const COM1: std::ops::RangeInclusive<u16> = 0x3f8..=0x3ff;
const I8042: [u16; 2] = [0x60, 0x64];
const EXIT_PORTS: std::ops::RangeInclusive<u16> = debug_exit::EXIT_PORT..=debug_exit::EXIT_PORT + 1;

/// Every port-I/O device, dispatched by port from the vCPU threads.
pub struct PioBus {
    serial: Mutex<serial::SerialPort>,
    keyboard: Mutex<Keyboard>,
    /// When the guest first wrote to COM1 (its boot time, as the control API reports it).
    first_output: Arc<serial::FirstOutput>,
    /// Where a device that ends the VM says so.
    exits: Sender<VmExit>,
}

impl PioBus {
    pub fn new(
        serial: serial::SerialPort,
        keyboard: Keyboard,
        first_output: Arc<serial::FirstOutput>,
        exits: Sender<VmExit>,
    ) -> Self {
        Self { serial: Mutex::new(serial), keyboard: Mutex::new(keyboard), first_output, exits }
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
            if let Some(exit) = self.with_keyboard(|k| k.write(port, value)) {
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
            self.with_keyboard(|k| k.read(port))
        } else {
            0xff
        };
        data.fill(value);
    }

    /// The serial port's state, for snapshots and migration.
    pub fn serial_state(&self) -> crate::state::SerialState {
        self.with_serial(|s| (&s.state()).into())
    }

    /// Types Ctrl+Alt+Del on the guest's keyboard (the control API's request to
    /// shut down); refused while the guest has not read the keys typed before.
    pub fn ctrl_alt_del(&self) -> Result<(), Error> {
        self.with_keyboard(|k| k.ctrl_alt_del()).map_err(|i8042::BufferFull| Error::KeyboardFull)
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

    fn with_keyboard<T>(&self, f: impl FnOnce(&mut Keyboard) -> T) -> T {
        // As for the serial port: every operation leaves the controller consistent.
        let mut keyboard = self.keyboard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut keyboard)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn bus_with_keyboard_irq() -> (PioBus, mpsc::Receiver<VmExit>, Arc<serial::FirstOutput>, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out: Box<dyn std::io::Write + Send> = Box::new(std::io::sink());
        let serial = vm_superio::Serial::new(IrqTrigger(irq), out);
        let keyboard_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let keyboard = i8042::I8042::new(IrqTrigger(keyboard_irq.try_clone().unwrap()));
        let (exits, events) = mpsc::channel();
        let first = Arc::new(serial::FirstOutput::default());
        (PioBus::new(serial, keyboard, first.clone(), exits), events, first, keyboard_irq)
    }

    fn bus() -> (PioBus, mpsc::Receiver<VmExit>, Arc<serial::FirstOutput>) {
        let (bus, events, first, _) = bus_with_keyboard_irq();
        (bus, events, first)
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
    fn ctrl_alt_del_reaches_the_guest_through_the_ports_and_irq_1() {
        let (bus, events, _, irq) = bus_with_keyboard_irq();
        let read = |port| {
            let mut value = [0u8];
            bus.read(port, &mut value);
            value[0]
        };
        assert_eq!(read(0x64) & 1, 0, "nothing to read");
        bus.ctrl_alt_del().unwrap();
        assert_eq!(irq.read().unwrap(), 1, "IRQ 1 raised");
        assert_eq!(read(0x64) & 1, 1, "output buffer full");
        assert_eq!(read(0x60), 0x14, "Ctrl pressed, in scan code set 2");
        assert!(matches!(bus.ctrl_alt_del(), Err(Error::KeyboardFull)), "10 bytes still unread");
        while read(0x64) & 1 != 0 {
            read(0x60);
        }
        bus.ctrl_alt_del().unwrap();
        assert!(events.try_recv().is_err(), "typing ends nothing");
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
