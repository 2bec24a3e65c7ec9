//! The target side: accept one authenticated source, receive memory and state into
//! a new VM, and start it only when the source says it never will again (`Go`).
//! Whatever goes wrong before then, this VM never runs: a partial VM is never resumed.

use crate::memory::GuestRam;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::channel::SecureStream;
use super::wire::{self, Frame, PAGE_SIZE, WireError};
use crate::Error;
use crate::config::VmConfig;
use crate::restore::RestoreSource;
use crate::state::VmState;

/// A source that has authenticated and said what VM it sends.
pub struct Incoming {
    stream: SecureStream,
    /// The other lanes, in order (lane 1 first).
    lanes: Vec<SecureStream>,
    /// The VM's configuration, as the source runs it.
    pub config: VmConfig,
    peer: String,
}

/// How long the source has to open its other lanes once welcomed.
const LANE_WAIT: Duration = Duration::from_secs(10);

/// Listens on `listen` (`host:port`) for one source with the same secret. When
/// `expected` is given (the agent knows what it asked for), the source's VM must
/// have its shape.
pub fn accept(listen: &str, secret: &[u8], expected: Option<&VmConfig>) -> Result<Incoming, Error> {
    let listener = TcpListener::bind(listen).map_err(|e| Error::Migration(format!("listening on {listen}: {e}")))?;
    tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "waiting for the migration source");
    let (tcp, peer) = listener.accept().map_err(|e| Error::Migration(format!("accepting on {listen}: {e}")))?;
    let peer = peer.to_string();
    let mut tcp = prepare(tcp)?;
    wire::read_preamble(&mut tcp).map_err(|e| Error::Migration(format!("refused {peer}: {e}")))?;
    let mut stream = SecureStream::accept(tcp, secret, &wire::preamble())
        .map_err(|e| Error::Migration(format!("refused {peer}: {e}")))?;
    let hello = match wire::read_frame(&mut stream)? {
        Frame::Hello(h) => h,
        other => return Err(Error::Wire(WireError::Unexpected { got: other.name(), want: "Hello" })),
    };
    if hello.version != wire::VERSION {
        return Err(Error::Wire(WireError::WrongVersion(hello.version)));
    }
    if let Some(want) = expected {
        let (a, b) = (&hello.config, want);
        let devices =
            |c: &VmConfig| (c.disks.len(), c.nics.iter().map(|n| n.mac.to_ascii_lowercase()).collect::<Vec<_>>());
        if a.vcpus != b.vcpus
            || a.memory_mib != b.memory_mib
            || a.topology() != b.topology()
            || devices(a) != devices(b)
        {
            let shape = |c: &VmConfig| {
                let macs: Vec<&str> = c.nics.iter().map(|n| n.mac.as_str()).collect();
                format!(
                    "{} vCPUs ({:?}), {} MiB, {} disks, NICs [{}]",
                    c.vcpus,
                    c.topology(),
                    c.memory_mib,
                    c.disks.len(),
                    macs.join(", ")
                )
            };
            let why = format!("the source sends {}, this target expects {}", shape(a), shape(b));
            let _ = wire::write_frame(&mut stream, &Frame::Abort(why.clone()));
            let _ = stream.flush();
            return Err(Error::Wire(WireError::WrongShape(why)));
        }
    }
    if !(1..=wire::MAX_LANES).contains(&hello.lanes) {
        let why = format!("{} lanes announced (1 to {} allowed)", hello.lanes, wire::MAX_LANES);
        let _ = wire::write_frame(&mut stream, &Frame::Abort(why.clone()));
        let _ = stream.flush();
        return Err(Error::Wire(WireError::Malformed { kind: "Hello", why }));
    }
    tracing::info!(%peer, vcpus = hello.config.vcpus, memory_mib = hello.config.memory_mib, lanes = hello.lanes, "migration source authenticated");
    wire::write_frame(&mut stream, &Frame::Welcome)?;
    stream.flush().map_err(|e| Error::Migration(format!("to {peer}: {e}")))?;
    let lanes = accept_lanes(&listener, secret, &hello).map_err(|e| Error::Migration(format!("from {peer}: {e}")))?;
    Ok(Incoming { stream, lanes, config: hello.config, peer })
}

/// A connection from the source: blocking, with a read timeout (a source that
/// stalls this long is gone; the VM here never ran).
fn prepare(tcp: TcpStream) -> Result<TcpStream, Error> {
    tcp.set_nonblocking(false).map_err(|e| Error::io("a migration connection", e))?;
    tcp.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| Error::io("a migration connection", e))?;
    Ok(tcp)
}

/// Accepts the source's other lanes: each names its index in clear and proves in
/// its handshake that it knows the secret and this migration's session.
fn accept_lanes(listener: &TcpListener, secret: &[u8], hello: &wire::Hello) -> Result<Vec<SecureStream>, Error> {
    let wanted = hello.lanes as usize - 1;
    if wanted == 0 {
        return Ok(Vec::new());
    }
    let mut lanes: Vec<Option<SecureStream>> = (0..wanted).map(|_| None).collect();
    listener.set_nonblocking(true).map_err(|e| Error::io("the migration listener", e))?;
    let deadline = Instant::now() + LANE_WAIT;
    let mut opened = 0;
    while opened < wanted {
        let tcp = match listener.accept() {
            Ok((tcp, _)) => tcp,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(Error::Migration(format!(
                    "only {opened} of {wanted} more lanes opened within {} s",
                    LANE_WAIT.as_secs()
                )));
            }
            Err(e) => return Err(Error::Migration(format!("accepting a lane: {e}"))),
        };
        let mut tcp = prepare(tcp)?;
        wire::read_preamble(&mut tcp)?;
        let mut index = [0u8; 4];
        tcp.read_exact(&mut index).map_err(|e| Error::Migration(format!("a lane's index: {e}")))?;
        let index = u32::from_le_bytes(index);
        let slot = lanes.get_mut((index as usize).wrapping_sub(1)).filter(|slot| slot.is_none()).ok_or_else(|| {
            Error::Migration(format!("lane {index} is not one of the {} announced, or opened twice", hello.lanes))
        })?;
        *slot = Some(
            SecureStream::accept(tcp, secret, &wire::lane_prologue(&hello.session, index))
                .map_err(|e| Error::Migration(format!("lane {index} refused: {e}")))?,
        );
        opened += 1;
    }
    Ok(lanes.into_iter().flatten().collect())
}

impl Incoming {
    fn frame(&mut self) -> Result<Frame, Error> {
        wire::read_frame(&mut self.stream).map_err(|e| Error::Migration(format!("from {}: {e}", self.peer)))
    }

    fn send(&mut self, frame: Frame) -> Result<(), Error> {
        wire::write_frame(&mut self.stream, &frame)?;
        self.stream.flush().map_err(|e| Error::Migration(format!("to {}: {e}", self.peer)))
    }

    /// Receives pages on every lane until the VM state arrives on lane 0 and the
    /// other lanes are done; returns the state.
    fn receive_memory(&mut self, memory: &GuestRam) -> Result<VmState, Error> {
        let count = self.lanes.len() as u32 + 1;
        // Every socket, to stop all lanes when one fails.
        let sockets: Vec<TcpStream> =
            std::iter::once(&self.stream).chain(&self.lanes).filter_map(|s| s.socket().try_clone().ok()).collect();
        // The first failure is the cause; the lanes it stops fail after it.
        let first_error: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
        let fail = |e: Error| {
            first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
            sockets.iter().for_each(|s| drop(s.shutdown(std::net::Shutdown::Both)));
        };
        let peer = self.peer.as_str();
        let state = std::thread::scope(|scope| {
            for (i, stream) in self.lanes.iter_mut().enumerate() {
                let fail = &fail;
                scope.spawn(move || match receive_lane(stream, memory, i as u32 + 1, count, peer) {
                    Ok(_) => {}
                    Err(e) => fail(e),
                });
            }
            match receive_lane(&mut self.stream, memory, 0, count, peer) {
                Ok(state) => state,
                Err(e) => {
                    fail(e);
                    None
                }
            }
        });
        // Every lane has ended here (the scope joined them).
        if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        state.ok_or(Error::Wire(WireError::Unexpected { got: "Done", want: "State" }))
    }
}

/// Receives lane `lane`'s frames (of `lanes`) into guest memory, until the VM
/// state (lane 0: returned) or Done (the other lanes). Pages outside the lane's
/// blocks are refused: lanes write guest memory at once, never the same pages.
fn receive_lane(
    stream: &mut SecureStream,
    memory: &GuestRam,
    lane: u32,
    lanes: u32,
    peer: &str,
) -> Result<Option<VmState>, Error> {
    let zero = [0u8; PAGE_SIZE];
    let mut scratch = Vec::new();
    let from = |e: WireError| Error::Migration(format!("from {peer}, lane {lane}: {e}"));
    let owned = |first: u64, count: u64| {
        let last = first.saturating_add(count.saturating_sub(1));
        if wire::lane_of(first, lanes) != lane || first / wire::BLOCK_PAGES != last / wire::BLOCK_PAGES {
            return Err(from(WireError::Malformed {
                kind: "Pages",
                why: format!("pages {first}+{count} are not all in a block of lane {lane} of {lanes}"),
            }));
        }
        Ok(())
    };
    loop {
        let mut head = wire::read_head(stream).map_err(from)?;
        if head.kind == wire::PAGES {
            let (first, count) = head.pages(stream).map_err(from)?;
            check_pages(memory, first, count as u64)?;
            owned(first, count as u64)?;
            // SAFETY: the pages lie in one region of guest memory and in one block
            // of this lane (both checked just above); nothing else reads or writes
            // them meanwhile: this VM's vCPUs run only after `Go`, and each lane
            // writes only its own blocks.
            let dest = unsafe { crate::memory::pages_mut(memory, first, count)? };
            // Decrypted straight into guest memory. Should the frame prove bad, the
            // error ends the migration and this VM never runs.
            head.page_data(stream, dest).map_err(from)?;
            continue;
        }
        let kind = head.kind;
        match wire::decode(kind, head.payload(stream, &mut scratch).map_err(from)?.to_vec()).map_err(from)? {
            Frame::Zero(pages) => {
                for page in pages {
                    check_pages(memory, page, 1)?;
                    owned(page, 1)?;
                    memory
                        .write_slice(&zero, GuestAddress(page << 12))
                        .map_err(|e| Error::Memory(format!("page {page}: {e}")))?;
                }
            }
            Frame::State(bytes) if lane == 0 => {
                let state = VmState::decode(&bytes)?;
                return match wire::read_frame(stream).map_err(from)? {
                    Frame::Done => Ok(Some(state)),
                    other => Err(from(WireError::Unexpected { got: other.name(), want: "Done" })),
                };
            }
            Frame::Done if lane != 0 => return Ok(None),
            // Everything before it is in guest memory now: say so.
            Frame::Sync => {
                wire::write_frame(stream, &Frame::Synced).map_err(from)?;
                stream.flush().map_err(|e| from(WireError::Io(e.to_string())))?;
            }
            Frame::Abort(why) => return Err(Error::Migration(format!("the source gave up: {why}"))),
            other => {
                return Err(from(WireError::Unexpected {
                    got: other.name(),
                    want: if lane == 0 { "Pages, Zero or State" } else { "Pages, Zero or Done" },
                }));
            }
        }
    }
}

/// A target that prepares guest memory before it listens: it is given the VM it
/// expects, faults that VM's memory in, and only then binds its address and
/// accepts the source (see [`crate::memory::prefault`]). The cost moves from the
/// migration itself to the target's start, before anyone can connect.
pub struct Prefaulted {
    listen: String,
    secret: Vec<u8>,
    expected: VmConfig,
    incoming: Option<Incoming>,
}

impl Prefaulted {
    pub fn new(listen: &str, secret: &[u8], expected: VmConfig) -> Self {
        Self { listen: listen.into(), secret: secret.to_vec(), expected, incoming: None }
    }
}

impl RestoreSource for Prefaulted {
    fn load(&mut self, memory: &GuestRam) -> Result<VmState, Error> {
        let started = std::time::Instant::now();
        crate::memory::prefault(memory)?;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            memory_mib = self.expected.memory_mib,
            "guest memory faulted in"
        );
        let incoming = self.incoming.insert(accept(&self.listen, &self.secret, Some(&self.expected))?);
        incoming.load(memory)
    }

    fn restored(&mut self) -> Result<(), Error> {
        self.incoming.as_mut().map_or(Ok(()), |i| i.restored())
    }

    fn before_run(&mut self) -> Result<(), Error> {
        self.incoming.as_mut().map_or(Ok(()), |i| i.before_run())
    }

    fn running(&mut self) {
        if let Some(incoming) = self.incoming.as_mut() {
            incoming.running();
        }
    }
}

/// Checks that `count` pages from `first` lie inside guest memory.
fn check_pages(memory: &GuestRam, first: u64, count: u64) -> Result<(), Error> {
    let out = |page| Error::Wire(WireError::PageOutOfRange { page });
    let last = first.checked_add(count.saturating_sub(1)).ok_or(out(first))?;
    let start = first.checked_mul(PAGE_SIZE as u64).ok_or(out(first))?;
    let end = last.checked_mul(PAGE_SIZE as u64).and_then(|a| a.checked_add(PAGE_SIZE as u64 - 1)).ok_or(out(last))?;
    // Both ends in one region: runs never straddle the MMIO hole.
    match (memory.find_region(GuestAddress(start)), memory.find_region(GuestAddress(end))) {
        (Some(a), Some(b)) if std::ptr::eq(a, b) => Ok(()),
        (None, _) => Err(out(first)),
        _ => Err(out(last)),
    }
}

impl RestoreSource for Incoming {
    fn load(&mut self, memory: &GuestRam) -> Result<VmState, Error> {
        // (Prefaulting all of guest memory in a background thread was tried: it
        // costs a 1 GiB idle guest 300 ms of downtime and all its memory at once.)
        self.receive_memory(memory)
    }

    fn restored(&mut self) -> Result<(), Error> {
        self.send(Frame::Ready)
    }

    fn before_run(&mut self) -> Result<(), Error> {
        match self.frame()? {
            Frame::Go => Ok(()),
            Frame::Abort(why) => Err(Error::Migration(format!("the source gave up: {why}"))),
            other => Err(Error::Wire(WireError::Unexpected { got: other.name(), want: "Go" })),
        }
    }

    fn running(&mut self) {
        if let Err(e) = self.send(Frame::Resumed) {
            // The VM runs here; the source committed and never resumes. Say so.
            tracing::warn!("could not confirm to the source that the VM runs: {e}");
        }
        tracing::info!(peer = %self.peer, "migration received; the VM runs here");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_outside_guest_memory_are_refused() {
        let regions = crate::arch::x86_64::layout::ram_regions(4 << 30);
        let ranges: Vec<_> = regions.iter().map(|(a, l)| (GuestAddress(*a), *l as usize)).collect();
        let memory = GuestRam::from_ranges(&ranges).unwrap();
        let low_end = (3u64 << 30) >> 12; // first page of the MMIO hole
        assert!(check_pages(&memory, 0, 256).is_ok());
        assert!(check_pages(&memory, (4u64 << 30) >> 12, 256).is_ok());
        let err = |first, count| check_pages(&memory, first, count).unwrap_err().to_string();
        assert!(err(low_end, 1).contains(&format!("page {low_end} is outside guest memory")));
        assert!(err(low_end - 1, 2).contains(&format!("page {low_end} is outside")), "a run may not straddle the hole");
        assert!(err(u64::MAX - 1, 4).contains("outside guest memory"), "no overflow");
        assert!(err((5u64 << 30) >> 12, 1).contains("outside guest memory"), "past the end");
    }
}
