//! `drover-vmm`: runs one Drover VM per process.
//!
//! Exit status: 0 guest shut down, 1 VMM error (bad configuration, no KVM, kernel
//! not loadable, ...; one log line says what), 2 bad command line, 3 guest reset,
//! 4 guest fault (triple fault, emulation failure), 5 guest reported a failure,
//! 6 the VM moved to another host (live migration): `drover_vmm_api::ExitStatus`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use drover_hypervisor::config::{
    CpuPlacement, DiskConfig, NicConfig, NumaConfig, NumaPolicy, SerialOutput, Topology, VmConfig,
};
use drover_hypervisor::exit::VmExit;
use drover_hypervisor::restore::{Origin, RestoreSource, Unannounced};
use drover_hypervisor::{api, vmm};
use drover_vmm_api::ExitStatus;

#[derive(Parser)]
#[command(name = "drover-vmm", version, about = "Drover's VMM: one process per virtual machine, on KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a VM until the guest ends it.
    Run(RunArgs),
    /// Start a VM again from a snapshot written by `PUT /vm/snapshot`.
    Restore {
        /// The snapshot directory.
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        here: HostSide,
    },
    /// Wait for a live migration: accept one source that knows the secret, receive
    /// its VM, and run it.
    Receive {
        /// Address to listen on, e.g. 0.0.0.0:7070.
        #[arg(long)]
        listen: String,
        /// File holding the shared migration secret.
        #[arg(long)]
        secret_file: PathBuf,
        #[command(flatten)]
        here: HostSide,
        /// The VM this target expects (JSON config): a source sending another shape is refused.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Fault the expected VM's memory in before listening (needs --config): the
        /// transfer then writes into memory that is already there.
        #[arg(long, requires = "config")]
        prefault: bool,
    },
    /// Report what /dev/kvm offers (API version, vCPU limits, needed capabilities) as
    /// JSON; exit status 1 when it cannot run Drover VMs.
    KvmCheck {
        /// The KVM device to open.
        #[arg(long, default_value = "/dev/kvm")]
        device: PathBuf,
    },
    /// Send one request to a running VMM's control API and print the reply, e.g.
    /// `drover-vmm api --socket /run/drover/vm.sock PATCH /vm/cpus '{"hostCpus":"0-1"}'`.
    Api {
        /// The VMM's control socket.
        #[arg(long)]
        socket: PathBuf,
        /// GET, PUT or PATCH.
        method: String,
        /// /vm, /vm/pause, /vm/resume, /vm/shutdown, /vm/cpus or /vm/priority.
        path: String,
        /// JSON body.
        body: Option<String>,
    },
    /// Write Drover's test guest image (a PVH ELF) to a file.
    WriteTestGuest {
        /// Where to write it.
        path: PathBuf,
    },
}

/// What a VM brought from elsewhere (a snapshot, a migration source) gets from
/// this host rather than from where it came from.
#[derive(Args)]
struct HostSide {
    /// Serial output: `stdout`, `null`, or a file path (default: stdout).
    #[arg(long)]
    serial: Option<String>,
    /// Control API socket path.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Host CPUs for the vCPUs here, if not the ones it had.
    #[arg(long)]
    host_cpus: Option<String>,
    /// The tap of each NIC here, in order, if not the names it had (taps are
    /// per host; the MACs travel with the VM).
    #[arg(long = "tap")]
    taps: Vec<String>,
    /// Do not announce the VM's MACs (RARP) once it runs here; bridges then
    /// learn its new port only when the guest next sends.
    #[arg(long)]
    no_announce: bool,
}

impl HostSide {
    /// The restore source, with the announcement turned off where asked.
    fn origin(&self, source: Box<dyn RestoreSource>) -> Origin {
        match self.no_announce {
            true => Origin::Restore(Box::new(Unannounced(source))),
            false => Origin::Restore(source),
        }
    }

    fn apply(self, mut config: VmConfig) -> VmConfig {
        config.serial = self.serial.as_deref().map(serial_output).unwrap_or(SerialOutput::Stdout);
        config.api_socket = self.api_socket;
        if self.host_cpus.is_some() {
            config.cpus.host_cpus = self.host_cpus;
        }
        for (nic, tap) in config.nics.iter_mut().zip(self.taps) {
            nic.tap = tap;
        }
        config
    }
}

#[derive(Args)]
struct RunArgs {
    /// A JSON VM configuration (the agent's format); flags below override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest topology as SOCKETS:CORES:THREADS.
    #[arg(long, value_parser = parse_topology)]
    topology: Option<Topology>,
    /// Guest memory in MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Kernel image.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Serial output: `stdout`, `null`, `unix:PATH` (a socket consoles connect to),
    /// or a file path.
    #[arg(long)]
    serial: Option<String>,
    /// Host CPUs for the vCPUs (CPU list, e.g. 0-3).
    #[arg(long)]
    host_cpus: Option<String>,
    /// Pin each vCPU to a host CPU of its own.
    #[arg(long)]
    dedicated: bool,
    /// With --dedicated, allow vCPUs on hyper-thread siblings.
    #[arg(long)]
    allow_siblings: bool,
    /// NUMA policy of guest memory: None, Preferred, Strict or Interleave.
    #[arg(long)]
    numa_policy: Option<String>,
    /// NUMA nodes (comma-separated).
    #[arg(long, value_delimiter = ',')]
    numa_nodes: Vec<u32>,
    /// CPU shares (Low 500, Normal 1000, High 2000).
    #[arg(long)]
    shares: Option<u32>,
    /// Control API socket path.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// VM name, for logs.
    #[arg(long)]
    name: Option<String>,
    /// A virtio-blk disk on a raw image: `PATH`, or `PATH,ro` for a read-only
    /// one (repeat for more disks; they come after the config's).
    #[arg(long = "disk", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// A virtio-net NIC on an existing tap: `TAP,mac=52:54:00:12:34:56` (repeat
    /// for more; after the config's).
    #[arg(long = "nic", value_parser = parse_nic)]
    nics: Vec<NicConfig>,
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match s.strip_suffix(",ro") {
        Some(path) => (path, true),
        None => (s, false),
    };
    Ok(DiskConfig { path: path.into(), read_only, id: String::new() })
}

fn parse_nic(s: &str) -> Result<NicConfig, String> {
    let (tap, mac) = s.split_once(",mac=").ok_or_else(|| format!("{s:?} is not TAP,mac=MAC"))?;
    Ok(NicConfig { tap: tap.into(), mac: mac.into() })
}

fn parse_topology(s: &str) -> Result<Topology, String> {
    let parts: Vec<u32> = s
        .split(':')
        .map(|p| p.parse().map_err(|_| format!("{s:?} is not SOCKETS:CORES:THREADS")))
        .collect::<Result<_, _>>()?;
    match parts[..] {
        [sockets, cores, threads] => Ok(Topology { sockets, cores, threads }),
        _ => Err(format!("{s:?} is not SOCKETS:CORES:THREADS")),
    }
}

impl RunArgs {
    fn into_config(self) -> Result<VmConfig, drover_hypervisor::Error> {
        let missing = |f: &str| drover_hypervisor::Error::Config(format!("--{f} is required (or give --config)"));
        let mut c = match &self.config {
            Some(path) => VmConfig::from_file(path)?,
            None => VmConfig {
                name: "vm".into(),
                vcpus: self.vcpus.ok_or_else(|| missing("vcpus"))?,
                topology: None,
                memory_mib: self.memory_mib.ok_or_else(|| missing("memory-mib"))?,
                kernel: self.kernel.clone().ok_or_else(|| missing("kernel"))?,
                initrd: None,
                cmdline: String::new(),
                serial: SerialOutput::Stdout,
                cpus: CpuPlacement::default(),
                numa: NumaConfig::default(),
                shares: 1000,
                api_socket: None,
                disks: Vec::new(),
                nics: Vec::new(),
            },
        };
        if let Some(v) = self.vcpus {
            c.vcpus = v
        }
        if let Some(v) = self.topology {
            c.topology = Some(v)
        }
        if let Some(v) = self.memory_mib {
            c.memory_mib = v
        }
        if let Some(v) = self.kernel {
            c.kernel = v
        }
        if let Some(v) = self.cmdline {
            c.cmdline = v
        }
        if let Some(v) = self.name {
            c.name = v
        }
        if let Some(v) = self.serial {
            c.serial = serial_output(&v);
        }
        if let Some(v) = self.host_cpus {
            c.cpus.host_cpus = Some(v)
        }
        if self.dedicated {
            c.cpus.dedicated = true
        }
        if self.allow_siblings {
            c.cpus.allow_siblings = true
        }
        if let Some(v) = self.numa_policy {
            c.numa.policy = serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| {
                drover_hypervisor::Error::Config(format!(
                    "--numa-policy: {v:?} is not None, Preferred, Strict or Interleave"
                ))
            })?;
        }
        if !self.numa_nodes.is_empty() {
            c.numa.nodes = self.numa_nodes
        }
        if c.numa.policy == NumaPolicy::None && !c.numa.nodes.is_empty() {
            return Err(drover_hypervisor::Error::Config("--numa-nodes needs --numa-policy".into()));
        }
        if let Some(v) = self.shares {
            c.shares = v
        }
        if let Some(v) = self.api_socket {
            c.api_socket = Some(v)
        }
        c.disks.extend(self.disks);
        c.nics.extend(self.nics);
        Ok(c)
    }
}

/// Builds and starts the VM, serves its control API if it has a socket, and
/// waits until the VM ends.
fn run_vm(config: &VmConfig, origin: Origin) -> Result<VmExit, drover_hypervisor::Error> {
    let vm = vmm::start(config, origin)?;
    let api = config.api_socket.as_deref().map(|socket| api::serve(socket, vm.control().clone())).transpose()?;
    let exit = vm.wait();
    drop(api);
    Ok(exit)
}

/// Ends the process with the VM's exit status (or 1 and the error).
fn finish(result: Result<VmExit, drover_hypervisor::Error>) -> ExitCode {
    match result {
        Ok(exit) => {
            let status = exit.exit_status();
            if status.is_success() {
                tracing::info!("{exit}");
            } else {
                tracing::error!("{exit}");
            }
            // vCPU threads may be blocked in KVM_RUN; the process exit ends them.
            std::process::exit(i32::from(status.code()));
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(ExitStatus::VmmError.code())
        }
    }
}

fn serial_output(v: &str) -> SerialOutput {
    match v {
        "stdout" => SerialOutput::Stdout,
        "null" => SerialOutput::Null,
        v if v.starts_with("unix:") => SerialOutput::Socket(v["unix:".len()..].into()),
        path => SerialOutput::File(path.into()),
    }
}

fn main() -> ExitCode {
    drover_logging::init(drover_logging::LogFormat::Text);
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => finish(args.into_config().and_then(|config| run_vm(&config, Origin::Boot))),
        Command::Restore { from, here } => {
            let result = drover_hypervisor::snapshot::load(&from).and_then(|snapshot| {
                let config = snapshot.config().clone();
                let origin = here.origin(Box::new(snapshot));
                run_vm(&here.apply(config), origin)
            });
            finish(result)
        }
        Command::Receive { listen, secret_file, here, config, prefault } => {
            let result = (|| {
                let secret = std::fs::read(&secret_file).map_err(|e| {
                    drover_hypervisor::Error::Config(format!("--secret-file {}: {e}", secret_file.display()))
                })?;
                let expected = config.as_deref().map(VmConfig::from_file).transpose()?;
                if let (true, Some(expected)) = (prefault, expected.clone()) {
                    // The VM is built from the expected configuration (the source's
                    // must have its shape), so its memory exists before anyone connects.
                    let source = drover_hypervisor::migration::receive::Prefaulted::new(
                        &listen,
                        secret.trim_ascii(),
                        expected.clone(),
                    );
                    let origin = here.origin(Box::new(source));
                    return run_vm(&here.apply(expected), origin);
                }
                let incoming =
                    drover_hypervisor::migration::receive::accept(&listen, secret.trim_ascii(), expected.as_ref())?;
                let config = incoming.config.clone();
                let origin = here.origin(Box::new(incoming));
                run_vm(&here.apply(config), origin)
            })();
            finish(result)
        }
        Command::KvmCheck { device } => match drover_hypervisor::kvm_probe::probe_device(&device) {
            Ok(facts) => {
                println!("{}", serde_json::to_string_pretty(&facts).unwrap_or_default());
                if facts.usable() {
                    tracing::info!(max_vcpus = facts.max_vcpus, "KVM can run Drover VMs");
                    ExitCode::SUCCESS
                } else {
                    tracing::error!("KVM lacks capabilities Drover needs: {:?}", facts.capabilities);
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Api { socket, method, path, body } => {
            match drover_vmm_api::client::request(&socket, &method, &path, body.as_deref()) {
                Ok((status, reply)) => {
                    println!("{reply}");
                    if (200..300).contains(&status) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
                }
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::WriteTestGuest { path } => match std::fs::write(&path, drover_hypervisor::TEST_GUEST) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("writing {}: {e}", path.display());
                ExitCode::FAILURE
            }
        },
    }
}
