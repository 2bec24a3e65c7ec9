//! Kicking a vCPU thread out of KVM_RUN: a real-time signal whose handler sets
//! the thread's `kvm_run.immediate_exit`, so that a kick landing outside KVM_RUN
//! is not lost (the next KVM_RUN returns EINTR at once).

use crate::Error;

/// The signal that kicks a vCPU thread out of KVM_RUN (the interrupted ioctl
/// returns EINTR).
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// The `kvm_run.immediate_exit` byte of the vCPU this thread runs (null on
    /// other threads). Constant-initialised and without a destructor, so reading it
    /// in a signal handler is a plain thread-local load.
    static IMMEDIATE_EXIT: std::cell::Cell<*mut u8> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// Tells the kick handler where this vCPU thread's `kvm_run.immediate_exit` is
/// (null before the vCPU's fd goes away).
pub fn set_immediate_exit(flag: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(flag));
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A kick that lands while the thread is outside KVM_RUN (handling an exit, or
    // between its pause check and the ioctl) would be lost, and the pause would
    // wait for the next kick: the flag makes the next KVM_RUN return EINTR at once.
    let flag = IMMEDIATE_EXIT.with(|c| c.get());
    if !flag.is_null() {
        // SAFETY: set by this thread from its vCPU's kvm_run mapping, which lives
        // until the thread clears the pointer; a byte write is async-signal-safe.
        unsafe { flag.write_volatile(1) };
    }
}

/// Installs the kick handler (once per process, before vCPU threads start).
pub fn install_kick_handler() -> Result<(), Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| Error::io("installing the vCPU kick signal handler", e.into()))
}
