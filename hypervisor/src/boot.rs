//! Puts a kernel and what it needs to boot into guest memory.

use std::fs::File;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::Error;
use crate::arch::x86_64::{acpi, layout, pvh};
use crate::config::VmConfig;

/// Where and how the boot CPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// PVH 32-bit entry point.
    pub entry: u64,
    /// Address of the PVH start_info (for %ebx).
    pub start_info: u64,
}

/// Loads the kernel of `config`, the command line, the ACPI tables and the PVH
/// start_info into `memory`.
pub fn load(config: &VmConfig, memory: &GuestMemoryMmap, apic_ids: &[u32], ram: &[(u64, u64)]) -> Result<BootEntry, Error> {
    let kernel_err = |why: String| Error::Kernel { path: config.kernel.display().to_string(), why };
    let mut file = File::open(&config.kernel).map_err(|e| kernel_err(format!("cannot open: {e}")))?;
    let loaded = Elf::load(memory, None, &mut file, Some(GuestAddress(layout::HIMEM_START))).map_err(|e| {
        kernel_err(format!("not a bootable kernel image ({e}); drover-vmm boots ELF images with a PVH entry note"))
    })?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => return Err(kernel_err("ELF image without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)".into())),
    };

    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| Error::Config(format!("cmdline: {e}")))?;
    if !config.cmdline.is_empty() {
        cmdline.insert_str(&config.cmdline).map_err(|e| Error::Config(format!("cmdline: {e}")))?;
    }
    linux_loader::loader::load_cmdline(memory, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(|e| Error::Memory(format!("writing the command line: {e}")))?;

    let (rsdp, tables) = acpi::tables(layout::ACPI_START, apic_ids);
    let (info, memmap) = pvh::start_info(&pvh::memory_map(ram), rsdp);
    for (addr, bytes, what) in
        [(layout::ACPI_START, &tables, "ACPI tables"), (layout::PVH_INFO_START, &info, "start_info"), (layout::MEMMAP_START, &memmap, "memory map")]
    {
        memory.write_slice(bytes, GuestAddress(addr)).map_err(|e| Error::Memory(format!("writing the {what}: {e}")))?;
    }
    Ok(BootEntry { entry, start_info: pvh::START_INFO_ADDR })
}
