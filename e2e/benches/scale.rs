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

mod bench_cluster;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bench_cluster::{Cluster, Names, env_usize};

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
        let client = bench_cluster::client(kubeconfig).await;
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
    // A pool with room for them all: idle guests cost almost no CPU.
    let names = Names { bench: "scale", short: "bn", apiserver_port: 30443, etcd_port: 30379, host_net: "10.82.0" };
    let cluster = Cluster::up(&names, hosts, "  capacity: {cpuOvercommitRatio: 32, reservedMemory: 1Gi}\n");
    let guest = cluster.guest.clone();
    let mut operator = cluster.start_operator();
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
