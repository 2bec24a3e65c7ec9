//! Helpers for tests of VMs on the real control plane: kubectl calls, the test
//! guest image, waiting for phases, and reading what runs on a host.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::control_plane;
use crate::hosts::{Host, cluster_state};

/// One test at a time in a test binary (they time things, and share hosts).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where drover-vmm, drover-agent and drover-monitor are.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("DROVER_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| crate::repo_root().join("target/debug"))
}

/// Drover's test guest, written once per test process where every host can read it.
pub fn guest_image() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = cluster_state().join(format!("test-guest-{}", std::process::id()));
        let vmm = bin_dir().join("drover-vmm");
        let out =
            std::process::Command::new(&vmm).arg("write-test-guest").arg(&path).output().unwrap_or_else(|e| {
                panic!("cannot run {}: {e} (build it with cargo build --workspace)", vmm.display())
            });
        assert!(out.status.success(), "write-test-guest: {}", String::from_utf8_lossy(&out.stderr));
        path
    })
    .clone()
}

/// A namespace with the CRDs installed.
pub fn namespace(prefix: &str) -> String {
    let cp = control_plane();
    cp.install_crds();
    cp.fresh_namespace(prefix)
}

pub fn kubectl(args: &[&str]) -> String {
    control_plane().kubectl_ok(args, None)
}

pub fn apply(yaml: &str) {
    control_plane().kubectl_ok(&["apply", "-f", "-"], Some(yaml));
}

pub fn get(ns: &str, kind: &str, name: &str) -> Value {
    serde_json::from_str(&kubectl(&["get", kind, name, "-n", ns, "-o", "json"])).expect("kubectl get -o json")
}

/// The object, or `None` while it does not exist yet (any other error still panics).
pub fn try_get(ns: &str, kind: &str, name: &str) -> Option<Value> {
    let out = control_plane().kubectl(&["get", kind, name, "-n", ns, "-o", "json"], None);
    if out.status.success() {
        return Some(serde_json::from_slice(&out.stdout).expect("kubectl get -o json"));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NotFound"), "kubectl get {kind} {name} -n {ns} failed:\n{stderr}");
    None
}

pub fn vm_yaml(ns: &str, name: &str, vcpus: u32, memory: &str, cmdline: &str) -> String {
    format!(
        "apiVersion: drover.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  cpu: {{vcpus: {vcpus}}}\n  memory: {{size: {memory}}}\n  boot: {{kernel: {}, cmdline: \"{cmdline}\"}}\n",
        guest_image().display()
    )
}

/// An idle 32 MiB VM of `vcpus` with `labels` (YAML map entries, may be empty)
/// and `extra` spec lines (indented two spaces) after the boot.
pub fn idle_vm(ns: &str, name: &str, labels: &str, vcpus: u32, extra: &str) -> String {
    format!(
        "apiVersion: drover.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
         spec:\n  cpu: {{vcpus: {vcpus}}}\n  memory: {{size: 32Mi}}\n  boot: {{kernel: {}, cmdline: \"drover.mode=idle\"}}\n{extra}",
        guest_image().display()
    )
}

/// The condition `type_` of an object's status, or null.
pub fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or(Value::Null)
}

/// The host a VM's status places it on ("" if none).
pub fn node_of(ns: &str, name: &str) -> String {
    vm_status(ns, name)["nodeName"].as_str().unwrap_or_default().to_string()
}

/// The host of `hosts` named `name`.
pub fn host_named<'a>(hosts: &'a [Host], name: &str) -> &'a Host {
    hosts.iter().find(|h| h.name() == name).unwrap_or_else(|| panic!("no host {name}"))
}

/// Places a VM on a host and asks for it to start, as the operator will.
pub fn place(ns: &str, vm: &str, host: &Host) {
    let patch = format!(r#"{{"status":{{"nodeName":"{}","phase":"Scheduled"}}}}"#, host.name());
    kubectl(&["patch", "vm", vm, "-n", ns, "--subresource=status", "--type=merge", "-p", &patch]);
}

/// Polls `f` until it returns `Some`, or panics after `timeout` saying what it waited for.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn vm_status(ns: &str, vm: &str) -> Value {
    get(ns, "vm", vm)["status"].clone()
}

pub fn wait_phase(ns: &str, vm: &str, phase: &str, timeout: Duration) -> Value {
    wait_for(&format!("VM {vm} to be {phase}"), timeout, || {
        let status = vm_status(ns, vm);
        (status["phase"] == phase).then_some(status)
    })
}

/// The pid of the VMM running `vm` (its command line names the VM's config).
pub fn vmm_pid(host: &Host, uid: &str) -> Option<u32> {
    let pid: u32 =
        std::fs::read_to_string(host.runtime_dir().join("vms").join(uid).join("vmm.pid")).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

pub fn uid(ns: &str, vm: &str) -> String {
    get(ns, "vm", vm)["metadata"]["uid"].as_str().expect("uid").to_string()
}

/// GET `path` from a host's agent (plain HTTP/1.1 over TCP, from the root namespace
/// through the bridge): (status code, body).
pub fn agent_get(host: &Host, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect_timeout(&(host.ip(), 7445).into(), Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

pub fn console(host: &Host, ns: &str, vm: &str) -> String {
    agent_get(host, &format!("/vms/{ns}/{vm}/console")).map(|(_, body)| body).unwrap_or_default()
}

/// The CPU list the VMM's vCPU threads ("vcpu N") may run on.
pub fn vcpu_affinity(pid: u32) -> Vec<String> {
    let mut lists = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("vcpu") {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            if let Some(list) = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")) {
                lists.push(list.trim().to_string());
            }
        }
    }
    lists
}

pub fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// The digest the workload prints when it runs undisturbed, from a plain VMM run.
pub fn reference_digest(vcpus: u32, memory_mib: u32, cmdline: &str) -> String {
    let out = std::process::Command::new(bin_dir().join("drover-vmm"))
        .args(["run", "--vcpus", &vcpus.to_string(), "--memory-mib", &memory_mib.to_string(), "--cmdline", cmdline])
        .arg("--kernel")
        .arg(guest_image())
        .output()
        .expect("run drover-vmm");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "reference run: {text}{}", String::from_utf8_lossy(&out.stderr));
    digest_of(&text).unwrap_or_else(|| panic!("no digest in {text}"))
}

/// The digest a `drover.mode=digest` guest printed on its serial console, if it did.
pub fn digest_of(serial: &str) -> Option<String> {
    serial
        .lines()
        .find_map(|l| l.strip_prefix("drover-guest: digest "))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
}

/// Sends `signal` (`KILL`, `STOP`, `CONT`, ...) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status =
        std::process::Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// SIGKILL, as a crash or the OOM killer would.
pub fn kill_9(pid: u32) {
    signal(pid, "KILL");
}
