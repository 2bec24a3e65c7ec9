//! x86-64: guest memory layout, CPUID, boot registers, firmware tables (ACPI, MP
//! table) and the boot protocols (PVH for ELF images with a PVH note, the Linux
//! 64-bit boot protocol for bzImage and vmlinux).

pub mod acpi;
pub mod cpuid;
pub mod layout;
pub mod linux;
pub mod mptable;
pub mod pvh;
pub mod regs;
