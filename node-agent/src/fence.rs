//! The host's fencing deadline, shared by the agent and every VM monitor through a
//! file holding a time on the host's `CLOCK_BOOTTIME` in nanoseconds.
//!
//! The agent moves the deadline forward after each heartbeat the API server accepted
//! (see `heartbeat`); each monitor powers its VM off as soon as the clock passes the
//! deadline, or when the file is gone. Keeping the watchdog in the monitors, not only
//! in the agent, is what lets VMs outlive an agent restart without ever outliving the
//! host's lease: if the agent dies and does not come back in time, nobody renews the
//! lease, the operator will restart the VMs elsewhere, and the monitors have already
//! stopped them here. `CLOCK_BOOTTIME` (not `CLOCK_MONOTONIC`) keeps counting while the
//! host is suspended, as the lease does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Error;
use crate::files::write_atomic;

/// Path of the deadline file in a runtime directory.
pub fn deadline_file(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("fence-deadline")
}

/// Now on `CLOCK_BOOTTIME`, in nanoseconds.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to the valid pointer it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        // CLOCK_BOOTTIME exists on every Linux since 2.6.39; if it failed anyway,
        // report "long after any deadline" so that readers fence rather than trust.
        return u64::MAX;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sets the deadline to `from_ns + after` (both on `CLOCK_BOOTTIME`).
pub fn write_deadline(runtime_dir: &Path, from_ns: u64, after: Duration) -> Result<(), Error> {
    let deadline = from_ns.saturating_add(after.as_nanos() as u64);
    write_atomic(&deadline_file(runtime_dir), deadline.to_string().as_bytes())
}

/// The deadline, or `None` when the file is missing or unreadable.
pub fn read_deadline(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether a VM may run now: the deadline exists and has not passed.
pub fn within_deadline(path: &Path) -> bool {
    read_deadline(path).is_some_and(|deadline| boottime_ns() < deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_holds_until_it_passes_and_a_missing_file_means_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let file = deadline_file(dir.path());
        assert!(!within_deadline(&file), "no file: fenced");
        write_deadline(dir.path(), boottime_ns(), Duration::from_secs(60)).unwrap();
        assert!(within_deadline(&file));
        write_deadline(dir.path(), boottime_ns(), Duration::ZERO).unwrap();
        assert!(!within_deadline(&file));
        std::fs::write(&file, "garbage").unwrap();
        assert!(!within_deadline(&file), "unreadable: fenced");
    }
}
