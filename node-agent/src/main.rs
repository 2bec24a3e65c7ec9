//! `drover-agent`: Drover's node agent; see the library's documentation.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use drover_agent::context::Context;
use drover_agent::heartbeat;
use drover_agent::settings::Settings;
use drover_agent::supervisor::Supervisor;
use drover_agent::timing::Timing;
use drover_agent::{Error, console, host_facts, migration_controller, vm_controller};
use drover_crds::migration::VirtualMachineMigration;
use drover_crds::vm::VirtualMachine;
use futures::StreamExt;
use kube::Api;
use kube::runtime::{Controller, watcher};

#[derive(Parser)]
#[command(name = "drover-agent", version, about = "Drover's node agent: runs the VMs of its host")]
struct Cli {
    /// Path of a kubeconfig; without it, the in-cluster configuration or $KUBECONFIG.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// This host's Node name.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// This host's address (migrations and the HTTP endpoint listen on it).
    #[arg(long, env = "NODE_IP")]
    address: IpAddr,
    /// Namespace of the heartbeat Leases.
    #[arg(long, default_value = "drover-system")]
    namespace: String,
    /// Runtime state (VMM sockets and pids); like /run, lost on power failure.
    #[arg(long, default_value = "/run/drover")]
    runtime_dir: PathBuf,
    /// Persistent state (serial console logs).
    #[arg(long, default_value = "/var/lib/drover")]
    state_dir: PathBuf,
    /// The drover-vmm program (default: next to this program).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// The drover-monitor program (default: next to this program).
    #[arg(long)]
    monitor: Option<PathBuf>,
    /// Port of the HTTP endpoint (health, console logs).
    #[arg(long, default_value_t = 7445)]
    http_port: u16,
    /// Ports migration targets listen on, `LOW-HIGH`.
    #[arg(long, default_value = "49200-49299", value_parser = parse_range)]
    migration_ports: (u16, u16),
    /// Root of the sysfs tree to read the CPU/NUMA topology from.
    #[arg(long, default_value = "/sys")]
    sysfs_root: PathBuf,
    /// The KVM device. Another path makes a host without KVM (for tests).
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Heartbeat (Lease renewal) interval, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_interval_ms: u64,
    /// Lease duration in whole seconds: the operator declares the host failed after
    /// this long without a heartbeat; this host powers its VMs off before that.
    #[arg(long, default_value_t = 3)]
    lease_duration_seconds: u64,
    /// Size at which a VM's serial log rotates (one older file is kept).
    #[arg(long, default_value_t = 1 << 20)]
    serial_log_bytes: u64,
    /// Log lines as text or JSON (filter with RUST_LOG).
    #[arg(long, value_enum, default_value_t = drover_logging::LogFormat::Text)]
    log_format: drover_logging::LogFormat,
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (low, high) = s.split_once('-').ok_or("expected LOW-HIGH")?;
    let low: u16 = low.parse().map_err(|e| format!("{low}: {e}"))?;
    let high: u16 = high.parse().map_err(|e| format!("{high}: {e}"))?;
    if low == 0 || low > high {
        return Err(format!("{s}: need 1 <= LOW <= HIGH"));
    }
    Ok((low, high))
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn settings(cli: Cli) -> Result<Settings, Error> {
    let timing =
        Timing::new(Duration::from_millis(cli.heartbeat_interval_ms), Duration::from_secs(cli.lease_duration_seconds))?;
    Ok(Settings {
        node: cli.node_name,
        address: cli.address,
        namespace: cli.namespace,
        runtime_dir: cli.runtime_dir,
        state_dir: cli.state_dir,
        vmm: cli.vmm.unwrap_or_else(|| sibling("drover-vmm")),
        monitor: cli.monitor.unwrap_or_else(|| sibling("drover-monitor")),
        http_port: cli.http_port,
        migration_ports: cli.migration_ports,
        sysfs_root: cli.sysfs_root,
        kvm_device: cli.kvm_device,
        timing,
        serial_log_bytes: cli.serial_log_bytes,
    })
}

async fn run(cli: Cli) -> Result<(), Error> {
    let started = Instant::now();
    let kubeconfig = cli.kubeconfig.clone();
    let settings = Arc::new(settings(cli)?);
    for dir in [&settings.runtime_dir, &settings.state_dir] {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
    }
    for program in [&settings.vmm, &settings.monitor] {
        if !program.is_file() {
            return Err(Error::Config(format!(
                "{} not found: install it next to drover-agent or pass --vmm/--monitor",
                program.display()
            )));
        }
    }
    let client = drover_kube::client(kubeconfig.as_deref()).await.map_err(|e| Error::Config(e.to_string()))?;

    let supervisor = Arc::new(Supervisor::new(settings.clone()));
    let adopted = supervisor.adopt_all();
    for (meta, state) in &adopted {
        tracing::info!(vm = %format!("{}/{}", meta.namespace, meta.name), role = ?meta.role, ?state, "re-adopted");
    }
    tracing::info!(
        node = %settings.node, vms = adopted.len(), elapsed_ms = started.elapsed().as_millis() as u64,
        "agent started; VMs found in {}", settings.runtime_dir.display()
    );

    let (leased_tx, leased) = tokio::sync::watch::channel(false);
    let (facts_tx, facts) = tokio::sync::watch::channel(None);
    let (isolation_tx, isolation) = tokio::sync::watch::channel(Default::default());
    let events = drover_agent::events::for_node(client.clone(), &settings.node);
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: settings.clone(),
        supervisor: supervisor.clone(),
        leased,
        facts: facts.clone(),
        events,
    });

    tokio::spawn(heartbeat::run(
        client.clone(),
        settings.clone(),
        supervisor.clone(),
        facts.clone(),
        isolation,
        leased_tx,
    ));
    tokio::spawn(host_facts::publish(
        client.clone(),
        settings.clone(),
        facts_tx,
        isolation_tx,
        Duration::from_secs(30),
    ));
    let http = tokio::spawn(console::serve(ctx.clone()));

    let vms = Controller::new(Api::<VirtualMachine>::all(client.clone()), watcher::Config::default())
        .shutdown_on_signal()
        .run(vm_controller::reconcile, vm_controller::error_policy, ctx.clone())
        .for_each(|_| async {});
    let migrations = Controller::new(Api::<VirtualMachineMigration>::all(client.clone()), watcher::Config::default())
        .shutdown_on_signal()
        .run(migration_controller::reconcile, migration_controller::error_policy, ctx.clone())
        .for_each(|_| async {});
    tokio::select! {
        _ = futures::future::join(vms, migrations) => {
            // A signal: the agent stops; its VMs do not (they are re-adopted by the next agent).
            tracing::info!("agent stopping; VMs keep running under their monitors");
            Ok(())
        }
        result = http => match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::Io(format!("HTTP endpoint: {e}"))),
        },
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    drover_logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
