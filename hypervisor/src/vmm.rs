//! Builds a VM from its configuration and starts it: guest memory, devices, vCPU
//! threads. What drives the running VM (the control API, a migration) works on the
//! [`VmControl`] it hands back; the VMM itself serves no API (as in Firecracker,
//! `main.rs` starts the API server on the VMM, never the reverse).

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::time::Instant;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{cpuid, layout, regs};
use crate::boot::BootEntry;
use crate::config::{SerialOutput, VmConfig};
use crate::control::{self, VmControl};
use crate::devices::virtio::bus::MmioBus;
use crate::devices::{IrqTrigger, Keyboard, PioBus, i8042, serial};
use crate::exit::VmExit;
use crate::restore::{Origin, RestoreSource};
use crate::vstate::{vcpu::Vcpu, vm::Vm};
use crate::{Error, affinity, boot, memory};

/// A VM whose vCPUs run: its control, for whatever drives it, and the channel on
/// which its vCPUs, devices, control API and migrations report how it ends.
pub struct RunningVm {
    control: Arc<VmControl>,
    exits: Receiver<VmExit>,
}

impl RunningVm {
    /// The running VM's control (pause, resume, live changes, migration, status).
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// Waits for the first outcome a vCPU, a device, the API or a migration
    /// reports, and cleans up what would outlive the process.
    pub fn wait(self) -> VmExit {
        self.exits.recv().unwrap_or_else(|_| VmExit::VmmError("every vCPU thread ended without an outcome".into()))
    }
}

impl Drop for RunningVm {
    /// Also when whoever started the VM gives up on it (its API socket failed).
    fn drop(&mut self) {
        self.control.cleanup();
    }
}

/// Builds the VM (booting it, or restoring it from `origin`) and starts its vCPUs.
pub fn start(config: &VmConfig, origin: Origin) -> Result<RunningVm, Error> {
    let started = Instant::now();
    config.validate()?;
    let topology = config.topology();
    let apic_ids: Vec<u32> = (0..config.vcpus).map(|i| cpuid::apic_id(i, topology)).collect();
    if let Some(&max) = apic_ids.iter().max().filter(|id| **id > 254) {
        return Err(Error::Config(format!(
            "topology: needs APIC ID {max}, above the xAPIC limit of 254; use fewer sockets or cores"
        )));
    }
    let placement = affinity::plan(config)?;
    let (exits_tx, exits) = mpsc::channel();

    let mem_bytes = config.memory_mib << 20;
    let vm = Vm::new(config.vcpus, mem_bytes)?;
    tracing::debug!(us = started.elapsed().as_micros() as u64, "KVM VM created");
    let numa_nodes = numa_nodes(config, &placement)?;
    memory::bind(&vm.memory, config.numa.policy, &numa_nodes)?;

    // The control comes before the guest's state: for a migration target,
    // everything after the state arrives is downtime.
    let first_output = Arc::new(serial::FirstOutput::default());
    let control =
        Arc::new(VmControl::new(config.clone(), started, placement, numa_nodes, exits_tx, vm, first_output.clone()));
    let Prepared { fds, serial, keyboard, msrs, virtio, mut source } =
        prepare(config, control.vm(), &apic_ids, origin)?;
    let bus = Arc::new(PioBus::new(serial, keyboard, first_output, control.exits().clone()));
    let virtio = Arc::new(virtio);
    control.set_bus(bus.clone(), virtio.clone());
    let msrs = Arc::new(msrs);
    let vcpus: Vec<Vcpu> = (0..config.vcpus)
        .zip(fds)
        .map(|(index, fd)| Vcpu {
            index,
            fd,
            bus: bus.clone(),
            mmio: virtio.clone(),
            control: control.clone(),
            msrs: msrs.clone(),
        })
        .collect();
    let running = RunningVm { control, exits };
    let control = &running.control;
    tracing::debug!(us = started.elapsed().as_micros() as u64, "guest loaded, vCPUs created");
    control::install_kick_handler()?;
    match source.as_mut() {
        None => {
            virtio.start()?;
            spawn_vcpus(vcpus, control)?
        }
        Some(source) => {
            // A restored VM's vCPU threads start held: for a migration target they
            // come up while `Ready` and `Go` cross the network, and run only if
            // `before_run` allows it.
            let at = Instant::now();
            control.hold();
            virtio.start()?;
            source.restored()?;
            spawn_vcpus(vcpus, control)?;
            let spawned = at.elapsed().as_micros() as u64;
            source.before_run()?;
            control.resume();
            tracing::debug!(
                spawned_us = spawned,
                resumed_us = at.elapsed().as_micros() as u64,
                "vCPU threads up, then running"
            );
            source.running();
            if source.announce_nics() {
                // Its NICs may be on new ports now: tell the bridges at once.
                virtio.announce_in_background();
            }
        }
    }
    control.clone().apply_priority_in_background();
    tracing::info!(name = %config.name, vcpus = config.vcpus, memory_mib = config.memory_mib, setup_us = started.elapsed().as_micros() as u64, "VM started");
    Ok(running)
}

/// Starts a thread for each vCPU.
fn spawn_vcpus(vcpus: Vec<Vcpu>, control: &VmControl) -> Result<(), Error> {
    for vcpu in vcpus {
        let handle = vcpu.spawn().map_err(|e| Error::io("starting a vCPU thread", e))?;
        control.register(handle);
    }
    Ok(())
}

/// What `prepare` makes: the vCPU fds, set up; the serial port; the keyboard
/// controller; the MSRs each vCPU saves; the restore source to tell when the vCPUs run.
struct Prepared {
    fds: Vec<kvm_ioctls::VcpuFd>,
    serial: serial::SerialPort,
    keyboard: Keyboard,
    msrs: Vec<u32>,
    virtio: MmioBus,
    source: Option<Box<dyn RestoreSource>>,
}

/// Loads the guest (or restores it), sets up devices, creates the vCPUs.
///
/// What does not depend on the guest's state (the vCPUs themselves, the serial
/// port's interrupt and output, the keyboard controller, which is not part of the
/// saved state, the virtio devices' disks and taps) is set up before the state is
/// loaded: a migration target loads it while the guest is paused, and does the
/// rest beforehand (its taps are open before it reports ready).
fn prepare(config: &VmConfig, vm: &Vm, apic_ids: &[u32], origin: Origin) -> Result<Prepared, Error> {
    let irq_for = |gsi| -> Result<IrqTrigger, Error> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?;
        vm.fd.register_irqfd(&irq, gsi).map_err(|source| Error::Kvm { what: "KVM_IRQFD", source })?;
        Ok(IrqTrigger(irq))
    };
    let trigger = irq_for(serial::COM1_GSI)?;
    let keyboard = i8042::I8042::new(irq_for(i8042::KEYBOARD_GSI)?);
    let out = serial_output(&config.serial)?;
    let fds = (0..config.vcpus)
        .map(|index| {
            vm.fd.create_vcpu(u64::from(index)).map_err(|source| Error::Kvm { what: "KVM_CREATE_VCPU", source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let virtio = MmioBus::build(config, &vm.fd, &vm.memory)?;

    let (serial, msrs, source) = match origin {
        Origin::Boot => {
            let ram = layout::ram_regions(config.memory_mib << 20);
            let entry = boot::load(config, &vm.memory, apic_ids, &ram)?;
            set_up_for_boot(vm, &fds, config, entry)?;
            // The MSRs this host can save, probed on the first vCPU once it is set up.
            let msrs = match fds.first() {
                Some(fd) => crate::state::saveable_msrs(&vm.kvm, fd)?,
                None => Vec::new(),
            };
            (vm_superio::Serial::new(trigger, out), msrs, None)
        }
        Origin::Restore(mut source) => {
            let state = source.load(&vm.memory)?;
            let loaded = Instant::now();
            if state.vcpus.len() != fds.len() {
                return Err(Error::State(format!("state holds {} vCPUs, the VM has {}", state.vcpus.len(), fds.len())));
            }
            crate::state::restore_vm(&vm.fd, &state.kvm)?;
            for (fd, saved) in fds.iter().zip(&state.vcpus) {
                crate::state::restore_vcpu(fd, saved)?;
            }
            virtio.restore(&state.virtio)?;
            // The VM saves the MSRs it was restored with: every one of them was
            // just written here, and the guest's CPUID (the source's) advertises no
            // others. Probing this host's list would cost the switch-over 0.1 ms
            // or more of KVM calls.
            let msrs = state.vcpus.first().map(|v| v.msrs.iter().map(|m| m.index).collect()).unwrap_or_default();
            let serial =
                vm_superio::Serial::from_state(&(&state.serial).into(), trigger, vm_superio::serial::NoEvents, out)
                    .map_err(|e| Error::State(format!("serial port: {e:?}")))?;
            tracing::debug!(us = loaded.elapsed().as_micros() as u64, "state restored into the VM and its vCPUs");
            (serial, msrs, Some(source))
        }
    };
    Ok(Prepared { fds, serial, keyboard, msrs, virtio, source })
}

/// Sets each new vCPU up to boot: CPUID and topology, FPU, LAPIC lines; the first
/// one also gets the registers of the kernel's entry point.
fn set_up_for_boot(vm: &Vm, fds: &[kvm_ioctls::VcpuFd], config: &VmConfig, entry: BootEntry) -> Result<(), Error> {
    let topology = config.topology();
    let supported = vm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| Error::Kvm { what: "KVM_GET_SUPPORTED_CPUID", source })?;
    for (index, fd) in (0..).zip(fds) {
        let mut cpuid = supported.clone();
        cpuid::configure(&mut cpuid, index, topology);
        fd.set_cpuid2(&cpuid).map_err(|source| Error::Kvm { what: "KVM_SET_CPUID2", source })?;
        fd.set_fpu(&regs::reset_fpu()).map_err(|source| Error::Kvm { what: "KVM_SET_FPU", source })?;
        set_lint(fd)?;
        if index == 0 {
            let sregs = fd.get_sregs().map_err(|source| Error::Kvm { what: "KVM_GET_SREGS", source })?;
            let (sregs, regs) = match entry {
                BootEntry::Pvh { entry, start_info } => (regs::pvh_sregs(sregs), regs::pvh_regs(entry, start_info)),
                BootEntry::Linux { entry } => (regs::linux_sregs(sregs), regs::linux_regs(entry)),
            };
            fd.set_sregs(&sregs).map_err(|source| Error::Kvm { what: "KVM_SET_SREGS", source })?;
            fd.set_regs(&regs).map_err(|source| Error::Kvm { what: "KVM_SET_REGS", source })?;
        }
    }
    Ok(())
}

/// Local APIC LINT0 as ExtINT (the 8259 PIC's output) and LINT1 as NMI, as a PC
/// firmware leaves them and as the MP table says.
fn set_lint(vcpu: &kvm_ioctls::VcpuFd) -> Result<(), Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7 << 8;
    const MODE_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(|source| Error::Kvm { what: "KVM_GET_LAPIC", source })?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let value = (u32::from_le_bytes([0, 1, 2, 3].map(|i| lapic.regs[reg + i] as u8)) & !0x700) | mode;
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as std::ffi::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(|source| Error::Kvm { what: "KVM_SET_LAPIC", source })
}

/// The NUMA nodes guest memory is bound to: the configured ones, else those of the
/// host CPUs the vCPUs run on.
fn numa_nodes(config: &VmConfig, placement: &[drover_topology::CpuSet]) -> Result<drover_topology::CpuSet, Error> {
    if config.numa.policy == crate::config::NumaPolicy::None {
        return Ok(drover_topology::CpuSet::default());
    }
    if !config.numa.nodes.is_empty() {
        return Ok(config.numa.nodes.iter().copied().collect());
    }
    let topo = affinity::host_topology()?;
    let cpus: drover_topology::CpuSet = placement.iter().flat_map(|s| s.iter()).collect();
    Ok(drover_topology::numa_nodes_for(&topo, &cpus).into_iter().collect())
}

fn serial_output(out: &SerialOutput) -> Result<Box<dyn std::io::Write + Send>, Error> {
    Ok(match out {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Null => Box::new(std::io::sink()),
        SerialOutput::Socket(path) => Box::new(serial::SocketOutput::listen(path)?),
        SerialOutput::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::io(format!("serial output {}", path.display()), e))?,
        ),
    })
}
