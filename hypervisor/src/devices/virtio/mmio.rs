//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2): the
//! registers a driver reads and writes, feature negotiation and the device status
//! state machine, and the queues' configuration. Pure logic: a register access in,
//! an [`Action`] out for the caller (the device's lock holder) to carry out.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};

use super::state::{QueueSnapshot, TransportState};
use super::{QUEUE_SIZE, VIRTIO_F_VERSION_1, VirtioDevice};

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// The virtio-mmio register layout of virtio 1.x.
const VERSION: u32 = 2;
/// Vendor ID: "DRVR" would do, but drivers do not care; QEMU's is "QEMU".
const VENDOR: u32 = 0x5256_5244;

/// What a register write asks of the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// The driver notified queue `n` (only seen where KVM's ioeventfd did not take the write).
    Notify(usize),
    /// The driver set `DRIVER_OK`: start serving the queues.
    Activated,
    /// The driver reset the device.
    Reset,
}

/// One virtio-mmio device: its transport registers and the device behind them.
pub struct Transport {
    pub device: Box<dyn VirtioDevice>,
    pub queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    /// Interrupt status bits (used buffer 1, configuration change 2), as the driver reads them.
    pub interrupt_status: u32,
    config_generation: u32,
}

impl Transport {
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let queues = (0..device.queue_count()).map(|_| new_queue()).collect();
        Self {
            device,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// Whether the driver has started the device (and not reset or failed it).
    pub fn is_active(&self) -> bool {
        self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == VIRTIO_CONFIG_S_DRIVER_OK
    }

    /// The features both sides agreed on.
    pub fn negotiated_features(&self) -> u64 {
        self.driver_features & self.device.features()
    }

    /// A driver's read at `offset` into the device's MMIO window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            return self.device.read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
        }
        // Registers are 32 bits wide and read whole; anything else reads as zero.
        let value = if data.len() == 4 { self.register(offset as u32) } else { 0 };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn register(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    /// A driver's write at `offset` into the device's MMIO window.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            // The configuration may change only while the driver sets the device up.
            if !self.is_active() {
                self.device.write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            }
            return Action::Nothing;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else { return Action::Nothing };
        let value = u32::from_le_bytes(bytes);
        // Queue registers may be written only while the queue is not ready, and
        // features only before FEATURES_OK (virtio 1.x, 2.2 and 4.2.2.2).
        let setting_up = self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        let sel = self.queue_sel as usize;
        let queue = self.queues.get_mut(sel).filter(|q| !q.ready());
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES if setting_up => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                _ => {}
            },
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = queue {
                    q.set_size(value as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.into_iter().for_each(|q| q.set_desc_table_address(Some(value), None)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.into_iter().for_each(|q| q.set_desc_table_address(None, Some(value))),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.into_iter().for_each(|q| q.set_avail_ring_address(Some(value), None)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.into_iter().for_each(|q| q.set_avail_ring_address(None, Some(value))),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.into_iter().for_each(|q| q.set_used_ring_address(Some(value), None)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.into_iter().for_each(|q| q.set_used_ring_address(None, Some(value))),
            VIRTIO_MMIO_QUEUE_NOTIFY if (value as usize) < self.queues.len() && self.is_active() => {
                return Action::Notify(value as usize);
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => return self.set_status(value),
            _ => {}
        }
        Action::Nothing
    }

    /// The device status state machine (virtio 1.x, 3.1.1): bits are added one
    /// step at a time; FEATURES_OK only for an acceptable feature set; 0 resets.
    fn set_status(&mut self, value: u32) -> Action {
        if value == 0 {
            self.reset();
            return Action::Reset;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            // Clearing a bit other than by a reset is not allowed: the driver is confused.
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return Action::Nothing;
        }
        let next = match added {
            VIRTIO_CONFIG_S_ACKNOWLEDGE if self.status == 0 => true,
            VIRTIO_CONFIG_S_DRIVER if self.status == VIRTIO_CONFIG_S_ACKNOWLEDGE => true,
            VIRTIO_CONFIG_S_FEATURES_OK if self.status == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER => {
                // Only features the device offered, and virtio 1.x itself: a
                // legacy driver cannot drive a version-2 transport.
                let offered = self.device.features();
                self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0
            }
            VIRTIO_CONFIG_S_DRIVER_OK
                if self.status
                    == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK =>
            {
                true
            }
            VIRTIO_CONFIG_S_FAILED => true,
            0 => true,
            _ => false,
        };
        if !next {
            // FEATURES_OK refused: the status reads back without it, as the spec
            // asks; any other jump is ignored.
            return Action::Nothing;
        }
        self.status = value;
        if added == VIRTIO_CONFIG_S_DRIVER_OK {
            let features = self.negotiated_features();
            let event_idx = features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
            self.device.activate(features);
            return Action::Activated;
        }
        Action::Nothing
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
    }

    /// The transport's state, for a snapshot or a migration.
    pub fn state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| QueueSnapshot::from(q.state())).collect(),
        }
    }

    /// Restores a state saved by [`Transport::state`] on a device made from the
    /// same configuration; an active device is activated again.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        if state.device_type != self.device.device_type() {
            return Err(format!(
                "saved device type {} where this VM has device type {}",
                state.device_type,
                self.device.device_type()
            ));
        }
        if state.queues.len() != self.queues.len() {
            return Err(format!("saved {} queues where the device has {}", state.queues.len(), self.queues.len()));
        }
        if state.driver_features & !self.device.features() != 0 {
            return Err(format!(
                "saved features {:#x} this device does not offer (it offers {:#x})",
                state.driver_features,
                self.device.features()
            ));
        }
        let queues = state
            .queues
            .iter()
            .map(|q| Queue::try_from(virtio_queue::QueueState::from(q)).map_err(|e| format!("queue state: {e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        if self.is_active() {
            self.device.activate(self.negotiated_features());
        }
        Ok(())
    }
}

fn new_queue() -> Queue {
    // QUEUE_SIZE is a power of two below the 32768 limit: `new` cannot fail.
    Queue::new(QUEUE_SIZE).unwrap_or_else(|_| unreachable!("queue size {QUEUE_SIZE} is valid"))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::memory::GuestRam;

    /// A device with two queues and 8 bytes of configuration; what it was told
    /// (the features it was activated with, how many resets) is shared with the test.
    struct Fake(Seen);

    /// The features the device was activated with, and how many resets it saw.
    type Seen = Arc<Mutex<(Option<u64>, u32)>>;

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 5
        }
        fn queue_count(&self) -> usize {
            2
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let config = 0x1122_3344_5566_7788_u64.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn process_queue(&mut self, _: usize, _: &mut Queue, _: &GuestRam) -> bool {
            false
        }
        fn activate(&mut self, features: u64) {
            self.0.lock().unwrap().0 = Some(features);
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().1 += 1;
        }
        fn name(&self) -> &'static str {
            "fake"
        }
    }

    fn transport_and_seen() -> (Transport, Seen) {
        let seen = Arc::new(Mutex::new((None, 0)));
        (Transport::new(Box::new(Fake(seen.clone()))), seen)
    }

    fn transport() -> Transport {
        transport_and_seen().0
    }

    fn read(t: &Transport, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        t.read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut Transport, offset: u32, value: u32) -> Action {
        t.write(u64::from(offset), &value.to_le_bytes())
    }

    /// The driver's side of start-up (virtio 1.x, 3.1.1), up to FEATURES_OK.
    fn negotiate(t: &mut Transport, features: u64) -> u32 {
        write(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        write(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        read(t, VIRTIO_MMIO_STATUS)
    }

    const UP_TO_FEATURES_OK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;

    #[test]
    fn identity_registers_read_as_a_version_2_device() {
        let t = transport();
        assert_eq!(read(&t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read(&t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read(&t, VIRTIO_MMIO_DEVICE_ID), 2);
        assert_eq!(read(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        let mut t = t;
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(read(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no queue 2");
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&t, VIRTIO_MMIO_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(read(&t, VIRTIO_MMIO_DEVICE_FEATURES), 1 << 5);
        let mut short = [0xffu8; 2];
        t.read(0, &mut short);
        assert_eq!(short, [0, 0], "registers are read 32 bits at a time");
    }

    #[test]
    fn configuration_space_reads_at_any_width() {
        let t = transport();
        let mut byte = [0u8];
        t.read(0x100 + 1, &mut byte);
        assert_eq!(byte, [0x77]);
        let mut word = [0u8; 8];
        t.read(0x100, &mut word);
        assert_eq!(u64::from_le_bytes(word), 0x1122_3344_5566_7788);
        let mut past = [0xffu8; 4];
        t.read(0x100 + 6, &mut past);
        assert_eq!(past, [0x22, 0x11, 0, 0]);
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_features() {
        let mut t = transport();
        assert_eq!(negotiate(&mut t, 1 << 5), VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER, "legacy driver");
        write(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 7), 3, "feature 7 was never offered");
        write(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 5), UP_TO_FEATURES_OK);
        assert_eq!(t.negotiated_features(), VIRTIO_F_VERSION_1 | 1 << 5);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(t.negotiated_features(), VIRTIO_F_VERSION_1 | 1 << 5, "features are fixed after FEATURES_OK");
    }

    #[test]
    fn status_moves_one_step_at_a_time_and_0_resets() {
        let (mut t, seen) = transport_and_seen();
        assert_eq!(write(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER_OK), Action::Nothing);
        assert_eq!(read(&t, VIRTIO_MMIO_STATUS), 0, "DRIVER_OK before ACKNOWLEDGE is ignored");
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert_eq!(write(&mut t, VIRTIO_MMIO_STATUS, UP_TO_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK), Action::Activated);
        assert!(t.is_active());
        assert_eq!(seen.lock().unwrap().0, Some(VIRTIO_F_VERSION_1));
        assert_eq!(write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1), Action::Notify(1));
        assert_eq!(write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 2), Action::Nothing, "no queue 2");
        assert_eq!(write(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE), Action::Nothing);
        assert_eq!(read(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FAILED, "bits cleared");
        assert!(!t.is_active());
        assert_eq!(write(&mut t, VIRTIO_MMIO_STATUS, 0), Action::Reset);
        assert_eq!(read(&t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(seen.lock().unwrap().1, 1, "the device saw the reset");
        assert_eq!(
            write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0),
            Action::Nothing,
            "a reset device takes no notifications"
        );
    }

    #[test]
    fn queue_setup_holds_until_ready_and_interrupts_are_acked() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 64);
        write(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10_0000);
        write(&mut t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 1);
        write(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x10_1000);
        write(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x10_2000);
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read(&t, VIRTIO_MMIO_QUEUE_READY), 1);
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 32);
        let q = &t.queues[1];
        assert_eq!(
            (q.size(), q.desc_table(), q.avail_ring(), q.used_ring()),
            (64, 0x1_0010_0000, 0x10_1000, 0x10_2000)
        );
        assert!(!t.queues[0].ready());

        t.interrupt_status = 3;
        assert_eq!(read(&t, VIRTIO_MMIO_INTERRUPT_STATUS), 3);
        write(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(read(&t, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
    }

    #[test]
    fn state_round_trips_and_reactivates_an_active_device() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 5);
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        write(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x4000);
        write(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x5000);
        write(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x6000);
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        write(&mut t, VIRTIO_MMIO_STATUS, UP_TO_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        t.queues[0].set_next_avail(7);
        t.queues[0].set_next_used(5);
        let state = t.state();

        let (mut restored, seen) = transport_and_seen();
        restored.restore(&state).unwrap();
        assert_eq!(restored.state(), state);
        assert!(restored.is_active());
        assert_eq!(seen.lock().unwrap().0, Some(VIRTIO_F_VERSION_1 | 1 << 5), "activated again");
        assert_eq!((restored.queues[0].next_avail(), restored.queues[0].next_used()), (7, 5));

        let mut wrong = state.clone();
        wrong.device_type = 1;
        assert!(transport().restore(&wrong).unwrap_err().contains("device type 1"));
        let mut wrong = state;
        wrong.queues[0].size = 3;
        assert!(transport().restore(&wrong).unwrap_err().contains("queue state"), "size not a power of two");
    }
}
