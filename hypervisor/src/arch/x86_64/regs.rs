//! Registers a vCPU starts with.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

/// The boot CPU's registers for the PVH entry: 32-bit protected mode, flat segments,
/// paging off, %ebx = start_info (PVH boot protocol, "x86/HVM direct boot ABI").
pub fn pvh_regs(entry: u64, start_info: u64) -> kvm_regs {
    kvm_regs { rip: entry, rbx: start_info, rflags: 0x2, ..Default::default() }
}

/// Special registers for the PVH entry, from the vCPU's current ones.
pub fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let flat = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = flat(0x10, 0xb); // execute/read, accessed
    let data = flat(0x18, 0x3); // read/write, accessed
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment { base: 0, limit: 0x67, selector: 0, type_: 0xb, present: 1, s: 0, ..data };
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// The FPU state a CPU has after reset (x87 control word 0x37f, SSE MXCSR 0x1f80).
pub fn reset_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// GDT entries for the Linux 64-bit boot: null, code64, data, TSS (as Linux's boot
/// code and Firecracker lay them out).
pub const LINUX_BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // code: 64-bit, present, execute/read
    gdt_entry(0xc093, 0, 0xfffff), // data: present, read/write
    gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy
];

/// A GDT entry from flags (access byte and granularity nibble), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The segment a GDT entry describes, for `kvm_sregs`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let flag = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = flag(55, 1);
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(index) * 8,
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g,
        avl: flag(52, 1),
        unusable: if flag(47, 1) == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// Boot page tables for Linux: identity map of the first GiB with 2 MiB pages, as
/// `(guest address, bytes)` to write (PML4, PDPT, PD).
pub fn linux_page_tables() -> Vec<(u64, Vec<u8>)> {
    use super::layout::{PDE_START, PDPTE_START, PML4_START};
    let pml4 = (PDPTE_START | 0x03).to_le_bytes().to_vec();
    let pdpt = (PDE_START | 0x03).to_le_bytes().to_vec();
    let pd: Vec<u8> = (0..512u64).flat_map(|i| ((i << 21) | 0x83).to_le_bytes()).collect();
    vec![(PML4_START, pml4), (PDPTE_START, pdpt), (PDE_START, pd)]
}

/// Special registers for the Linux 64-bit entry: long mode, paging on with
/// `linux_page_tables`, flat segments from `LINUX_BOOT_GDT`.
pub fn linux_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    use super::layout::{BOOT_GDT_START, BOOT_IDT_START, PML4_START};
    let code = segment_from_gdt(LINUX_BOOT_GDT[1], 1);
    let data = segment_from_gdt(LINUX_BOOT_GDT[2], 2);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&LINUX_BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(LINUX_BOOT_GDT[3], 3);
    sregs.cr3 = PML4_START;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.efer = 0x500; // LMA | LME
    sregs
}

/// General registers for the Linux 64-bit entry: %rsi points at the zero page.
pub fn linux_regs(entry: u64) -> kvm_regs {
    use super::layout::{BOOT_STACK_POINTER, ZERO_PAGE_START};
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let code = segment_from_gdt(LINUX_BOOT_GDT[1], 1);
        assert_eq!(
            (code.selector, code.l, code.db, code.type_, code.present, code.limit),
            (8, 1, 0, 0xb, 1, 0xffff_ffff)
        );
        let data = segment_from_gdt(LINUX_BOOT_GDT[2], 2);
        assert_eq!((data.selector, data.db, data.type_, data.s), (16, 1, 3, 1));
        let tss = segment_from_gdt(LINUX_BOOT_GDT[3], 3);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let tables = linux_page_tables();
        let pd = &tables[2].1;
        assert_eq!(pd.len(), 4096);
        let entry = |i: usize| u64::from_le_bytes(pd[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(entry(0), 0x83);
        assert_eq!(entry(511), (511 << 21) | 0x83);
    }

    #[test]
    fn linux_entry_is_long_mode() {
        let s = linux_sregs(kvm_sregs::default());
        assert_eq!(s.efer & 0x500, 0x500);
        assert_ne!(s.cr0 & 0x8000_0000, 0);
        assert_eq!(linux_regs(0x1000000).rsi, super::super::layout::ZERO_PAGE_START);
    }
}
