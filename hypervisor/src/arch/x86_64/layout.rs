//! Where things live in guest physical memory.
//!
//! ```text
//! 0x0000_0500  GDT, then IDT (Linux 64-bit boot)
//! 0x0000_6000  PVH start_info, then its memory map
//! 0x0000_7000  PVH: kernel command line; Linux: the zero page (boot_params)
//! 0x0000_9000  Linux: boot page tables (PML4, PDPT, PD: first 1 GiB identity-mapped)
//! 0x0000_8ff0  Linux: boot stack top
//! 0x0002_0000  Linux: kernel command line
//! 0x0000_8000  left free: the test guest copies its AP start-up code here
//! 0x000E_0000  ACPI tables (RSDP, XSDT, MADT), reserved in the memory map
//! 0x000F_0000  MP table (floating pointer, then the configuration table)
//! 0x0010_0000  kernel image (1 MiB)
//! ...          RAM up to 3 GiB, then the MMIO hole (IOAPIC, LAPIC) up to 4 GiB,
//! 0x1_0000_0000 the rest of RAM
//! ```

/// The PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH memory map, right after start_info.
pub const MEMMAP_START: u64 = 0x6040;
/// Most memory-map entries we write (low RAM, ACPI, RAM below the hole, RAM above).
pub const MEMMAP_MAX_ENTRIES: usize = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x7000;
/// Linux 64-bit boot: the GDT, the IDT, the zero page, page tables, stack, command line.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const LINUX_CMDLINE_START: u64 = 0x2_0000;
/// The command line's size limit, its terminating NUL included (x86 Linux's limit).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the low RAM that the memory map reports as usable (the EBDA starts here).
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables.
pub const ACPI_START: u64 = 0xe_0000;
/// The MP table.
pub const MPTABLE_START: u64 = 0xf_0000;
/// End of the BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO hole below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS for real-mode emulation on Intel: three pages just below the BIOS ROM.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Guest RAM regions for `mem_bytes` of memory: below the MMIO hole, then above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_bytes - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_regions(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    // Checked at compile time: the fixed areas do not overlap.
    const _: () = {
        assert!(MEMMAP_START + (MEMMAP_MAX_ENTRIES as u64) * 24 <= CMDLINE_START);
        assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= 0x8000);
        assert!(ACPI_START < MPTABLE_START && MPTABLE_START < BIOS_END && BIOS_END <= HIMEM_START);
        // ACPI tables for the most vCPUs fit below the MP table.
        assert!(ACPI_START + 48 + 44 + 36 + 8 + 254 * 8 + 12 + 10 <= MPTABLE_START);
        assert!(BOOT_IDT_START + 8 <= PVH_INFO_START && PDE_START + 0x1000 <= LINUX_CMDLINE_START);
        assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER && BOOT_STACK_POINTER < PML4_START);
    };
}
