//! The vCPU threads as the host sees them: their thread ids (for pinning,
//! priority and status) and their handles (for kicking them out of KVM_RUN).

use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::signal::Killable;

use super::kick::kick_signal;

/// The host threads of a VM's vCPUs.
pub struct VcpuThreads {
    /// Host thread id of each vCPU (0 until its thread starts).
    tids: Mutex<Vec<i32>>,
    /// vCPU threads, for kicking them out of KVM_RUN.
    handles: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State stays consistent across a panicking holder: every update is one assignment.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VcpuThreads {
    pub fn new(vcpus: u32) -> Self {
        Self { tids: Mutex::new(vec![0; vcpus as usize]), handles: Mutex::new(Vec::with_capacity(vcpus as usize)) }
    }

    /// Records the host thread id of vCPU `index`.
    pub fn started(&self, index: u32, tid: i32) {
        if let Some(slot) = lock(&self.tids).get_mut(index as usize) {
            *slot = tid;
        }
    }

    /// Records a vCPU thread (for kicking it).
    pub fn register(&self, handle: JoinHandle<()>) {
        lock(&self.handles).push(handle);
    }

    /// The thread id of each vCPU, by index (0 for one not started yet).
    pub fn by_index(&self) -> Vec<i32> {
        lock(&self.tids).clone()
    }

    /// The thread ids of the vCPUs that have started.
    pub fn started_tids(&self) -> Vec<i32> {
        lock(&self.tids).iter().copied().filter(|t| *t != 0).collect()
    }

    /// Kicks every vCPU thread out of KVM_RUN.
    pub fn kick_all(&self) {
        for handle in lock(&self.handles).iter() {
            let _ = handle.kill(kick_signal());
        }
    }
}
