//! The lanes pages travel on, and sending pages on them: each lane is one
//! encrypted connection with a thread at each end (the first lane also carries
//! everything else); a lane sends the pages of its blocks (`wire::lane_of`),
//! copied out of guest memory a run at a time, tested for zero in the copy and
//! sealed where they lie.

use std::io::Write;

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::Error;
use crate::control::VmControl;
use crate::memory::PageBitmap;
use crate::migration::channel::SecureStream;
use crate::migration::wire::{self, Frame, PAGE_SIZE};

/// Largest run of pages in one Pages frame: a block (1 MiB), sent as one channel
/// message. Shorter runs (64 and 32 pages) measured 20-40% slower for a fully
/// written guest.
const RUN: usize = wire::BLOCK_PAGES as usize;

/// A pass of at most this many pages goes from the calling thread, lane after
/// lane: a thread per lane costs 50-80 µs to start, more than 2 MiB take to send,
/// and at switch-over (a few pages, usually) that is downtime. With 8 lanes on a
/// 16-CPU host the idle guest's last pass took 0.58 ms in threads.
const SMALL_PASS_PAGES: u64 = 512;

/// Zero pages are named in a Zero frame once this many wait.
const ZERO_BATCH: usize = 4096;

/// One connection pages travel on, and what it has sent.
pub struct Lane {
    pub out: SecureStream,
    sender: PageSender,
}

impl Lane {
    pub fn new(out: SecureStream) -> Self {
        Self { out, sender: PageSender::default() }
    }

    /// Sends `frame` and everything before it.
    pub fn send(&mut self, frame: &Frame) -> Result<(), Error> {
        wire::write_frame(&mut self.out, frame)?;
        self.out.flush().map_err(|e| Error::Migration(format!("sending: {e}")))
    }

    /// Waits for the target's `want`.
    pub fn wait_for(&mut self, want: &'static str) -> Result<(), Error> {
        wait_for(&mut self.out, want)
    }
}

/// Waits for the target's `want` on `out`; an Abort says why the target gave up.
pub fn wait_for(out: &mut SecureStream, want: &'static str) -> Result<(), Error> {
    match wire::read_frame(out) {
        Ok(f) if f.name() == want => Ok(()),
        Ok(Frame::Abort(why)) => Err(Error::Migration(format!("the target gave up: {why}"))),
        Ok(f) => Err(Error::Wire(wire::WireError::Unexpected { got: f.name(), want })),
        Err(e) => Err(Error::Migration(format!("waiting for {want} from the target: {e}"))),
    }
}

/// Sends the pages in `pages` (`total` of them, as [`PageBitmap::page_count`]
/// gives), each lane its blocks, lanes in parallel; with `skip_zero`, zero pages
/// are not sent at all (only right when the target's copy is known to be zero).
pub fn send_pages(
    control: &VmControl,
    lanes: &mut [Lane],
    pages: &PageBitmap,
    total: u64,
    skip_zero: bool,
) -> Result<(), Error> {
    let count = lanes.len() as u32;
    if total <= SMALL_PASS_PAGES {
        return (0..)
            .zip(lanes.iter_mut())
            .try_for_each(|(i, lane)| lane.sender.send_bitmap(control, &mut lane.out, pages, skip_zero, i, count));
    }
    let Some((main, others)) = lanes.split_first_mut() else { return Ok(()) };
    std::thread::scope(|scope| {
        let workers: Vec<_> = others
            .iter_mut()
            .enumerate()
            .map(|(i, lane)| {
                scope.spawn(move || {
                    lane.sender.send_bitmap(control, &mut lane.out, pages, skip_zero, i as u32 + 1, count)
                })
            })
            .collect();
        let mut result = main.sender.send_bitmap(control, &mut main.out, pages, skip_zero, 0, count);
        for worker in workers {
            let outcome = worker.join().unwrap_or_else(|_| Err(Error::Migration("a lane's thread panicked".into())));
            if result.is_ok() {
                result = outcome;
            }
        }
        result
    })
}

/// Waits until the target has every page sent so far in guest memory. A pass's
/// time then counts until the pages arrived, not until the sockets' buffers took
/// them: on loopback those hold tens of MiB, and a pass of a few MiB looked
/// instant while a slower target still worked through it, which made the
/// switch-over's estimate short (26 ms estimated, 38 ms taken).
pub fn sync(lanes: &mut [Lane]) -> Result<(), Error> {
    for lane in lanes.iter_mut() {
        lane.send(&Frame::Sync)?;
    }
    lanes.iter_mut().try_for_each(|lane| lane.wait_for("Synced"))
}

/// Bytes and pages sent on all lanes.
pub fn sent(lanes: &[Lane]) -> (u64, u64) {
    lanes.iter().fold((0, 0), |(b, p), l| (b + l.sender.bytes, p + l.sender.pages))
}

/// Sends pages: copies runs of up to RUN contiguous pages out of guest memory,
/// testing each for zero as it goes; skips (first pass) or names (later passes)
/// the zero ones, and sends the rest as Pages frames, encrypted in the copy.
struct PageSender {
    bytes: u64,
    pages: u64,
    zero: Vec<u64>,
    buf: Vec<u8>,
}

impl Default for PageSender {
    fn default() -> Self {
        Self { bytes: 0, pages: 0, zero: Vec::new(), buf: vec![0; RUN * PAGE_SIZE] }
    }
}

impl PageSender {
    /// Sends the pages in `pages` whose blocks are lane `lane`'s (of `lanes`).
    fn send_bitmap(
        &mut self,
        control: &VmControl,
        out: &mut SecureStream,
        pages: &PageBitmap,
        skip_zero: bool,
        lane: u32,
        lanes: u32,
    ) -> Result<(), Error> {
        for (first, count) in pages.runs() {
            // A run may span blocks, and so lanes: each block's part goes on its own.
            let end = first + count;
            let mut start = first;
            while start < end {
                let stop = end.min((start / wire::BLOCK_PAGES + 1) * wire::BLOCK_PAGES);
                if wire::lane_of(start, lanes) == lane {
                    self.send_run(control, out, start, stop - start, skip_zero)?;
                }
                start = stop;
            }
        }
        self.flush(out)
    }

    /// Sends `count` (at most RUN) contiguous pages from `first`.
    fn send_run(
        &mut self,
        control: &VmControl,
        out: &mut SecureStream,
        first: u64,
        count: u64,
        skip_zero: bool,
    ) -> Result<(), Error> {
        let len = count as usize * PAGE_SIZE;
        let vm = control.vm();
        let source = vm
            .memory
            .get_slice(GuestAddress(first << 12), len)
            .map_err(|e| Error::Memory(format!("reading pages {first}+{count}: {e}")))?;
        let base = source.ptr_guard().as_ptr();
        let mut start = None;
        for i in 0..count as usize {
            let page = &mut self.buf.as_chunks_mut::<PAGE_SIZE>().0[i];
            // SAFETY: `get_slice` checked that the run lies in one mapped region,
            // which `vm` keeps alive; pages are 4096-byte aligned there.
            let zero = unsafe { crate::memory::copy_page(base.add(i * PAGE_SIZE), page) };
            match (zero, start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    self.write_pages(out, first + s as u64, s, i)?;
                    start = None;
                }
                _ => {}
            }
            if zero && !skip_zero {
                self.zero.push(first + i as u64);
            }
        }
        if let Some(s) = start {
            self.write_pages(out, first + s as u64, s, count as usize)?;
        }
        if self.zero.len() >= ZERO_BATCH {
            self.flush_zero(out)?;
        }
        Ok(())
    }

    /// Sends pages `from..to` of the run in `buf` (encrypted in place: `buf` is
    /// spent afterwards).
    fn write_pages(&mut self, out: &mut SecureStream, page: u64, from: usize, to: usize) -> Result<(), Error> {
        wire::write_pages(out, page, &mut self.buf[from * PAGE_SIZE..to * PAGE_SIZE])?;
        self.pages += (to - from) as u64;
        self.bytes += ((to - from) * PAGE_SIZE) as u64 + 21;
        Ok(())
    }

    fn flush_zero(&mut self, out: &mut SecureStream) -> Result<(), Error> {
        if !self.zero.is_empty() {
            self.bytes += self.zero.len() as u64 * 8 + 13;
            wire::write_frame(out, &Frame::Zero(std::mem::take(&mut self.zero)))?;
        }
        Ok(())
    }

    fn flush(&mut self, out: &mut SecureStream) -> Result<(), Error> {
        self.flush_zero(out)?;
        out.flush().map_err(|e| Error::Migration(format!("sending to the target: {e}")))
    }
}
