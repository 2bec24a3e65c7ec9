//! Where a VM's first state comes from: a boot, or a VM saved elsewhere (a
//! snapshot, a migration source). The VMM drives a [`RestoreSource`] through the
//! restore; the sources (`snapshot`, `migration::receive`) implement it without
//! knowing the VMM.

use crate::Error;
use crate::memory::GuestRam;
use crate::state::VmState;

/// Where a restored VM comes from: a snapshot, or a migration source.
///
/// The VMM calls, in order: `load`; `restored` once every vCPU and device holds
/// its state; `before_run` once the vCPU threads are up but held; `running` once
/// they run. For a migration target everything after `load` is downtime.
pub trait RestoreSource {
    /// Fills guest memory and returns the rest of the VM's state.
    fn load(&mut self, memory: &GuestRam) -> Result<VmState, Error>;
    /// The VM is restored; its vCPU threads start (held) after this returns.
    fn restored(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// The last word before the vCPUs run; an error keeps them from ever running.
    fn before_run(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// Called once the vCPUs run.
    fn running(&mut self) {}
    /// Whether the VMM then announces the VM's MACs (RARP, see
    /// `devices::virtio::net`): after a move its NICs are on new bridge ports.
    fn announce_nics(&self) -> bool {
        true
    }
}

/// Where a VM's first state comes from.
pub enum Origin {
    /// Boot the kernel of the configuration.
    Boot,
    /// Continue a VM saved elsewhere.
    Restore(Box<dyn RestoreSource>),
}

/// A source whose VM does not announce its MACs once it runs (`--no-announce`:
/// for tests that show what the announcement is for).
pub struct Unannounced(pub Box<dyn RestoreSource>);

impl RestoreSource for Unannounced {
    fn load(&mut self, memory: &GuestRam) -> Result<VmState, Error> {
        self.0.load(memory)
    }
    fn restored(&mut self) -> Result<(), Error> {
        self.0.restored()
    }
    fn before_run(&mut self) -> Result<(), Error> {
        self.0.before_run()
    }
    fn running(&mut self) {
        self.0.running()
    }
    fn announce_nics(&self) -> bool {
        false
    }
}
