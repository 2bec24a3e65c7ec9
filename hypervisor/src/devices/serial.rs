//! COM1, a 16550A UART (vm-superio), whose interrupt is KVM's GSI 4 through an eventfd.

use std::io::Write;

use vm_superio::Serial;

use super::IrqTrigger;

/// When the guest first wrote to the serial port: set once by the vCPU that
/// writes, read by the control API (a VM's boot time is its first output).
#[derive(Debug, Default)]
pub struct FirstOutput(std::sync::OnceLock<std::time::Instant>);

impl FirstOutput {
    /// Notes an output byte (only the first one counts).
    pub fn note(&self) {
        // Checked first: every later byte then costs one load, not a clock read.
        if self.0.get().is_none() {
            let _ = self.0.set(std::time::Instant::now());
        }
    }

    /// When the first byte came, if one did.
    pub fn at(&self) -> Option<std::time::Instant> {
        self.0.get().copied()
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
            .map_err(|e| crate::Error::io(format!("serial socket {}", path.display()), e))?;
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
            .map_err(|e| crate::Error::io("serial socket thread", e))?;
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
