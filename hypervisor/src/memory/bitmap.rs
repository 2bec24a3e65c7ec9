//! Sets of guest pages as bitmaps: one bit per page, one bitmap per memory
//! region, as KVM's dirty log (`KVM_GET_DIRTY_LOG`) and the host's page map give
//! them. A migration counts them, merges them and walks them as runs of
//! consecutive pages.

use super::GuestRam;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Guest page size.
const PAGE: u64 = 4096;

/// A set of guest pages (for example, those the guest dirtied since the dirty
/// log was last read).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBitmap {
    regions: Vec<Region>,
}

/// One memory region's bits: bit `i` of word `w` is page `first_page + 64 w + i`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Region {
    first_page: u64,
    words: Vec<u64>,
}

impl PageBitmap {
    /// No pages, no regions.
    pub fn new() -> Self {
        Self::default()
    }

    /// No pages yet, with room for `regions` regions.
    pub fn with_regions(regions: usize) -> Self {
        Self { regions: Vec::with_capacity(regions) }
    }

    /// Adds a region whose first page is `first_page` with its bitmap (bit `i`:
    /// page `first_page + i`), in KVM_GET_DIRTY_LOG's layout.
    pub fn push_region(&mut self, first_page: u64, words: Vec<u64>) {
        self.regions.push(Region { first_page, words });
    }

    /// No page of `memory`, with a region for each of its regions.
    pub fn none_of(memory: &GuestRam) -> Self {
        Self { regions: regions_of(memory).map(|(first_page, pages)| Region::new(first_page, pages, false)).collect() }
    }

    /// Every page of `memory`.
    pub fn all_of(memory: &GuestRam) -> Self {
        Self { regions: regions_of(memory).map(|(first_page, pages)| Region::new(first_page, pages, true)).collect() }
    }

    /// The number of pages in the set.
    pub fn page_count(&self) -> u64 {
        self.regions.iter().flat_map(|r| &r.words).map(|w| u64::from(w.count_ones())).sum()
    }

    /// Adds the pages of `other`, which has the same regions (both are bitmaps
    /// of one VM's memory).
    pub fn merge(&mut self, other: &PageBitmap) {
        debug_assert_eq!(self.regions.len(), other.regions.len());
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            debug_assert_eq!(mine.first_page, theirs.first_page);
            mine.words.iter_mut().zip(&theirs.words).for_each(|(a, b)| *a |= *b);
        }
    }

    /// The runs of consecutive pages in the set, `(first page, count)`, in
    /// ascending order; a run never spans two regions.
    pub fn runs(&self) -> Runs<'_> {
        Runs { regions: self.regions.iter(), first_page: 0, words: &[], index: 0, bits: 0 }
    }

    /// Every page in the set, in ascending order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs().flat_map(|(first, count)| first..first + count)
    }

    /// Each region's first page and words, to fill in (the page map reader).
    pub fn regions_mut(&mut self) -> impl Iterator<Item = (u64, &mut [u64])> {
        self.regions.iter_mut().map(|r| (r.first_page, r.words.as_mut_slice()))
    }
}

impl Region {
    /// A region of `pages` pages from `first_page`, all set or none.
    fn new(first_page: u64, pages: u64, set: bool) -> Self {
        let mut words = vec![if set { u64::MAX } else { 0 }; pages.div_ceil(64) as usize];
        // Bits past the region's end stay clear: they are no pages.
        if let (true, Some(last)) = (set && !pages.is_multiple_of(64), words.last_mut()) {
            *last = (1u64 << (pages % 64)) - 1;
        }
        Self { first_page, words }
    }
}

/// `(first page, page count)` of each region of `memory`.
fn regions_of(memory: &GuestRam) -> impl Iterator<Item = (u64, u64)> + '_ {
    memory.iter().map(|r| (r.start_addr().0 / PAGE, r.len() / PAGE))
}

/// The runs of a [`PageBitmap`]: whole words of set bits are taken at once, so a
/// fully written region costs a few operations per 64 pages, not one per page.
pub struct Runs<'a> {
    regions: std::slice::Iter<'a, Region>,
    /// The region being walked.
    first_page: u64,
    words: &'a [u64],
    /// The word being walked, and its bits not yet given out.
    index: usize,
    bits: u64,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        // The next set bit, in this word or a later one, or in a later region.
        while self.bits == 0 {
            self.index += 1;
            match self.words.get(self.index) {
                Some(&word) => self.bits = word,
                None => {
                    let region = self.regions.next()?;
                    self.first_page = region.first_page;
                    self.words = &region.words;
                    self.index = 0;
                    self.bits = self.words.first().copied().unwrap_or(0);
                }
            }
        }
        let start_bit = self.bits.trailing_zeros();
        let first = self.first_page + self.index as u64 * 64 + u64::from(start_bit);
        let ones = (self.bits >> start_bit).trailing_ones();
        let end_bit = start_bit + ones;
        if end_bit < 64 {
            // The run ends inside this word.
            self.bits &= u64::MAX << end_bit;
            return Some((first, u64::from(ones)));
        }
        // The run reaches the end of the word: it goes on through the next words
        // while they are full, and ends inside the first that is not (or with the
        // region).
        let mut count = u64::from(ones);
        self.bits = 0;
        while let Some(&word) = self.words.get(self.index + 1) {
            self.index += 1;
            let ones = word.trailing_ones();
            count += u64::from(ones);
            if ones < 64 {
                self.bits = word & (u64::MAX << ones);
                break;
            }
        }
        Some((first, count))
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    fn bitmap(regions: Regions) -> PageBitmap {
        let mut b = PageBitmap::new();
        for (first, words) in regions {
            b.push_region(*first, words.to_vec());
        }
        b
    }

    /// Runs as a bit-by-bit walk finds them (the reference).
    fn slow_runs(b: &PageBitmap) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for r in &b.regions {
            let mut last: Option<u64> = None;
            for page in 0..r.words.len() as u64 * 64 {
                if r.words[(page / 64) as usize] >> (page % 64) & 1 == 0 {
                    continue;
                }
                let page = r.first_page + page;
                match (last, runs.last_mut()) {
                    (Some(l), Some(run)) if l + 1 == page => run.1 += 1,
                    _ => runs.push((page, 1)),
                }
                last = Some(page);
            }
        }
        runs
    }

    /// Regions as `(first page, words)`.
    type Regions<'a> = &'a [(u64, &'a [u64])];

    #[test]
    fn runs_of_a_table_of_bitmaps() {
        let cases: &[(Regions, &[(u64, u64)])] = &[
            (&[], &[]),
            (&[(0, &[0, 0])], &[]),
            (&[(0, &[1])], &[(0, 1)]),
            (&[(0, &[0b1011_0110])], &[(1, 2), (4, 2), (7, 1)]),
            (&[(10, &[1 << 63, 1])], &[(73, 2)]),
            (&[(0, &[u64::MAX])], &[(0, 64)]),
            (&[(0, &[u64::MAX, u64::MAX, 0b111])], &[(0, 131)]),
            (&[(0, &[u64::MAX << 60, u64::MAX, 0b10])], &[(60, 68), (129, 1)]),
            (&[(0, &[u64::MAX]), (1 << 20, &[u64::MAX])], &[(0, 64), (1 << 20, 64)]),
            (&[(0, &[1 << 63]), (64, &[1])], &[(63, 1), (64, 1)]),
            (&[(0, &[]), (100, &[0, 0b11 << 62])], &[(226, 2)]),
        ];
        for (regions, want) in cases {
            let b = bitmap(regions);
            assert_eq!(b.runs().collect::<Vec<_>>(), *want, "{regions:?}");
            assert_eq!(b.page_count(), want.iter().map(|(_, n)| n).sum::<u64>(), "{regions:?}");
        }
    }

    #[test]
    fn runs_match_a_bit_by_bit_walk() {
        // Pseudo-random words, biased to all-zero and all-one words too.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 5 {
                0 => 0,
                1 => u64::MAX,
                2 => x & (x >> 3),
                _ => x,
            }
        };
        for _ in 0..200 {
            let words: Vec<u64> = (0..8).map(|_| next()).collect();
            let more: Vec<u64> = (0..3).map(|_| next()).collect();
            let b = bitmap(&[(0, &words), (4096, &more)]);
            assert_eq!(b.runs().collect::<Vec<_>>(), slow_runs(&b), "{words:x?} {more:x?}");
            assert_eq!(b.pages().count() as u64, b.page_count());
        }
    }

    #[test]
    fn all_none_and_merge_cover_the_regions_of_memory() {
        // 100 pages (not a multiple of 64) and 256 pages at 4 GiB.
        let memory =
            GuestRam::from_ranges(&[(GuestAddress(0), 100 * 4096), (GuestAddress(1 << 32), 256 * 4096)]).unwrap();
        let all = PageBitmap::all_of(&memory);
        assert_eq!(all.page_count(), 356);
        assert_eq!(all.runs().collect::<Vec<_>>(), vec![(0, 100), (1 << 20, 256)], "no pages past a region's end");
        let mut some = PageBitmap::none_of(&memory);
        assert_eq!(some.page_count(), 0);
        let mut other = bitmap(&[(0, &[0b100, 0]), (1 << 20, &[0, 1, 0, 0])]);
        some.merge(&other);
        other.merge(&bitmap(&[(0, &[0b1, 0]), (1 << 20, &[0; 4])]));
        assert_eq!(some.pages().collect::<Vec<_>>(), vec![2, (1 << 20) + 64]);
        assert_eq!(other.pages().collect::<Vec<_>>(), vec![0, 2, (1 << 20) + 64]);
    }
}
