//! The Linux 64-bit boot protocol: a bzImage or ELF vmlinux loaded at 1 MiB, the
//! zero page (`boot_params`) with the setup header, command line, initrd and e820
//! map, entered in long mode at the 64-bit entry point.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::ByteValued;

use super::layout::{CMDLINE_MAX_SIZE, LINUX_CMDLINE_START};
use super::pvh::MemmapEntry;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// `boot_params` as bytes for guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct ZeroPage(pub boot_params);

// SAFETY: boot_params is a plain-old-data C struct (bindgen, packed, only integers
// and arrays of them): every bit pattern is valid and it has no padding-dependent
// invariants.
unsafe impl ByteValued for ZeroPage {}

/// Where the initrd goes: page-aligned, as high as it fits below `limit` (the end
/// of low RAM, or the kernel's `initrd_addr_max`).
pub fn initrd_address(limit: u64, size: u64) -> Option<u64> {
    limit.checked_sub(size).map(|a| a & !0xfff)
}

/// The zero page for a kernel whose setup header is `hdr` (bzImage) or none (ELF).
pub fn zero_page(
    hdr: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    memmap: &[MemmapEntry],
) -> ZeroPage {
    let mut params = boot_params::default();
    if let Some(hdr) = hdr {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = LINUX_CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len.min(CMDLINE_MAX_SIZE - 1) as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(memmap.iter().take(E820_MAX_ENTRIES_ZEROPAGE)) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind };
    }
    params.e820_entries = memmap.len().min(E820_MAX_ENTRIES_ZEROPAGE) as u8;
    ZeroPage(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ram_regions;
    use crate::arch::x86_64::pvh::memory_map;

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let map = memory_map(&ram_regions(4 << 30));
        let ZeroPage(p) = zero_page(None, 24, Some((0x7f00_0000, 0x10_0000)), &map);
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr }, LINUX_CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 24);
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (0x7f00_0000, 0x10_0000));
        assert_eq!(p.e820_entries as usize, map.len());
        let last = p.e820_table[map.len() - 1];
        assert_eq!(({ last.addr }, { last.size }, { last.r#type }), (4 << 30, 1 << 30, 1));
        assert_eq!(ZeroPage(p).as_slice().len(), 4096);
    }

    #[test]
    fn bzimage_header_is_kept() {
        let hdr = setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            version: 0x20f,
            ..Default::default()
        };
        let ZeroPage(p) = zero_page(Some(hdr), 0, None, &[]);
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        assert_eq!(initrd_address(0x4000_0000, 0x1234), Some(0x3fff_e000));
        assert_eq!(initrd_address(0x1000, 0x2000), None);
    }
}
