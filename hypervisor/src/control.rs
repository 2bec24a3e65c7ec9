//! The running VM as the control API sees it: its vCPU threads, pausing and
//! resuming them, their host CPUs and priority (both changeable while it runs).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use drover_topology::CpuSet;
use vmm_sys_util::signal::Killable;

use crate::config::VmConfig;
use crate::devices::{PioBus, serial::FirstOutput};
use crate::exit::VmExit;
use crate::priority::Priority;
use crate::state::{STATE_VERSION, VcpuState, VmState};
use crate::vstate::vm::Vm;
use crate::{Error, affinity};
use drover_vmm_api::api::{MigrationPhase as Phase, MigrationStatus, VcpuStatus, VmStatus};
use std::sync::Arc;

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

/// Shared by the vCPU threads, the API thread and the main thread.
pub struct VmControl {
    config: VmConfig,
    started: Instant,
    first_output: Arc<FirstOutput>,
    /// Host thread id of each vCPU (0 until its thread starts).
    tids: Mutex<Vec<i32>>,
    /// vCPU threads, for kicking them out of KVM_RUN.
    handles: Mutex<Vec<JoinHandle<()>>>,
    paused: AtomicBool,
    /// Raised to ask parked vCPU threads for their state; answers land in `saved`.
    save_generation: std::sync::atomic::AtomicU64,
    /// The save request `pause_and_save` made for the current pause (0: none).
    saved_on_pause: std::sync::atomic::AtomicU64,
    saved: Mutex<Vec<Saved>>,
    parked: Mutex<u32>,
    parked_changed: Condvar,
    resumed: Condvar,
    placement: Mutex<Vec<CpuSet>>,
    cpus_changed_at: Mutex<Option<SystemTime>>,
    numa_nodes: CpuSet,
    shares: AtomicU32,
    /// Made when first needed: moving a thread into a cgroup waits for an RCU grace
    /// period (~25 ms here), which must not delay the guest's start.
    priority: Mutex<Option<Priority>>,
    priority_changed_at: Mutex<Option<SystemTime>>,
    events: Sender<VmExit>,
    vm: Vm,
    /// The devices, for their state (set once they exist; they report to no one).
    bus: std::sync::OnceLock<Arc<PioBus>>,
    migration: Mutex<MigrationStatus>,
    migrating: AtomicBool,
    migration_cancel: AtomicBool,
    migration_sockets: Mutex<Vec<std::net::TcpStream>>,
    /// Set once a migration passed its point of no return: this VMM must never run
    /// the guest again, whatever else happens.
    handed_over: AtomicBool,
}

/// A vCPU's answer to the latest save request it saw.
#[derive(Default)]
struct Saved {
    /// The request (`save_generation`) answered.
    generation: u64,
    /// The state, taken while this pause lasts (cleared when the vCPUs run again).
    state: Option<Result<VcpuState, String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State stays consistent across a panicking holder: every update is one assignment.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmControl {
    pub fn new(
        config: VmConfig,
        started: Instant,
        placement: Vec<CpuSet>,
        numa_nodes: CpuSet,
        events: Sender<VmExit>,
        vm: Vm,
        first_output: Arc<FirstOutput>,
    ) -> Self {
        let vcpus = config.vcpus as usize;
        let shares = config.shares;
        Self {
            config,
            started,
            first_output,
            tids: Mutex::new(vec![0; vcpus]),
            handles: Mutex::new(Vec::with_capacity(vcpus)),
            paused: AtomicBool::new(false),
            save_generation: std::sync::atomic::AtomicU64::new(0),
            saved_on_pause: std::sync::atomic::AtomicU64::new(0),
            saved: Mutex::new((0..vcpus).map(|_| Saved::default()).collect()),
            parked: Mutex::new(0),
            parked_changed: Condvar::new(),
            resumed: Condvar::new(),
            placement: Mutex::new(placement),
            cpus_changed_at: Mutex::new(None),
            numa_nodes,
            shares: AtomicU32::new(shares),
            priority: Mutex::new(None),
            priority_changed_at: Mutex::new(None),
            events,
            vm,
            bus: std::sync::OnceLock::new(),
            migration: Mutex::new(MigrationStatus::default()),
            migrating: AtomicBool::new(false),
            migration_cancel: AtomicBool::new(false),
            migration_sockets: Mutex::new(Vec::new()),
            handed_over: AtomicBool::new(false),
        }
    }

    /// Marks a migration as started; false if one already runs.
    pub fn begin_migration(&self, destination: &str) -> bool {
        if self.migrating.swap(true, Ordering::AcqRel) || self.handed_over.load(Ordering::Acquire) {
            return false;
        }
        self.migration_cancel.store(false, Ordering::Release);
        *lock(&self.migration) =
            MigrationStatus { phase: Phase::Connecting, destination: destination.to_string(), ..Default::default() };
        true
    }

    /// Updates the migration's figures.
    pub fn update_migration(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut lock(&self.migration));
    }

    /// The current (or last) migration's figures.
    pub fn migration_status(&self) -> MigrationStatus {
        lock(&self.migration).clone()
    }

    /// Records the migration's socket, so that a cancel can cut it.
    /// Records a connection of the running migration (cancelling shuts them all down).
    pub fn add_migration_socket(&self, socket: std::net::TcpStream) {
        lock(&self.migration_sockets).push(socket);
    }

    /// Asks the running migration to stop; the VM keeps running here. Refused past
    /// the point of no return.
    pub fn cancel_migration(&self) -> Result<(), Error> {
        if self.handed_over.load(Ordering::Acquire) {
            return Err(Error::HandedOver);
        }
        if !self.migrating.load(Ordering::Acquire) {
            return Err(Error::NoMigration);
        }
        self.migration_cancel.store(true, Ordering::Release);
        for socket in lock(&self.migration_sockets).iter() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        Ok(())
    }

    /// Whether the running migration was cancelled.
    pub fn migration_cancelled(&self) -> bool {
        self.migration_cancel.load(Ordering::Acquire)
    }

    /// The point of no return: from now on `resume` does nothing.
    pub fn commit_migration(&self) {
        self.handed_over.store(true, Ordering::Release);
    }

    /// The migration thread is done (whatever the outcome).
    pub fn finish_migration(&self) {
        lock(&self.migration_sockets).clear();
        self.migrating.store(false, Ordering::Release);
    }

    /// Ends the VM here with this outcome.
    pub fn end(&self, exit: VmExit) {
        let _ = self.events.send(exit);
    }

    /// The channel on which the VM's outcome is reported (for its devices).
    pub fn exits(&self) -> &Sender<VmExit> {
        &self.events
    }

    /// Records the device bus (made after the control: a restored VM's devices
    /// come from its state, and the control is made before the state arrives).
    pub fn set_bus(&self, bus: Arc<PioBus>) {
        let _ = self.bus.set(bus);
    }

    /// The KVM VM and its memory.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The state of the devices the VMM emulates.
    pub fn serial_state(&self) -> crate::state::SerialState {
        self.bus.get().map(|b| b.serial_state()).unwrap_or_default()
    }

    /// The whole state of the paused VM (everything but memory), for a snapshot
    /// or a migration's switch-over.
    pub fn save_state(&self) -> Result<VmState, Error> {
        Ok(VmState {
            version: STATE_VERSION,
            config: self.config.clone(),
            vcpus: self.save_vcpus()?,
            kvm: crate::state::save_vm(&self.vm.fd)?,
            serial: self.serial_state(),
        })
    }

    /// The host CPUs planned for vCPU `index`.
    fn planned_cpus(&self, index: u32) -> Option<CpuSet> {
        lock(&self.placement).get(index as usize).cloned()
    }

    /// Called by each vCPU thread as it starts: pins it (fast: one syscall).
    pub fn vcpu_started(&self, index: u32) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        if let Some(cpus) = self.planned_cpus(index)
            && let Err(e) = affinity::pin_thread(tid, &cpus)
        {
            tracing::warn!("vCPU {index}: {e}");
        }
        if let Some(slot) = lock(&self.tids).get_mut(index as usize) {
            *slot = tid;
        }
    }

    /// Records a vCPU thread (for kicking it).
    pub fn register(&self, handle: JoinHandle<()>) {
        lock(&self.handles).push(handle);
    }

    /// Called by a vCPU thread before each KVM_RUN: parks it while the VM is paused.
    /// While parked, a vCPU thread answers requests to save its state (`save_vcpus`,
    /// `pause_and_save`): only the thread that runs a vCPU may touch its fd.
    pub fn pause_point(&self, index: u32, save: &dyn Fn() -> Result<VcpuState, Error>) {
        if !self.paused.load(Ordering::Acquire) {
            return;
        }
        let mut parked = lock(&self.parked);
        *parked += 1;
        self.parked_changed.notify_all();
        while self.paused.load(Ordering::Acquire) {
            let wanted = self.save_generation.load(Ordering::Acquire);
            let answered = lock(&self.saved).get(index as usize).map_or(u64::MAX, |s| s.generation);
            if wanted > answered {
                // Save without holding the lock: every vCPU saves at once.
                drop(parked);
                let state = save().map_err(|e| e.to_string());
                {
                    let mut saved = lock(&self.saved);
                    // `resume` clears states under this lock: a state is kept only
                    // while the pause it was taken in lasts.
                    if let Some(slot) = saved.get_mut(index as usize) {
                        slot.generation = wanted;
                        slot.state = self.paused.load(Ordering::Acquire).then_some(state);
                    }
                }
                parked = lock(&self.parked);
                self.parked_changed.notify_all();
                continue;
            }
            parked = self.resumed.wait(parked).unwrap_or_else(|p| p.into_inner());
        }
        *parked -= 1;
    }

    /// The state of every vCPU; the VM must be paused. States the vCPUs saved as
    /// they parked (`pause_and_save`) are used as they are.
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, Error> {
        if !self.paused.load(Ordering::Acquire) {
            return Err(Error::State("the VM must be paused to save vCPU state".into()));
        }
        let mut parked = lock(&self.parked);
        let ready = |generation: u64| lock(&self.saved).iter().all(|s| s.generation >= generation && s.state.is_some());
        let on_pause = self.saved_on_pause.swap(0, Ordering::AcqRel);
        let generation = if on_pause != 0 && on_pause == self.save_generation.load(Ordering::Acquire) {
            // Asked for as this pause began: taken, or being taken.
            on_pause
        } else {
            self.resumed.notify_all();
            self.save_generation.fetch_add(1, Ordering::AcqRel) + 1
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready(generation) {
            if Instant::now() > deadline {
                return Err(Error::State("vCPUs did not save their state within 10 s".into()));
            }
            parked = self
                .parked_changed
                .wait_timeout(parked, Duration::from_millis(5))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        drop(parked);
        lock(&self.saved)
            .iter_mut()
            .enumerate()
            .map(|(i, s)| match s.state.take() {
                Some(Ok(state)) => Ok(state),
                Some(Err(e)) => Err(Error::State(format!("vCPU {i}: {e}"))),
                None => Err(Error::State(format!("vCPU {i}: no state"))),
            })
            .collect()
    }

    /// `pause`, with each vCPU saving its state as it parks, in the same wake-up:
    /// `save_vcpus` then finds the states ready. A switch-over saves a round of
    /// vCPU wake-ups from the guest's pause (on a busy host, each is up to a
    /// scheduler tick).
    pub fn pause_and_save(&self) -> Result<(), Error> {
        {
            let _parked = lock(&self.parked);
            let generation = self.save_generation.fetch_add(1, Ordering::AcqRel) + 1;
            self.saved_on_pause.store(generation, Ordering::Release);
            // Threads parked already (a throttle's pause) answer too.
            self.resumed.notify_all();
        }
        self.pause()
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// The configuration the VM runs with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Stops every vCPU (they park outside KVM_RUN) and returns once all have.
    pub fn pause(&self) -> Result<(), Error> {
        self.paused.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut parked = lock(&self.parked);
        while *parked < self.config.vcpus {
            if Instant::now() > deadline {
                return Err(Error::PauseTimedOut {
                    parked: *parked,
                    vcpus: self.config.vcpus,
                    waited: Duration::from_secs(5),
                });
            }
            drop(parked);
            // Kick again every 2 ms until every thread has parked (a thread may be
            // slow to get a CPU).
            self.kick_all();
            parked = lock(&self.parked);
            // The threads may have parked while we kicked: waiting now would miss
            // their notification and sleep the whole 2 ms.
            if *parked < self.config.vcpus {
                parked = self
                    .parked_changed
                    .wait_timeout(parked, Duration::from_millis(2))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        Ok(())
    }

    /// Holds vCPU threads that have yet to start at their first pause point: a
    /// restored VM's threads start held, and run on `resume`.
    pub fn hold(&self) {
        self.paused.store(true, Ordering::Release);
    }

    /// Lets paused vCPUs run again, unless the VM was handed over to a migration
    /// target (then it must never run here again).
    pub fn resume(&self) {
        if self.handed_over.load(Ordering::Acquire) {
            tracing::warn!("not resuming: the VM was handed over to the migration target");
            return;
        }
        let _parked = lock(&self.parked);
        {
            // States saved during this pause are stale once the vCPUs run.
            let mut saved = lock(&self.saved);
            saved.iter_mut().for_each(|s| s.state = None);
            self.saved_on_pause.store(0, Ordering::Release);
            self.paused.store(false, Ordering::Release);
        }
        self.resumed.notify_all();
    }

    fn kick_all(&self) {
        for handle in lock(&self.handles).iter() {
            let _ = handle.kill(kick_signal());
        }
    }

    /// Powers the VM off (the control API's shutdown).
    pub fn power_off(&self) {
        let _ = self.events.send(VmExit::PoweredOff);
    }

    fn tids(&self) -> Vec<i32> {
        lock(&self.tids).iter().copied().filter(|t| *t != 0).collect()
    }

    /// Moves the running vCPUs to `host_cpus` (Dedicated: one CPU each, re-chosen).
    pub fn set_host_cpus(&self, host_cpus: &str) -> Result<(), Error> {
        let mut config = self.config.clone();
        config.cpus.host_cpus = Some(host_cpus.to_string());
        config.validate()?;
        let plan = affinity::plan(&config)?;
        for (tid, cpus) in lock(&self.tids).iter().zip(&plan) {
            if *tid != 0 {
                affinity::pin_thread(*tid, cpus)?;
            }
        }
        *lock(&self.placement) = plan;
        *lock(&self.cpus_changed_at) = Some(SystemTime::now());
        tracing::info!(host_cpus, "vCPUs moved");
        Ok(())
    }

    /// Sets the VM's CPU shares while it runs.
    pub fn set_shares(&self, shares: u32) -> Result<(), Error> {
        if !(1..=10_000).contains(&shares) {
            return Err(Error::Config(format!("shares: {shares} is out of range 1-10000")));
        }
        self.apply_shares(shares)?;
        self.shares.store(shares, Ordering::Relaxed);
        *lock(&self.priority_changed_at) = Some(SystemTime::now());
        tracing::info!(shares, "vCPU priority changed");
        Ok(())
    }

    /// Puts every vCPU thread under `shares`, making the VM's group on first use.
    fn apply_shares(&self, shares: u32) -> Result<(), Error> {
        let tids = self.tids();
        let mut priority = lock(&self.priority);
        let priority = match &mut *priority {
            Some(p) => p,
            none => {
                let p = Priority::create(&self.config.name);
                for tid in &tids {
                    p.add_thread(*tid, shares)?;
                }
                none.insert(p)
            }
        };
        priority.set_shares(shares, &tids)
    }

    /// Applies the configured priority once every vCPU thread has started, off the
    /// guest's start-up path. Normal priority (1000 shares) needs nothing.
    pub fn apply_priority_in_background(self: std::sync::Arc<Self>) {
        let shares = self.shares.load(Ordering::Relaxed);
        if shares == 1000 {
            return;
        }
        let spawned = std::thread::Builder::new().name("priority".into()).spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.tids().len() < self.config.vcpus as usize && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Err(e) = self.apply_shares(shares) {
                tracing::warn!("vCPU priority: {e}");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("vCPU priority: cannot start a thread: {e}");
        }
    }

    /// Cleans up what outlives the process (the VM's cgroup).
    pub fn cleanup(&self) {
        // Dropping the priority removes the group (see `Priority`'s Drop).
        drop(lock(&self.priority).take());
    }

    /// A snapshot for the control API.
    pub fn status(&self) -> VmStatus {
        let topo = affinity::host_topology().ok();
        let vcpus = lock(&self.tids)
            .iter()
            .enumerate()
            .map(|(index, &tid)| {
                let (last_cpu, cpu_time_ms) = thread_stat(tid).unwrap_or((None, 0));
                VcpuStatus {
                    index: index as u32,
                    tid,
                    host_cpus: affinity::thread_affinity(tid).map(|s| s.to_string()).unwrap_or_default(),
                    last_host_cpu: last_cpu,
                    numa_node: last_cpu.and_then(|c| topo.as_ref()?.cpu(c).map(|c| c.node)),
                    cpu_time_ms,
                }
            })
            .collect();
        let millis = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_millis() as u64)
        };
        VmStatus {
            name: self.config.name.clone(),
            state: if self.paused.load(Ordering::Acquire) { "paused" } else { "running" }.into(),
            memory_mib: self.config.memory_mib,
            numa_policy: format!("{:?}", self.config.numa.policy),
            numa_nodes: self.numa_nodes.to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            boot_time_ms: self.first_output.at().map(|t| t.duration_since(self.started).as_millis() as u64),
            shares: self.shares.load(Ordering::Relaxed),
            priority_mechanism: lock(&self.priority)
                .as_ref()
                .map(Priority::describe)
                .unwrap_or_else(|| "none (Normal priority)".into()),
            cpus_changed_at_ms: millis(*lock(&self.cpus_changed_at)),
            priority_changed_at_ms: millis(*lock(&self.priority_changed_at)),
            vcpus,
        }
    }
}

/// `(last host CPU, user + system CPU time in ms)` of a thread, from /proc.
fn thread_stat(tid: i32) -> Option<(Option<u32>, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Fields after the parenthesised command name; it may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // In `rest`, field 3 of stat is index 0: utime is stat field 14, stime 15, processor 39.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((fields.get(36).and_then(|c| c.parse().ok()), ticks * 1000 / hz))
}
