//! Processes named by pid files (a VM's monitor and VMM): whether one still runs the
//! program it should, and signalling it so that the signal reaches the process that
//! was checked. Pids are reused: a pid read from a file may name a stranger by the
//! time it is used, and a check of `/proc/<pid>` followed by `kill(pid)` can be
//! defeated by a reuse between the two. A pidfd (`pidfd_open`), opened before the
//! check, names one process for good; `pidfd_send_signal` on it never reaches
//! another.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One process, pinned: once it has ended, the pidfd names no process at all, even
/// if its pid is given to a new one.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
}

impl Pidfd {
    /// A pidfd for the process that holds `pid` now.
    pub fn open(pid: i32) -> io::Result<Self> {
        if pid <= 0 {
            // 0 and negative pids name process groups to kill(2); never a VM.
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: pidfd_open(2) takes a pid and flags by value and returns a new
        // file descriptor or -1; it reads and writes no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel has just returned this descriptor to us and nothing
        // else holds it, so the OwnedFd is its only owner and closes it once.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Sends `signal` to the pinned process (0: only checks that it has not ended).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with a pidfd we own, no siginfo (a null
        // pointer: the kernel fills it in as kill(2) would) and no flags; the kernel
        // reads no memory of ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

/// Whether `pid` is alive (not a zombie) and runs a program whose command line
/// contains `name`: a stale pid file must not adopt a stranger.
pub fn runs(pid: i32, name: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            // A zombie has an empty command line: it has ended.
            !cmdline.is_empty() && String::from_utf8_lossy(&cmdline).contains(name) && !is_zombie(pid)
        }
        Err(_) => false,
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

/// SIGKILLs the process `pid` if it runs `name`. Returns whether a process was
/// signalled. The pidfd is opened before the check: if the pid changed hands before
/// the check, the check sees the stranger and fails; if it changed hands between
/// the open and the check, the pidfd names the ended process and the signal goes
/// nowhere. Either way, only a checked process is ever killed.
pub fn kill_if_runs(pid: i32, name: &str) -> io::Result<bool> {
    let pidfd = match Pidfd::open(pid) {
        Ok(pidfd) => pidfd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return kill_without_pidfd(pid, name),
        Err(e) => return Err(e),
    };
    if !runs(pid, name) {
        return Ok(false);
    }
    match pidfd.signal(libc::SIGKILL) {
        Ok(()) => Ok(true),
        // It ended on its own since the check.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Kernels before 5.3 have no pidfd_open: check, then kill(2). The reuse window
/// between the two is back there, as small as two system calls.
fn kill_without_pidfd(pid: i32, name: &str) -> io::Result<bool> {
    if !runs(pid, name) {
        return Ok(false);
    }
    // SAFETY: kill(2) takes a pid and a signal by value; only pids that
    // `Pidfd::open` accepted (positive) come here, so this signals one process,
    // never a group.
    if unsafe { libc::kill(pid, libc::SIGKILL) } < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) { Ok(false) } else { Err(e) };
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    /// A `sleep 30` child, once it runs `sleep` (between fork and exec its command
    /// line is still the test's).
    fn sleeper() -> std::process::Child {
        let child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let start = std::time::Instant::now();
        while !runs(child.id() as i32, "sleep") {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "sleep never started");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child
    }

    #[test]
    fn only_a_process_that_runs_the_named_program_is_killed() {
        let mut child = sleeper();
        let pid = child.id() as i32;
        assert!(!kill_if_runs(pid, "drover-vmm").unwrap(), "not a VMM: left alone");
        assert!(child.try_wait().unwrap().is_none(), "still running");
        assert!(kill_if_runs(pid, "sleep").unwrap());
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(!runs(pid, "sleep"));
        assert!(!kill_if_runs(pid, "sleep").unwrap(), "gone: nothing to kill");
    }

    #[test]
    fn a_pidfd_names_its_process_even_after_the_pid_is_free() {
        let mut child = sleeper();
        let pidfd = Pidfd::open(child.id() as i32).unwrap();
        pidfd.signal(0).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // Reaped: its pid may name a new process any moment; the pidfd names none.
        let e = pidfd.signal(libc::SIGKILL).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH), "{e}");
    }

    #[test]
    fn no_pid_is_no_process() {
        assert!(Pidfd::open(0).is_err() && Pidfd::open(-1).is_err());
        assert!(!kill_if_runs(0, "").unwrap() && !kill_if_runs(-1, "").unwrap());
    }
}
