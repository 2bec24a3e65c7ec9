//! The migration wire format: a preamble, then frames. Each frame is
//! `kind: u8 | length: u32 LE | payload | crc32(kind, length, payload): u32 LE`.
//! Every way a stream can be wrong has its own error, and a decoder never trusts a
//! length before checking it against the limit.
//!
//! The preamble travels in clear, before the channel's handshake (which binds it),
//! so that a peer of another version gets a clear error rather than a failed
//! handshake; the frames travel through the encrypted channel. A Pages frame's data
//! can be written and read in place ([`FrameSink`], [`Head::page_data`]): the
//! channel then carries it as a message of its own, sealed where it lies and opened
//! where it belongs.
//!
//! Pages may travel on more than one connection ("lanes", one thread each end, so
//! that encryption and copies use more than one core): the source says how many
//! in Hello, then opens the others, each sending the preamble and its index
//! (`u32 LE`) in clear and running its handshake with [`lane_prologue`]. Lane `k`
//! carries the Pages and Zero frames of the blocks [`lane_of`] gives it, then Done
//! at switch-over; lane 0, the first connection, carries everything else.
//!
//! ```text
//! preamble  "DROVERMG" | version: u16 LE
//! Hello     postcard(Hello): protocol version, the VM's configuration, lanes, session
//! Pages     first page number: u64 | count: u32 | count × 4096 bytes
//! Zero      count: u32 | count × page number: u64   (pages now all zero)
//! State     postcard(VmState)
//! Done      (source) everything is sent, the source is paused; on a lane: this
//!           lane is done
//! Ready     (target) the VM is built and restored, waiting for Go
//! Go        (source) the source will not run the VM again: start it
//! Resumed   (target) the VM runs on the target
//! Abort     UTF-8 reason
//! Welcome   (target) the VM in Hello can come here: open the other lanes
//! Sync      (source, on every lane after a pre-copy pass) answer once all before
//!           this is in guest memory
//! Synced    (target) the answer: the pass's time then counts until the target
//!           has the pages, not until the sockets' buffers took them
//! ```

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// The preamble's magic.
pub const MAGIC: &[u8; 8] = b"DROVERMG";
/// The protocol version this build speaks (2: the channel's transport messages
/// carry up to 4 MiB, the preamble travels in clear; 3: Sync and Synced; 4: the
/// state carries virtio devices).
pub const VERSION: u16 = 4;
/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// The largest frame payload accepted (a Pages frame of 1024 pages, or a VmState).
pub const MAX_PAYLOAD: u32 = 16 << 20;

/// What the source says first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    pub config: VmConfig,
    /// Connections the pages travel on, this one included (see [`lane_of`]).
    pub lanes: u32,
    /// Binds the other connections to this migration (their handshakes' prologue).
    pub session: [u8; 16],
}

/// The most connections a migration may use.
pub use drover_vmm_api::api::MAX_LANES;

/// Pages travel in blocks of this many (1 MiB), each block always on the same
/// connection: a page's newer copy never overtakes its older one.
pub const BLOCK_PAGES: u64 = 256;

/// The connection ("lane") page `page` travels on, out of `lanes`. Lane 0 is the
/// first connection, which also carries everything else.
pub fn lane_of(page: u64, lanes: u32) -> u32 {
    ((page / BLOCK_PAGES) % u64::from(lanes.max(1))) as u32
}

/// The prologue of lane `index`'s handshake: the preamble, the session, the index.
/// A connection that is not part of this migration fails its handshake.
pub fn lane_prologue(session: &[u8; 16], index: u32) -> Vec<u8> {
    let mut prologue = preamble().to_vec();
    prologue.extend_from_slice(session);
    prologue.extend_from_slice(&index.to_le_bytes());
    prologue
}

/// One frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Hello(Box<Hello>),
    Pages { first: u64, data: Vec<u8> },
    Zero(Vec<u64>),
    State(Vec<u8>),
    Done,
    Ready,
    Go,
    Resumed,
    Abort(String),
    Welcome,
    Sync,
    Synced,
}

/// Everything that can be wrong with a stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("stream ended in the middle of {0}")]
    Truncated(&'static str),
    #[error("not a Drover migration stream (bad magic)")]
    BadMagic,
    #[error("peer speaks migration protocol version {0}, this drover-vmm speaks version {VERSION}")]
    WrongVersion(u16),
    #[error("frame of kind {kind} fails its checksum (corrupt stream)")]
    BadChecksum { kind: u8 },
    #[error("frame of {0} bytes is larger than the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind} frame: {why}")]
    Malformed { kind: &'static str, why: String },
    #[error("page {page} is outside guest memory")]
    PageOutOfRange { page: u64 },
    #[error("wrong VM shape: {0}")]
    WrongShape(String),
    #[error("unexpected {got} frame while waiting for {want}")]
    Unexpected { got: &'static str, want: &'static str },
    #[error("I/O: {0}")]
    Io(String),
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => 1,
            Frame::Pages { .. } => 2,
            Frame::Zero(_) => 3,
            Frame::State(_) => 4,
            Frame::Done => 5,
            Frame::Ready => 6,
            Frame::Go => 7,
            Frame::Resumed => 8,
            Frame::Abort(_) => 9,
            Frame::Welcome => 10,
            Frame::Sync => 11,
            Frame::Synced => 12,
        }
    }

    /// The frame's name, for messages.
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "Hello",
        2 => "Pages",
        3 => "Zero",
        4 => "State",
        5 => "Done",
        6 => "Ready",
        7 => "Go",
        8 => "Resumed",
        9 => "Abort",
        10 => "Welcome",
        11 => "Sync",
        12 => "Synced",
        _ => "unknown",
    }
}

fn io(e: std::io::Error, what: &'static str) -> WireError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        WireError::Truncated(what)
    } else {
        WireError::Io(e.to_string())
    }
}

/// The preamble's bytes (also the channel handshake's prologue).
pub fn preamble() -> [u8; 10] {
    let mut bytes = [0u8; 10];
    bytes[..8].copy_from_slice(MAGIC);
    bytes[8..].copy_from_slice(&VERSION.to_le_bytes());
    bytes
}

/// Writes the preamble.
pub fn write_preamble(w: &mut impl Write) -> Result<(), WireError> {
    w.write_all(&preamble()).map_err(|e| io(e, "the preamble"))
}

/// Reads and checks the preamble.
pub fn read_preamble(r: &mut impl Read) -> Result<(), WireError> {
    let mut buf = [0u8; 10];
    r.read_exact(&mut buf).map_err(|e| io(e, "the preamble"))?;
    if &buf[..8] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = u16::from_le_bytes([buf[8], buf[9]]);
    if version != VERSION {
        return Err(WireError::WrongVersion(version));
    }
    Ok(())
}

/// Where frames are written. Page data may be handed over whole, to be consumed:
/// the encrypted channel seals it where it lies.
pub trait FrameSink: Write {
    /// Writes `data`; its contents may be overwritten in the process.
    fn write_consuming(&mut self, data: &mut [u8]) -> std::io::Result<()> {
        self.write_all(data)
    }
}

impl FrameSink for Vec<u8> {}

/// Writes one Pages frame, its data straight from `data` (which the sink may
/// overwrite: the checksum is taken first).
pub fn write_pages(w: &mut impl FrameSink, first: u64, data: &mut [u8]) -> Result<(), WireError> {
    let count = (data.len() / PAGE_SIZE) as u32;
    let len = 12 + data.len();
    if len > MAX_PAYLOAD as usize {
        return Err(WireError::TooLarge(len as u32));
    }
    let mut head = [0u8; 17];
    head[0] = 2;
    head[1..5].copy_from_slice(&(len as u32).to_le_bytes());
    head[5..13].copy_from_slice(&first.to_le_bytes());
    head[13..].copy_from_slice(&count.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(data);
    let result = (|| {
        w.write_all(&head)?;
        w.write_consuming(data)?;
        w.write_all(&crc.finalize().to_le_bytes())
    })();
    result.map_err(|e| io(e, "a frame"))
}

/// Writes a frame.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<(), WireError> {
    match frame {
        Frame::Pages { first, data } => {
            write_parts(w, 2, &[&first.to_le_bytes(), &((data.len() / PAGE_SIZE) as u32).to_le_bytes(), data])
        }
        Frame::Hello(h) => {
            let bytes =
                postcard::to_allocvec(h).map_err(|e| WireError::Malformed { kind: "Hello", why: e.to_string() })?;
            write_parts(w, 1, &[&bytes])
        }
        Frame::Zero(pages) => {
            let mut p = Vec::with_capacity(4 + pages.len() * 8);
            p.extend_from_slice(&(pages.len() as u32).to_le_bytes());
            pages.iter().for_each(|n| p.extend_from_slice(&n.to_le_bytes()));
            write_parts(w, 3, &[&p])
        }
        Frame::State(bytes) => write_parts(w, 4, &[bytes]),
        Frame::Abort(why) => write_parts(w, 9, &[why.as_bytes()]),
        Frame::Done | Frame::Ready | Frame::Go | Frame::Resumed | Frame::Welcome | Frame::Sync | Frame::Synced => {
            write_parts(w, frame.kind(), &[])
        }
    }
}

fn write_parts(w: &mut impl Write, kind: u8, parts: &[&[u8]]) -> Result<(), WireError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_PAYLOAD as usize {
        return Err(WireError::TooLarge(len as u32));
    }
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(len as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    let result = (|| {
        w.write_all(&head)?;
        for p in parts {
            crc.update(p);
            w.write_all(p)?;
        }
        w.write_all(&crc.clone().finalize().to_le_bytes())
    })();
    result.map_err(|e| io(e, "a frame"))
}

/// Reads one frame, checking length, checksum and contents.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, WireError> {
    let mut head = read_head(r)?;
    if head.kind == PAGES {
        let (first, count) = head.pages(r)?;
        let mut data = vec![0u8; count * PAGE_SIZE];
        head.page_data(r, &mut data)?;
        return Ok(Frame::Pages { first, data });
    }
    let mut scratch = Vec::new();
    let kind = head.kind;
    decode(kind, head.payload(r, &mut scratch)?.to_vec())
}

/// The kind of a Pages frame.
pub const PAGES: u8 = 2;

/// A frame's header, read and checked: its payload comes next on the stream.
pub struct Head {
    pub kind: u8,
    len: u32,
    crc: crc32fast::Hasher,
}

/// Reads a frame's header and checks its kind and length.
pub fn read_head(r: &mut impl Read) -> Result<Head, WireError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).map_err(|e| io(e, "a frame header"))?;
    let kind = head[0];
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    if kind_name(kind) == "unknown" {
        return Err(WireError::UnknownKind(kind));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    Ok(Head { kind, len, crc })
}

impl Head {
    /// Reads the payload into `scratch` (reused between frames) and checks the
    /// checksum. `decode` makes sense of it.
    pub fn payload<'a>(mut self, r: &mut impl Read, scratch: &'a mut Vec<u8>) -> Result<&'a [u8], WireError> {
        scratch.resize(self.len as usize, 0);
        r.read_exact(scratch).map_err(|e| io(e, "a frame payload"))?;
        self.crc.update(scratch);
        self.check(r)?;
        Ok(scratch.as_slice())
    }

    /// A Pages frame's first page number and page count; its data comes next.
    pub fn pages(&mut self, r: &mut impl Read) -> Result<(u64, usize), WireError> {
        let data = (self.len as usize).checked_sub(12).ok_or_else(short_pages)?;
        let mut numbers = [0u8; 12];
        r.read_exact(&mut numbers).map_err(|e| io(e, "a frame payload"))?;
        self.crc.update(&numbers);
        page_numbers(&numbers, data)
    }

    /// Reads a Pages frame's data into `dest` (as many bytes as [`Head::pages`]
    /// announced) and checks the checksum. On an error `dest` holds garbage.
    pub fn page_data(mut self, r: &mut impl Read, dest: &mut [u8]) -> Result<(), WireError> {
        debug_assert_eq!(dest.len() + 12, self.len as usize);
        r.read_exact(dest).map_err(|e| io(e, "a frame payload"))?;
        self.crc.update(dest);
        self.check(r)
    }

    fn check(self, r: &mut impl Read) -> Result<(), WireError> {
        let mut crc_bytes = [0u8; 4];
        r.read_exact(&mut crc_bytes).map_err(|e| io(e, "a frame checksum"))?;
        if self.crc.finalize() != u32::from_le_bytes(crc_bytes) {
            return Err(WireError::BadChecksum { kind: self.kind });
        }
        Ok(())
    }
}

/// A Pages payload's first page number and data.
fn pages(payload: &[u8]) -> Result<(u64, &[u8]), WireError> {
    let (numbers, data) = payload.split_first_chunk::<12>().ok_or_else(short_pages)?;
    page_numbers(numbers, data.len()).map(|(first, _)| (first, data))
}

fn short_pages() -> WireError {
    WireError::Malformed { kind: "Pages", why: "shorter than its header".into() }
}

/// A Pages frame's first page and page count, from its 12 header bytes, checked
/// against the `data` bytes that follow them.
fn page_numbers(numbers: &[u8; 12], data: usize) -> Result<(u64, usize), WireError> {
    let [a, b, c, d, e, f, g, h, i, j, k, l] = *numbers;
    let first = u64::from_le_bytes([a, b, c, d, e, f, g, h]);
    let count = u32::from_le_bytes([i, j, k, l]) as usize;
    if data != count * PAGE_SIZE {
        return Err(WireError::Malformed {
            kind: "Pages",
            why: format!("{count} pages announced, {data} bytes of data"),
        });
    }
    Ok((first, count))
}

/// Makes a frame of a checked payload.
pub fn decode(kind: u8, payload: Vec<u8>) -> Result<Frame, WireError> {
    let name = kind_name(kind);
    let bad = |why: String| WireError::Malformed { kind: name, why };
    let empty =
        |f: Frame| if payload.is_empty() { Ok(f) } else { Err(bad(format!("{} unexpected bytes", payload.len()))) };
    match kind {
        1 => postcard::from_bytes::<Hello>(&payload).map(|h| Frame::Hello(Box::new(h))).map_err(|e| bad(e.to_string())),
        2 => pages(&payload).map(|(first, data)| Frame::Pages { first, data: data.to_vec() }),
        3 => {
            if payload.len() < 4 {
                return Err(bad("shorter than its header".into()));
            }
            let count = u32::from_le_bytes(payload[..4].try_into().map_err(|_| bad("header".into()))?) as usize;
            if payload.len() - 4 != count * 8 {
                return Err(bad(format!("{count} pages announced, {} bytes of page numbers", payload.len() - 4)));
            }
            Ok(Frame::Zero(
                payload[4..].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect(),
            ))
        }
        4 => Ok(Frame::State(payload)),
        5 => empty(Frame::Done),
        6 => empty(Frame::Ready),
        7 => empty(Frame::Go),
        8 => empty(Frame::Resumed),
        9 => String::from_utf8(payload).map(Frame::Abort).map_err(|_| bad("reason is not UTF-8".into())),
        10 => empty(Frame::Welcome),
        11 => empty(Frame::Sync),
        12 => empty(Frame::Synced),
        other => Err(WireError::UnknownKind(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        serde_json::from_value(serde_json::json!({"vcpus": 2, "memoryMib": 64, "kernel": "/k"})).unwrap()
    }

    fn roundtrip(frame: Frame) {
        let mut buf = Vec::new();
        write_frame(&mut buf, &frame).unwrap();
        assert_eq!(read_frame(&mut buf.as_slice()).unwrap(), frame);
    }

    #[test]
    fn every_frame_roundtrips() {
        roundtrip(Frame::Hello(Box::new(Hello { version: VERSION, config: config(), lanes: 2, session: [7; 16] })));
        roundtrip(Frame::Pages { first: 7, data: vec![0xab; 2 * PAGE_SIZE] });
        roundtrip(Frame::Zero(vec![1, 5, 1 << 40]));
        roundtrip(Frame::State(vec![1, 2, 3]));
        for f in [Frame::Done, Frame::Ready, Frame::Go, Frame::Resumed, Frame::Welcome, Frame::Sync, Frame::Synced] {
            roundtrip(f);
        }
        roundtrip(Frame::Abort("target out of memory".into()));
    }

    #[test]
    fn a_block_always_travels_on_the_same_lane() {
        assert_eq!(lane_of(0, 1), 0);
        assert_eq!(lane_of(u64::MAX, 1), 0);
        assert_eq!((0..4).map(|b| lane_of(b * BLOCK_PAGES, 2)).collect::<Vec<_>>(), vec![0, 1, 0, 1]);
        assert_eq!(lane_of(BLOCK_PAGES - 1, 3), 0, "the last page of block 0");
        assert_eq!(lane_of(BLOCK_PAGES, 3), 1);
        assert_eq!(lane_of(5, 0), 0, "no lanes is read as one");
        assert_ne!(lane_prologue(&[1; 16], 1), lane_prologue(&[1; 16], 2));
        assert_ne!(lane_prologue(&[1; 16], 1), lane_prologue(&[2; 16], 1));
    }

    #[test]
    fn preamble_checks_magic_and_version() {
        let mut buf = Vec::new();
        write_preamble(&mut buf).unwrap();
        read_preamble(&mut buf.as_slice()).unwrap();
        let mut wrong = buf.clone();
        wrong[8] = 9;
        assert_eq!(read_preamble(&mut wrong.as_slice()), Err(WireError::WrongVersion(9)));
        assert_eq!(read_preamble(&mut &b"HTTP/1.1 200"[..]), Err(WireError::BadMagic));
        assert_eq!(read_preamble(&mut &buf[..5]), Err(WireError::Truncated("the preamble")));
    }

    #[test]
    fn corruption_is_caught_by_the_checksum() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Frame::Pages { first: 1, data: vec![1; PAGE_SIZE] }).unwrap();
        buf[100] ^= 1;
        assert_eq!(read_frame(&mut buf.as_slice()), Err(WireError::BadChecksum { kind: 2 }));
    }

    #[test]
    fn truncation_length_and_kind_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Frame::State(vec![0; 100])).unwrap();
        assert_eq!(read_frame(&mut &buf[..50]), Err(WireError::Truncated("a frame payload")));
        assert_eq!(read_frame(&mut &[2u8, 0xff, 0xff, 0xff, 0xff][..]), Err(WireError::TooLarge(u32::MAX)));
        assert_eq!(read_frame(&mut &[42u8, 0, 0, 0, 0][..]), Err(WireError::UnknownKind(42)));
    }

    #[test]
    fn inconsistent_payloads_are_malformed() {
        // A Pages frame announcing 2 pages with data for 1, with a valid checksum.
        let mut head = [0u8; 12];
        head[8..].copy_from_slice(&2u32.to_le_bytes());
        let mut buf = Vec::new();
        write_parts(&mut buf, 2, &[&head, &[0; PAGE_SIZE]]).unwrap();
        assert!(matches!(read_frame(&mut buf.as_slice()), Err(WireError::Malformed { kind: "Pages", .. })));
        let mut buf = Vec::new();
        write_parts(&mut buf, 5, &[b"x"]).unwrap();
        assert!(matches!(read_frame(&mut buf.as_slice()), Err(WireError::Malformed { kind: "Done", .. })));
    }

    /// A short fuzz run in every test run (the cargo-fuzz target in fuzz/ runs the
    /// same decoder for as long as one likes): random damage to valid streams must
    /// give errors, never panics or unbounded allocations.
    #[test]
    fn decoder_survives_random_damage() {
        let mut stream = Vec::new();
        write_preamble(&mut stream).unwrap();
        for frame in [
            Frame::Hello(Box::new(Hello { version: VERSION, config: config(), lanes: 2, session: [7; 16] })),
            Frame::Pages { first: 3, data: vec![0x5a; 2 * PAGE_SIZE] },
            Frame::Zero(vec![9, 10, 11]),
            Frame::State(vec![7; 300]),
            Frame::Done,
            Frame::Abort("bye".into()),
        ] {
            write_frame(&mut stream, &frame).unwrap();
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut damaged = stream.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % damaged.len() as u64) as usize;
                match next() % 3 {
                    0 => damaged[at] ^= 1 << (next() % 8),
                    1 => damaged.truncate(at),
                    _ => damaged.insert(at, next() as u8),
                }
                if damaged.is_empty() {
                    break;
                }
            }
            let mut input = damaged.as_slice();
            if read_preamble(&mut input).is_ok() {
                while read_frame(&mut input).is_ok() {}
            }
        }
    }
}
