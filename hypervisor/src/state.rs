//! The complete state of a VM outside its memory, as plain serializable structs:
//! each vCPU's registers, FPU/xsave, MSRs, LAPIC, pending events and MP state; the
//! VM's interrupt controllers, PIT and clock; the devices. Saved while the vCPUs are
//! paused, restored into a fresh VM before its vCPUs first run (snapshots, and the
//! target side of a live migration).

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data, kvm_cpuid_entry2,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::config::VmConfig;

/// Format version of `VmState`; a restore refuses any other.
pub const STATE_VERSION: u32 = 2;

/// One vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// The VM-wide in-kernel devices.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The serial port (vm-superio's own state struct, kept as plain fields).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<&vm_superio::serial::SerialState> for SerialState {
    fn from(s: &vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Everything but guest memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    /// The configuration the VM was started with (shape: vCPUs, memory, topology).
    pub config: VmConfig,
    pub vcpus: Vec<VcpuState>,
    pub kvm: VmKvmState,
    pub serial: SerialState,
    /// The virtio devices, in slot order (disks, then NICs).
    pub virtio: Vec<crate::devices::virtio::state::DeviceState>,
}

impl VmState {
    /// Encodes for a file or the wire.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        postcard::to_allocvec(self).map_err(|e| Error::State(format!("encoding VM state: {e}")))
    }

    /// Decodes, refusing another format version.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let state: VmState =
            postcard::from_bytes(bytes).map_err(|e| Error::State(format!("decoding VM state: {e}")))?;
        if state.version != STATE_VERSION {
            return Err(Error::State(format!(
                "VM state version {} (this drover-vmm reads version {STATE_VERSION})",
                state.version
            )));
        }
        Ok(state)
    }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// The MSRs KVM can save and restore on this host, probed once per VM. KVM_GET_MSRS
/// stops at the first MSR it cannot read and says how many it read, so one call per
/// unreadable MSR finds them all (a restore probes while a migrated guest waits).
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, Error> {
    let list = kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut readable = Vec::with_capacity(list.as_slice().len());
    let mut rest: &[u32] = list.as_slice();
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> =
            rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::State(format!("MSR list: {e:?}")))?;
        let read = vcpu.get_msrs(&mut msrs).unwrap_or(0).min(rest.len());
        readable.extend_from_slice(&rest[..read]);
        // Skip the one that failed (some listed MSRs are not readable on every host,
        // PVM included) and go on after it.
        rest = rest.get(read + 1..).unwrap_or(&[]);
    }
    Ok(readable)
}

/// Saves one (paused) vCPU.
pub fn save_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, Error> {
    let entries: Vec<kvm_msr_entry> =
        msr_indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::State(format!("MSR list: {e:?}")))?;
    let read = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
    if read != entries.len() {
        return Err(Error::State(format!("KVM_GET_MSRS read {read} of {} MSRs", entries.len())));
    }
    Ok(VcpuState {
        cpuid: vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec(),
        mp_state: vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
        debug_regs: vcpu.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
        msrs: msrs.as_slice().to_vec(),
        events: vcpu.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
        tsc_khz: vcpu.get_tsc_khz().ok(),
    })
}

/// Restores one vCPU before it first runs. The order follows KVM's dependencies:
/// CPUID before anything that depends on features, the LAPIC before MSRs (the
/// TSC deadline MSR needs it), events last.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), Error> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| Error::State(format!("CPUID: {e:?}")))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    if let Some(khz) = s.tsc_khz {
        // A host with another TSC frequency scales the guest's; refusing would be worse.
        if let Err(e) = vcpu.set_tsc_khz(khz) {
            tracing::warn!("keeping this host's TSC frequency (the source ran at {khz} kHz): {e}");
        }
    }
    vcpu.set_mp_state(s.mp_state).map_err(kvm_err("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` is a complete kvm_xsave as KVM_GET_XSAVE returned it (the
    // legacy 4 KiB layout, which set_xsave reads in full).
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debug_regs).map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|e| Error::State(format!("MSR list: {e:?}")))?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if written != s.msrs.len() {
        let failed = s.msrs.get(written).map(|m| m.index).unwrap_or(0);
        return Err(Error::State(format!("KVM_SET_MSRS stopped at MSR {failed:#x} ({written} of {})", s.msrs.len())));
    }
    vcpu.set_vcpu_events(&s.events).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Saves the VM's in-kernel devices.
pub fn save_vm(vm: &VmFd) -> Result<VmKvmState, Error> {
    let chip = |chip_id| -> Result<kvm_irqchip, Error> {
        let mut c = kvm_irqchip { chip_id, ..Default::default() };
        vm.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        Ok(c)
    };
    Ok(VmKvmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
    })
}

/// Restores the VM's in-kernel devices.
pub fn restore_vm(vm: &VmFd, s: &VmKvmState) -> Result<(), Error> {
    vm.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    // Only the clock value travels; flags such as KVM_CLOCK_TSC_STABLE are the host's.
    let clock = kvm_clock_data { clock: s.clock.clock, ..Default::default() };
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
