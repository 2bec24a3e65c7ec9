//! The source side: pre-copy of guest memory while the guest runs, then the
//! switch-over. The guest stays on the source until the target has the whole VM
//! and the source has said it will never run it again (`Go`); any failure before
//! that resumes it here.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::channel::SecureStream;
use super::wire::{self, Frame, Hello, PAGE_SIZE};
use crate::Error;
use crate::control::VmControl;
use crate::exit::VmExit;
use drover_vmm_api::api::MigrationPhase as Phase;

pub use drover_vmm_api::api::{DEFAULT_MAX_DOWNTIME_MS, MigrateRequest};

/// Below this estimated pause (µs), pre-copy stops even while passes still shrink.
/// The pages of the last pass go while the guest is paused: a pass of 2 ms left
/// 2 ms of pages to send paused, where one more short pass leaves a tenth of that.
const DOWNTIME_FLOOR_US: u64 = 500;

/// What a switch-over costs besides its pages, counted against the budget: the
/// pause, the state, the target's restore and two round trips (0.7-1 ms measured
/// on our hosts in release builds).
const SWITCHOVER_FIXED_US: u64 = 1000;

/// A pass that moves less than this measures latency more than bandwidth: it
/// can only raise the bandwidth estimate, never lower it.
const BANDWIDTH_SAMPLE_BYTES: u64 = 1 << 20;

/// The number of lanes a request asks for, checked.
fn lanes(request: &MigrateRequest) -> Result<u32, Error> {
    match request.lanes {
        Some(n) if (1..=wire::MAX_LANES).contains(&n) => Ok(n),
        Some(n) => Err(Error::Config(format!("lanes is {n}: give 1 to {}", wire::MAX_LANES))),
        // A lane keeps one CPU busy at each end while pages flow (AES-GCM,
        // the kernel's TCP copies, CRC) and carries 2.5-3 GiB/s; lanes add up
        // until the host's memory or link is the limit. The work is the same
        // whatever the count, only spread: half the host's CPUs, up to 8,
        // leaves the other half to the guests for the second or less it
        // takes. Fully written 1 GiB guest on a 16-CPU host, 1/2/4/8 lanes:
        // 405/214/166/95 ms (QEMU 313 ms). On a 2-CPU host, which source and
        // target share, 2 lanes were no faster than 1.
        None => Ok((std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).clamp(1, 8) as u32),
    }
}

/// The shared secret a request gives, from the request or its file.
fn secret(request: &MigrateRequest) -> Result<Vec<u8>, Error> {
    match (&request.secret, &request.secret_file) {
        (Some(s), None) if !s.is_empty() => Ok(s.as_bytes().to_vec()),
        (None, Some(path)) => {
            let bytes =
                std::fs::read(path).map_err(|e| Error::Config(format!("secretFile {}: {e}", path.display())))?;
            let trimmed = bytes.trim_ascii().to_vec();
            if trimmed.is_empty() {
                Err(Error::Config(format!("secretFile {} is empty", path.display())))
            } else {
                Ok(trimmed)
            }
        }
        _ => Err(Error::Config("give exactly one of secret and secretFile".into())),
    }
}

/// Largest run of pages in one Pages frame: a block (1 MiB), sent as one channel
/// message. Shorter runs (64 and 32 pages) measured 20-40% slower for a fully
/// written guest.
const RUN: usize = wire::BLOCK_PAGES as usize;

/// Starts the migration in a thread of its own; progress goes to the control's
/// migration status. Refused if one is under way.
pub fn start(control: Arc<VmControl>, request: MigrateRequest) -> Result<(), Error> {
    let secret = secret(&request)?;
    let lanes = lanes(&request)?;
    control.migration().begin(&request.destination)?;
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let started = Instant::now();
            let result = migrate(&control, &request, &secret, lanes, started);
            control.migration().update(|s| s.total_ms = started.elapsed().as_millis() as u64);
            match result {
                Ok(()) => {
                    let s = control.migration_status();
                    tracing::info!(
                        destination = %request.destination,
                        downtime_ms = s.downtime_ms.unwrap_or(0),
                        downtime_us = s.downtime_us.unwrap_or(0),
                        total_ms = s.total_ms,
                        bytes_sent = s.bytes_sent,
                        passes = s.pass,
                        throttle_percent = s.throttle_percent,
                        "migration completed; the VM runs on the target"
                    );
                    write_status_file(&control, &request);
                    control.end(VmExit::MigratedOut(request.destination.clone()));
                }
                Err(Outcome::Failed(e)) => {
                    let cancelled = control.migration().cancelled();
                    tracing::warn!(
                        "migration to {} {}: {e}; the VM keeps running here",
                        request.destination,
                        if cancelled { "cancelled" } else { "failed" }
                    );
                    control.migration().update(|s| {
                        s.phase = if cancelled { Phase::Cancelled } else { Phase::Failed };
                        s.error = Some(e.to_string());
                    });
                }
                Err(Outcome::Unknown(e)) => {
                    tracing::error!(
                        "migration to {}: {e}; the VM stays paused here until someone checks the target",
                        request.destination
                    );
                    control.migration().update(|s| {
                        s.phase = Phase::Unknown;
                        s.error = Some(e.to_string());
                    });
                }
            }
            if !matches!(control.migration_status().phase, Phase::Completed) {
                write_status_file(&control, &request);
            }
            control.migration().finish();
        })
        .map_err(|e| Error::io("starting the migration thread", e))?;
    Ok(())
}

/// Writes the final figures where the request asked, as a whole file (temporary
/// file renamed) so that a reader never sees half.
fn write_status_file(control: &VmControl, request: &MigrateRequest) {
    let Some(path) = &request.status_file else { return };
    let tmp = path.with_extension("tmp");
    let result = serde_json::to_vec(&control.migration_status())
        .map_err(std::io::Error::other)
        .and_then(|json| std::fs::write(&tmp, json))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        tracing::warn!("cannot write the migration figures to {}: {e}", path.display());
    }
}

enum Outcome {
    /// The VM runs here again (or never stopped).
    Failed(Error),
    /// Past the point of no return: the VM is paused here.
    Unknown(Error),
}

impl<E> From<E> for Outcome
where
    Error: From<E>,
{
    fn from(e: E) -> Self {
        Outcome::Failed(e.into())
    }
}

fn migrate(
    control: &Arc<VmControl>,
    req: &MigrateRequest,
    secret: &[u8],
    lanes: u32,
    started: Instant,
) -> Result<(), Outcome> {
    let deadline = started + Duration::from_secs(req.timeout_seconds);
    let addr = req
        .destination
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("destination {}: {e}", req.destination)))?
        .next()
        .ok_or_else(|| Error::Config(format!("destination {} resolves to nothing", req.destination)))?;
    let connect = || -> Result<TcpStream, Error> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| Error::Migration(format!("connecting to {}: {e}", req.destination)))?;
        tcp.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| Error::io("a migration connection", e))?;
        if let Ok(clone) = tcp.try_clone() {
            control.migration().add_socket(clone);
        }
        Ok(tcp)
    };
    let mut tcp = connect()?;
    wire::write_preamble(&mut tcp)?;
    let mut main = SecureStream::initiate(tcp, secret, &wire::preamble())?;
    let mut session = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut session)
        .map_err(|_| Error::Internal("no random numbers for the migration session".into()))?;
    let hello = Hello { version: wire::VERSION, config: control.config().clone(), lanes, session };
    wire::write_frame(&mut main, &Frame::Hello(Box::new(hello)))?;
    main.flush().map_err(|e| Error::Migration(format!("sending to the target: {e}")))?;
    // The target says whether it takes this VM before the other lanes connect.
    expect(&mut main, "Welcome")?;
    let mut outs = vec![main];
    for index in 1..lanes {
        let mut tcp = connect()?;
        wire::write_preamble(&mut tcp)?;
        tcp.write_all(&index.to_le_bytes()).map_err(|e| Error::Migration(format!("opening lane {index}: {e}")))?;
        outs.push(
            SecureStream::initiate(tcp, secret, &wire::lane_prologue(&session, index))
                .map_err(|e| Error::Migration(format!("lane {index}: {e}")))?,
        );
    }
    let mut lanes: Vec<Lane> = outs.into_iter().map(|out| Lane { out, sender: Sender::default() }).collect();

    let vm = control.vm();
    vm.set_dirty_logging(true)?;
    // Start from an empty log: what the guest writes from now on shows in the next pass.
    vm.take_dirty_pages()?;
    let result = precopy_and_switch(control, req, &mut lanes, started, deadline);
    if !matches!(result, Ok(()) | Err(Outcome::Unknown(_))) {
        if let Err(e) = vm.set_dirty_logging(false) {
            tracing::warn!("turning dirty logging off: {e}");
        }
        let main = &mut lanes[0].out;
        let _ = wire::write_frame(main, &Frame::Abort("the source gave up".into()));
        let _ = main.flush();
    }
    result
}

/// One connection pages travel on, and what it has sent.
struct Lane {
    out: SecureStream,
    sender: Sender,
}

/// A pass of at most this many pages goes from the calling thread, lane after
/// lane: a thread per lane costs 50-80 µs to start, more than 2 MiB take to send,
/// and at switch-over (a few pages, usually) that is downtime. With 8 lanes on a
/// 16-CPU host the idle guest's last pass took 0.58 ms in threads.
const SMALL_PASS_PAGES: u64 = 512;

/// The pages whose bits are set.
fn page_count(pages: &[(u64, Vec<u64>)]) -> u64 {
    pages.iter().flat_map(|(_, bitmap)| bitmap).map(|w| u64::from(w.count_ones())).sum()
}

/// Sends the pages whose bits are set (`total` of them, as [`page_count`] gives),
/// each lane its blocks, lanes in parallel.
fn send_pages(
    control: &VmControl,
    lanes: &mut [Lane],
    pages: &[(u64, Vec<u64>)],
    total: u64,
    skip_zero: bool,
) -> Result<(), Error> {
    let count = lanes.len() as u32;
    if total <= SMALL_PASS_PAGES {
        return (0..)
            .zip(lanes.iter_mut())
            .try_for_each(|(i, lane)| lane.sender.send_bitmaps(control, &mut lane.out, pages, skip_zero, i, count));
    }
    let Some((main, others)) = lanes.split_first_mut() else { return Ok(()) };
    std::thread::scope(|scope| {
        let workers: Vec<_> = others
            .iter_mut()
            .enumerate()
            .map(|(i, lane)| {
                scope.spawn(move || {
                    lane.sender.send_bitmaps(control, &mut lane.out, pages, skip_zero, i as u32 + 1, count)
                })
            })
            .collect();
        let mut result = main.sender.send_bitmaps(control, &mut main.out, pages, skip_zero, 0, count);
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
fn sync(lanes: &mut [Lane]) -> Result<(), Error> {
    for lane in lanes.iter_mut() {
        wire::write_frame(&mut lane.out, &Frame::Sync)?;
        lane.out.flush().map_err(|e| Error::Migration(format!("sending: {e}")))?;
    }
    lanes.iter_mut().try_for_each(|lane| expect(&mut lane.out, "Synced"))
}

/// Bytes and pages sent on all lanes.
fn sent(lanes: &[Lane]) -> (u64, u64) {
    lanes.iter().fold((0, 0), |(b, p), l| (b + l.sender.bytes, p + l.sender.pages))
}

fn precopy_and_switch(
    control: &Arc<VmControl>,
    req: &MigrateRequest,
    lanes: &mut [Lane],
    started: Instant,
    deadline: Instant,
) -> Result<(), Outcome> {
    let vm = control.vm();
    control.migration().update(|s| s.phase = Phase::PreCopy);
    // Pass 1: every page that is not zero (the target starts with zeroed memory).
    // Pages the host never gave the guest are zero without reading them; the rest
    // are read and their zero pages skipped.
    let pass_start = Instant::now();
    let candidates = crate::memory::populated_pages(&vm.memory, lanes.len()).unwrap_or_else(|e| {
        tracing::warn!("reading every guest page ({e})");
        vm.memory
            .iter()
            .map(|r| (r.start_addr().0 >> 12, vec![u64::MAX; (r.len() / PAGE_SIZE as u64).div_ceil(64) as usize]))
            .collect()
    });
    tracing::debug!(us = pass_start.elapsed().as_micros() as u64, "pass 1: pages the host has, read from pagemap");
    send_pages(control, lanes, &candidates, page_count(&candidates), true)?;
    sync(lanes)?;
    let (bytes, pages) = sent(lanes);
    let mut bandwidth = rate(bytes, pass_start.elapsed());
    control.migration().update(|s| {
        s.pass = 1;
        s.bandwidth_bps = bandwidth;
        s.bytes_sent = bytes;
        s.total_ms = started.elapsed().as_millis() as u64;
    });

    let throttle = Throttle::new(control.clone());
    let mut pass = 1;
    // What the last pass sent: a pass that dirties half of it or more does not converge.
    let mut last_dirty = pages.max(1);
    // Pages dirtied since the last pass, taken from KVM but not sent yet: they go
    // with the last ones at switch-over.
    // When the dirty log was last read: the guest's dirty rate is what it dirtied since.
    let mut logged_at = pass_start;
    let pending = loop {
        check(control, deadline)?;
        let pass_start = Instant::now();
        let dirty = vm.take_dirty_pages()?;
        let count = page_count(&dirty);
        let dirty_rate = rate(count * PAGE_SIZE as u64, logged_at.elapsed());
        logged_at = pass_start;
        let estimate_us = (count * PAGE_SIZE as u64 * 1_000_000).checked_div(bandwidth.max(1)).unwrap_or(u64::MAX);
        let estimate_ms = estimate_us.saturating_add(SWITCHOVER_FIXED_US).div_ceil(1000);
        tracing::debug!(pass, dirty_pages = count, estimate_us, bandwidth, "migration pass");
        control.migration().update(|s| {
            s.dirty_pages = count;
            s.estimated_downtime_ms = estimate_ms;
            s.bytes_sent = sent(lanes).0;
            s.total_ms = started.elapsed().as_millis() as u64;
        });
        // Within the budget, keep copying while each pass at least halves what is
        // left, down to the floor: a pass that small costs the running guest
        // nothing, and every page sent now is one less to send while it is paused.
        let shrinking = count * 2 <= last_dirty;
        if estimate_ms <= req.max_downtime_ms
            && (estimate_us <= DOWNTIME_FLOOR_US || !shrinking || pass + 1 >= req.max_passes)
        {
            break dirty;
        }
        pass += 1;
        if pass > req.max_passes {
            throttle.stop();
            return Err(Error::Migration(format!(
                "did not converge in {} passes: the guest still dirties {} MiB per pass (estimated pause {estimate_ms} ms, budget {} ms)",
                req.max_passes,
                (count * PAGE_SIZE as u64) >> 20,
                req.max_downtime_ms
            ))
            .into());
        }
        // Auto-converge: a pass that did not halve what is left means the guest
        // dirties memory about as fast as the link carries it; slow its vCPUs one
        // step per such pass (waiting longer only makes the migration longer).
        if !shrinking && estimate_ms > req.max_downtime_ms {
            throttle.raise(needed_throttle(dirty_rate, bandwidth));
        }
        last_dirty = count;
        let before = sent(lanes).0;
        send_pages(control, lanes, &dirty, count, false)?;
        sync(lanes)?;
        let elapsed = pass_start.elapsed();
        // The link as the last pass found it (end to end, see `sync`), as QEMU
        // measures it, rather than the best rate seen so far.
        let moved = sent(lanes).0 - before;
        let measured = rate(moved, elapsed);
        if moved >= BANDWIDTH_SAMPLE_BYTES || measured > bandwidth {
            bandwidth = measured;
        }
        control.migration().update(|s| {
            s.pass = pass;
            s.bandwidth_bps = bandwidth;
            s.dirty_rate_bps = rate(count * PAGE_SIZE as u64, elapsed);
            s.throttle_percent = throttle.percent();
        });
    };
    throttle.hand_over();

    // Switch-over: pause, last pages, state; then the handshake that hands the VM over.
    control.migration().update(|s| s.phase = Phase::Switchover);
    let paused_at = Instant::now();
    // The vCPUs save their state as they park, while the last pages go.
    control.pause_and_save()?;
    let step = |what: &str| tracing::debug!(us = paused_at.elapsed().as_micros() as u64, "switch-over: {what}");
    step("paused");
    let handover = (|| -> Result<(), Error> {
        let mut dirty = vm.take_dirty_pages()?;
        step("dirty log read");
        for ((_, last), (_, earlier)) in dirty.iter_mut().zip(&pending) {
            last.iter_mut().zip(earlier).for_each(|(a, b)| *a |= *b);
        }
        let last_pages = page_count(&dirty);
        tracing::debug!(pages = last_pages, "switch-over: pages to send paused");
        send_pages(control, lanes, &dirty, last_pages, false)?;
        for lane in lanes.iter_mut().skip(1) {
            wire::write_frame(&mut lane.out, &Frame::Done)?;
            lane.out.flush().map_err(|e| Error::Migration(format!("sending: {e}")))?;
        }
        step("last pages sent");
        let state = control.save_state()?.encode()?;
        step("state captured");
        let out = &mut lanes[0].out;
        wire::write_frame(out, &Frame::State(state))?;
        wire::write_frame(out, &Frame::Done)?;
        out.flush().map_err(|e| Error::Migration(format!("sending: {e}")))?;
        expect(out, "Ready")?;
        step("target ready");
        Ok(())
    })();
    if let Err(e) = handover {
        control.resume();
        return Err(e.into());
    }
    // The point of no return: from here on this VMM never runs the guest again.
    control.migration().commit();
    let out = &mut lanes[0].out;
    let confirmed = (|| -> Result<(), Error> {
        wire::write_frame(out, &Frame::Go)?;
        out.flush().map_err(|e| Error::Migration(format!("sending Go: {e}")))?;
        expect(out, "Resumed")
    })();
    let downtime = paused_at.elapsed();
    let (bytes, pages) = sent(lanes);
    control.migration().update(|s| {
        s.downtime_ms = Some(downtime.as_millis() as u64);
        s.downtime_us = Some(downtime.as_micros() as u64);
        s.bytes_sent = bytes;
        s.pages_sent = pages;
    });
    confirmed.map_err(Outcome::Unknown)?;
    control.migration().update(|s| s.phase = Phase::Completed);
    Ok(())
}

fn expect(out: &mut SecureStream, want: &'static str) -> Result<(), Error> {
    match wire::read_frame(out) {
        Ok(f) if f.name() == want => Ok(()),
        Ok(Frame::Abort(why)) => Err(Error::Migration(format!("the target gave up: {why}"))),
        Ok(f) => Err(Error::Wire(wire::WireError::Unexpected { got: f.name(), want })),
        Err(e) => Err(Error::Migration(format!("waiting for {want} from the target: {e}"))),
    }
}

fn check(control: &VmControl, deadline: Instant) -> Result<(), Error> {
    if control.migration().cancelled() {
        return Err(Error::Migration("cancelled".into()));
    }
    if Instant::now() > deadline {
        return Err(Error::Migration("timed out".into()));
    }
    Ok(())
}

fn rate(bytes: u64, elapsed: Duration) -> u64 {
    (bytes as f64 / elapsed.as_secs_f64().max(1e-6)) as u64
}

/// Sends pages: copies runs of up to RUN contiguous pages out of guest memory,
/// testing each for zero as it goes; skips (first pass) or names (later passes)
/// the zero ones, and sends the rest as Pages frames, encrypted in the copy.
struct Sender {
    bytes: u64,
    pages: u64,
    zero: Vec<u64>,
    buf: Vec<u8>,
}

impl Default for Sender {
    fn default() -> Self {
        Self { bytes: 0, pages: 0, zero: Vec::new(), buf: vec![0; RUN * PAGE_SIZE] }
    }
}

impl Sender {
    /// Sends the pages whose bits are set and whose blocks are lane `lane`'s (of
    /// `lanes`); with `skip_zero`, zero pages are not sent at all (only right when
    /// the target's copy is known to be zero).
    fn send_bitmaps(
        &mut self,
        control: &VmControl,
        out: &mut SecureStream,
        pages: &[(u64, Vec<u64>)],
        skip_zero: bool,
        lane: u32,
        lanes: u32,
    ) -> Result<(), Error> {
        for (first_page, bitmap) in pages {
            // Walk set bits, folding consecutive pages of one block into runs.
            let mut run: Option<(u64, u64)> = None;
            for (word_index, word) in bitmap.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let page = first_page + word_index as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    if wire::lane_of(page, lanes) != lane {
                        continue;
                    }
                    run = match run {
                        Some((start, n))
                            if start + n == page && start / wire::BLOCK_PAGES == page / wire::BLOCK_PAGES =>
                        {
                            Some((start, n + 1))
                        }
                        Some((start, n)) => {
                            self.send_run(control, out, start, n, skip_zero)?;
                            Some((page, 1))
                        }
                        None => Some((page, 1)),
                    };
                }
            }
            if let Some((start, n)) = run {
                self.send_run(control, out, start, n, skip_zero)?;
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
        if self.zero.len() >= 4096 {
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

/// Auto-converge: pauses the vCPUs for a growing share of every 20 ms.
/// The throttle (percent of time the vCPUs are held) that brings a guest dirtying
/// `dirty_rate` bytes/s down to a quarter of the link's `bandwidth`, so that each
/// pass leaves at most a quarter of itself to the next: what it takes to converge
/// in a few passes rather than creeping up on it one step per pass.
fn needed_throttle(dirty_rate: u64, bandwidth: u64) -> u32 {
    if dirty_rate == 0 {
        return 0;
    }
    let allowed = bandwidth as f64 / 4.0;
    (((1.0 - allowed / dirty_rate as f64) * 100.0).ceil().clamp(0.0, 99.0)) as u32
}

struct Throttle {
    percent: Arc<AtomicU32>,
    /// Set to end the throttle; its thread waits on the condvar, so it ends at
    /// once rather than at the end of its 20 ms cycle (a guest still dirtying at
    /// the throttled rate for that long added pages the switch-over's estimate
    /// had not counted).
    end: Arc<(std::sync::Mutex<ThrottleEnd>, std::sync::Condvar)>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    control: Arc<VmControl>,
}

const THROTTLE_STEPS: [u32; 6] = [30, 50, 70, 85, 95, 99];

/// How a throttle ends.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum ThrottleEnd {
    #[default]
    NotYet,
    /// The vCPUs run on (the migration gave up, or ended).
    Resume,
    /// The switch-over takes the vCPUs over: if the throttle holds them, they
    /// stay held. Letting them go for the microseconds before the switch-over's
    /// own pause let a guest dirtying 4 GB/s add 800 pages that no estimate had
    /// counted (18 ms of downtime in a dev build).
    HandOver,
}

impl Throttle {
    fn new(control: Arc<VmControl>) -> Self {
        Self { percent: Arc::new(AtomicU32::new(0)), end: Arc::default(), thread: std::sync::Mutex::new(None), control }
    }

    fn percent(&self) -> u32 {
        self.percent.load(Ordering::Relaxed)
    }

    /// One step up, or straight to `at_least` percent when that is more.
    fn raise(&self, at_least: u32) {
        let now = self.percent();
        let step = THROTTLE_STEPS.iter().copied().find(|p| *p > now).unwrap_or(99);
        let next = step.max(at_least.min(99));
        self.percent.store(next, Ordering::Relaxed);
        tracing::info!(percent = next, "migration: throttling vCPUs to converge");
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if thread.is_none() {
            let (percent, ending, control) = (self.percent.clone(), self.end.clone(), self.control.clone());
            *thread = std::thread::Builder::new()
                .name("throttle".into())
                .spawn(move || {
                    // Sleeps `d` unless told to end first; says how to end.
                    let end_within = |d: Duration| {
                        let (end, changed) = &*ending;
                        let guard = end.lock().unwrap_or_else(|p| p.into_inner());
                        *changed
                            .wait_timeout_while(guard, d, |end| *end == ThrottleEnd::NotYet)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    };
                    loop {
                        let p = u64::from(percent.load(Ordering::Relaxed));
                        // Ended while the vCPUs run: they run on (a switch-over
                        // pauses them itself).
                        if end_within(Duration::from_micros(200 * (100 - p))) != ThrottleEnd::NotYet {
                            return;
                        }
                        if control.pause().is_err() {
                            continue;
                        }
                        match end_within(Duration::from_micros(200 * p)) {
                            ThrottleEnd::HandOver => return,
                            ThrottleEnd::Resume => {
                                control.resume();
                                return;
                            }
                            ThrottleEnd::NotYet => control.resume(),
                        }
                    }
                })
                .ok();
        }
    }

    /// Ends the throttle; the vCPUs run on.
    fn stop(&self) {
        self.end(ThrottleEnd::Resume);
    }

    /// Ends the throttle for the switch-over: vCPUs the throttle holds stay held.
    /// The switch-over's downtime counts from here: the time they were held
    /// before is throttling, as in QEMU's auto-converge.
    fn hand_over(&self) {
        self.end(ThrottleEnd::HandOver);
    }

    fn end(&self, how: ThrottleEnd) {
        let (end, changed) = &*self.end;
        {
            let mut end = end.lock().unwrap_or_else(|p| p.into_inner());
            if *end == ThrottleEnd::NotYet {
                *end = how;
            }
        }
        changed.notify_all();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_brings_the_dirty_rate_to_a_quarter_of_the_link() {
        let gib = 1 << 30;
        assert_eq!(needed_throttle(0, gib), 0, "an idle guest needs none");
        assert_eq!(needed_throttle(gib / 4, gib), 0, "already slow enough");
        assert_eq!(needed_throttle(gib, gib), 75);
        assert_eq!(needed_throttle(2 * gib, gib), 88);
        assert_eq!(needed_throttle(u64::MAX / 2, 1), 99, "never a full stop");
    }
}
