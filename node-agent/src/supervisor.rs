//! The VMM processes of this host. Each VMM runs under a `drover-monitor` in a
//! session of its own, so neither dies with the agent; everything needed to find
//! them again is in their runtime directories (`vm_dir`), so an agent that restarts
//! re-adopts every VM without restarting any.

use std::collections::HashMap;
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_vmm_api::VmConfig;

use crate::Error;
use crate::fence;
use crate::files::write_atomic;
use crate::process;
use crate::settings::Settings;
use crate::vm_dir::{ExitRecord, Role, StopReason, VmDir, VmMeta, unix_ms};

/// What a VMM is doing, as seen from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmState {
    /// Its monitor is alive and no exit is recorded.
    Running,
    /// The VMM ended; its monitor recorded how.
    Ended(ExitRecord),
    /// The monitor is gone without recording an end (killed from outside).
    Lost,
}

/// One VM with a runtime directory on this host.
#[derive(Clone, Debug)]
pub struct LocalVm {
    pub dir: VmDir,
    pub meta: VmMeta,
}

#[derive(Default)]
struct CpuSample {
    ticks: u64,
    at: Option<Instant>,
    cores: Option<f64>,
}

/// The VMs of this host.
pub struct Supervisor {
    settings: Arc<Settings>,
    vms: Mutex<HashMap<String, LocalVm>>,
    cpu: Mutex<HashMap<String, CpuSample>>,
}

impl Supervisor {
    pub fn new(settings: Arc<Settings>) -> Self {
        Self { settings, vms: Mutex::default(), cpu: Mutex::default() }
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<String, LocalVm>> {
        // A panic while holding the lock leaves a map that is still consistent
        // (every operation is a single insert or remove).
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finds every VM directory left by an earlier agent and takes it over. Returns
    /// what it found, for the log.
    pub fn adopt_all(&self) -> Vec<(VmMeta, VmmState)> {
        let root = self.settings.runtime_dir.join("vms");
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let dir = VmDir { path: entry.path() };
            match dir.read_meta() {
                Ok(meta) => {
                    let uid = meta.uid.clone();
                    self.vms().insert(uid.clone(), LocalVm { dir, meta: meta.clone() });
                    found.push((meta, self.state(&uid).unwrap_or(VmmState::Lost)));
                }
                Err(e) => tracing::warn!(dir = %entry.path().display(), "not a VM directory, left alone: {e}"),
            }
        }
        found
    }

    /// The local VM with this uid, if any.
    pub fn get(&self, uid: &str) -> Option<LocalVm> {
        self.vms().get(uid).cloned()
    }

    /// Every local VM.
    pub fn all(&self) -> Vec<LocalVm> {
        self.vms().values().cloned().collect()
    }

    /// Starts a VMM under its monitor. `vmm_args` follow the `drover-vmm` program
    /// name (`run --config ...` or `receive ...`). Refused unless the host holds its
    /// heartbeat deadline: a fenced host starts nothing.
    pub fn start(
        &self,
        meta: VmMeta,
        config: &VmConfig,
        vmm_args: Vec<String>,
        secret: Option<&[u8]>,
    ) -> Result<LocalVm, Error> {
        let fence_file = fence::deadline_file(&self.settings.runtime_dir);
        if !fence::within_deadline(&fence_file) {
            return Err(Error::NotLeased);
        }
        let dir = VmDir::new(&self.settings.runtime_dir, &meta.uid);
        // A directory left by an earlier, ended VMM of this VM is replaced.
        let _ = std::fs::remove_dir_all(&dir.path);
        std::fs::create_dir_all(&dir.path).map_err(|e| Error::io(dir.path.display(), e))?;
        write_atomic(&dir.config(), &serde_json::to_vec_pretty(config).map_err(|e| Error::Io(e.to_string()))?)?;
        if let Some(secret) = secret {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(dir.secret())
                .map_err(|e| Error::io(dir.secret().display(), e))?;
            std::io::Write::write_all(&mut file, secret).map_err(|e| Error::io(dir.secret().display(), e))?;
        }
        write_atomic(&dir.meta(), &serde_json::to_vec_pretty(&meta).map_err(|e| Error::Io(e.to_string()))?)?;
        let monitor_log =
            std::fs::File::create(dir.path.join("monitor.log")).map_err(|e| Error::io("monitor.log", e))?;

        let mut command = std::process::Command::new(&self.settings.monitor);
        command
            .arg("--dir")
            .arg(&dir.path)
            .arg("--fence-file")
            .arg(&fence_file)
            .arg("--serial-log")
            .arg(self.settings.serial_log(&meta.namespace, &meta.name))
            .arg("--serial-max-bytes")
            .arg(self.settings.serial_log_bytes.to_string())
            .arg("--")
            .arg(&self.settings.vmm)
            .args(&vmm_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(monitor_log);
        // SAFETY: setsid() is async-signal-safe and only changes the child's own
        // session; a new session keeps the monitor and its VMM alive when the
        // agent's process group is killed.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child =
            command.spawn().map_err(|e| Error::io(format!("starting {}", self.settings.monitor.display()), e))?;
        write_atomic(&dir.monitor_pid(), child.id().to_string().as_bytes())?;
        // The monitor is reaped by a thread of its own: it is our child while we
        // live, and must not linger as a zombie (which would look alive).
        std::thread::Builder::new()
            .name("reap-monitor".into())
            .spawn(move || {
                let mut child = child;
                let _ = child.wait();
            })
            .map_err(|e| Error::io("reaper thread", e))?;
        let vm = LocalVm { dir, meta };
        self.vms().insert(vm.meta.uid.clone(), vm.clone());
        Ok(vm)
    }

    /// The state of a local VM's VMM.
    pub fn state(&self, uid: &str) -> Option<VmmState> {
        let vm = self.get(uid)?;
        if let Some(record) = vm.dir.read_exit() {
            return Some(VmmState::Ended(record));
        }
        let alive = VmDir::read_pid(&vm.dir.monitor_pid()).is_some_and(|pid| process::runs(pid, "drover-monitor"));
        if alive {
            return Some(VmmState::Running);
        }
        // The monitor may have written exit.json between the two checks.
        Some(vm.dir.read_exit().map(VmmState::Ended).unwrap_or(VmmState::Lost))
    }

    /// Powers a VM off now (SIGKILL to the VMM), recording why. The monitor records
    /// the exit.
    pub fn kill(&self, uid: &str, reason: StopReason) {
        let Some(vm) = self.get(uid) else { return };
        vm.dir.set_stop_reason(reason);
        let Some(pid) = VmDir::read_pid(&vm.dir.vmm_pid()) else { return };
        // The VMM is the monitor's child, not ours: its pid may have ended and been
        // reused since the monitor wrote it. `kill_if_runs` signals through a pidfd
        // opened before it checks the program, so only a checked drover-vmm dies.
        if let Err(e) = process::kill_if_runs(pid, "drover-vmm") {
            tracing::warn!(vm = %vm.meta.name, pid, "cannot power the VMM off: {e}");
        }
    }

    /// Powers off every VM of this host (the isolation response).
    pub fn kill_all(&self, reason: StopReason) -> usize {
        let uids: Vec<String> = self.vms().keys().cloned().collect();
        let mut killed = 0;
        for uid in uids {
            if self.state(&uid) == Some(VmmState::Running) {
                self.kill(&uid, reason);
                killed += 1;
            }
        }
        killed
    }

    /// Asks a VM's guest to shut down (Ctrl+Alt+Del through its VMM's control API,
    /// `PUT /vm/ctrl-alt-del`). Records `reason` now, so that an end that follows
    /// at once is reported with it, and returns the request itself, blocking (one
    /// request on the VMM's socket, at most `timeout`), for the caller to run off
    /// its async threads; the request withdraws the reason if the VMM did not take
    /// it. `None` when there is no such VM.
    pub fn ask_to_shut_down(
        &self,
        uid: &str,
        reason: StopReason,
        timeout: Duration,
    ) -> Option<impl FnOnce() -> Result<(), Error> + Send + 'static> {
        let vm = self.get(uid)?;
        vm.dir.set_stop_reason(reason);
        Some(move || {
            let asked = drover_vmm_api::Client::new(vm.dir.api_socket()).with_timeout(timeout).ctrl_alt_del();
            if asked.is_err() {
                vm.dir.withdraw_stop_reason(reason);
            }
            asked.map_err(Error::from)
        })
    }

    /// Withdraws a stop reason recorded for a VM (see `VmDir::withdraw_stop_reason`).
    pub fn withdraw_stop_reason(&self, uid: &str, reason: StopReason) {
        if let Some(vm) = self.get(uid) {
            vm.dir.withdraw_stop_reason(reason);
        }
    }

    /// Changes what a local VMM does for its VM (a received VM becomes the VM's own).
    pub fn set_role(&self, uid: &str, role: Role) -> Result<(), Error> {
        let mut vms = self.vms();
        let Some(vm) = vms.get_mut(uid) else { return Ok(()) };
        vm.meta.role = role;
        write_atomic(&vm.dir.meta(), &serde_json::to_vec_pretty(&vm.meta).map_err(|e| Error::Io(e.to_string()))?)
    }

    /// Forgets a VM whose VMM has ended, removing its runtime directory.
    pub fn forget(&self, uid: &str) {
        if let Some(vm) = self.vms().remove(uid) {
            let _ = std::fs::remove_dir_all(&vm.dir.path);
        }
        self.cpu.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }

    /// Host CPU the VMM used since the last call, in cores; `None` on the first call.
    pub fn cpu_usage(&self, uid: &str) -> Option<f64> {
        let vm = self.get(uid)?;
        let pid = VmDir::read_pid(&vm.dir.vmm_pid())?;
        let ticks = process_cpu_ticks(pid)?;
        let now = Instant::now();
        let mut samples = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        let sample = samples.entry(uid.to_string()).or_default();
        if let Some(at) = sample.at {
            let secs = now.duration_since(at).as_secs_f64();
            // Sample over at least a few seconds: ticks are 10 ms.
            if secs < 2.0 {
                return sample.cores;
            }
            sample.cores = Some(ticks.saturating_sub(sample.ticks) as f64 / clock_ticks_per_second() / secs);
        }
        sample.ticks = ticks;
        sample.at = Some(now);
        sample.cores
    }
}

/// user + system CPU time of a process, in clock ticks.
fn process_cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The metadata of a new VM directory.
pub fn new_meta(namespace: &str, name: &str, uid: &str, role: Role) -> VmMeta {
    VmMeta { namespace: namespace.into(), name: name.into(), uid: uid.into(), role, started_at_ms: unix_ms() }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A supervisor that has adopted one VM directory, `uid` "u1".
    fn with_one_vm(root: &std::path::Path) -> (Supervisor, VmDir) {
        let settings = Arc::new(crate::settings::tests::settings(root));
        let dir = VmDir::new(&settings.runtime_dir, "u1");
        std::fs::create_dir_all(&dir.path).unwrap();
        let meta = new_meta("ns", "vm", "u1", Role::Run);
        write_atomic(&dir.meta(), &serde_json::to_vec(&meta).unwrap()).unwrap();
        let supervisor = Supervisor::new(settings);
        assert_eq!(supervisor.adopt_all().len(), 1);
        (supervisor, dir)
    }

    /// Answers one request on the VMM's socket with `status`; returns the request line.
    fn vmm_answering(dir: &VmDir, status: &'static str) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(dir.api_socket()).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut header = String::new();
            while reader.read_line(&mut header).unwrap() > 0 && header != "\r\n" {
                header.clear();
            }
            let body = r#"{"error":"the guest has not read the keys typed before"}"#;
            write!(&stream, "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
            line
        })
    }

    #[test]
    fn a_shutdown_request_records_its_reason_first_and_withdraws_it_when_refused() {
        let reason = StopReason::IsolationShutdown;
        // (the VMM's answer, the reason left recorded)
        for (answer, kept) in [(Some("204 No Content"), true), (Some("409 Conflict"), false), (None, false)] {
            let root = tempfile::tempdir().unwrap();
            let (supervisor, dir) = with_one_vm(root.path());
            let vmm = answer.map(|status| vmm_answering(&dir, status));
            let request = supervisor.ask_to_shut_down("u1", reason, Duration::from_secs(5)).unwrap();
            assert_eq!(dir.read_stop_reason().as_deref(), Some(reason.text()), "recorded before the request");
            assert_eq!(request().is_ok(), kept, "{answer:?}");
            if let Some(vmm) = vmm {
                assert_eq!(vmm.join().unwrap(), "PUT /vm/ctrl-alt-del HTTP/1.1\r\n");
            }
            assert_eq!(dir.read_stop_reason().is_some(), kept, "{answer:?}");
        }
        let root = tempfile::tempdir().unwrap();
        let (supervisor, _) = with_one_vm(root.path());
        assert!(supervisor.ask_to_shut_down("other", reason, Duration::from_secs(1)).is_none());
    }
}
