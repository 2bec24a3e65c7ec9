//! Auto-converge: a thread that pauses the vCPUs for a share of every 20 ms, so
//! that a guest dirtying memory faster than the link carries it slows down until
//! pre-copy converges. The share comes from the convergence decision
//! (`converge::decide`); this module only carries it out.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::control::VmControl;

/// The throttle's cycle: the vCPUs are held `percent` of it.
const CYCLE_US: u64 = 20_000;

/// The vCPU throttle of one migration; it ends (the vCPUs run on) when dropped.
pub struct Throttle {
    percent: Arc<AtomicU32>,
    /// Set to end the throttle; its thread waits on the condvar, so it ends at
    /// once rather than at the end of its 20 ms cycle (a guest still dirtying at
    /// the throttled rate for that long added pages the switch-over's estimate
    /// had not counted).
    end: Arc<(Mutex<ThrottleEnd>, Condvar)>,
    thread: Mutex<Option<JoinHandle<()>>>,
    control: Arc<VmControl>,
}

/// How a throttle ends.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum ThrottleEnd {
    #[default]
    NotYet,
    /// The vCPUs run on (the migration gave up, or ended).
    Resume,
    /// The switch-over takes the vCPUs over: if the throttle holds them, they
    /// stay held. Letting them go for the microseconds before the switch-over's
    /// own pause let a guest dirtying 4 GB/s add 800 pages that no estimate had
    /// counted (18 ms of downtime in a dev build).
    HandOver,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Throttle {
    /// A throttle at 0 % (no thread until it is first set).
    pub fn new(control: Arc<VmControl>) -> Self {
        Self { percent: Arc::new(AtomicU32::new(0)), end: Arc::default(), thread: Mutex::new(None), control }
    }

    /// The share of time the vCPUs are held, percent.
    pub fn percent(&self) -> u32 {
        self.percent.load(Ordering::Relaxed)
    }

    /// Holds the vCPUs `percent` (at most 99) of the time from now on.
    pub fn set(&self, percent: u32) {
        let percent = percent.min(99);
        self.percent.store(percent, Ordering::Relaxed);
        tracing::info!(percent, "migration: throttling vCPUs to converge");
        let mut thread = lock(&self.thread);
        if thread.is_none() {
            let (percent, ending, control) = (self.percent.clone(), self.end.clone(), self.control.clone());
            *thread = std::thread::Builder::new()
                .name("throttle".into())
                .spawn(move || run(&percent, &ending, &control))
                .ok();
        }
    }

    /// Ends the throttle; the vCPUs run on.
    pub fn stop(&self) {
        self.end(ThrottleEnd::Resume);
    }

    /// Ends the throttle for the switch-over: vCPUs the throttle holds stay held.
    /// The switch-over's downtime counts from here: the time they were held
    /// before is throttling, as in QEMU's auto-converge.
    pub fn hand_over(&self) {
        self.end(ThrottleEnd::HandOver);
    }

    fn end(&self, how: ThrottleEnd) {
        let (end, changed) = &*self.end;
        {
            let mut end = lock(end);
            if *end == ThrottleEnd::NotYet {
                *end = how;
            }
        }
        changed.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The throttle's thread: lets the vCPUs run `100 - percent` of a cycle, holds
/// them `percent` of it, until told to end.
fn run(percent: &AtomicU32, ending: &(Mutex<ThrottleEnd>, Condvar), control: &VmControl) {
    // Sleeps `d` unless told to end first; says how to end.
    let end_within = |d: Duration| {
        let (end, changed) = ending;
        *changed
            .wait_timeout_while(lock(end), d, |end| *end == ThrottleEnd::NotYet)
            .unwrap_or_else(|p| p.into_inner())
            .0
    };
    loop {
        let p = u64::from(percent.load(Ordering::Relaxed));
        // Ended while the vCPUs run: they run on (a switch-over pauses them itself).
        if end_within(Duration::from_micros(CYCLE_US / 100 * (100 - p))) != ThrottleEnd::NotYet {
            return;
        }
        if control.pause().is_err() {
            // A vCPU did not park within the pause's wait: try again next cycle
            // (those that parked stay held meanwhile).
            continue;
        }
        match end_within(Duration::from_micros(CYCLE_US / 100 * p)) {
            ThrottleEnd::HandOver => return,
            ThrottleEnd::Resume => {
                control.resume();
                return;
            }
            ThrottleEnd::NotYet => control.resume(),
        }
    }
}
