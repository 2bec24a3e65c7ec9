//! The running VM as the control API and a migration see it. [`VmControl`]
//! puts together its concerns, each in a module of its own:
//!
//! - `park`: the vCPU park/save protocol (pause, save, hold, resume), which knows
//!   nothing of KVM; `kick`: getting a vCPU thread out of KVM_RUN for it
//! - `threads`: the vCPU threads as the host sees them (thread ids, handles)
//! - `tuning`: live host-CPU and priority changes
//! - `migration`: the outgoing migration's bookkeeping and point of no return
//!
//! and the VM's exit events: the channel its vCPUs, devices, API and migrations
//! report its outcome on.

mod kick;
pub mod migration;
pub mod park;
mod threads;
mod tuning;

use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use drover_topology::CpuSet;
use drover_vmm_api::api::{MigrationPhase as Phase, MigrationStatus, VcpuStatus, VmStatus};

use crate::config::VmConfig;
use crate::devices::virtio::bus::MmioBus;
use crate::devices::{PioBus, serial::FirstOutput};
use crate::exit::VmExit;
use crate::state::{STATE_VERSION, VcpuState, VmState};
use crate::vstate::vm::Vm;
use crate::{Error, affinity};

pub use kick::{install_kick_handler, set_immediate_exit};
use migration::MigrationBook;
use park::Park;
use threads::VcpuThreads;
use tuning::Tuning;

/// Shared by the vCPU threads, the API thread, a migration and the main thread.
pub struct VmControl {
    config: VmConfig,
    started: Instant,
    vm: Vm,
    /// The devices, for their state (set once they exist; they report to no one).
    bus: OnceLock<Arc<PioBus>>,
    /// The virtio devices (set with the port devices). They pause after the
    /// vCPUs and resume before them.
    virtio: OnceLock<Arc<MmioBus>>,
    first_output: Arc<FirstOutput>,
    numa_nodes: CpuSet,
    threads: VcpuThreads,
    park: Park<VcpuState>,
    tuning: Tuning,
    migration: MigrationBook,
    /// Where the VM's outcome is reported (the VMM's exit channel).
    exits: Sender<VmExit>,
}

impl VmControl {
    pub fn new(
        config: VmConfig,
        started: Instant,
        placement: Vec<CpuSet>,
        numa_nodes: CpuSet,
        exits: Sender<VmExit>,
        vm: Vm,
        first_output: Arc<FirstOutput>,
    ) -> Self {
        Self {
            threads: VcpuThreads::new(config.vcpus),
            park: Park::new(config.vcpus),
            tuning: Tuning::new(placement, config.shares),
            migration: MigrationBook::default(),
            config,
            started,
            vm,
            bus: OnceLock::new(),
            virtio: OnceLock::new(),
            first_output,
            numa_nodes,
            exits,
        }
    }

    /// The configuration the VM runs with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The KVM VM and its memory.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The outgoing migration's bookkeeping.
    pub fn migration(&self) -> &MigrationBook {
        &self.migration
    }

    /// The current (or last) migration's figures.
    pub fn migration_status(&self) -> MigrationStatus {
        self.migration.status()
    }

    /// Asks the running migration to stop; the VM keeps running here.
    pub fn cancel_migration(&self) -> Result<(), Error> {
        self.migration.cancel()
    }

    // --- exit events ---

    /// Ends the VM here with this outcome.
    pub fn end(&self, exit: VmExit) {
        let _ = self.exits.send(exit);
    }

    /// Powers the VM off (the control API's shutdown).
    pub fn power_off(&self) {
        self.end(VmExit::PoweredOff);
    }

    /// Asks the guest to shut down: Ctrl+Alt+Del on its keyboard. Refused while a
    /// migration is under way or has handed the VM over: the keyboard is not part
    /// of the state that travels, and the keys would be lost (or typed into a VM
    /// that no longer runs here).
    pub fn ctrl_alt_del(&self) -> Result<(), Error> {
        if self.migration.handed_over() {
            return Err(Error::HandedOver);
        }
        if matches!(self.migration.status().phase, Phase::Connecting | Phase::PreCopy | Phase::Switchover) {
            return Err(Error::MigrationUnderWay);
        }
        match self.bus.get() {
            Some(bus) => bus.ctrl_alt_del(),
            None => Err(Error::Internal("the VM's devices do not exist yet".into())),
        }
    }

    /// The channel on which the VM's outcome is reported (for its devices).
    pub fn exits(&self) -> &Sender<VmExit> {
        &self.exits
    }

    // --- devices and state ---

    /// Records the device bus (made after the control: a restored VM's devices
    /// come from its state, and the control is made before the state arrives).
    pub fn set_bus(&self, bus: Arc<PioBus>, virtio: Arc<MmioBus>) {
        let _ = self.bus.set(bus);
        let _ = self.virtio.set(virtio);
    }

    /// The virtio devices (none until `set_bus`).
    pub fn virtio(&self) -> Option<&Arc<MmioBus>> {
        self.virtio.get()
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
            virtio: self.virtio.get().map(|v| v.state()).unwrap_or_default(),
        })
    }

    // --- vCPU threads and the park/save protocol ---

    /// Called by each vCPU thread as it starts: pins it (fast: one syscall).
    pub fn vcpu_started(&self, index: u32) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.tuning.pin_new(index, tid);
        self.threads.started(index, tid);
    }

    /// Records a vCPU thread (for kicking it).
    pub fn register(&self, handle: JoinHandle<()>) {
        self.threads.register(handle);
    }

    /// Called by a vCPU thread before each KVM_RUN: parks it while the VM is
    /// paused, and while parked it answers requests to save its state with `save`
    /// (only the thread that runs a vCPU may touch its fd). See [`Park`].
    #[inline]
    pub fn pause_point(&self, index: u32, save: impl Fn() -> Result<VcpuState, Error>) {
        self.park.pause_point(index, save);
    }

    /// The state of every vCPU; the VM must be paused.
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, Error> {
        self.park.save_all()
    }

    /// Stops every vCPU (they park outside KVM_RUN) and returns once all have.
    pub fn pause(&self) -> Result<(), Error> {
        self.park.pause(|| self.threads.kick_all())?;
        self.pause_devices();
        Ok(())
    }

    /// Once no vCPU runs, no driver makes new requests: finish the ones under way
    /// and start none until `resume` (see `devices::virtio::device`).
    fn pause_devices(&self) {
        if let Some(virtio) = self.virtio.get() {
            virtio.pause();
        }
    }

    /// `pause`, each vCPU saving its state as it parks: `save_vcpus` then finds
    /// the states ready (a switch-over saves a round of vCPU wake-ups).
    pub fn pause_and_save(&self) -> Result<(), Error> {
        self.park.pause_and_save(|| self.threads.kick_all())?;
        self.pause_devices();
        Ok(())
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.park.is_paused()
    }

    /// Holds vCPU threads that have yet to start at their first pause point: a
    /// restored VM's threads start held, and run on `resume`.
    pub fn hold(&self) {
        self.park.hold();
        // Restored devices serve nothing either (a tap's frames wait) until `resume`.
        self.pause_devices();
    }

    /// Lets paused vCPUs run again, unless the VM was handed over to a migration
    /// target (then it must never run here again).
    pub fn resume(&self) {
        if self.migration.handed_over() {
            tracing::warn!("not resuming: the VM was handed over to the migration target");
            return;
        }
        // Devices first: requests the driver made while paused are served as the
        // vCPUs come back.
        if let Some(virtio) = self.virtio.get() {
            virtio.resume();
        }
        self.park.resume();
    }

    // --- live tuning ---

    /// Moves the running vCPUs to `host_cpus` (Dedicated: one CPU each, re-chosen).
    pub fn set_host_cpus(&self, host_cpus: &str) -> Result<(), Error> {
        self.tuning.set_host_cpus(&self.config, &self.threads.by_index(), host_cpus)
    }

    /// Sets the VM's CPU shares while it runs.
    pub fn set_shares(&self, shares: u32) -> Result<(), Error> {
        self.tuning.set_shares(&self.config.name, &self.threads.started_tids(), shares)
    }

    /// Applies the configured priority once every vCPU thread has started, off the
    /// guest's start-up path. Normal priority (1000 shares) needs nothing.
    pub fn apply_priority_in_background(self: Arc<Self>) {
        let shares = self.tuning.shares();
        if shares == 1000 {
            return;
        }
        let spawned = std::thread::Builder::new().name("priority".into()).spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.threads.started_tids().len() < self.config.vcpus as usize && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Err(e) = self.tuning.apply_shares(&self.config.name, &self.threads.started_tids(), shares) {
                tracing::warn!("vCPU priority: {e}");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("vCPU priority: cannot start a thread: {e}");
        }
    }

    /// Cleans up what outlives the process (the VM's cgroup).
    pub fn cleanup(&self) {
        self.tuning.cleanup();
    }

    /// A snapshot for the control API.
    pub fn status(&self) -> VmStatus {
        let topo = affinity::host_topology().ok();
        let vcpus = (0..)
            .zip(self.threads.by_index())
            .map(|(index, tid)| {
                let (last_cpu, cpu_time_ms) = thread_stat(tid).unwrap_or((None, 0));
                VcpuStatus {
                    index,
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
        let tuning = self.tuning.status();
        VmStatus {
            name: self.config.name.clone(),
            state: if self.is_paused() { "paused" } else { "running" }.into(),
            memory_mib: self.config.memory_mib,
            numa_policy: format!("{:?}", self.config.numa.policy),
            numa_nodes: self.numa_nodes.to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            boot_time_ms: self.first_output.at().map(|t| t.duration_since(self.started).as_millis() as u64),
            shares: tuning.shares,
            priority_mechanism: tuning.priority_mechanism,
            cpus_changed_at_ms: millis(tuning.cpus_changed_at),
            priority_changed_at_ms: millis(tuning.priority_changed_at),
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
