//! Copying a page out of a running guest, for a migration.

use std::arch::x86_64::{
    __m128i, _mm_cmpeq_epi8, _mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128, _mm_storeu_si128,
};

/// Copies the guest page at host address `src` into `dest`; true when the copy
/// is all zero. The copy and the zero test read the page once, 16 bytes at a
/// time with SSE2: a `memcpy` of a page (or of anything smaller than the L2
/// cache) takes its `rep movsb` path on AMD hosts, and that ran at a fifth of the
/// speed here.
///
/// The loads are volatile, as vm-memory's and Firecracker's accesses to guest
/// memory are: the guest (a vCPU on another host CPU, outside this program) may
/// write the page while it is copied, and a plain load lets the compiler assume
/// that it does not; it could then read a block twice (once for the copy, once
/// for the zero test, under register pressure) and call a page zero whose copy is
/// not. A volatile load reads each block exactly once, so the zero test is always
/// the copy's. It costs nothing: the same aligned 16-byte moves (`movdqa`), and
/// since no `memcpy` may replace volatile loads the stores can be plain ones.
///
/// # Safety
///
/// `src` must point to 4096 readable bytes, 16-byte aligned (a guest page is
/// 4096-byte aligned in the host mapping), inside a mapping that outlives the
/// call. A running guest may write them meanwhile: each aligned 8 bytes of the
/// copy is then a value the guest wrote there (x86-64 loads them atomically), but
/// the page as a whole may mix what was there before and after a write (torn);
/// the guest's write also marked the page dirty, so the next pass (or the
/// switch-over, with the guest paused) sends it again.
pub unsafe fn copy_page(src: *const u8, dest: &mut [u8; 4096]) -> bool {
    let src = src.cast::<__m128i>();
    let out = dest.as_mut_ptr().cast::<__m128i>();
    debug_assert!(src.is_aligned(), "guest pages are page-aligned");
    // SAFETY: SSE2 is part of x86-64. Every access is one of the 256 16-byte
    // blocks of the two pages: in bounds by the caller's promise (`src`) and by
    // `dest`'s type. The loads are aligned, as `read_volatile` needs (the caller
    // promises 16-byte alignment); the stores use the unaligned form, as `dest`
    // is a byte array. Concurrent guest writes make the loads race with no Rust
    // code: they are volatile, and what they may see is argued above.
    unsafe {
        let mut any = _mm_setzero_si128();
        for i in (0..256).step_by(4) {
            let (a, b, c, d) = (
                src.add(i).read_volatile(),
                src.add(i + 1).read_volatile(),
                src.add(i + 2).read_volatile(),
                src.add(i + 3).read_volatile(),
            );
            _mm_storeu_si128(out.add(i), a);
            _mm_storeu_si128(out.add(i + 1), b);
            _mm_storeu_si128(out.add(i + 2), c);
            _mm_storeu_si128(out.add(i + 3), d);
            any = _mm_or_si128(any, _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d)));
        }
        _mm_movemask_epi8(_mm_cmpeq_epi8(any, _mm_setzero_si128())) == 0xffff
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    use super::*;

    const PAGES: usize = 4;
    const WORDS: usize = 512;

    /// The value a writer puts in word `word` of page `page` in generation `generation`
    /// (generation 0 is a zero page: a page going from zero to data and back
    /// exercises the zero test too).
    fn pattern(generation: u64, page: usize, word: usize) -> u64 {
        if generation.is_multiple_of(4) { 0 } else { generation << 20 | (page as u64) << 10 | word as u64 }
    }

    #[test]
    fn pages_copied_while_a_thread_writes_them_hold_only_written_values() {
        // Guest memory as the VMM maps it; a thread stands in for a vCPU writing it.
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PAGES * 4096)]).unwrap();
        let base = memory.get_host_address(GuestAddress(0)).unwrap() as usize;
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, written) = (stop.clone(), written.clone());
            std::thread::spawn(move || {
                let mut generation = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    for page in 0..PAGES {
                        for word in 0..WORDS {
                            let at = (base + page * 4096 + word * 8) as *mut u64;
                            // SAFETY: inside the mapping, which outlives this thread
                            // (joined below); aligned; whole-u64 writes, as a guest's.
                            unsafe { at.write_volatile(pattern(generation, page, word)) };
                        }
                    }
                    written.store(generation, Ordering::Release);
                    generation += 1;
                }
            })
        };
        let mut copy = [0u8; 4096];
        let (mut zero, mut data, mut torn, mut copies) = (0u64, 0u64, 0u64, 0u64);
        let wants_torn = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
        let deadline = Instant::now() + Duration::from_secs(20);
        while copies < 20_000 || zero == 0 || data == 0 || (wants_torn && torn == 0) {
            assert!(Instant::now() < deadline, "{copies} copies: {zero} zero, {data} with data, {torn} torn");
            let page = (copies as usize) % PAGES;
            // SAFETY: the page lies in the mapping, page-aligned.
            let is_zero = unsafe { copy_page((base + page * 4096) as *const u8, &mut copy) };
            // Generations that may show in the copy: up to the one being written as it ended.
            let newest = written.load(Ordering::Acquire) + 1;
            copies += 1;
            let mut generations = std::collections::BTreeSet::new();
            for (word, bytes) in copy.chunks_exact(8).enumerate() {
                let value = u64::from_le_bytes(bytes.try_into().unwrap());
                let generation = value >> 20;
                assert!(
                    value == 0 || (value == pattern(generation, page, word) && generation <= newest),
                    "page {page} word {word}: {value:#x} was never written there"
                );
                generations.insert(if value == 0 { 0 } else { generation });
            }
            assert_eq!(is_zero, copy.iter().all(|b| *b == 0), "the zero test is not the copy's");
            match (is_zero, generations.len()) {
                (true, _) => zero += 1,
                (false, 1) => data += 1,
                (false, _) => torn += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
    }

    #[test]
    fn a_quiet_page_is_copied_exactly() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 * 4096)]).unwrap();
        let base = memory.get_host_address(GuestAddress(0)).unwrap();
        let mut copy = [1u8; 4096];
        // SAFETY: the first page of the mapping.
        assert!(unsafe { copy_page(base, &mut copy) }, "a fresh page is zero");
        assert!(copy.iter().all(|b| *b == 0));
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
        vm_memory::Bytes::write_slice(&memory, &data, GuestAddress(4096)).unwrap();
        // SAFETY: the second page.
        assert!(!unsafe { copy_page(base.add(4096), &mut copy) });
        assert_eq!(copy.as_slice(), data.as_slice());
        // One non-zero byte at the very end is seen.
        vm_memory::Bytes::write_slice(&memory, &[0u8; 4095], GuestAddress(4096)).unwrap();
        // SAFETY: the second page.
        assert!(!unsafe { copy_page(base.add(4096), &mut copy) }, "the last byte is {}", copy[4095]);
    }
}
