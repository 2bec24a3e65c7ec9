//! Guest memory placement: binding guest RAM to host NUMA nodes with `mbind`, per
//! the VM's policy (Strict: MPOL_BIND, Preferred: MPOL_PREFERRED, Interleave:
//! MPOL_INTERLEAVE). Applied before the kernel is loaded, so every page the guest
//! touches, the first included, follows the policy.

use drover_topology::CpuSet;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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

/// Which guest pages may hold data, per region: `(first page number, bitmap)` with
/// a bit set for each page the host has in RAM or in swap. A page the guest never
/// touched has no host page at all and reads as zero, so a migration can skip it
/// without reading it (a 4 GiB idle guest: 8 MiB of page map instead of 4 GiB of
/// memory). Read from `/proc/self/pagemap` (the present and swapped bits need no
/// privilege), by up to `threads` threads: the kernel's page-table walk costs
/// about 5 ms per GiB of guest memory that the host has.
pub fn populated_pages(memory: &GuestMemoryMmap, threads: usize) -> Result<Vec<(u64, Vec<u64>)>, Error> {
    const PAGE: u64 = 4096;
    // 16 Ki pages (64 MiB of guest memory, 128 KiB of page map) per piece; a
    // multiple of 64, so pieces own whole words of the bitmap.
    const PIECE: u64 = 1 << 14;
    let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(|e| Error::io("/proc/self/pagemap", e))?;
    let mut out = Vec::new();
    // (first host page, the bitmap words it fills)
    let mut pieces: Vec<(u64, &mut [u64])> = Vec::new();
    for region in memory.iter() {
        let pages = region.len() / PAGE;
        out.push((region.start_addr().0 / PAGE, vec![0u64; pages.div_ceil(64) as usize]));
    }
    for ((_, bitmap), region) in out.iter_mut().zip(memory.iter()) {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(format!("guest region at {:#x}: {e}", region.start_addr().0)))?
            as u64;
        for (i, words) in (0u64..).zip(bitmap.chunks_mut((PIECE / 64) as usize)) {
            pieces.push((host / PAGE + i * PIECE, words));
        }
    }
    let threads = threads.clamp(1, pieces.len().max(1));
    let per_thread = pieces.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = pieces
            .chunks_mut(per_thread)
            .map(|share| {
                let pagemap = &pagemap;
                scope
                    .spawn(move || share.iter_mut().try_for_each(|(first, words)| read_present(pagemap, *first, words)))
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or_else(|_| Err(Error::Internal("a page map reader panicked".into()))))
    })?;
    Ok(out)
}

/// Sets a bit in `words` for each page from host page `first` on that is in RAM
/// or in swap.
fn read_present(pagemap: &std::fs::File, first: u64, words: &mut [u64]) -> Result<(), Error> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let mut entries = vec![0u8; words.len() * 64 * 8];
    pagemap.read_exact_at(&mut entries, first * 8).map_err(|e| Error::io("/proc/self/pagemap", e))?;
    for (word, entries) in words.iter_mut().zip(entries.chunks_exact(64 * 8)) {
        for (bit, entry) in (0..).zip(entries.chunks_exact(8)) {
            let bits =
                u64::from_le_bytes([entry[0], entry[1], entry[2], entry[3], entry[4], entry[5], entry[6], entry[7]]);
            if bits & (PRESENT | SWAPPED) != 0 {
                *word |= 1 << bit;
            }
        }
    }
    Ok(())
}

/// Faults every page of guest memory in now, writable (`MADV_POPULATE_WRITE`, or a
/// write per page on kernels older than 5.14).
/// A migration target does this before it listens, so that the transfer writes
/// into memory that is already there instead of paying a page fault (and the
/// zeroing of the page) for every page it receives.
pub fn prefault(memory: &GuestMemoryMmap) -> Result<(), Error> {
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

/// Copies the guest page at host address `src` into `dest`; true when the page is
/// all zero. The copy and the zero test read the page once, with SSE2 moves: a
/// `memcpy` of a page (or of anything smaller than the L2 cache) takes its
/// `rep movsb` path on AMD hosts, and that ran at a fifth of the speed here. The
/// stores are volatile so that the compiler does not turn the loop back into a
/// `memcpy` call.
///
/// # Safety
///
/// `src` must point to 4096 readable bytes inside a mapping that outlives the
/// call. A running guest may write them meanwhile, as with any copy of live guest
/// memory (vm-memory's included): the copy may then be torn, and the dirty log has
/// the page sent again.
pub unsafe fn copy_page(src: *const u8, dest: &mut [u8; 4096]) -> bool {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128,
    };
    let src = src.cast::<__m128i>();
    let out = dest.as_mut_ptr().cast::<__m128i>();
    // SAFETY: SSE2 is part of x86-64; every access below is one of the 256
    // 16-byte blocks of the two pages (in bounds by the caller's promise and
    // `dest`'s type), and the unaligned forms are used for both.
    unsafe {
        let mut any = _mm_setzero_si128();
        for i in (0..256).step_by(4) {
            let (a, b, c, d) = (
                _mm_loadu_si128(src.add(i)),
                _mm_loadu_si128(src.add(i + 1)),
                _mm_loadu_si128(src.add(i + 2)),
                _mm_loadu_si128(src.add(i + 3)),
            );
            out.add(i).write_volatile(a);
            out.add(i + 1).write_volatile(b);
            out.add(i + 2).write_volatile(c);
            out.add(i + 3).write_volatile(d);
            any = _mm_or_si128(any, _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d)));
        }
        _mm_movemask_epi8(_mm_cmpeq_epi8(any, _mm_setzero_si128())) == 0xffff
    }
}

/// `count` guest pages from page `first`, as one mutable byte slice.
///
/// # Safety
///
/// Nothing else may read or write these pages while the slice lives: no vCPU
/// runs, no other thread touches them, and no other reference to them exists.
// The bytes are the guest's, not the `GuestMemoryMmap` value's: a shared borrow of
// the mapping's handle says nothing about them, and exclusivity is the caller's
// promise.
#[allow(clippy::mut_from_ref)]
pub unsafe fn pages_mut(memory: &GuestMemoryMmap, first: u64, count: usize) -> Result<&mut [u8], Error> {
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

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn prefaulted_memory_is_populated_and_still_zero() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        prefault(&memory).unwrap();
        let (_, bitmap) = &populated_pages(&memory, 2).unwrap()[0];
        assert!(bitmap.iter().all(|w| *w == u64::MAX), "every page present");
        let mut page = [1u8; 4096];
        memory.read_slice(&mut page, GuestAddress(4 << 20)).unwrap();
        assert!(page.iter().all(|b| *b == 0));
    }

    #[test]
    fn populated_pages_are_the_ones_written() {
        // The low region spans two whole 64 MiB pieces of the page map and part of
        // a third.
        let memory =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 160 << 20), (GuestAddress(1 << 32), 16 << 20)])
                .unwrap();
        memory.write_slice(&[1], GuestAddress(5 * 4096 + 100)).unwrap();
        memory.write_slice(&[1; 8192], GuestAddress(1000 * 4096)).unwrap();
        memory.write_slice(&[1], GuestAddress(30_000 * 4096)).unwrap();
        memory.write_slice(&[1], GuestAddress(40_000 * 4096)).unwrap();
        memory.write_slice(&[1], GuestAddress((1 << 32) + 3 * 4096)).unwrap();
        let populated = populated_pages(&memory, 1).unwrap();
        assert_eq!(populated_pages(&memory, 3).unwrap(), populated, "threads read what one thread reads");
        let set = |(first, bitmap): &(u64, Vec<u64>)| -> Vec<u64> {
            (0..bitmap.len() as u64 * 64)
                .filter(|p| bitmap[(p / 64) as usize] >> (p % 64) & 1 == 1)
                .map(|p| first + p)
                .collect()
        };
        // Transparent huge pages may make a whole 2 MiB around a written page
        // present; pages far from any write are not.
        let low = set(&populated[0]);
        assert!([5, 1000, 1001, 30_000, 40_000].iter().all(|p| low.contains(p)), "{low:?}");
        assert!(!low.contains(&(10_000)), "an untouched page far from the writes is not populated");
        assert!(low.len() <= 5 * 512, "{}", low.len());
        let high = set(&populated[1]);
        assert!(high.contains(&((1 << 20) + 3)), "{high:?}");
        assert!(high.len() <= 512);
    }
}
