//! The operator at scale, through the real API server with real agents and VMMs:
//! 500 VMs (Drover's test guest, idle, 1 vCPU, 16-64 MiB) applied at once →
//! all Running. Prints the time to all Running, p50/p99 from apply to Running and
//! from each VM's creation to Running, the operator's peak RSS, and the API write
//! requests per second in steady state (kube-apiserver's own
//! `apiserver_request_total`), by resource.
//!
//! Hosts: netns hosts of this machine, each offering its CPUs under a HostPolicy
//! with the highest CPU overcommit the API allows (32 vCPUs per CPU). On 2-CPU
//! machines a host holds 64 such VMs, so 500 need 8 hosts (the default is as many
//! as the VMs need; `DROVER_BENCH_HOSTS` sets it).
//!
//! Needs root (hosts are network namespaces) and release binaries of the agent, the
//! VMM and the operator (`./run-benchmarks` builds them):
//! `cargo build --release --bins -p drover-node-agent -p drover-hypervisor -p drover-operator`
//! then `cargo bench -p drover-e2e --bench scale`. `DROVER_BENCH_VMS` (default 500)
//! and `DROVER_BENCH_HOSTS` change the size.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed step ends it, saying where

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Cluster {
    env: Vec<(&'static str, String)>,
    tools: PathBuf,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn script(&self, args: &[&str]) -> String {
        let out = Command::new(repo().join("e2e/cluster"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v)))
            .output()
            .unwrap();
        assert!(out.status.success(), "e2e/cluster {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new(self.tools.join("kubectl"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ =
            Command::new(repo().join("e2e/cluster")).arg("down").envs(self.env.iter().map(|(k, v)| (*k, v))).output();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Write requests served so far, by resource: (verb sum over POST, PUT, PATCH, APPLY, DELETE).
fn writes(cluster: &Cluster) -> HashMap<String, f64> {
    let metrics = cluster.kubectl(&["get", "--raw", "/metrics"], None);
    let mut out = HashMap::new();
    for line in metrics.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let label = |name: &str| {
            labels.split(&format!("{name}=\"")).nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("")
        };
        if !["POST", "PUT", "PATCH", "APPLY", "DELETE"].contains(&label("verb")) {
            continue;
        }
        let resource = match label("subresource") {
            "" => label("resource").to_string(),
            sub => format!("{}/{sub}", label("resource")),
        };
        *out.entry(resource).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// When the watch saw each VM appear, get a host, and run (since the watch began).
#[derive(Clone, Default)]
struct Seen {
    created: HashMap<String, Duration>,
    placed: HashMap<String, Duration>,
    running: HashMap<String, Duration>,
}

/// Watches the bench's VMs until `vms` of them run, or five minutes pass.
fn watch_vms(kubeconfig: &Path, started: Instant, seen: Arc<Mutex<Seen>>, vms: usize) {
    use futures::StreamExt;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(kubeconfig).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let api: kube::Api<drover_crds::vm::VirtualMachine> = kube::Api::namespaced(client, "bench");
        let mut events = kube::runtime::watcher(api, Default::default()).boxed();
        let deadline = tokio::time::sleep(Duration::from_secs(300));
        tokio::pin!(deadline);
        loop {
            let event = tokio::select! {
                e = events.next() => e,
                _ = &mut deadline => return,
            };
            let Some(Ok(kube::runtime::watcher::Event::Apply(vm) | kube::runtime::watcher::Event::InitApply(vm))) =
                event
            else {
                continue;
            };
            let now = started.elapsed();
            let name = vm.metadata.name.clone().unwrap_or_default();
            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
            s.created.entry(name.clone()).or_insert(now);
            let status = vm.status.unwrap_or_default();
            if status.node_name.is_some() {
                s.placed.entry(name.clone()).or_insert(now);
            }
            if status.phase == Some(drover_crds::vm::VmPhase::Running) {
                s.running.entry(name).or_insert(now);
            }
            if s.running.len() >= vms {
                return;
            }
        }
    });
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let vms = env_usize("DROVER_BENCH_VMS", 500);
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hosts = env_usize("DROVER_BENCH_HOSTS", vms.div_ceil(32 * cpus).max(1));
    let release = repo().join("target/release");
    for bin in ["drover-agent", "drover-vmm", "drover-monitor", "drover-operator"] {
        assert!(
            release.join(bin).is_file(),
            "{} missing: cargo build --release --bins -p drover-node-agent -p drover-hypervisor -p drover-operator",
            release.join(bin).display()
        );
    }
    let state = std::env::temp_dir().join(format!("drover-bench-scale-{}", std::process::id()));
    let env = vec![
        ("DROVER_STATE", state.display().to_string()),
        ("DROVER_APISERVER_PORT", "30443".to_string()),
        ("DROVER_ETCD_PORT", "30379".to_string()),
        ("DROVER_BRIDGE", "droverbn0".to_string()),
        ("DROVER_HOST_NET", "10.82.0".to_string()),
        ("DROVER_NETNS_PREFIX", "droverbn-".to_string()),
        ("DROVER_BIN_DIR", release.display().to_string()),
    ];
    let tools = PathBuf::from(
        String::from_utf8_lossy(&Command::new(repo().join("e2e/build-tools")).output().unwrap().stdout).trim(),
    );
    let mut cluster = Cluster { env, tools, kubeconfig: PathBuf::new() };
    cluster.kubeconfig = PathBuf::from(cluster.script(&["up", "--bare", "--hosts", &hosts.to_string()]));
    cluster.kubectl(&["apply", "-f", &repo().join("crds").display().to_string()], None);
    cluster.kubectl(
        &[
            "wait",
            "--for",
            "condition=Established",
            "--timeout",
            "60s",
            "-f",
            &repo().join("crds").display().to_string(),
        ],
        None,
    );
    // A pool with room for them all: idle guests cost almost no CPU.
    cluster.kubectl(&["label", "nodes", "--all", "drover.dev/pool=bench"], None);
    cluster.kubectl(&["apply", "-f", "-"], Some("apiVersion: drover.dev/v1alpha1\nkind: HostPolicy\nmetadata: {name: bench}\nspec:\n  nodeSelector: {matchLabels: {drover.dev/pool: bench}}\n  capacity: {cpuOvercommitRatio: 32, reservedMemory: 1Gi}\n"));
    let guest = state.join("guest.elf");
    assert!(Command::new(release.join("drover-vmm")).arg("write-test-guest").arg(&guest).status().unwrap().success());
    cluster.kubectl(&["create", "namespace", "bench"], None);
    let log = std::fs::File::create(state.join("operator-bench.log")).unwrap();
    let mut operator = Command::new(release.join("drover-operator"))
        .args([
            "--kubeconfig",
            &cluster.kubeconfig.display().to_string(),
            "--identity",
            "bench",
            "--http-address",
            "127.0.0.1:0",
            "--leader-lease-seconds",
            "6",
        ])
        .env("RUST_LOG", "warn")
        .stderr(log)
        .spawn()
        .unwrap();
    // Let the hosts publish their facts under the policy.
    std::thread::sleep(Duration::from_secs(5));
    let sizes = ["16Mi", "32Mi", "48Mi", "64Mi"];
    let yaml: String = (0..vms)
        .map(|i| {
            format!(
                "apiVersion: drover.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: vm-{i:04}, namespace: bench}}\nspec:\n  cpu: {{vcpus: 1}}\n  memory: {{size: {}}}\n  boot: {{kernel: {}, cmdline: drover.mode=idle}}\n---\n",
                sizes[i % sizes.len()],
                guest.display()
            )
        })
        .collect();
    // Eight kubectl processes at once: one applies ~10 objects a second here, and
    // the figure is about the operator, not about kubectl.
    let docs: Vec<&str> = yaml.split_inclusive("---\n").collect();
    let chunk = docs.len().div_ceil(8).max(1);
    // A watch started before the apply sees each VM appear, get a host and run.
    let times = Arc::new(Mutex::new(Seen::default()));
    let started = Instant::now();
    let watching = {
        let (times, kubeconfig) = (times.clone(), cluster.kubeconfig.clone());
        std::thread::spawn(move || watch_vms(&kubeconfig, started, times, vms))
    };
    std::thread::sleep(Duration::from_secs(1));
    let applied = Instant::now();
    std::thread::scope(|s| {
        for part in docs.chunks(chunk) {
            let cluster = &cluster;
            let text: String = part.concat();
            s.spawn(move || cluster.kubectl(&["apply", "--server-side", "-f", "-"], Some(&text)));
        }
    });
    let apply_took = applied.elapsed();
    let _ = watching.join();
    let all = applied.elapsed();
    let seen = times.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let since_apply = |t: &Duration| t.saturating_sub(applied - started);
    let running: HashMap<String, Duration> = seen.running.iter().map(|(n, t)| (n.clone(), since_apply(t))).collect();
    let all = running.values().max().copied().unwrap_or(all);
    let all_placed = seen.placed.values().map(since_apply).max().unwrap_or_default();
    let placed_count = seen.placed.len();
    let mut times: Vec<Duration> = running.values().copied().collect();
    times.sort();
    let mut own: Vec<Duration> =
        seen.running.iter().map(|(n, t)| t.saturating_sub(seen.created.get(n).copied().unwrap_or(*t))).collect();
    own.sort();
    let pending = vms - running.len();
    // Steady state: 30 s of nothing happening.
    std::thread::sleep(Duration::from_secs(5));
    let before = writes(&cluster);
    let window = Duration::from_secs(30);
    std::thread::sleep(window);
    let after = writes(&cluster);
    let rss = std::fs::read_to_string(format!("/proc/{}/status", operator.id()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let _ = operator.kill();
    let _ = operator.wait();
    println!(
        "operator at scale: {vms} VMs applied at once on {hosts} hosts (kubectl apply took {:.1} s)",
        apply_took.as_secs_f64()
    );
    println!("| figure | value | goal |");
    println!("| --- | --- | --- |");
    println!("| all placed by the operator | {:.1} s ({placed_count} of {vms}) | |", all_placed.as_secs_f64());
    println!(
        "| all Running | {:.1} s ({} of {vms}{}) | ≤ 30 s |",
        all.as_secs_f64(),
        running.len(),
        if pending > 0 { ", the rest timed out" } else { "" }
    );
    if !times.is_empty() {
        println!(
            "| apply → Running, p50 / p99 | {:.1} / {:.1} s | |",
            percentile(&times, 0.5).as_secs_f64(),
            percentile(&times, 0.99).as_secs_f64()
        );
        println!(
            "| created → Running, p50 / p99 | {:.1} / {:.1} s | |",
            percentile(&own, 0.5).as_secs_f64(),
            percentile(&own, 0.99).as_secs_f64()
        );
    }
    println!("| operator peak RSS | {rss} | ≤ 64 MiB |");
    let mut rates: Vec<(String, f64)> = after
        .iter()
        .map(|(r, n)| (r.clone(), (n - before.get(r).copied().unwrap_or(0.0)) / window.as_secs_f64()))
        .filter(|(_, rate)| *rate > 0.0)
        .collect();
    rates.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = rates.iter().map(|(_, r)| r).sum();
    let by: Vec<String> = rates.iter().map(|(r, rate)| format!("{r} {rate:.2}")).collect();
    println!("| API writes/s in steady state | {total:.2} ({}) | ≤ 5/s |", by.join(", "));
}
