//! A virtio-mmio device at work: its [`Transport`] behind one lock (the vCPUs'
//! register accesses and the device thread take turns), the eventfd per queue
//! that a driver's notification signals, the irqfd its interrupt goes out on, and
//! the thread that serves the queues.
//!
//! Pausing takes the lock and sets a flag: the device thread holds the lock for
//! the whole of each batch of requests, so once `pause` returns no request is
//! half done (a disk read is in guest memory with its status written, or not
//! begun), and none starts until `resume`. What the driver made available
//! meanwhile stays in the avail ring, which is guest memory: it travels with a
//! migration, and `resume` (on either host) kicks every queue to serve it.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioDevice;
use super::mmio::{Action, Transport};
use super::state::DeviceState;
use crate::Error;
use crate::memory::GuestRam;

struct Inner {
    transport: Transport,
    paused: bool,
}

/// One device on the MMIO bus.
pub struct MmioDevice {
    inner: Mutex<Inner>,
    /// Signalled by a notification of queue `i` (by KVM, or by `write`).
    queue_events: Vec<EventFd>,
    /// The irqfd of the device's IOAPIC pin.
    irq: EventFd,
    memory: GuestRam,
    /// What identifies the device across a save and restore (see `DeviceState`).
    identity: String,
    name: &'static str,
}

impl MmioDevice {
    /// A device with an eventfd per queue; `irq` must already be an irqfd.
    pub fn new(device: Box<dyn VirtioDevice>, identity: String, memory: GuestRam, irq: EventFd) -> Result<Self, Error> {
        let name = device.name();
        let queue_events = (0..device.queue_count())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e)))
            .collect::<Result<Vec<_>, _>>()?;
        let inner = Mutex::new(Inner { transport: Transport::new(device), paused: false });
        Ok(Self { inner, queue_events, irq, memory, identity, name })
    }

    /// The eventfd a notification of queue `index` signals (for KVM's ioeventfd).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A device thread that panicked mid-batch leaves the transport's registers
        // consistent (each is a plain store); the driver sees an unfinished request.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A vCPU's read in the device's window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        self.lock().transport.read(offset, data);
    }

    /// A vCPU's write in the device's window.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let action = self.lock().transport.write(offset, data);
        match action {
            Action::Notify(queue) => self.kick(queue),
            // Buffers made available before DRIVER_OK are served now.
            Action::Activated => self.kick_all(),
            Action::Nothing | Action::Reset => {}
        }
    }

    fn kick(&self, queue: usize) {
        if let Some(Err(e)) = self.queue_events.get(queue).map(|event| event.write(1)) {
            tracing::warn!(device = self.name, queue, "notifying the device thread: {e}");
        }
    }

    fn kick_all(&self) {
        (0..self.queue_events.len()).for_each(|q| self.kick(q));
    }

    /// Stops serving requests; returns once none is under way.
    pub fn pause(&self) {
        self.lock().paused = true;
    }

    /// Serves requests again, those made available while paused first.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.kick_all();
    }

    /// The device's state; it should be paused.
    pub fn state(&self) -> DeviceState {
        DeviceState { transport: self.lock().transport.state(), identity: self.identity.clone() }
    }

    /// Restores a saved state into this (new, unstarted) device.
    pub fn restore(&self, state: &DeviceState) -> Result<(), Error> {
        if state.identity != self.identity {
            return Err(Error::State(format!(
                "{} device: saved as {}, configured here as {}",
                self.name, state.identity, self.identity
            )));
        }
        self.lock().transport.restore(&state.transport).map_err(|e| Error::State(format!("{} device: {e}", self.name)))
    }

    /// Starts the thread that serves the device's queues (and its host fd).
    pub fn spawn(self: &Arc<Self>, index: usize) -> Result<(), Error> {
        let epoll = Epoll::new().map_err(|e| Error::io("epoll_create", e))?;
        for (token, event) in self.queue_events.iter().enumerate() {
            epoll
                .ctl(ControlOperation::Add, event.as_raw_fd(), EpollEvent::new(EventSet::IN, token as u64))
                .map_err(|e| Error::io("epoll_ctl", e))?;
        }
        let host_fd = self.lock().transport.device.host_fd();
        if let Some(fd) = host_fd {
            // Edge-triggered: a tap with frames but no guest buffers waits for the
            // driver's next notification instead of waking this thread in a loop.
            let events = EventSet::IN | EventSet::EDGE_TRIGGERED;
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, HOST_TOKEN))
                .map_err(|e| Error::io("epoll_ctl", e))?;
        }
        let device = self.clone();
        std::thread::Builder::new()
            .name(format!("virtio-{} {index}", self.name))
            .spawn(move || device.serve(&epoll))
            .map_err(|e| Error::io("starting a device thread", e))?;
        Ok(())
    }

    fn serve(&self, epoll: &Epoll) {
        let mut events = vec![EpollEvent::default(); self.queue_events.len() + 1];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(device = self.name, "device thread: epoll_wait: {e}; the device stops");
                    return;
                }
            };
            for event in &events[..n] {
                let token = event.data();
                if let Some(queue) = self.queue_events.get(token as usize) {
                    // Drains the counter; several notifications are one batch.
                    let _ = queue.read();
                }
                self.serve_one(token);
            }
        }
    }

    fn serve_one(&self, token: u64) {
        let mut inner = self.lock();
        if inner.paused || !inner.transport.is_active() {
            return;
        }
        let Transport { device, queues, .. } = &mut inner.transport;
        let used = if token == HOST_TOKEN {
            device.process_host(queues, &self.memory)
        } else {
            match queues.get_mut(token as usize) {
                Some(queue) => device.process_queue(token as usize, queue, &self.memory),
                None => false,
            }
        };
        if !used {
            return;
        }
        // One interrupt for the batch, if the driver wants one on any queue.
        let wanted = queues.iter_mut().any(|q| q.ready() && q.needs_notification(&self.memory).unwrap_or(true));
        if wanted {
            inner.transport.interrupt_status |= VIRTIO_MMIO_INT_VRING;
            if let Err(e) = self.irq.write(1) {
                tracing::warn!(device = self.name, "raising the interrupt: {e}");
            }
        }
    }
}

/// The epoll token of a device's host fd (queue tokens are their indices).
const HOST_TOKEN: u64 = u64::MAX;
