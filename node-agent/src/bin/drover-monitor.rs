//! `drover-monitor`: stays with one VMM for its whole life; see `drover_agent::monitor`.
//! Started by `drover-agent`, not by hand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use drover_agent::monitor::{self, MonitorArgs};
use drover_agent::vm_dir::VmDir;

#[derive(Parser)]
#[command(
    name = "drover-monitor",
    version,
    about = "Keeps one drover-vmm company: serial log, fencing watchdog, exit record"
)]
struct Cli {
    /// The VM's runtime directory.
    #[arg(long)]
    dir: PathBuf,
    /// The host's fencing deadline file: the VM is powered off once it passes.
    #[arg(long)]
    fence_file: PathBuf,
    /// Where the serial output is kept.
    #[arg(long)]
    serial_log: PathBuf,
    /// Size at which the serial log rotates (one older file is kept).
    #[arg(long, default_value_t = 1 << 20)]
    serial_max_bytes: u64,
    /// The VMM command line.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = MonitorArgs {
        dir: VmDir { path: cli.dir },
        fence_file: cli.fence_file,
        serial_log: cli.serial_log,
        serial_max_bytes: cli.serial_max_bytes,
        command: cli.command,
    };
    match monitor::run(&args) {
        Ok(record) => {
            eprintln!("drover-monitor: VMM ended: {}", record.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("drover-monitor: {e}");
            ExitCode::FAILURE
        }
    }
}
