//! Live CPU and priority tuning: where the vCPU threads may run (pinning, moved
//! while the guest runs) and their CPU shares (a cgroup or nice values, changed
//! while it runs), with when each last changed.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use drover_topology::CpuSet;

use crate::config::VmConfig;
use crate::priority::Priority;
use crate::{Error, affinity};

/// The host CPUs and priority of a VM's vCPU threads.
pub struct Tuning {
    /// The host CPUs planned for each vCPU.
    placement: Mutex<Vec<CpuSet>>,
    cpus_changed_at: Mutex<Option<SystemTime>>,
    shares: AtomicU32,
    /// Made when first needed: moving a thread into a cgroup waits for an RCU grace
    /// period (~25 ms here), which must not delay the guest's start.
    priority: Mutex<Option<Priority>>,
    priority_changed_at: Mutex<Option<SystemTime>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State stays consistent across a panicking holder: every update is one assignment.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The tuning as the control API reports it.
pub struct TuningStatus {
    pub shares: u32,
    pub priority_mechanism: String,
    pub cpus_changed_at: Option<SystemTime>,
    pub priority_changed_at: Option<SystemTime>,
}

impl Tuning {
    /// Tuning with the planned host CPUs of each vCPU and the configured shares.
    pub fn new(placement: Vec<CpuSet>, shares: u32) -> Self {
        Self {
            placement: Mutex::new(placement),
            cpus_changed_at: Mutex::new(None),
            shares: AtomicU32::new(shares),
            priority: Mutex::new(None),
            priority_changed_at: Mutex::new(None),
        }
    }

    /// Pins the thread `tid` of vCPU `index`, just started, to its planned CPUs
    /// (fast: one syscall). A failure is logged: the vCPU runs unpinned.
    pub fn pin_new(&self, index: u32, tid: i32) {
        let planned = lock(&self.placement).get(index as usize).cloned();
        if let Some(cpus) = planned
            && let Err(e) = affinity::pin_thread(tid, &cpus)
        {
            tracing::warn!("vCPU {index}: {e}");
        }
    }

    /// Moves the vCPU threads `tids` (by vCPU index; 0: not started) of the VM
    /// `config` describes to `host_cpus` (Dedicated: one CPU each, re-chosen).
    pub fn set_host_cpus(&self, config: &VmConfig, tids: &[i32], host_cpus: &str) -> Result<(), Error> {
        let mut config = config.clone();
        config.cpus.host_cpus = Some(host_cpus.to_string());
        config.validate()?;
        let plan = affinity::plan(&config)?;
        for (tid, cpus) in tids.iter().zip(&plan) {
            if *tid != 0 {
                affinity::pin_thread(*tid, cpus)?;
            }
        }
        *lock(&self.placement) = plan;
        *lock(&self.cpus_changed_at) = Some(SystemTime::now());
        tracing::info!(host_cpus, "vCPUs moved");
        Ok(())
    }

    /// The shares the vCPUs run with (or are about to).
    pub fn shares(&self) -> u32 {
        self.shares.load(Ordering::Relaxed)
    }

    /// Sets the CPU shares of the VM `name`'s vCPU threads `tids` while it runs.
    pub fn set_shares(&self, name: &str, tids: &[i32], shares: u32) -> Result<(), Error> {
        if !(1..=10_000).contains(&shares) {
            return Err(Error::Config(format!("shares: {shares} is out of range 1-10000")));
        }
        self.apply_shares(name, tids, shares)?;
        self.shares.store(shares, Ordering::Relaxed);
        *lock(&self.priority_changed_at) = Some(SystemTime::now());
        tracing::info!(shares, "vCPU priority changed");
        Ok(())
    }

    /// Puts every vCPU thread under `shares`, making the VM's group on first use.
    pub fn apply_shares(&self, name: &str, tids: &[i32], shares: u32) -> Result<(), Error> {
        let mut priority = lock(&self.priority);
        let priority = match &mut *priority {
            Some(p) => p,
            none => {
                let p = Priority::create(name);
                for tid in tids {
                    p.add_thread(*tid, shares)?;
                }
                none.insert(p)
            }
        };
        priority.set_shares(shares, tids)
    }

    /// Removes what outlives the process (the VM's cgroup).
    pub fn cleanup(&self) {
        // Dropping the priority removes the group (see `Priority`'s Drop).
        drop(lock(&self.priority).take());
    }

    pub fn status(&self) -> TuningStatus {
        TuningStatus {
            shares: self.shares(),
            priority_mechanism: lock(&self.priority)
                .as_ref()
                .map(Priority::describe)
                .unwrap_or_else(|| "none (Normal priority)".into()),
            cpus_changed_at: *lock(&self.cpus_changed_at),
            priority_changed_at: *lock(&self.priority_changed_at),
        }
    }
}
