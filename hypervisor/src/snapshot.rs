//! Snapshots: a paused VM's state and memory written to a directory
//! (`state.bin`, `memory.bin`), and a VM started again from them.

use crate::memory::GuestRam;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

use crate::Error;
use crate::control::VmControl;
use crate::state::VmState;

const STATE_FILE: &str = "state.bin";
const MEMORY_FILE: &str = "memory.bin";

pub use drover_vmm_api::api::SnapshotInfo;

/// Pauses the VM (if it runs), writes its snapshot to `dir`, resumes it if it ran.
pub fn save(control: &VmControl, dir: &Path) -> Result<SnapshotInfo, Error> {
    let was_running = !control.is_paused();
    let paused_at = Instant::now();
    if was_running {
        control.pause()?;
    }
    let result = write(control, dir);
    if was_running {
        control.resume();
    }
    result.map(|(state_bytes, memory_bytes)| SnapshotInfo {
        state_bytes,
        memory_bytes,
        paused_ms: paused_at.elapsed().as_millis() as u64,
    })
}

fn write(control: &VmControl, dir: &Path) -> Result<(u64, u64), Error> {
    let io = |what: &str, e: std::io::Error| Error::io(format!("snapshot {}: {what}", dir.display()), e);
    std::fs::create_dir_all(dir).map_err(|e| io("creating the directory", e))?;
    let state = control.save_state()?.encode()?;
    std::fs::write(dir.join(STATE_FILE), &state).map_err(|e| io(STATE_FILE, e))?;
    let memory = &control.vm().memory;
    // Large volatile copies straight into the file: no user-space buffer needed.
    let mut out = File::create(dir.join(MEMORY_FILE)).map_err(|e| io(MEMORY_FILE, e))?;
    let mut total = 0;
    for region in memory.iter() {
        memory
            .write_all_volatile_to(region.start_addr(), &mut out, region.len() as usize)
            .map_err(|e| Error::Memory(format!("writing guest memory to the snapshot: {e}")))?;
        total += region.len();
    }
    out.flush().map_err(|e| io(MEMORY_FILE, e))?;
    Ok((state.len() as u64, total))
}

/// A snapshot on disk, to start a VM from.
pub struct Snapshot {
    config: crate::config::VmConfig,
    state: Option<VmState>,
    memory: File,
    path: std::path::PathBuf,
}

/// Opens a snapshot, checking its state and the size of its memory file.
pub fn load(dir: &Path) -> Result<Snapshot, Error> {
    let bytes = std::fs::read(dir.join(STATE_FILE))
        .map_err(|e| Error::io(format!("snapshot {}: {STATE_FILE}", dir.display()), e))?;
    let state = VmState::decode(&bytes)?;
    let path = dir.join(MEMORY_FILE);
    let expected = state.config.memory_mib << 20;
    let memory = File::open(&path).map_err(|e| Error::io(format!("snapshot {}", path.display()), e))?;
    let size = memory.metadata().map(|m| m.len()).unwrap_or(0);
    if size != expected {
        return Err(Error::State(format!(
            "{} holds {size} bytes, the VM has {expected} bytes of memory",
            path.display()
        )));
    }
    Ok(Snapshot { config: state.config.clone(), state: Some(state), memory, path })
}

impl Snapshot {
    /// The configuration the VM was saved with.
    pub fn config(&self) -> &crate::config::VmConfig {
        &self.config
    }
}

impl crate::restore::RestoreSource for Snapshot {
    fn load(&mut self, memory: &GuestRam) -> Result<VmState, Error> {
        for region in memory.iter() {
            memory
                .read_exact_volatile_from(region.start_addr(), &mut self.memory, region.len() as usize)
                .map_err(|e| Error::Memory(format!("reading guest memory from {}: {e}", self.path.display())))?;
        }
        self.state.take().ok_or_else(|| Error::State("snapshot already used".into()))
    }
}
