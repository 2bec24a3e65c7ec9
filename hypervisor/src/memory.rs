//! Guest memory placement: binding guest RAM to host NUMA nodes with `mbind`, per
//! the VM's policy (Strict: MPOL_BIND, Preferred: MPOL_PREFERRED, Interleave:
//! MPOL_INTERLEAVE). Applied before the kernel is loaded, so every page the guest
//! touches, the first included, follows the policy.

use drover_topology::CpuSet;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::Error;
use crate::config::NumaPolicy;

const MPOL_PREFERRED: i32 = 1;
const MPOL_BIND: i32 = 2;
const MPOL_INTERLEAVE: i32 = 3;
/// Move pages that are already there, and fail if some cannot be.
const MPOL_MF_STRICT: u32 = 1;
const MPOL_MF_MOVE: u32 = 1 << 1;

/// The `mbind` mode of a policy; `None` for no binding.
pub fn mode(policy: NumaPolicy) -> Option<i32> {
    match policy {
        NumaPolicy::None => None,
        NumaPolicy::Preferred => Some(MPOL_PREFERRED),
        NumaPolicy::Strict => Some(MPOL_BIND),
        NumaPolicy::Interleave => Some(MPOL_INTERLEAVE),
    }
}

/// Binds every region of `memory` to `nodes` with `policy`.
pub fn bind(memory: &GuestMemoryMmap, policy: NumaPolicy, nodes: &CpuSet) -> Result<(), Error> {
    let Some(mode) = mode(policy) else { return Ok(()) };
    if nodes.is_empty() {
        return Err(Error::Config(format!("numa: policy {policy:?} needs at least one node")));
    }
    // A node mask of 1024 bits, the most nodes Linux supports by default.
    let mut mask = [0u64; 16];
    for node in nodes.iter() {
        let (word, bit) = ((node / 64) as usize, node % 64);
        let slot = mask
            .get_mut(word)
            .ok_or_else(|| Error::Config(format!("numa.nodes: node {node} is beyond the 1024 nodes Linux supports")))?;
        *slot |= 1 << bit;
    }
    for region in memory.iter() {
        let addr = memory
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(format!("region at {:#x}: {e}", region.start_addr().0)))?;
        // SAFETY: `addr..addr+len` is a mapping owned by `memory`; the mask outlives
        // the call and holds `mask.len() * 64` bits, the maxnode we pass.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                addr as usize,
                region.len() as usize,
                mode,
                mask.as_ptr(),
                mask.len() * 64,
                MPOL_MF_STRICT | MPOL_MF_MOVE,
            )
        };
        if rc != 0 {
            return Err(Error::Memory(format!(
                "binding guest memory to NUMA node(s) {nodes} ({policy:?}): {} (are these nodes online?)",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}
