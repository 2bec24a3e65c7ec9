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
