//! The KVM VM: in-kernel interrupt controllers (PIC, IOAPIC, LAPICs) and PIT, and
//! guest RAM registered as KVM memory slots.

use crate::memory::GuestRam;
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::Error;
use crate::arch::x86_64::layout;
use crate::memory::PageBitmap;

/// A KVM VM with its guest memory.
pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub memory: GuestRam,
}

/// Asks for transparent huge pages behind guest RAM: fewer page faults when memory
/// is first touched (a migration target writes all of it at once) and fewer TLB
/// misses. Advice only: a host without THP ignores it.
fn advise_huge_pages(memory: &GuestRam) {
    for region in memory.iter() {
        if let Ok(addr) = memory.get_host_address(region.start_addr()) {
            // SAFETY: the range is a mapping owned by `memory`; MADV_HUGEPAGE changes
            // no contents, only how the kernel backs the range.
            let rc = unsafe { libc::madvise(addr.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
            if rc != 0 {
                tracing::debug!("madvise(MADV_HUGEPAGE): {}", std::io::Error::last_os_error());
            }
        }
    }
}

impl Vm {
    /// Opens /dev/kvm, creates the VM, `mem_bytes` of RAM and the interrupt controllers.
    pub fn new(vcpus: u32, mem_bytes: u64) -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(|source| Error::KvmOpen { path: "/dev/kvm".into(), source })?;
        let max = kvm.get_max_vcpus();
        if vcpus as usize > max {
            return Err(Error::Config(format!("vcpus: {vcpus} is more than this host's KVM allows ({max})")));
        }
        let t = std::time::Instant::now();
        let fd = kvm.create_vm().map_err(|source| Error::Kvm { what: "KVM_CREATE_VM", source })?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(|source| Error::Kvm { what: "KVM_SET_TSS_ADDR", source })?;

        let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_bytes)
            .into_iter()
            .map(|(start, size)| (GuestAddress(start), size as usize))
            .collect();
        let memory = GuestRam::from_ranges(&ranges)
            .map_err(|e| Error::Memory(format!("cannot allocate {} MiB of guest memory: {e}", mem_bytes >> 20)))?;
        advise_huge_pages(&memory);
        let vm = Self { kvm, fd, memory };
        // Memory slots before the in-kernel irqchip and PIT: once those exist, each
        // slot update waits for an SRCU grace period (5-8 ms on our hosts, against
        // 0.4 ms before them).
        vm.register_memory()?;
        vm.fd.create_irq_chip().map_err(|source| Error::Kvm { what: "KVM_CREATE_IRQCHIP", source })?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.fd.create_pit2(pit).map_err(|source| Error::Kvm { what: "KVM_CREATE_PIT2", source })?;
        tracing::debug!(us = t.elapsed().as_micros() as u64, "VM, memory and interrupt controllers created");
        Ok(vm)
    }

    /// Turns KVM's dirty-page logging on or off for every memory slot (live migration).
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), Error> {
        self.register_slots(if on { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    /// Pages written since the last call: KVM's dirty log of every slot (the
    /// guest's writes) ORed with guest RAM's own bitmap (the VMM's writes: devices).
    /// Reading clears both.
    pub fn take_dirty_pages(&self) -> Result<PageBitmap, Error> {
        let mut dirty = PageBitmap::with_regions(self.memory.num_regions());
        for (slot, region) in self.memory.iter().enumerate() {
            let mut bitmap = self
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|source| Error::Kvm { what: "KVM_GET_DIRTY_LOG", source })?;
            // Each word is swapped out atomically: a device write racing this read
            // lands in this set or the next, never in neither.
            for (word, device) in bitmap.iter_mut().zip(std::ops::Deref::deref(region).bitmap().get_and_reset()) {
                *word |= device;
            }
            dirty.push_region(region.start_addr().0 >> 12, bitmap);
        }
        Ok(dirty)
    }

    /// Makes guest RAM visible to the guest (one KVM memory slot per region).
    fn register_memory(&self) -> Result<(), Error> {
        self.register_slots(0)
    }

    fn register_slots(&self, flags: u32) -> Result<(), Error> {
        let memory = &self.memory;
        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(|e| Error::Memory(format!("guest memory region at {:#x}: {e}", region.start_addr().0)))?;
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which lives as
            // long as the VM (both are fields of `Vm`, and the VM fd is dropped first),
            // and slots do not overlap (one per region of a non-overlapping layout).
            unsafe { self.fd.set_user_memory_region(slot_region) }
                .map_err(|source| Error::Kvm { what: "KVM_SET_USER_MEMORY_REGION", source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::VcpuExit;
    use vm_memory::Bytes;

    /// Needs /dev/kvm. A real-mode vCPU writes one byte to page 5; the dirty log
    /// shows exactly that page, once.
    #[test]
    fn dirty_log_reports_the_pages_the_guest_wrote() {
        let vm = Vm::new(1, 16 << 20).expect("this test needs a usable /dev/kvm");
        // mov al, 1; mov [0x5000], al; out 0x10, al
        let code = [0xb0, 0x01, 0xa2, 0x00, 0x50, 0xe6, 0x10];
        vm.memory.write_slice(&code, vm_memory::GuestAddress(0x1000)).unwrap();
        let mut vcpu = vm.fd.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() }).unwrap();

        vm.set_dirty_logging(true).unwrap();
        vm.take_dirty_pages().unwrap();
        loop {
            match vcpu.run().unwrap() {
                VcpuExit::IoOut(0x10, _) => break,
                VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
        let dirty: Vec<u64> = vm.take_dirty_pages().unwrap().pages().collect();
        assert_eq!(dirty, vec![5], "pages in the dirty log");
        assert_eq!(vm.take_dirty_pages().unwrap().page_count(), 0, "reading clears the log");
        let mut byte = [0u8];
        vm.memory.read_slice(&mut byte, vm_memory::GuestAddress(0x5000)).unwrap();
        assert_eq!(byte, [1]);
    }

    /// Needs /dev/kvm. A page a device thread writes (through vm-memory, as the
    /// virtio devices do) is in the next dirty set, though KVM never saw the write.
    #[test]
    fn pages_the_vmm_writes_are_dirty_too() {
        let vm = Vm::new(1, 16 << 20).expect("this test needs a usable /dev/kvm");
        vm.set_dirty_logging(true).unwrap();
        vm.take_dirty_pages().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| vm.memory.write_obj(0xabcd_u32, vm_memory::GuestAddress(0x7_3ffe)).unwrap());
        });
        let dirty: Vec<u64> = vm.take_dirty_pages().unwrap().pages().collect();
        assert_eq!(dirty, vec![0x73, 0x74], "a write across a page boundary dirties both pages");
        assert_eq!(vm.take_dirty_pages().unwrap().page_count(), 0, "reading clears the VMM's bitmap too");
    }
}
