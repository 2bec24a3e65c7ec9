//! `drover-monitor`: the small process that stays with one VMM for its whole life
//! (the conmon pattern). The agent starts it in a session of its own, so it outlives
//! an agent restart; it starts the VMM as its child and:
//! - keeps the VM's serial output (the VMM's standard output) in a size-bounded,
//!   rotated log, and streams it live to clients of `console.sock`;
//! - powers the VM off (SIGKILL) as soon as the host's fencing deadline passes
//!   (`fence`), whether or not the agent is alive to do it;
//! - records how the VMM ended in `exit.json`, which only a parent can know.
//!
//! The VMM gets `PR_SET_PDEATHSIG(SIGKILL)`: a VM never outlives its watchdog.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Error;
use crate::fence;
use crate::files::write_atomic;
use crate::vm_dir::{EXIT_NOT_STARTED, ExitRecord, StopReason, VmDir, unix_ms};

/// How often the monitor checks the deadline and the child. The heartbeat margin
/// (`timing::Timing`) allows for this delay.
pub const POLL: Duration = Duration::from_millis(50);

/// What the monitor is told to do.
#[derive(Clone, Debug)]
pub struct MonitorArgs {
    pub dir: VmDir,
    pub fence_file: PathBuf,
    pub serial_log: PathBuf,
    pub serial_max_bytes: u64,
    /// The VMM program and its arguments.
    pub command: Vec<String>,
}

/// Runs the VMM to its end; returns how it ended (also written to `exit.json`).
pub fn run(args: &MonitorArgs) -> Result<ExitRecord, Error> {
    let (program, rest) = args.command.split_first().ok_or_else(|| Error::Config("no VMM command given".into()))?;
    let vmm_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.dir.vmm_log())
        .map_err(|e| Error::io(args.dir.vmm_log().display(), e))?;
    let mut command = Command::new(program);
    command.args(rest).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(vmm_log);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches only the
    // calling (child) process; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            // Recorded like any other end, so the agent reports it instead of
            // finding a monitor that vanished without a word.
            let record = ExitRecord { code: Some(EXIT_NOT_STARTED), signal: None, at_ms: unix_ms() };
            let _ = write_atomic(&args.dir.exit(), &serde_json::to_vec(&record).unwrap_or_default());
            return Err(Error::io(format!("starting {program}"), e));
        }
    };
    let pid = child.id() as i32;
    write_atomic(&args.dir.vmm_pid(), pid.to_string().as_bytes())?;

    let clients: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
    let socket = args.dir.console_socket();
    let _ = std::fs::remove_file(&socket);
    match UnixListener::bind(&socket) {
        Ok(listener) => {
            let clients = clients.clone();
            std::thread::Builder::new()
                .name("console".into())
                .spawn(move || accept_consoles(listener, clients))
                .map_err(|e| Error::io("console thread", e))?;
        }
        Err(e) => {
            eprintln!("drover-monitor: no live console ({}: {e}); the serial log is still kept", socket.display())
        }
    }
    let mut serial = None;
    if let Some(stdout) = child.stdout.take() {
        let mut log = RotatingLog::open(&args.serial_log, args.serial_max_bytes)?;
        serial = Some(
            std::thread::Builder::new()
                .name("serial".into())
                .spawn(move || pump_serial(stdout, &mut log, &clients))
                .map_err(|e| Error::io("serial thread", e))?,
        );
    }

    loop {
        if let Some(status) = child.try_wait().map_err(|e| Error::io("waiting for the VMM", e))? {
            // The guest's last words (a result, a panic) are in the pipe: the log
            // is complete before anyone is told the VM ended. The VMM is gone, so
            // the pipe ends at once.
            if let Some(serial) = serial.take() {
                let _ = serial.join();
            }
            let record = ExitRecord { code: status.code(), signal: status.signal(), at_ms: unix_ms() };
            let json = serde_json::to_vec(&record).map_err(|e| Error::Io(e.to_string()))?;
            write_atomic(&args.dir.exit(), &json)?;
            return Ok(record);
        }
        if !fence::within_deadline(&args.fence_file) {
            args.dir.set_stop_reason(StopReason::Fenced);
            // SAFETY: kill(2) on our own child's pid; the child is not reaped yet
            // (try_wait above saw it running), so the pid cannot name another process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(POLL);
    }
}

fn accept_consoles(listener: UnixListener, clients: Arc<Mutex<Vec<UnixStream>>>) {
    for stream in listener.incoming().flatten() {
        // A slow console must never stall the guest's serial port: writes to
        // clients time out and the client is dropped.
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        if let Ok(mut list) = clients.lock() {
            list.push(stream);
        }
    }
}

fn pump_serial(mut from: impl Read, log: &mut RotatingLog, clients: &Mutex<Vec<UnixStream>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        log.write(&buf[..n]);
        if let Ok(mut list) = clients.lock() {
            list.retain_mut(|client| client.write_all(&buf[..n]).is_ok());
        }
    }
}

/// A log that keeps at most `max_bytes` in `path` and the previous `max_bytes` in
/// `path.1`: bounded at twice the size, and the newest output is always there.
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    file: std::fs::File,
    size: u64,
}

impl RotatingLog {
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, Error> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent.display(), e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path.display(), e))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self { path: path.to_path_buf(), max_bytes: max_bytes.max(1), file, size })
    }

    /// Appends; rotates first when the data would not fit. Errors are dropped: a full
    /// disk must not stop the guest.
    pub fn write(&mut self, data: &[u8]) {
        if self.size > 0 && self.size + data.len() as u64 > self.max_bytes {
            let _ = std::fs::rename(&self.path, rotated(&self.path));
            if let Ok(file) = std::fs::OpenOptions::new().create(true).append(true).open(&self.path) {
                self.file = file;
                self.size = 0;
            }
        }
        if self.file.write_all(data).is_ok() {
            self.size += data.len() as u64;
        }
    }
}

/// Where a rotated log goes.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The last `max` bytes of a rotated log (older file first).
pub fn read_log_tail(path: &Path, max: usize) -> Vec<u8> {
    let mut out = std::fs::read(rotated(path)).unwrap_or_default();
    out.extend(std::fs::read(path).unwrap_or_default());
    if out.len() > max {
        out.drain(..out.len() - max);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotating_log_stays_bounded_and_keeps_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut log = RotatingLog::open(&path, 100).unwrap();
        for i in 0..50 {
            log.write(format!("line {i:03}\n").as_bytes()); // 9 bytes each
        }
        let current = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(rotated(&path)).unwrap().len();
        assert!(current <= 100 && old <= 100, "{current} {old}");
        let tail = String::from_utf8(read_log_tail(&path, 1000)).unwrap();
        assert!(tail.ends_with("line 049\n"), "{tail}");
        assert!(!tail.contains("line 000"), "oldest output rotated away");
        let lines: Vec<&str> = tail.lines().collect();
        let numbers: Vec<u32> = lines.iter().map(|l| l[5..].parse().unwrap()).collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "in order, no gaps: {numbers:?}");
        assert_eq!(read_log_tail(&path, 9), b"line 049\n");
    }

    /// A monitor for `command` in a fresh directory, with the deadline `after` from now.
    fn monitor(dir: &std::path::Path, after: Duration, command: &[&str]) -> MonitorArgs {
        let vm = VmDir { path: dir.join("vm") };
        std::fs::create_dir_all(&vm.path).unwrap();
        fence::write_deadline(dir, fence::boottime_ns(), after).unwrap();
        MonitorArgs {
            dir: vm,
            fence_file: fence::deadline_file(dir),
            serial_log: dir.join("serial.log"),
            serial_max_bytes: 1 << 20,
            command: command.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn monitor_records_the_exit_and_keeps_serial_output() {
        let dir = tempfile::tempdir().unwrap();
        // Output written just before the end is in the log when the exit is recorded.
        let args = monitor(dir.path(), Duration::from_secs(60), &["sh", "-c", "echo hello from the guest; exit 5"]);
        let record = run(&args).unwrap();
        assert_eq!(record.code, Some(5));
        assert_eq!(args.dir.read_exit().unwrap(), record);
        assert_eq!(read_log_tail(&args.serial_log, 100), b"hello from the guest\n");
    }

    #[test]
    fn monitor_powers_the_vm_off_when_the_deadline_passes() {
        let dir = tempfile::tempdir().unwrap();
        let args = monitor(dir.path(), Duration::from_millis(300), &["sleep", "30"]);
        let vm = args.dir.clone();
        let start = std::time::Instant::now();
        let record = run(&args).unwrap();
        assert_eq!(record.signal, Some(libc::SIGKILL));
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
        assert!(vm.read_stop_reason().unwrap().contains("isolation response"));
    }
}
