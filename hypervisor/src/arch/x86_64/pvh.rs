//! The PVH boot protocol: the guest starts in 32-bit protected mode with paging off
//! at the entry point named by its ELF note, %ebx pointing at an `hvm_start_info`
//! that gives the command line, the memory map and the ACPI RSDP. QEMU boots the same
//! image the same way, which keeps the benchmarks fair.

use super::layout::{ACPI_START, BIOS_END, CMDLINE_START, EBDA_START, MEMMAP_START, PVH_INFO_START};

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// E820 / PVH memory types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// One memory-map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map for RAM regions `ram` (from `layout::ram_regions`): usable low RAM
/// below the EBDA, the firmware area (ACPI tables) reserved, the rest of RAM usable.
pub fn memory_map(ram: &[(u64, u64)]) -> Vec<MemmapEntry> {
    let mut map = vec![
        MemmapEntry { addr: 0, size: EBDA_START, kind: E820_RAM },
        MemmapEntry { addr: ACPI_START, size: BIOS_END - ACPI_START, kind: E820_RESERVED },
    ];
    for &(start, size) in ram {
        let start_above_bios = start.max(BIOS_END);
        let end = start + size;
        if end > start_above_bios {
            map.push(MemmapEntry { addr: start_above_bios, size: end - start_above_bios, kind: E820_RAM });
        }
    }
    map
}

/// The bytes of `hvm_start_info` (version 1) and of its memory map, to be written at
/// `PVH_INFO_START` and `MEMMAP_START`.
pub fn start_info(memmap: &[MemmapEntry], rsdp: u64) -> (Vec<u8>, Vec<u8>) {
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&0u32.to_le_bytes()); // nr_modules
    info.extend_from_slice(&0u64.to_le_bytes()); // modlist_paddr
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&rsdp.to_le_bytes());
    info.extend_from_slice(&MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(memmap.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    let mut map = Vec::with_capacity(memmap.len() * 24);
    for e in memmap {
        map.extend_from_slice(&e.addr.to_le_bytes());
        map.extend_from_slice(&e.size.to_le_bytes());
        map.extend_from_slice(&e.kind.to_le_bytes());
        map.extend_from_slice(&0u32.to_le_bytes());
    }
    (info, map)
}

/// Where start_info goes (for %ebx).
pub const START_INFO_ADDR: u64 = PVH_INFO_START;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ram_regions;

    #[test]
    fn memory_map_reserves_firmware_and_skips_the_hole() {
        let map = memory_map(&ram_regions(5 << 30));
        assert_eq!(map[0], MemmapEntry { addr: 0, size: EBDA_START, kind: E820_RAM });
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(map[2], MemmapEntry { addr: BIOS_END, size: (3 << 30) - BIOS_END, kind: E820_RAM });
        assert_eq!(map[3], MemmapEntry { addr: 4 << 30, size: 2 << 30, kind: E820_RAM });
    }

    #[test]
    fn start_info_has_the_pvh_layout() {
        let (info, map) = start_info(&memory_map(&ram_regions(64 << 20)), 0xe0000);
        assert_eq!(info.len(), 56);
        assert_eq!(u32::from_le_bytes(info[0..4].try_into().unwrap()), XEN_HVM_START_MAGIC);
        assert_eq!(u64::from_le_bytes(info[24..32].try_into().unwrap()), CMDLINE_START);
        assert_eq!(u64::from_le_bytes(info[32..40].try_into().unwrap()), 0xe0000);
        assert_eq!(u32::from_le_bytes(info[48..52].try_into().unwrap()), 3);
        assert_eq!(map.len(), 3 * 24);
    }
}
