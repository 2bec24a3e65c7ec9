//! ACPI tables that tell the guest its CPUs and interrupt controllers: RSDP -> XSDT
//! -> MADT. The test guest counts its CPUs from the MADT, as an OS does; Linux
//! reads the same tables.

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};

const OEM_ID: &[u8; 6] = b"DROVER";
const OEM_TABLE_ID: &[u8; 8] = b"DROVERVM";

/// Makes the bytes of a table sum to zero by setting the checksum byte at `at`
/// (ACPI tables and the MP table use the same 8-bit checksum).
pub(super) fn fix_checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    let sum = bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    bytes[at] = 0u8.wrapping_sub(sum);
}

/// A system description table header followed by `body`; the length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"DRVR"); // creator ID
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    fix_checksum(&mut t, 9);
    t
}

/// The MADT: one enabled local APIC per vCPU (by APIC ID), the IOAPIC, and the ISA
/// IRQ 0 -> GSI 2 override every PC has (the PIT).
pub fn madt(apic_ids: &[u32]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259 PICs
    for (uid, id) in apic_ids.iter().enumerate() {
        body.extend_from_slice(&[0, 8, uid as u8, *id as u8]);
        body.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    body.extend_from_slice(&[1, 12, 0, 0]); // IOAPIC, id 0
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    body.extend_from_slice(&[2, 10, 0, 0]); // interrupt source override: bus 0, IRQ 0
    body.extend_from_slice(&2u32.to_le_bytes()); // -> GSI 2
    body.extend_from_slice(&0u16.to_le_bytes()); // conforming polarity and trigger
    sdt(b"APIC", 4, &body)
}

/// The tables laid out from guest address `base`: `(rsdp address, bytes to write at base)`.
pub fn tables(base: u64, apic_ids: &[u32]) -> (u64, Vec<u8>) {
    let madt = madt(apic_ids);
    // Layout: RSDP (36, padded to 48) | XSDT (36 + 8) | MADT.
    let xsdt_addr = base + 48;
    let madt_addr = xsdt_addr + 44;
    let xsdt = sdt(b"XSDT", 1, &madt_addr.to_le_bytes());

    let mut rsdp = Vec::with_capacity(48);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+, XSDT present
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_addr.to_le_bytes());
    rsdp.push(0); // extended checksum
    rsdp.extend_from_slice(&[0; 3]);
    let mut first20 = rsdp[..20].to_vec();
    fix_checksum(&mut first20, 8);
    rsdp[8] = first20[8];
    fix_checksum(&mut rsdp, 32);
    rsdp.resize(48, 0);

    let mut out = rsdp;
    out.extend_from_slice(&xsdt);
    out.extend_from_slice(&madt);
    (base, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn tables_checksum_to_zero_and_link_up() {
        let base = 0xe0000;
        let (rsdp_addr, bytes) = tables(base, &[0, 1, 2, 3]);
        assert_eq!(rsdp_addr, base);
        assert_eq!(&bytes[..8], b"RSD PTR ");
        assert_eq!(sum(&bytes[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&bytes[..36]), 0, "RSDP extended checksum");
        let xsdt_addr = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
        let xsdt = &bytes[(xsdt_addr - base) as usize..];
        assert_eq!(&xsdt[..4], b"XSDT");
        let xsdt_len = u32::from_le_bytes(xsdt[4..8].try_into().unwrap()) as usize;
        assert_eq!(sum(&xsdt[..xsdt_len]), 0, "XSDT checksum");
        let madt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let madt = &bytes[(madt_addr - base) as usize..];
        assert_eq!(&madt[..4], b"APIC");
        let madt_len = u32::from_le_bytes(madt[4..8].try_into().unwrap()) as usize;
        assert_eq!(madt_len, madt.len());
        assert_eq!(sum(madt), 0, "MADT checksum");
    }

    #[test]
    fn madt_lists_every_cpu_by_apic_id() {
        let madt = madt(&[0, 1, 4, 5]);
        let mut ids = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            if kind == 0 {
                assert_eq!(madt[at + 4] & 1, 1, "enabled");
                ids.push(madt[at + 3]);
            }
            at += len;
        }
        assert_eq!(ids, vec![0, 1, 4, 5]);
    }
}
