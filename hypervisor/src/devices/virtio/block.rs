//! virtio-blk (virtio 1.x, 5.2) on a raw image file: read, write, flush, get-id,
//! read-only disks. Requests are served on the device's own thread, straight
//! between the file and guest memory (pread/pwrite into the guest's buffers, no
//! copy in between), one request after another in the order the driver made them
//! available. A request the disk cannot carry out gets a virtio status (IOERR,
//! UNSUPP) in its status byte, never a VMM failure.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Address, Bytes, GuestMemoryBackend, VolatileSlice};

use super::{QUEUE_SIZE, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::Error;
use crate::memory::GuestRam;

/// Sectors are 512 bytes, whatever the image's block size.
pub const SECTOR_SIZE: u64 = 512;
/// A request header: type (u32), reserved (u32), sector (u64).
const HEADER_SIZE: u32 = 16;
/// The ID string's length (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;

/// A virtio-blk device on an image file.
pub struct Block {
    file: File,
    /// The disk's size in sectors (the image's size, rounded down).
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
}

impl Block {
    /// Opens `path` (read-only where `read_only`); `id` is what GET_ID answers
    /// (cut to 20 bytes).
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Self, Error> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io(format!("disk {}", path.display()), e))?;
        let len = file.metadata().map_err(|e| Error::io(format!("disk {}", path.display()), e))?.len();
        if len < SECTOR_SIZE {
            return Err(Error::Config(format!(
                "disk {}: {len} bytes, smaller than one {SECTOR_SIZE}-byte sector",
                path.display()
            )));
        }
        let mut bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self { file, sectors: len / SECTOR_SIZE, read_only, id: bytes })
    }

    /// The disk's size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Carries out one request; returns the bytes written into the guest's buffers.
    fn execute(&self, descriptors: &[Descriptor], memory: &GuestRam) -> u32 {
        let (Some(header), Some(status)) = (descriptors.first(), descriptors.last()) else { return 0 };
        if descriptors.len() < 2 || header.is_write_only() || header.len() < HEADER_SIZE || !status.is_write_only() {
            // No header to read or no status byte to write: nothing to answer with.
            tracing::debug!("virtio-blk: malformed request ({} descriptors)", descriptors.len());
            return 0;
        }
        let data = &descriptors[1..descriptors.len() - 1];
        let (kind, sector) =
            match (memory.read_obj::<u32>(header.addr()), memory.read_obj::<u64>(header.addr().unchecked_add(8))) {
                (Ok(kind), Ok(sector)) => (u32::from_le(kind), u64::from_le(sector)),
                _ => return 0,
            };
        let (code, written) = match self.request(kind, sector, data, memory) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(code) => (code, 0),
        };
        // The status byte's address was checked with the chain: a failed write
        // here means the guest pointed it outside its memory.
        if memory.write_obj(code as u8, status.addr()).is_err() {
            return written;
        }
        written + 1
    }

    /// The request itself: the data bytes written into guest memory, or a status.
    fn request(&self, kind: u32, sector: u64, data: &[Descriptor], memory: &GuestRam) -> Result<u32, u32> {
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let writing = kind == VIRTIO_BLK_T_OUT;
                if writing && self.read_only {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                // Reads fill buffers the driver may write to; writes take buffers it gave to be read.
                if data.iter().any(|d| d.is_write_only() == writing) {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let bytes: u64 = data.iter().map(|d| u64::from(d.len())).sum();
                let end = sector.checked_mul(SECTOR_SIZE).and_then(|start| start.checked_add(bytes));
                if end.is_none_or(|end| end > self.sectors * SECTOR_SIZE) {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let mut offset = sector * SECTOR_SIZE;
                for d in data {
                    let slice = memory.get_slice(d.addr(), d.len() as usize).map_err(|_| VIRTIO_BLK_S_IOERR)?;
                    let done = if writing { self.write_from(&slice, offset) } else { self.read_into(&slice, offset) };
                    done.map_err(|e| {
                        tracing::warn!("virtio-blk: {} at byte {offset}: {e}", if writing { "write" } else { "read" });
                        VIRTIO_BLK_S_IOERR
                    })?;
                    offset += u64::from(d.len());
                }
                Ok(if writing { 0 } else { bytes as u32 })
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.read_only {
                    return Ok(0);
                }
                self.file.sync_data().map(|()| 0).map_err(|e| {
                    tracing::warn!("virtio-blk: flush: {e}");
                    VIRTIO_BLK_S_IOERR
                })
            }
            VIRTIO_BLK_T_GET_ID => {
                let Some(d) = data.first().filter(|d| d.is_write_only()) else { return Err(VIRTIO_BLK_S_IOERR) };
                let n = (d.len() as usize).min(ID_BYTES);
                memory.write_slice(&self.id[..n], d.addr()).map_err(|_| VIRTIO_BLK_S_IOERR)?;
                Ok(n as u32)
            }
            _ => Err(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// Reads the file at `offset` into a guest buffer, marking its pages dirty.
    fn read_into<B: BitmapSlice>(&self, slice: &VolatileSlice<'_, B>, offset: u64) -> std::io::Result<()> {
        let guard = slice.ptr_guard_mut();
        let mut done = 0;
        while done < slice.len() {
            // SAFETY: the pointer and length are those of a live slice of guest
            // memory (the guard keeps the mapping); the guest may change the bytes
            // meanwhile, which is the contract of volatile memory, not a Rust
            // reference's.
            let n = unsafe {
                libc::pread(
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    guard.as_ptr().add(done).cast(),
                    slice.len() - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        // The VMM wrote guest memory: its pages go into the next migration pass.
        slice.bitmap().mark_dirty(0, slice.len());
        Ok(())
    }

    /// Writes a guest buffer to the file at `offset`.
    fn write_from<B: BitmapSlice>(&self, slice: &VolatileSlice<'_, B>, offset: u64) -> std::io::Result<()> {
        let guard = slice.ptr_guard();
        // SAFETY: as in `read_into`: a live slice of guest memory; the bytes are
        // only read, into the file.
        let bytes = unsafe { std::slice::from_raw_parts(guard.as_ptr(), slice.len()) };
        self.file.write_all_at(bytes, offset)
    }

    fn config(&self) -> [u8; 24] {
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        // seg_max: every descriptor but the header and the status may carry data.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut features =
            VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_count(&self) -> usize {
        1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, memory: &GuestRam) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let descriptors: Vec<Descriptor> = chain.collect();
            let written = self.execute(&descriptors, memory);
            if let Err(e) = queue.add_used(memory, head, written) {
                tracing::warn!("virtio-blk: used ring: {e:?}");
            }
            used = true;
        }
        used
    }

    fn name(&self) -> &'static str {
        "block"
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    use vm_memory::GuestAddress;

    use super::*;

    const DISK_SECTORS: u64 = 64;

    struct Setup {
        memory: GuestRam,
        dir: std::path::PathBuf,
    }

    fn setup(name: &str) -> Setup {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("drover-blk-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8).collect();
        std::fs::write(dir.join("disk.img"), image).unwrap();
        Setup { memory, dir }
    }

    /// One request: header at 0x10_0000, data buffers from 0x20_0000, status at 0x30_0000.
    /// `data` lists each buffer's length and whether the device writes it.
    fn run(s: &Setup, block: &mut Block, kind: u32, sector: u64, data: &[(u32, bool)]) -> (u8, u32) {
        let queue_mem = MockSplitQueue::new(&s.memory, 16);
        s.memory.write_obj(kind, GuestAddress(0x10_0000)).unwrap();
        s.memory.write_obj(sector, GuestAddress(0x10_0008)).unwrap();
        s.memory.write_obj(0xffu8, GuestAddress(0x30_0000)).unwrap();
        let mut descs = vec![(0x10_0000, HEADER_SIZE, false)];
        let mut addr = 0x20_0000;
        for &(len, write) in data {
            descs.push((addr, len, write));
            addr += u64::from(len);
        }
        descs.push((0x30_0000, 1, true));
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1))
            })
            .collect();
        queue_mem.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = queue_mem.create_queue().unwrap();
        assert!(block.process_queue(0, &mut queue, &s.memory));
        let used = queue_mem.used().ring().ref_at(0).unwrap().load();
        (s.memory.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), used.len())
    }

    fn open(s: &Setup, read_only: bool) -> Block {
        Block::open(&s.dir.join("disk.img"), read_only, "drover-disk-0-with-a-long-name").unwrap()
    }

    #[test]
    fn reads_fill_the_guest_buffers_and_mark_them_dirty() {
        let s = setup("read");
        let mut block = open(&s, false);
        assert_eq!(block.sectors(), DISK_SECTORS);
        std::ops::Deref::deref(s.memory.iter().next().unwrap()).bitmap().reset();
        let (status, written) = run(&s, &mut block, VIRTIO_BLK_T_IN, 3, &[(512, true), (1024, true)]);
        assert_eq!((status, written), (VIRTIO_BLK_S_OK as u8, 1536 + 1));
        let mut got = vec![0u8; 1536];
        s.memory.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert!(got[..512].iter().all(|b| *b == 3) && got[512..1024].iter().all(|b| *b == 4));
        assert!(got[1024..].iter().all(|b| *b == 5));
        let bitmap = std::ops::Deref::deref(s.memory.iter().next().unwrap()).bitmap();
        assert!(bitmap.is_addr_set(0x20_0000) && bitmap.is_addr_set(0x30_0000), "data and status pages dirty");
    }

    #[test]
    fn writes_reach_the_image_and_flush_syncs_it() {
        let s = setup("write");
        let mut block = open(&s, false);
        s.memory.write_slice(&[0xab; 1024], GuestAddress(0x20_0000)).unwrap();
        assert_eq!(run(&s, &mut block, VIRTIO_BLK_T_OUT, 10, &[(1024, false)]), (VIRTIO_BLK_S_OK as u8, 1));
        assert_eq!(run(&s, &mut block, VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK as u8, 1));
        let image = std::fs::read(s.dir.join("disk.img")).unwrap();
        assert!(image[10 * 512..12 * 512].iter().all(|b| *b == 0xab));
        assert_eq!(image[9 * 512], 9);
        assert_eq!(image[12 * 512], 12);
    }

    #[test]
    fn every_refusal_is_a_status_code() {
        let s = setup("errors");
        let mut block = open(&s, false);
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        assert_eq!(run(&s, &mut block, VIRTIO_BLK_T_IN, DISK_SECTORS, &[(512, true)]).0, ioerr, "past the end");
        assert_eq!(run(&s, &mut block, VIRTIO_BLK_T_IN, DISK_SECTORS - 1, &[(1024, true)]).0, ioerr, "across the end");
        assert_eq!(run(&s, &mut block, VIRTIO_BLK_T_IN, u64::MAX / 256, &[(512, true)]).0, ioerr, "overflow");
        assert_eq!(run(&s, &mut block, VIRTIO_BLK_T_IN, 0, &[(512, false)]).0, ioerr, "read into a read-only buffer");
        assert_eq!(run(&s, &mut block, 99, 0, &[(512, true)]), (VIRTIO_BLK_S_UNSUPP as u8, 1), "unknown type");
        let mut ro = open(&s, true);
        assert_eq!(ro.features() & 1 << VIRTIO_BLK_F_RO, 1 << VIRTIO_BLK_F_RO);
        assert_eq!(run(&s, &mut ro, VIRTIO_BLK_T_OUT, 0, &[(512, false)]).0, ioerr, "write to a read-only disk");
        assert_eq!(run(&s, &mut ro, VIRTIO_BLK_T_IN, 1, &[(512, true)]).0, VIRTIO_BLK_S_OK as u8);
        assert_eq!(std::fs::read(s.dir.join("disk.img")).unwrap()[0], 0, "nothing written");
    }

    #[test]
    fn get_id_answers_20_bytes() {
        let s = setup("id");
        let mut block = open(&s, false);
        assert_eq!(run(&s, &mut block, VIRTIO_BLK_T_GET_ID, 0, &[(32, true)]), (VIRTIO_BLK_S_OK as u8, 21));
        let mut id = [0u8; 20];
        s.memory.read_slice(&mut id, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&id, b"drover-disk-0-with-a");
    }

    #[test]
    fn the_configuration_space_gives_capacity_and_limits() {
        let s = setup("config");
        let block = open(&s, false);
        let mut capacity = [0u8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
        let mut blk_size = [0u8; 4];
        block.read_config(20, &mut blk_size);
        assert_eq!(u32::from_le_bytes(blk_size), 512);
        let small = s.dir.join("small.img");
        std::fs::write(&small, [0u8; 100]).unwrap();
        let Err(e) = Block::open(&small, false, "x") else { panic!("a disk smaller than a sector opened") };
        assert!(e.to_string().contains("smaller than one"), "{e}");
    }
}
