//! The overlap sampler: a background thread that, every 50 ms, finds every
//! `drover-vmm` process of this cluster's hosts in `/proc`, attributes it to a VM
//! (its command line names files in `<host>/run/vms/<uid>/`) and a host, and decides
//! whether it runs the guest:
//!
//! - a `run` or `restore` VMM does, unless it has handed the VM over in a migration
//!   (asked only when it is not alone: its `GET /vm/migration` says `Switchover`,
//!   `Completed` or `Unknown`, so its vCPUs are parked for good and it is about to
//!   exit, or stays paused);
//! - a `receive` VMM does once its control API answers (`GET /vm`): it serves it
//!   only once the VM it received runs.
//!
//! Per VM it records the most VMMs seen running the guest at once, every sample
//! where two did (an overlap: a VM running twice), and each VMM that ran it (host,
//! pid, role, first and last seen), so tests can also say where a VM ran when.
//! Pairs of VMs that must never share a host (a Required anti-affinity rule) are
//! checked in every sample too.
//!
//! Two VMMs counted in one sample both still ran at the end of that sample's
//! checks, so an overlap is never two VMMs that only followed each other.
//!
//! Sampling is cheap: one `/proc` directory read and one `comm` read per process;
//! command lines and control sockets only for `drover-vmm` processes.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::hosts::cluster_state;

/// How often the sampler looks.
pub const INTERVAL: Duration = Duration::from_millis(50);

/// How a VMM got its guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `drover-vmm run`: booted it.
    Run,
    /// `drover-vmm restore`: from a snapshot.
    Restore,
    /// `drover-vmm receive`: a migration's target.
    Receive,
}

/// One VMM that ran a VM's guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runner {
    pub host: String,
    pub pid: u32,
    pub role: Role,
}

/// One VMM's time running a VM's guest, as the samples saw it.
#[derive(Debug, Clone)]
pub struct Run {
    pub runner: Runner,
    /// Since the sampler started.
    pub first_seen: Duration,
    pub last_seen: Duration,
}

/// A sample in which more than one VMM ran the same VM.
#[derive(Debug, Clone)]
pub struct Overlap {
    pub uid: String,
    pub at: Duration,
    pub runners: Vec<Runner>,
}

/// A sample in which two VMs that must stay apart ran on one host.
#[derive(Debug, Clone)]
pub struct Together {
    pub vms: (String, String),
    pub host: String,
    pub at: Duration,
}

#[derive(Default)]
struct State {
    samples: u64,
    max_at_once: HashMap<String, usize>,
    overlaps: Vec<Overlap>,
    runs: HashMap<String, Vec<Run>>,
    latest: HashMap<String, Vec<Runner>>,
    apart: Vec<(String, String)>,
    together: Vec<Together>,
    slowest_sample: Duration,
}

struct Shared {
    stop: AtomicBool,
    state: Mutex<State>,
    started: Instant,
}

/// The sampler; stops when dropped.
pub struct Sampler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling the VMMs of this cluster's hosts (`$DROVER_STATE/hosts/*`).
    pub fn start() -> Sampler {
        let root = format!("{}/", cluster_state().join("hosts").display());
        let shared =
            Arc::new(Shared { stop: AtomicBool::new(false), state: Mutex::default(), started: Instant::now() });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("overlap-sampler".into())
                .spawn(move || sample_loop(&shared, &root))
                .expect("start the overlap sampler")
        };
        let sampler = Sampler { shared, thread: Some(thread) };
        // Return once a first sample is in: what a test does next is seen.
        let first = Instant::now();
        while sampler.state().samples == 0 && first.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        sampler
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Time since the sampler started (the clock of [`Run`] and [`Overlap`]).
    pub fn now(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Checks from now on that VMs `a` and `b` (uids) never run on one host.
    pub fn keep_apart(&self, a: &str, b: &str) {
        self.state().apart.push((a.to_string(), b.to_string()));
    }

    /// Samples taken so far.
    pub fn samples(&self) -> u64 {
        self.state().samples
    }

    /// The longest one sample took (its cost).
    pub fn slowest_sample(&self) -> Duration {
        self.state().slowest_sample
    }

    /// Every overlap seen, over all VMs.
    pub fn overlaps(&self) -> Vec<Overlap> {
        self.state().overlaps.clone()
    }

    /// Overlaps of one VM.
    pub fn overlaps_of(&self, uid: &str) -> usize {
        self.state().overlaps.iter().filter(|o| o.uid == uid).count()
    }

    /// The most VMMs seen running VM `uid`'s guest at once.
    pub fn max_at_once(&self, uid: &str) -> usize {
        self.state().max_at_once.get(uid).copied().unwrap_or(0)
    }

    /// Samples in which two VMs kept apart ran on one host.
    pub fn together(&self) -> Vec<Together> {
        self.state().together.clone()
    }

    /// The VMMs that ran VM `uid`'s guest, in the order they were first seen.
    pub fn runs(&self, uid: &str) -> Vec<Run> {
        self.state().runs.get(uid).cloned().unwrap_or_default()
    }

    /// The VMMs running VM `uid`'s guest in the latest sample.
    pub fn running(&self, uid: &str) -> Vec<Runner> {
        self.state().latest.get(uid).cloned().unwrap_or_default()
    }

    /// Waits (polling the samples every 5 ms) until `f` holds of the VMMs running
    /// VM `uid`; panics after `timeout`, saying what it waited for.
    pub fn wait(&self, uid: &str, what: &str, timeout: Duration, f: impl Fn(&[Runner]) -> bool) -> Vec<Runner> {
        let start = Instant::now();
        loop {
            let now = self.running(uid);
            if f(&now) {
                return now;
            }
            assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what} (runs: {now:?})");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A one-line summary for test output: samples, VMs seen, overlaps.
    pub fn summary(&self) -> String {
        let s = self.state();
        let most = s.max_at_once.values().copied().max().unwrap_or(0);
        format!(
            "{} samples every {} ms (slowest {} ms), {} VMs seen, at most {most} VMM(s) running one VM at once, {} overlaps, {} anti-affinity breaks",
            s.samples,
            INTERVAL.as_millis(),
            s.slowest_sample.as_millis(),
            s.max_at_once.len(),
            s.overlaps.len(),
            s.together.len()
        )
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the sampler knows of one `drover-vmm` process, kept while it lives.
struct Known {
    start_time: u64,
    /// `None`: not a VMM of this cluster's hosts.
    vmm: Option<Vmm>,
}

#[derive(Clone)]
struct Vmm {
    uid: String,
    host: String,
    role: Role,
    api: PathBuf,
    /// A receiving VMM once seen running the guest (it does until it ends).
    runs_guest: bool,
}

fn sample_loop(shared: &Shared, root: &str) {
    let mut known: HashMap<u32, Known> = HashMap::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let began = Instant::now();
        let found = scan(root, &mut known);
        let at = shared.started.elapsed();
        let mut by_uid: BTreeMap<String, Vec<(u32, Vmm)>> = BTreeMap::new();
        for (pid, vmm) in found {
            by_uid.entry(vmm.uid.clone()).or_default().push((pid, vmm));
        }
        let mut latest: HashMap<String, Vec<Runner>> = HashMap::new();
        let mut overlaps = Vec::new();
        for (uid, vmms) in by_uid {
            let running = if vmms.len() > 1 { settle(&known, vmms) } else { vmms };
            let runners: Vec<Runner> =
                running.iter().map(|(pid, v)| Runner { host: v.host.clone(), pid: *pid, role: v.role }).collect();
            if runners.len() > 1 {
                overlaps.push(Overlap { uid: uid.clone(), at, runners: runners.clone() });
            }
            if !runners.is_empty() {
                latest.insert(uid, runners);
            }
        }
        let mut s = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        s.samples += 1;
        for (uid, runners) in &latest {
            let most = s.max_at_once.entry(uid.clone()).or_default();
            *most = (*most).max(runners.len());
            let runs = s.runs.entry(uid.clone()).or_default();
            for r in runners {
                match runs.iter_mut().find(|run| run.runner == *r) {
                    Some(run) => run.last_seen = at,
                    None => runs.push(Run { runner: r.clone(), first_seen: at, last_seen: at }),
                }
            }
        }
        let mut together = Vec::new();
        for (a, b) in &s.apart {
            let hosts =
                |uid: &String| latest.get(uid).into_iter().flatten().map(|r| r.host.clone()).collect::<Vec<_>>();
            let (on_a, on_b) = (hosts(a), hosts(b));
            for host in on_a.iter().filter(|h| on_b.contains(h)) {
                together.push(Together { vms: (a.clone(), b.clone()), host: host.clone(), at });
            }
        }
        s.together.extend(together);
        s.overlaps.extend(overlaps);
        s.latest = latest;
        s.slowest_sample = s.slowest_sample.max(began.elapsed());
        drop(s);
        let spent = began.elapsed();
        std::thread::sleep(INTERVAL.saturating_sub(spent));
    }
}

/// Every VMM of this cluster that runs a guest now (receiving VMMs only once their
/// API answers), updating `known`.
fn scan(root: &str, known: &mut HashMap<u32, Known>) -> Vec<(u32, Vmm)> {
    let mut seen = Vec::new();
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return found };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        match std::fs::read(format!("/proc/{pid}/comm")) {
            Ok(comm) if comm == b"drover-vmm\n" => {}
            _ => continue,
        }
        let Some(start_time) = start_time(pid) else { continue };
        seen.push(pid);
        let stale = known.get(&pid).is_none_or(|k| k.start_time != start_time);
        if stale {
            let Some(vmm) = parse(pid, root) else {
                // Empty while it exits (or before exec): looked at again next time.
                known.remove(&pid);
                continue;
            };
            known.insert(pid, Known { start_time, vmm });
        }
        let Some(Known { vmm: Some(vmm), .. }) = known.get_mut(&pid) else { continue };
        if vmm.role == Role::Receive && !vmm.runs_guest {
            vmm.runs_guest = vmm.api.exists() && ask(&vmm.api, "/vm").is_some_and(|(code, _)| code == 200);
        }
        if vmm.role != Role::Receive || vmm.runs_guest {
            found.push((pid, vmm.clone()));
        }
    }
    known.retain(|pid, _| seen.contains(pid));
    found
}

/// Of several VMMs running one VM by the scan, those that really do: one that
/// handed the VM over (a migration's source, whatever its own origin) no longer
/// does; one that went away meanwhile does not count. Every one returned ran at the end of the check.
fn settle(known: &HashMap<u32, Known>, vmms: Vec<(u32, Vmm)>) -> Vec<(u32, Vmm)> {
    let mut kept = Vec::new();
    for (pid, vmm) in vmms {
        let Some(start) = known.get(&pid).map(|k| k.start_time) else { continue };
        // Up to half a second for an answer: a VMM that exits stops answering
        // just before it goes.
        let mut handed_over = None;
        let asking = Instant::now();
        while asking.elapsed() < Duration::from_millis(500) {
            if start_time(pid) != Some(start) {
                break;
            }
            if let Some((200, body)) = ask(&vmm.api, "/vm/migration") {
                let phase = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["phase"].as_str().map(str::to_string))
                    .unwrap_or_default();
                handed_over = Some(matches!(phase.as_str(), "Switchover" | "Completed" | "Unknown"));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Gone (`None` and not alive), or alive without an answer: counted.
        match handed_over {
            Some(true) => {}
            _ if start_time(pid) != Some(start) => {}
            _ => kept.push((pid, vmm)),
        }
    }
    kept.retain(|(pid, _)| known.get(pid).is_some_and(|k| start_time(*pid) == Some(k.start_time)));
    kept
}

/// The process's start time (field 22 of its stat), if it lives and is no zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let mut fields = rest.split(' ');
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `rest` starts at field 3 (state): the start time is field 22.
    fields.nth(18)?.parse().ok()
}

/// Which VM and host a `drover-vmm` process serves, from its command line; `None`
/// for one that names no VM directory of this cluster's hosts (another cluster's,
/// a test's own).
fn parse(pid: u32, root: &str) -> Option<Option<Vmm>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    let args: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let role = match args.get(1).map(String::as_str) {
        Some("run") => Role::Run,
        Some("restore") => Role::Restore,
        Some("receive") => Role::Receive,
        _ => return Some(None),
    };
    let named = args.iter().find_map(|a| {
        let rest = &a[a.find(root)? + root.len()..];
        let (host, rest) = rest.split_once('/')?;
        let rest = rest.strip_prefix("run/vms/")?;
        let uid = rest.split('/').next()?;
        let vms = &a[..a.find(root)? + root.len() + host.len() + "/run/vms/".len()];
        Some((host.to_string(), uid.to_string(), PathBuf::from(vms).join(uid).join("api.sock")))
    });
    Some(named.map(|(host, uid, api)| Vmm { uid, host, role, api, runs_guest: false }))
}

/// `GET path` on a VMM's control socket, with short timeouts: (code, body).
fn ask(socket: &std::path::Path, path: &str) -> Option<(u16, String)> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    stream.set_write_timeout(Some(Duration::from_millis(200))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n\r\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_this_process_is_read_and_a_missing_one_is_none() {
        assert!(start_time(std::process::id()).is_some());
        assert!(start_time(u32::MAX).is_none());
    }
}
