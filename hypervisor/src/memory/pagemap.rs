//! Which guest pages the host has: a page the guest never touched has no host
//! page at all and reads as zero, so a migration's first pass skips it without
//! reading it (a 4 GiB idle guest: 8 MiB of page map instead of 4 GiB of memory).

use super::GuestRam;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::bitmap::PageBitmap;
use crate::Error;

/// Which guest pages may hold data: each page the host has in RAM or in swap.
/// Read from `/proc/self/pagemap` (the present and swapped bits need no
/// privilege), by up to `threads` threads: the kernel's page-table walk costs
/// about 5 ms per GiB of guest memory that the host has.
pub fn populated_pages(memory: &GuestRam, threads: usize) -> Result<PageBitmap, Error> {
    const PAGE: u64 = 4096;
    // 16 Ki pages (64 MiB of guest memory, 128 KiB of page map) per piece; a
    // multiple of 64, so pieces own whole words of the bitmap.
    const PIECE: u64 = 1 << 14;
    let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(|e| Error::io("/proc/self/pagemap", e))?;
    let mut out = PageBitmap::none_of(memory);
    // (first host page, the bitmap words it fills)
    let mut pieces: Vec<(u64, &mut [u64])> = Vec::new();
    for ((_, bitmap), region) in out.regions_mut().zip(memory.iter()) {
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

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn prefaulted_memory_is_populated_and_still_zero() {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        crate::memory::prefault(&memory).unwrap();
        let populated = populated_pages(&memory, 2).unwrap();
        assert_eq!(populated.runs().collect::<Vec<_>>(), vec![(0, 2048)], "every page present");
        let mut page = [1u8; 4096];
        memory.read_slice(&mut page, GuestAddress(4 << 20)).unwrap();
        assert!(page.iter().all(|b| *b == 0));
    }

    #[test]
    fn populated_pages_are_the_ones_written() {
        // The low region spans two whole 64 MiB pieces of the page map and part of
        // a third.
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 160 << 20), (GuestAddress(1 << 32), 16 << 20)]).unwrap();
        memory.write_slice(&[1], GuestAddress(5 * 4096 + 100)).unwrap();
        memory.write_slice(&[1; 8192], GuestAddress(1000 * 4096)).unwrap();
        memory.write_slice(&[1], GuestAddress(30_000 * 4096)).unwrap();
        memory.write_slice(&[1], GuestAddress(40_000 * 4096)).unwrap();
        memory.write_slice(&[1], GuestAddress((1 << 32) + 3 * 4096)).unwrap();
        let populated = populated_pages(&memory, 1).unwrap();
        assert_eq!(populated_pages(&memory, 3).unwrap(), populated, "threads read what one thread reads");
        let (low, high): (Vec<u64>, Vec<u64>) = populated.pages().partition(|p| *p < 1 << 20);
        // Transparent huge pages may make a whole 2 MiB around a written page
        // present; pages far from any write are not.
        assert!([5, 1000, 1001, 30_000, 40_000].iter().all(|p| low.contains(p)), "{low:?}");
        assert!(!low.contains(&(10_000)), "an untouched page far from the writes is not populated");
        assert!(low.len() <= 5 * 512, "{}", low.len());
        assert!(high.contains(&((1 << 20) + 3)), "{high:?}");
        assert!(high.len() <= 512);
    }
}
