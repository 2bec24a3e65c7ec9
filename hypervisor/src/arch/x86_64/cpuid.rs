//! The CPUID a vCPU reports: what KVM supports, with the VM's topology (sockets,
//! cores, threads) and each vCPU's APIC ID, so that the guest sees the shape it was
//! given rather than the host's.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

use crate::config::Topology;

/// Bits of the APIC ID used by the thread and the core level.
fn shift_for(count: u32) -> u32 {
    if count <= 1 { 0 } else { 32 - (count - 1).leading_zeros() }
}

/// The APIC ID of vCPU `index` for this topology: thread, core and socket numbers
/// packed into bit fields, as real CPUs (and the guest's leaf 0xB parsing) expect.
pub fn apic_id(index: u32, t: Topology) -> u32 {
    let thread = index % t.threads;
    let core = (index / t.threads) % t.cores;
    let socket = index / (t.threads * t.cores);
    let smt_shift = shift_for(t.threads);
    let core_shift = smt_shift + shift_for(t.cores);
    (socket << core_shift) | (core << smt_shift) | thread
}

/// Adjusts KVM's supported CPUID for vCPU `index` of a VM with topology `t`.
pub fn configure(cpuid: &mut CpuId, index: u32, t: Topology) {
    let id = apic_id(index, t);
    let smt_shift = shift_for(t.threads);
    let core_shift = smt_shift + shift_for(t.cores);
    let per_package = t.threads * t.cores;
    ensure_topology_subleaves(cpuid);
    for entry in cpuid.as_mut_slice().iter_mut() {
        configure_entry(entry, id, t, smt_shift, core_shift, per_package);
    }
}

/// KVM may list leaf 0xB with fewer subleaves than the three the guest walks
/// (threads, cores, then the terminating invalid level); add the missing ones.
fn ensure_topology_subleaves(cpuid: &mut CpuId) {
    for index in 0..3 {
        let present = cpuid.as_slice().iter().any(|e| e.function == 0xb && e.index == index);
        if !present {
            let entry =
                kvm_cpuid_entry2 { function: 0xb, index, flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX, ..Default::default() };
            // The list has room: KVM returns far fewer entries than its maximum.
            if cpuid.push(entry).is_err() {
                tracing::warn!("CPUID list full: leaf 0xb subleaf {index} missing");
            }
        }
    }
}

fn configure_entry(
    e: &mut kvm_cpuid_entry2,
    apic_id: u32,
    t: Topology,
    smt_shift: u32,
    core_shift: u32,
    per_package: u32,
) {
    match e.function {
        0x1 => {
            // EBX: initial APIC ID [31:24], logical processors per package [23:16].
            e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((per_package.min(255)) << 16);
            // EDX bit 28 (HTT): more than one logical processor per package.
            if per_package > 1 {
                e.edx |= 1 << 28
            } else {
                e.edx &= !(1 << 28)
            }
            // ECX bit 31: running under a hypervisor.
            e.ecx |= 1 << 31;
        }
        0x4 => {
            // EAX[31:26]: cores per package - 1; [25:14]: threads sharing this cache - 1.
            let sharing = if e.index <= 2 { t.threads } else { per_package };
            e.eax = (e.eax & 0x3fff) | ((t.cores - 1) << 26) | ((sharing - 1) << 14);
        }
        0xb | 0x1f => {
            // Extended topology: level 0 threads, level 1 cores, then invalid levels.
            let (shift, count, level_type) = match e.index {
                0 => (smt_shift, t.threads, 1),
                1 => (core_shift, per_package, 2),
                _ => (0, 0, 0),
            };
            e.eax = shift;
            e.ebx = count;
            e.ecx = (level_type << 8) | (e.index & 0xff);
            e.edx = apic_id;
        }
        0x8000_0008 => {
            // AMD: ECX[7:0] threads per package - 1, [15:12] APIC ID size.
            e.ecx = (e.ecx & !0xf0ff) | (per_package - 1) | (core_shift << 12);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(sockets: u32, cores: u32, threads: u32) -> Topology {
        Topology { sockets, cores, threads }
    }

    #[test]
    fn apic_ids_pack_thread_core_socket() {
        let t = topo(2, 3, 2); // threads: 1 bit, cores: 2 bits
        let ids: Vec<u32> = (0..12).map(|i| apic_id(i, t)).collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        assert_eq!((0..4).map(|i| apic_id(i, topo(1, 4, 1))).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn leaf_0xb_describes_the_topology() {
        let t = topo(2, 4, 2);
        let mut e = kvm_cpuid_entry2 { function: 0xb, index: 0, ..Default::default() };
        configure_entry(&mut e, 5, t, 1, 3, 8);
        assert_eq!((e.eax, e.ebx, e.ecx >> 8, e.edx), (1, 2, 1, 5));
        let mut e = kvm_cpuid_entry2 { function: 0xb, index: 1, ..Default::default() };
        configure_entry(&mut e, 5, t, 1, 3, 8);
        assert_eq!((e.eax, e.ebx, e.ecx >> 8), (3, 8, 2));
        let mut e = kvm_cpuid_entry2 { function: 0x1, ..Default::default() };
        configure_entry(&mut e, 5, t, 1, 3, 8);
        assert_eq!((e.ebx >> 24, (e.ebx >> 16) & 0xff, e.edx >> 28 & 1), (5, 8, 1));
    }
}
