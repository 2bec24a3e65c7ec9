//! vCPUs: each runs `KVM_RUN` in its own thread, named `vcpu N`, and handles the
//! exits that reach user space (port and MMIO I/O, shutdown, errors).

use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::control::VmControl;
use crate::devices::PioBus;
use crate::devices::virtio::bus::MmioBus;
use crate::exit::VmExit;

/// KVM_SYSTEM_EVENT_* types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// One vCPU, ready to run.
pub struct Vcpu {
    pub index: u32,
    pub fd: VcpuFd,
    pub bus: Arc<PioBus>,
    /// The virtio devices in the MMIO gap.
    pub mmio: Arc<MmioBus>,
    pub control: Arc<VmControl>,
    /// MSRs to save with this vCPU's state (probed once per VM).
    pub msrs: Arc<Vec<u32>>,
}

impl Vcpu {
    /// Starts the vCPU in a thread of its own, pinned and prioritised as planned.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name(format!("vcpu {}", self.index)).spawn(move || {
            self.control.vcpu_started(self.index);
            self.run();
        })
    }

    /// Runs until the VM ends; the outcome goes to the control.
    fn run(mut self) {
        crate::control::set_immediate_exit(&mut self.fd.get_kvm_run().immediate_exit);
        self.run_loop();
        crate::control::set_immediate_exit(std::ptr::null_mut());
    }

    fn run_loop(&mut self) {
        loop {
            self.control.pause_point(self.index, || crate::state::save_vcpu(&self.fd, &self.msrs));
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => self.bus.write(port, data),
                Ok(VcpuExit::IoIn(port, data)) => self.bus.read(port, data),
                Ok(VcpuExit::MmioRead(addr, data)) => self.mmio.read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => self.mmio.write(addr, data),
                Ok(VcpuExit::Hlt) => {
                    // With the in-kernel LAPIC, HLT sleeps in KVM; seeing it means no
                    // interrupt can wake the CPU.
                    return self.stop(VmExit::Fault(format!("vCPU {} halted with no way to wake", self.index)));
                }
                Ok(VcpuExit::Shutdown) => {
                    return self
                        .stop(VmExit::Fault(format!("triple fault on vCPU {} (KVM_EXIT_SHUTDOWN)", self.index)));
                }
                Ok(VcpuExit::SystemEvent(SYSTEM_EVENT_RESET, _)) => return self.stop(VmExit::Reset),
                Ok(VcpuExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN, _)) => return self.stop(VmExit::Shutdown),
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return self.stop(VmExit::Fault(format!(
                        "VM entry failed on vCPU {} (reason {reason:#x}, host cpu {cpu})",
                        self.index
                    )));
                }
                Ok(VcpuExit::InternalError) => {
                    return self
                        .stop(VmExit::Fault(format!("KVM internal error on vCPU {} (emulation failure)", self.index)));
                }
                Ok(other) => {
                    let why = format!("unexpected exit on vCPU {}: {other:?}", self.index);
                    return self.stop(VmExit::Fault(why));
                }
                // Kicked (the handler set immediate_exit): clear it, then the loop's
                // pause check.
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => self.fd.set_kvm_immediate_exit(0),
                Err(e) => return self.stop(VmExit::VmmError(format!("KVM_RUN on vCPU {}: {e}", self.index))),
            }
        }
    }

    fn stop(&self, exit: VmExit) {
        self.control.end(exit);
    }
}
