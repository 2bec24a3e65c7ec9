//! Guest memory as the VMM handles it:
//!
//! - placement: binding guest RAM to host NUMA nodes with `mbind`, per the VM's
//!   policy (Strict: MPOL_BIND, Preferred: MPOL_PREFERRED, Interleave:
//!   MPOL_INTERLEAVE), applied before the kernel is loaded, so every page the
//!   guest touches, the first included, follows the policy; faulting it in ahead
//!   of a migration (`prefault`); pages as a slice for a migration target
//! - `bitmap`: sets of guest pages ([`PageBitmap`]: dirty logs, the page map)
//! - `pagemap`: which pages the host has ever given the guest
//! - `copy`: copying a page out of a running guest
//!
//! Guest RAM carries a dirty bitmap of its own ([`GuestRam`]): every write the
//! VMM makes through vm-memory (a device's used ring, a disk read into a guest
//! buffer, a received frame) marks its page there, as KVM's dirty log marks the
//! guest's own writes; a migration reads both (`Vm::take_dirty_pages`).

use drover_topology::CpuSet;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::Error;
use crate::config::NumaPolicy;

mod bitmap;
mod copy;
mod pagemap;

pub use bitmap::{PageBitmap, Runs};
pub use copy::copy_page;
pub use pagemap::populated_pages;

/// Guest RAM: vm-memory's mmap backend with a page bitmap of the writes the VMM
/// itself makes (see the module's comment).
pub type GuestRam = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

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
pub fn bind(memory: &GuestRam, policy: NumaPolicy, nodes: &CpuSet) -> Result<(), Error> {
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

/// Faults every page of guest memory in now, writable (`MADV_POPULATE_WRITE`, or a
/// write per page on kernels older than 5.14).
/// A migration target does this before it listens, so that the transfer writes
/// into memory that is already there instead of paying a page fault (and the
/// zeroing of the page) for every page it receives.
pub fn prefault(memory: &GuestRam) -> Result<(), Error> {
    const MADV_POPULATE_WRITE: i32 = 23;
    for region in memory.iter() {
        let addr = memory
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(format!("guest region at {:#x}: {e}", region.start_addr().0)))?;
        // SAFETY: the range is a private anonymous mapping owned by `memory`;
        // populating it changes no contents (the pages read as zero either way).
        let rc = unsafe { libc::madvise(addr.cast(), region.len() as usize, MADV_POPULATE_WRITE) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(Error::Memory(format!("faulting guest memory in: {e}")));
            }
            // Before Linux 5.14: write a zero into every page, which faults it in
            // the same way (the guest has not run; nothing else touches it).
            for page in (0..region.len()).step_by(4096) {
                memory
                    .write_obj(0u8, region.start_addr().unchecked_add(page))
                    .map_err(|e| Error::Memory(format!("faulting guest memory in: {e}")))?;
            }
        }
    }
    Ok(())
}

/// `count` guest pages from page `first`, as one mutable byte slice.
///
/// # Safety
///
/// Nothing else may read or write these pages while the slice lives: no vCPU
/// runs, no other thread touches them, and no other reference to them exists.
// The bytes are the guest's, not the `GuestRam` value's: a shared borrow of
// the mapping's handle says nothing about them, and exclusivity is the caller's
// promise.
#[allow(clippy::mut_from_ref)]
pub unsafe fn pages_mut(memory: &GuestRam, first: u64, count: usize) -> Result<&mut [u8], Error> {
    let len = count * 4096;
    let slice = memory
        .get_slice(GuestAddress(first << 12), len)
        .map_err(|e| Error::Memory(format!("pages {first}+{count}: {e}")))?;
    let ptr = slice.ptr_guard_mut().as_ptr();
    // SAFETY: `get_slice` checked that the `len` bytes at `ptr` are mapped in one
    // region, which lives as long as `memory`; exclusive access is the caller's
    // promise.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}
