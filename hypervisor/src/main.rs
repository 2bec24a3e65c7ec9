//! `drover-vmm`: runs one Drover VM. Today: `drover-vmm kvm-check` reports whether
//! this host's KVM can run Drover VMs.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "drover-vmm", version, about = "Drover's VMM: one process per virtual machine, on KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report what /dev/kvm offers (API version, vCPU limits, needed capabilities) as
    /// JSON; exit status 1 when it cannot run Drover VMs.
    KvmCheck,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::KvmCheck => match drover_hypervisor::kvm_probe::probe() {
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
    }
}
