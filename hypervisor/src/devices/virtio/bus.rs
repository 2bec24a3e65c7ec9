//! The VM's virtio devices on the MMIO bus: made from its configuration (disks
//! first, then NICs, each in its [`slot`]), wired to KVM (an irqfd per device, an
//! ioeventfd per queue where KVM takes them), dispatched from the vCPUs' MMIO
//! exits, and paused, saved and restored together.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vmm_sys_util::eventfd::EventFd;

use super::block::Block;
use super::device::MmioDevice;
use super::net::{Announcer, Net};
use super::state::DeviceState;
use super::{MMIO_BASE, MMIO_SIZE, VirtioDevice, slot};
use crate::Error;
use crate::config::VmConfig;
use crate::memory::GuestRam;

/// Every virtio device of a VM, by slot.
#[derive(Default)]
pub struct MmioBus {
    devices: Vec<Arc<MmioDevice>>,
    /// Each NIC's tap and MAC, to announce it.
    announcers: Vec<Announcer>,
    /// Whether KVM takes queue notifications as ioeventfds (else each is a vCPU exit).
    pub ioeventfds: bool,
}

impl MmioBus {
    /// Opens every disk and tap of `config` and puts each on the bus. Nothing
    /// runs yet: [`MmioBus::start`] starts the device threads.
    pub fn build(config: &VmConfig, vm: &VmFd, memory: &GuestRam) -> Result<Self, Error> {
        let mut devices: Vec<(Box<dyn VirtioDevice>, String)> = Vec::new();
        let mut announcers = Vec::new();
        for (i, disk) in config.disks.iter().enumerate() {
            let id = if disk.id.is_empty() {
                disk.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            } else {
                disk.id.clone()
            };
            let block = Block::open(&disk.path, disk.read_only, &id)
                .map_err(|e| Error::Config(format!("disks[{i}] ({}): {e}", disk.path.display())))?;
            let identity =
                format!("disk of {} sectors{}", block.sectors(), if disk.read_only { ", read-only" } else { "" });
            devices.push((Box::new(block), identity));
        }
        for (i, nic) in config.nics.iter().enumerate() {
            let net =
                Net::open(&nic.tap, &nic.mac).map_err(|e| Error::Config(format!("nics[{i}] ({}): {e}", nic.tap)))?;
            announcers.push(net.announcer());
            devices.push((Box::new(net), format!("NIC {}", nic.mac)));
        }
        let mut bus = MmioBus { devices: Vec::new(), announcers, ioeventfds: true };
        for (index, (device, identity)) in devices.into_iter().enumerate() {
            let (base, irq) = slot(index);
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?;
            vm.register_irqfd(&irqfd, irq).map_err(|source| Error::Kvm { what: "KVM_IRQFD", source })?;
            let device = MmioDevice::new(device, identity, memory.clone(), irqfd)?;
            for (queue, event) in device.queue_events().iter().enumerate() {
                let at = IoEventAddress::Mmio(base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
                if bus.ioeventfds && vm.register_ioevent(event, &at, queue as u32).is_err() {
                    // The vCPU signals the same eventfd on the write's exit instead.
                    tracing::debug!("KVM takes no MMIO ioeventfd here: queue notifications are vCPU exits");
                    bus.ioeventfds = false;
                }
            }
            bus.devices.push(Arc::new(device));
        }
        Ok(bus)
    }

    /// How many devices there are.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Starts every device's thread.
    pub fn start(&self) -> Result<(), Error> {
        self.devices.iter().enumerate().try_for_each(|(index, device)| device.spawn(index))
    }

    fn find(&self, addr: u64) -> Option<(&MmioDevice, u64)> {
        let index = addr.checked_sub(MMIO_BASE)? / MMIO_SIZE;
        let device = self.devices.get(index as usize)?;
        Some((device, addr - MMIO_BASE - index * MMIO_SIZE))
    }

    /// A vCPU's MMIO read; outside every device it reads as zero.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((device, offset)) => device.read(offset, data),
            None => data.fill(0),
        }
    }

    /// A vCPU's MMIO write; outside every device it is dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((device, offset)) = self.find(addr) {
            device.write(offset, data);
        }
    }

    /// Stops every device between requests.
    pub fn pause(&self) {
        self.devices.iter().for_each(|d| d.pause());
    }

    /// Lets every device serve again, what waited first.
    pub fn resume(&self) {
        self.devices.iter().for_each(|d| d.resume());
    }

    /// Announces every NIC's MAC a few times over the next quarter second, as
    /// QEMU does after a migration (at 0, 50, 150 and 250 ms: one lost frame
    /// does not leave a bridge pointing at the old port).
    pub fn announce_in_background(&self) {
        if self.announcers.is_empty() {
            return;
        }
        let announcers = self.announcers.clone();
        let spawned = std::thread::Builder::new().name("announce".into()).spawn(move || {
            for wait_ms in [0, 50, 100, 100] {
                std::thread::sleep(std::time::Duration::from_millis(wait_ms));
                for a in &announcers {
                    if let Err(e) = a.announce() {
                        tracing::warn!("announcing a NIC: {e}");
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("announcing the NICs: cannot start a thread: {e}");
        }
    }

    /// Every device's state, in slot order.
    pub fn state(&self) -> Vec<DeviceState> {
        self.devices.iter().map(|d| d.state()).collect()
    }

    /// Restores the devices' states (before their threads start).
    pub fn restore(&self, states: &[DeviceState]) -> Result<(), Error> {
        if states.len() != self.devices.len() {
            return Err(Error::State(format!(
                "state holds {} virtio devices, the VM is configured with {}",
                states.len(),
                self.devices.len()
            )));
        }
        self.devices.iter().zip(states).try_for_each(|(device, state)| device.restore(state))
    }
}
