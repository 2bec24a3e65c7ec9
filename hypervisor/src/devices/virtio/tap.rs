//! A tap device the agent (or a test) created: opened by name with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, so every frame carries the 12-byte
//! `virtio_net_hdr_v1` a virtio 1.x driver puts before it: frames pass between
//! the guest's buffers and the tap without a copy or a rewrite.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::Error;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// The header before every frame (virtio 1.x: `virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the rest is a union).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the existing tap `name` (non-blocking).
    pub fn open(name: &str) -> Result<Self, Error> {
        if name.is_empty() || name.len() > 15 {
            return Err(Error::Config(format!("tap {name:?}: not an interface name (1-15 bytes)")));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| Error::io("opening /dev/net/tun", e))?;
        let mut req = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let fd = file.as_raw_fd();
        // SAFETY: TUNSETIFF reads a `struct ifreq`, which `IfReq` lays out (40
        // bytes, name then flags); the fd is the tun device just opened.
        if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::Config(format!(
                "tap {name}: cannot attach ({e}); create it first (ip tuntap add {name} mode tap vnet_hdr)"
            )));
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int, which `hdr_len` is.
        if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(Error::io(format!("tap {name}: TUNSETVNETHDRSZ"), std::io::Error::last_os_error()));
        }
        // No offloads: the guest is offered none, so it must get no GSO frames.
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe { libc::ioctl(fd, TUNSETOFFLOAD, 0 as libc::c_uint) } < 0 {
            return Err(Error::io(format!("tap {name}: TUNSETOFFLOAD"), std::io::Error::last_os_error()));
        }
        Ok(Self { file, name: name.to_string() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `iovecs`; `None` when no frame is waiting.
    ///
    /// # Safety
    /// Every iovec must describe writable memory that stays mapped during the call.
    pub unsafe fn read_frame(&self, iovecs: &[libc::iovec]) -> std::io::Result<Option<usize>> {
        loop {
            // SAFETY: the caller vouches for the iovecs; readv writes only within them.
            let n = unsafe { libc::readv(self.file.as_raw_fd(), iovecs.as_ptr(), iovecs.len() as libc::c_int) };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return Ok(None),
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }

    /// Writes one frame gathered from `iovecs`.
    ///
    /// # Safety
    /// Every iovec must describe readable memory that stays mapped during the call.
    pub unsafe fn write_frame(&self, iovecs: &[libc::iovec]) -> std::io::Result<usize> {
        loop {
            // SAFETY: the caller vouches for the iovecs; writev only reads them.
            let n = unsafe { libc::writev(self.file.as_raw_fd(), iovecs.as_ptr(), iovecs.len() as libc::c_int) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Writes one frame from a buffer of the VMM's own (an announcement).
    pub fn write_buf(&self, frame: &[u8]) -> std::io::Result<usize> {
        let iov = libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() };
        // SAFETY: the iovec describes `frame`, borrowed for the call.
        unsafe { self.write_frame(&[iov]) }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
