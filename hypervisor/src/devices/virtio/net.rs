//! virtio-net (virtio 1.x, 5.1) on a tap: queue 0 receives, queue 1 transmits,
//! the MAC comes from the VM's configuration. Frames pass between the tap and
//! the guest's buffers with readv/writev, header and all (the tap is opened with
//! a 12-byte virtio-net header, see `tap`), so nothing is copied in the VMM. No
//! offloads are offered: every frame is a plain Ethernet frame.
//!
//! After a migration the target announces the MAC (`announce`): RARP frames
//! from it, as QEMU sends them, so that bridges and switches learn the VM's new
//! port at once instead of when the guest next speaks.

use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use super::VIRTIO_F_VERSION_1;
use super::VirtioDevice;
use super::tap::{Tap, VNET_HDR_LEN};
use crate::Error;
use crate::memory::GuestRam;

const RX: usize = 0;
const TX: usize = 1;
/// The most descriptors a frame may span; a longer chain is dropped.
const MAX_IOVECS: usize = 64;

/// A virtio-net device on a tap.
pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
}

impl Net {
    /// Opens the existing tap `tap` for a NIC with MAC `mac` ("52:54:00:12:34:56").
    pub fn open(tap: &str, mac: &str) -> Result<Self, Error> {
        let mac = crate::config::parse_mac(mac).map_err(Error::Config)?;
        Ok(Self { tap: Arc::new(Tap::open(tap)?), mac })
    }

    /// The tap and MAC, for announcements made outside the device thread.
    pub fn announcer(&self) -> Announcer {
        Announcer { tap: self.tap.clone(), mac: self.mac }
    }

    /// Fills the guest's receive buffers with waiting frames; returns whether any
    /// buffer was used.
    fn receive(&mut self, queue: &mut Queue, memory: &GuestRam) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let descriptors: Vec<Descriptor> = chain.filter(|d| d.is_write_only()).take(MAX_IOVECS).collect();
            let Some(slices) = slices(&descriptors, memory) else {
                // A buffer outside guest memory: give it back empty.
                let _ = queue.add_used(memory, head, 0);
                used = true;
                continue;
            };
            let iovecs: Vec<libc::iovec> = slices
                .iter()
                .map(|s| libc::iovec { iov_base: s.ptr_guard_mut().as_ptr().cast(), iov_len: s.len() })
                .collect();
            // SAFETY: each iovec is a slice of guest memory, which stays mapped for
            // the VM's life; the guest gave these buffers to the device to write.
            let read = unsafe { self.tap.read_frame(&iovecs) };
            let n = match read {
                Ok(Some(n)) => n,
                Ok(None) => {
                    // No frame waiting: the buffer stays the driver's, for the next one.
                    queue.go_to_previous_position();
                    break;
                }
                Err(e) => {
                    tracing::warn!(tap = self.tap.name(), "virtio-net: reading a frame: {e}");
                    queue.go_to_previous_position();
                    break;
                }
            };
            // The VMM wrote guest memory: those pages go into the next migration pass.
            let mut left = n;
            for s in &slices {
                let len = left.min(s.len());
                s.bitmap().mark_dirty(0, len);
                left -= len;
            }
            // Without VIRTIO_NET_F_MRG_RXBUF a frame is one buffer: num_buffers = 1
            // (the tap leaves those two header bytes as they were).
            if n >= VNET_HDR_LEN {
                write_at(&descriptors, 10, &1u16.to_le_bytes(), memory);
            }
            if let Err(e) = queue.add_used(memory, head, n as u32) {
                tracing::warn!("virtio-net: used ring: {e:?}");
            }
            used = true;
        }
        used
    }

    /// Sends every frame the driver made available; returns whether any was.
    fn transmit(&mut self, queue: &mut Queue, memory: &GuestRam) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let descriptors: Vec<Descriptor> = chain.filter(|d| !d.is_write_only()).take(MAX_IOVECS).collect();
            if let Some(slices) = slices(&descriptors, memory) {
                let iovecs: Vec<libc::iovec> = slices
                    .iter()
                    .map(|s| libc::iovec { iov_base: s.ptr_guard().as_ptr() as *mut libc::c_void, iov_len: s.len() })
                    .collect();
                // SAFETY: each iovec is a slice of guest memory, mapped for the VM's
                // life; writev only reads it.
                if let Err(e) = unsafe { self.tap.write_frame(&iovecs) } {
                    // A frame the host's stack refuses is lost, as on a wire.
                    tracing::debug!(tap = self.tap.name(), "virtio-net: sending a frame: {e}");
                }
            }
            if let Err(e) = queue.add_used(memory, head, 0) {
                tracing::warn!("virtio-net: used ring: {e:?}");
            }
            used = true;
        }
        used
    }
}

type Slice<'a> = vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>>;

/// The guest memory each descriptor names, or `None` if one is outside it.
fn slices<'a>(descriptors: &[Descriptor], memory: &'a GuestRam) -> Option<Vec<Slice<'a>>> {
    descriptors.iter().map(|d| memory.get_slice(d.addr(), d.len() as usize).ok()).collect()
}

/// Writes `bytes` at byte `offset` of the buffer the descriptors make together.
fn write_at(descriptors: &[Descriptor], mut offset: usize, bytes: &[u8], memory: &GuestRam) {
    let mut bytes = bytes;
    for d in descriptors {
        let len = d.len() as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = bytes.len().min(len - offset);
        let _ = memory.write_slice(&bytes[..n], d.addr().unchecked_add(offset as u64));
        bytes = &bytes[n..];
        offset = 0;
        if bytes.is_empty() {
            return;
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC
    }

    fn queue_count(&self) -> usize {
        2
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.mac.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, memory: &GuestRam) -> bool {
        match index {
            RX => self.receive(queue, memory),
            TX => self.transmit(queue, memory),
            _ => false,
        }
    }

    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.tap.raw_fd())
    }

    fn process_host(&mut self, queues: &mut [Queue], memory: &GuestRam) -> bool {
        match queues.get_mut(RX) {
            Some(queue) if queue.ready() => self.receive(queue, memory),
            _ => false,
        }
    }

    fn name(&self) -> &'static str {
        "net"
    }
}

/// Announces a NIC's MAC on its tap.
#[derive(Clone)]
pub struct Announcer {
    tap: Arc<Tap>,
    mac: [u8; 6],
}

impl Announcer {
    /// Sends one RARP "reverse request" from the MAC (with the tap's virtio-net
    /// header before it), as QEMU's announcement does.
    pub fn announce(&self) -> std::io::Result<()> {
        self.tap.write_buf(&rarp_frame(self.mac)).map(|_| ())
    }
}

/// A RARP request (RFC 903, opcode 3) from and about `mac`, broadcast; the
/// virtio-net header before it is all zero (no offloads).
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]); // destination: broadcast
    frame.extend_from_slice(&mac); // source: the VM
    frame.extend_from_slice(&[0x80, 0x35]); // ethertype: RARP
    frame.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]); // Ethernet, IPv4, reverse request
    frame.extend_from_slice(&mac); // sender hardware address
    frame.extend_from_slice(&[0; 4]); // sender protocol address
    frame.extend_from_slice(&mac); // target hardware address
    frame.extend_from_slice(&[0; 4]); // target protocol address
    frame.resize(VNET_HDR_LEN + 60, 0); // padded to Ethernet's minimum
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frames_are_from_the_mac_and_padded() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(mac);
        assert_eq!(f.len(), VNET_HDR_LEN + 60);
        let eth = &f[VNET_HDR_LEN..];
        assert_eq!(&eth[0..6], &[0xff; 6]);
        assert_eq!(&eth[6..12], &mac);
        assert_eq!(&eth[12..14], &[0x80, 0x35]);
        assert_eq!(&eth[20..22], &[0, 3], "opcode: reverse request");
        assert_eq!(&eth[22..28], &mac);
        assert_eq!(&eth[32..38], &mac);
    }

    #[test]
    fn num_buffers_lands_in_whichever_descriptor_holds_byte_10() {
        let memory = GuestRam::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let d = [Descriptor::new(0x1000, 8, 0, 0), Descriptor::new(0x2000, 100, 0, 0)];
        write_at(&d, 10, &[1, 0], &memory);
        assert_eq!(memory.read_obj::<u16>(vm_memory::GuestAddress(0x2002)).unwrap(), 1);
    }
}
