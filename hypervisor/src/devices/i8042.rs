//! The i8042 keyboard controller, as far as a VM needs it: the CPU-reset command
//! (0xfe on port 0x64) that Linux and BIOSes use to reboot, and a keyboard that
//! types one thing, Ctrl+Alt+Del, when the control API asks (`PUT /vm/ctrl-alt-del`):
//! the VMM's way to ask a guest to shut down, as Firecracker's `SendCtrlAltDel`.
//!
//! Why a keyboard rather than an ACPI power button: the button needs a FADT and a
//! DSDT (the VMM writes neither, only RSDP/XSDT/MADT), PM1 event registers, an SCI
//! and AML for the guest's interpreter, several times this device, and a guest
//! without ACPI (the test guest) could not see it. Every PC guest has an i8042
//! driver, and Linux turns Ctrl+Alt+Del into `ctrl-alt-del.target` under systemd
//! (a reboot by default, which the VMM ends with the reset exit; a poweroff if the
//! guest is set up so), or into an immediate reboot before its init took over.
//!
//! The emulation is Firecracker's subset: the status register, the controller
//! command byte (CTR), the output port, self tests, a 16-byte output buffer and a
//! keyboard that acknowledges every command, answers reset and identify, and types
//! scan code set 2 (set 1 when the guest turned translation on in the CTR). A Linux
//! guest needs `i8042.nopnp` (the VMM's ACPI tables describe no PS/2 devices) and is
//! best given `i8042.noaux i8042.nomux i8042.dumbkbd`, as Firecracker's guests are:
//! there is no mouse and no multiplexer to probe. Bytes for the guest raise IRQ 1
//! (through an irqfd, as the serial port's IRQ 4) when the CTR enables it; controller
//! replies do not, as guests poll for those.
//!
//! The controller's state is not part of the saved VM state: a restored or migrated
//! VM gets a fresh controller, whose defaults are what Linux leaves in the CTR anyway
//! (keyboard interrupt on, no translation). A key sequence queued but not yet read
//! would be lost on the way, which is why the control API refuses Ctrl+Alt+Del while
//! a migration is under way.

use std::collections::VecDeque;

use vm_superio::Trigger;

use crate::exit::VmExit;

/// The legacy IRQ (and KVM GSI) of the keyboard.
pub const KEYBOARD_GSI: u32 = 1;

const DATA_PORT: u16 = 0x60;
const COMMAND_PORT: u16 = 0x64;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
/// The last write went to the command port (its parameter is due on the data port).
const STATUS_COMMAND: u8 = 0x08;
/// The keyboard is not inhibited (the key lock of old PCs).
const STATUS_KBD_UNLOCKED: u8 = 0x10;

// Controller command byte bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_TRANSLATE: u8 = 0x40;

// Keyboard commands (port 0x60) and replies.
const KBD_ECHO: u8 = 0xee;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
/// What an MF2 keyboard answers to identify.
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Ctrl, Alt and Delete pressed, then released in reverse order, in scan code set
/// 2. The keys are released as a real keyboard does: a guest left with Ctrl and Alt
/// held would misread any later key, and each later request would not be a new press.
const CTRL_ALT_DEL_SET2: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];
/// The same in set 1, what the guest reads when it asked the controller to translate.
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// Size of the output buffer (Firecracker's; a whole Ctrl+Alt+Del fits).
const BUFFER: usize = 16;

/// Ctrl+Alt+Del did not fit: the guest has not read the keys sent before.
#[derive(Debug, PartialEq, Eq)]
pub struct BufferFull;

/// The controller and its keyboard; `T` raises IRQ 1.
pub struct I8042<T: Trigger> {
    status: u8,
    control: u8,
    output_port: u8,
    /// The controller command whose parameter the next data-port write is.
    awaiting_parameter: Option<u8>,
    output: VecDeque<u8>,
    irq: T,
}

impl<T: Trigger> I8042<T> {
    /// A controller as firmware leaves it: keyboard interrupt on, no translation.
    pub fn new(irq: T) -> Self {
        Self {
            status: STATUS_KBD_UNLOCKED,
            control: CTR_KBD_INT | CTR_SYSTEM_FLAG,
            // Bit 0: the CPU is not held in reset; bit 1: the A20 gate is open.
            output_port: 0x03,
            awaiting_parameter: None,
            output: VecDeque::with_capacity(BUFFER),
            irq,
        }
    }

    /// A guest write to port 0x60 or 0x64; `Some` when it asks for a reset.
    pub fn write(&mut self, port: u16, value: u8) -> Option<VmExit> {
        match port {
            COMMAND_PORT => return self.command(value),
            DATA_PORT => match self.awaiting_parameter.take() {
                Some(command) => {
                    self.status &= !STATUS_COMMAND;
                    match command {
                        CMD_WRITE_CTR => self.control = value,
                        CMD_WRITE_OUTPUT_PORT => self.output_port = value,
                        _ => {}
                    }
                }
                None => self.keyboard_command(value),
            },
            _ => {}
        }
        None
    }

    /// A guest read: the status register (0x64) or the next output byte (0x60;
    /// 0 when there is none).
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            COMMAND_PORT => self.status,
            DATA_PORT => {
                let value = self.output.pop_front().unwrap_or(0);
                self.sync_status();
                // A guest reads one byte per interrupt (Linux does): tell it of the next.
                if !self.output.is_empty() {
                    self.interrupt();
                }
                value
            }
            _ => 0,
        }
    }

    /// Types Ctrl+Alt+Del, in the scan code set the guest reads.
    pub fn ctrl_alt_del(&mut self) -> Result<(), BufferFull> {
        let keys: &[u8] = if self.control & CTR_TRANSLATE != 0 { &CTRL_ALT_DEL_SET1 } else { &CTRL_ALT_DEL_SET2 };
        // All or nothing: half a sequence (Ctrl and Alt held) would confuse the guest.
        if BUFFER - self.output.len() < keys.len() {
            return Err(BufferFull);
        }
        self.output.extend(keys);
        self.sync_status();
        self.interrupt();
        Ok(())
    }

    fn command(&mut self, command: u8) -> Option<VmExit> {
        self.status |= STATUS_COMMAND;
        self.awaiting_parameter = None;
        match command {
            CMD_RESET_CPU => return Some(VmExit::Reset),
            CMD_READ_CTR => self.reply(self.control),
            CMD_READ_OUTPUT_PORT => self.reply(self.output_port),
            CMD_SELF_TEST => self.reply(0x55),
            CMD_KBD_TEST => self.reply(0x00),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.awaiting_parameter = Some(command),
            CMD_KBD_DISABLE => self.control |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.control &= !CTR_KBD_DISABLED,
            // Other commands (the mouse port, passwords, ...) do nothing here.
            _ => {}
        }
        None
    }

    /// A controller reply: the only byte to read next, with no interrupt (guests
    /// poll the status register for it).
    fn reply(&mut self, value: u8) {
        self.output.clear();
        self.output.push_back(value);
        self.sync_status();
    }

    /// A byte written to the keyboard itself: a command it acknowledges (the
    /// parameters of LED, rate and scan-set commands are acknowledged the same way).
    fn keyboard_command(&mut self, command: u8) {
        self.status &= !STATUS_COMMAND;
        self.output.clear();
        match command {
            KBD_ECHO => self.output.push_back(KBD_ECHO),
            KBD_RESET => self.output.extend([KBD_ACK, KBD_SELF_TEST_PASSED]),
            KBD_IDENTIFY => self.output.extend([KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            _ => self.output.push_back(KBD_ACK),
        }
        self.sync_status();
        self.interrupt();
    }

    fn sync_status(&mut self) {
        if self.output.is_empty() {
            self.status &= !STATUS_OUTPUT_FULL;
        } else {
            self.status |= STATUS_OUTPUT_FULL;
        }
    }

    fn interrupt(&self) {
        if self.control & CTR_KBD_INT != 0 {
            // A lost edge only delays the guest until it next polls the status.
            if self.irq.trigger().is_err() {
                tracing::debug!("i8042: cannot raise IRQ 1");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;

    /// Counts the interrupts raised.
    #[derive(Clone, Default)]
    struct Count(Rc<Cell<u32>>);

    impl Trigger for Count {
        type E = std::io::Error;
        fn trigger(&self) -> Result<(), Self::E> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }
    }

    fn controller() -> (I8042<Count>, Count) {
        let count = Count::default();
        (I8042::new(count.clone()), count)
    }

    /// Everything the guest can read now, as it would: while the status says full.
    fn drain(dev: &mut I8042<Count>) -> Vec<u8> {
        let mut out = Vec::new();
        while dev.read(COMMAND_PORT) & STATUS_OUTPUT_FULL != 0 {
            out.push(dev.read(DATA_PORT));
        }
        out
    }

    #[test]
    fn the_reset_command_resets_and_nothing_else_does() {
        let (mut dev, _) = controller();
        for command in [CMD_READ_CTR, CMD_SELF_TEST, 0xfd, 0x00] {
            assert_eq!(dev.write(COMMAND_PORT, command), None, "{command:#x}");
        }
        assert_eq!(dev.write(DATA_PORT, CMD_RESET_CPU), None, "0xfe to the keyboard is a command for it");
        assert_eq!(dev.write(COMMAND_PORT, CMD_RESET_CPU), Some(VmExit::Reset));
    }

    #[test]
    fn controller_commands_answer_without_an_interrupt() {
        // (command, parameter written to 0x60, what the guest then reads)
        let cases: [(u8, Option<u8>, Vec<u8>); 5] = [
            (CMD_READ_CTR, None, vec![CTR_KBD_INT | CTR_SYSTEM_FLAG]),
            (CMD_READ_OUTPUT_PORT, None, vec![0x03]),
            (CMD_SELF_TEST, None, vec![0x55]),
            (CMD_KBD_TEST, None, vec![0x00]),
            (CMD_WRITE_CTR, Some(0x45), vec![]),
        ];
        for (command, parameter, reply) in cases {
            let (mut dev, irqs) = controller();
            dev.write(COMMAND_PORT, command);
            if let Some(p) = parameter {
                assert_ne!(dev.read(COMMAND_PORT) & STATUS_COMMAND, 0, "{command:#x} awaits its parameter");
                dev.write(DATA_PORT, p);
                assert_eq!(dev.read(COMMAND_PORT) & STATUS_COMMAND, 0);
            }
            assert_eq!(drain(&mut dev), reply, "{command:#x}");
            assert_eq!(irqs.0.get(), 0, "{command:#x}");
        }
    }

    #[test]
    fn the_command_byte_and_output_port_keep_what_the_guest_writes() {
        let (mut dev, _) = controller();
        dev.write(COMMAND_PORT, CMD_WRITE_CTR);
        dev.write(DATA_PORT, 0x61);
        dev.write(COMMAND_PORT, CMD_READ_CTR);
        assert_eq!(drain(&mut dev), [0x61]);
        dev.write(COMMAND_PORT, CMD_WRITE_OUTPUT_PORT);
        dev.write(DATA_PORT, 0xdf);
        dev.write(COMMAND_PORT, CMD_READ_OUTPUT_PORT);
        assert_eq!(drain(&mut dev), [0xdf]);
        dev.write(COMMAND_PORT, CMD_KBD_DISABLE);
        dev.write(COMMAND_PORT, CMD_READ_CTR);
        assert_eq!(drain(&mut dev), [0x61 | CTR_KBD_DISABLED]);
        dev.write(COMMAND_PORT, CMD_KBD_ENABLE);
        dev.write(COMMAND_PORT, CMD_READ_CTR);
        assert_eq!(drain(&mut dev), [0x61]);
    }

    #[test]
    fn the_keyboard_acknowledges_commands_and_says_who_it_is() {
        // (byte sent to the keyboard, what it answers)
        let cases: [(u8, &[u8]); 5] = [
            (KBD_RESET, &[KBD_ACK, KBD_SELF_TEST_PASSED]),
            (KBD_IDENTIFY, &[KBD_ACK, 0xab, 0x83]),
            (KBD_ECHO, &[KBD_ECHO]),
            (0xed, &[KBD_ACK]), // set LEDs
            (0x02, &[KBD_ACK]), // a parameter (the LEDs, a scan code set)
        ];
        for (byte, reply) in cases {
            let (mut dev, irqs) = controller();
            dev.write(DATA_PORT, byte);
            assert_eq!(drain(&mut dev), reply, "{byte:#x}");
            // One interrupt for the reply, one more for each further byte.
            assert_eq!(irqs.0.get() as usize, reply.len(), "{byte:#x}");
        }
    }

    #[test]
    fn ctrl_alt_del_is_typed_in_the_guests_scan_code_set_with_an_interrupt_per_byte() {
        // (controller command byte, what the guest reads, interrupts)
        let cases: [(u8, &[u8], u32); 3] = [
            (CTR_KBD_INT | CTR_SYSTEM_FLAG, &CTRL_ALT_DEL_SET2, 11),
            (CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_TRANSLATE, &CTRL_ALT_DEL_SET1, 8),
            // Interrupts off: the guest polls and still finds the keys.
            (CTR_SYSTEM_FLAG, &CTRL_ALT_DEL_SET2, 0),
        ];
        for (control, keys, interrupts) in cases {
            let (mut dev, irqs) = controller();
            dev.write(COMMAND_PORT, CMD_WRITE_CTR);
            dev.write(DATA_PORT, control);
            assert_eq!(dev.read(COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
            dev.ctrl_alt_del().unwrap();
            assert_eq!(drain(&mut dev), keys, "{control:#x}");
            assert_eq!(irqs.0.get(), interrupts, "{control:#x}");
            assert_eq!(dev.read(DATA_PORT), 0, "an empty buffer reads 0");
        }
        assert_eq!(&CTRL_ALT_DEL_SET2[..4], [0x14, 0x11, 0xe0, 0x71], "Ctrl, Alt, Delete pressed");
    }

    #[test]
    fn ctrl_alt_del_is_refused_whole_when_the_guest_does_not_read() {
        let (mut dev, _) = controller();
        dev.ctrl_alt_del().unwrap();
        assert_eq!(dev.ctrl_alt_del(), Err(BufferFull), "11 of 16 bytes unread");
        assert_eq!(drain(&mut dev).len(), CTRL_ALT_DEL_SET2.len(), "nothing half-written");
        dev.ctrl_alt_del().unwrap();
    }
}
