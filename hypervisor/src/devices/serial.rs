//! COM1, a 16550A UART (vm-superio), whose interrupt is KVM's GSI 4 through an eventfd.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the serial interrupt by signalling the eventfd KVM listens on (irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// The serial port with its output.
pub type SerialPort = Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// The legacy IRQ (and KVM GSI) of COM1.
pub const COM1_GSI: u32 = 4;

/// Serial output for console clients: the VMM listens on a Unix socket and writes
/// the guest's output to every connected client. A client that stops reading is
/// dropped rather than allowed to stall the vCPU writing to the port.
pub struct SocketOutput {
    clients: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl SocketOutput {
    /// Listens on `path` (replacing a stale socket) and accepts clients in a thread.
    pub fn listen(path: &std::path::Path) -> Result<Self, crate::Error> {
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| crate::Error::Io(format!("serial socket {}: {e}", path.display())))?;
        let clients = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepted = clients.clone();
        std::thread::Builder::new()
            .name("serial-accept".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    // Writes must not block a vCPU: a full client is dropped instead.
                    if stream.set_nonblocking(true).is_ok() {
                        accepted.lock().unwrap_or_else(|p| p.into_inner()).push(stream);
                    }
                }
            })
            .map_err(|e| crate::Error::Io(format!("serial socket thread: {e}")))?;
        Ok(Self { clients })
    }
}

impl Write for SocketOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.retain_mut(|c| c.write_all(buf).is_ok());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
