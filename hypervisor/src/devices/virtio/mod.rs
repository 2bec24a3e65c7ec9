//! virtio 1.x devices on the virtio-mmio transport ("version 2" registers), as
//! Firecracker and QEMU's microvm give them: a block device per disk image and a
//! network device per tap.
//!
//! - `mmio`: the transport's registers, feature negotiation and status (pure:
//!   no threads, no KVM), and each queue's `virtio-queue` state
//! - `device`: a transport with its device behind one lock, the eventfds that
//!   notify it and the interrupt it raises; the thread that serves its queues
//! - `block`: virtio-blk on a raw image file; `net`: virtio-net on a tap
//! - `state`: what a device saves in snapshots and migrations
//! - `bus`: the VM's devices by slot, built from its configuration
//! - `tap`: opening a tap with a virtio-net header
//!
//! Where they live: device `i` at [`MMIO_BASE`] + `i` × [`MMIO_SIZE`] in the MMIO
//! gap, on IOAPIC pin [`FIRST_IRQ`] + `i`, announced to the guest on its command
//! line (`virtio_mmio.device=4K@0xd0000000:5`, written by linux-loader), as an
//! unmodified Linux reads it.
//!
//! The guest notifies a queue by writing its index to `QueueNotify`; KVM turns that
//! write into an eventfd signal (ioeventfd) where it can, and the vCPU thread does
//! the same itself where it cannot: the device thread sees one kind of event.
//! Interrupts go out through an irqfd. Every write a device makes into guest
//! memory goes through vm-memory, which marks the page in guest RAM's own dirty
//! bitmap (see `memory`).

pub mod block;
pub mod bus;
pub mod device;
pub mod mmio;
pub mod net;
pub mod state;
pub mod tap;

use virtio_queue::Queue;

use crate::memory::GuestRam;

/// Guest-physical base of the first device.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Bytes of MMIO space per device: registers, then its configuration space.
pub const MMIO_SIZE: u64 = 0x1000;
/// IOAPIC pin of the first device (0-4 are the PIT, keyboard, cascade, COM2, COM1).
pub const FIRST_IRQ: u32 = 5;
/// The most devices: IOAPIC pins 5 to 23.
pub const MAX_DEVICES: usize = 19;

/// The queue size every device offers (the driver may pick a smaller one).
pub const QUEUE_SIZE: u16 = 256;

/// The feature every device offers and every driver must accept: virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Where device `index` is: its MMIO base and IRQ.
pub fn slot(index: usize) -> (u64, u32) {
    (MMIO_BASE + index as u64 * MMIO_SIZE, FIRST_IRQ + index as u32)
}

/// What a virtio device does; the transport does the rest.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 network, 2 block).
    fn device_type(&self) -> u32;
    /// The features the device offers, [`VIRTIO_F_VERSION_1`] included.
    fn features(&self) -> u64;
    /// How many queues it has.
    fn queue_count(&self) -> usize;
    /// Reads its configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A driver's write to the configuration space (ignored by devices whose
    /// configuration the driver may not change).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Serves what the driver made available on queue `index`; returns whether
    /// it used any buffer (the driver may then need an interrupt).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, memory: &GuestRam) -> bool;
    /// A host file descriptor the device thread also waits on (a tap's frames).
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// `host_fd` is readable: serve it with the queues; returns whether any
    /// buffer was used.
    fn process_host(&mut self, _queues: &mut [Queue], _memory: &GuestRam) -> bool {
        false
    }
    /// The device is being started (`DRIVER_OK`) or restored running; called
    /// with the negotiated features.
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// A short name for thread names and logs ("block", "net").
    fn name(&self) -> &'static str;
}
