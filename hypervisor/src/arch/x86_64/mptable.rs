//! The Intel MultiProcessor Specification 1.4 table: how Linux (without ACPI) and
//! older guests find their CPUs, buses and interrupt routing. Placed in the BIOS
//! area at 0xf0000, one of the places the guest searches for the floating pointer
//! (the EBDA's single KiB is too small for 254 CPUs).

use super::acpi::fix_checksum;
use super::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_START};

const SPEC_REV: u8 = 4; // MP spec 1.4
const APIC_VERSION: u8 = 0x14;
const IOAPIC_ID: u8 = 0xfe; // above every CPU's APIC ID
const ISA_BUS: u8 = 0;
/// Every pin of the IOAPIC: 0-15 the ISA IRQs, 5-23 also the virtio devices.
const IRQS: u8 = 24;

/// The MP floating pointer and configuration table for CPUs with these APIC IDs
/// (the first is the boot CPU), to be written at `address()`.
pub fn mptable(apic_ids: &[u32]) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count = 0u16;
    for (i, id) in apic_ids.iter().enumerate() {
        // Processor: type 0, APIC id, version, flags (enabled, BSP), signature, features.
        let flags = 1 | if i == 0 { 2 } else { 0 };
        entries.extend_from_slice(&[0, *id as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus: type 1, id, "ISA   ".
    entries.extend_from_slice(&[1, ISA_BUS]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // I/O APIC: type 2, id, version, flags (usable), address.
    entries.extend_from_slice(&[2, IOAPIC_ID, APIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // I/O interrupts: IRQ n -> IOAPIC pin n (type 3, INT, conforming flags: edge,
    // active high, as the irqfds signal them).
    for irq in 0..IRQS {
        entries.extend_from_slice(&[3, 0, 0, 0, ISA_BUS, irq, IOAPIC_ID, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 of every local APIC (0xff).
    entries.extend_from_slice(&[4, 3, 0, 0, ISA_BUS, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, ISA_BUS, 0, 0xff, 1]);
    count += 2;

    let table_addr = address() as u32 + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum
    table.extend_from_slice(b"DROVER  "); // OEM id
    table.extend_from_slice(b"DROVER VM   "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    fix_checksum(&mut table, 7);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(SPEC_REV);
    floating.push(0); // checksum
    floating.extend_from_slice(&[0; 5]); // features: configuration table present
    fix_checksum(&mut floating, 10);

    let mut out = floating;
    out.extend_from_slice(&table);
    out
}

/// Where the table goes.
pub fn address() -> u64 {
    MPTABLE_START
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_and_table_check_out() {
        let bytes = mptable(&[0, 1, 2, 3]);
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0, "floating pointer checksum");
        let table_addr = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
        assert_eq!(table_addr, address() + 16);
        let table = &bytes[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0, "configuration table checksum");
        // Every CPU, the boot CPU first and flagged as such.
        let processors: Vec<(u8, u8)> =
            table[44..].chunks(20).take_while(|e| e[0] == 0).map(|e| (e[1], e[3])).collect();
        assert_eq!(processors, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn fits_in_the_bios_area() {
        let bytes = mptable(&(0..254).collect::<Vec<_>>());
        assert!(address() + bytes.len() as u64 <= crate::arch::x86_64::layout::BIOS_END, "{} bytes", bytes.len());
    }
}
