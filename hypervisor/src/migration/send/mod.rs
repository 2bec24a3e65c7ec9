//! The source side of a live migration: pre-copy of guest memory while the guest
//! runs, then the switch-over. The guest stays on the source until the target has
//! the whole VM and the source has said it will never run it again (`Go`); any
//! failure before that resumes it here.
//!
//! - this module: the request (checked), the migration's thread, its outcome
//! - `connect`: the connections (handshake, Hello, lanes)
//! - `lanes`: sending pages on the lanes
//! - `precopy`: the passes while the guest runs
//! - `converge`: when pre-copy ends (a pure decision, tested on tables of passes)
//! - `throttle`: auto-converge, the vCPUs held a share of the time
//! - `switchover`: the last pages, the state, the hand-over

mod connect;
mod converge;
mod lanes;
mod precopy;
mod switchover;
mod throttle;

use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_vmm_api::api::MigrationPhase as Phase;

use super::wire::{self, Frame};
use crate::Error;
use crate::control::VmControl;
use crate::exit::VmExit;
use switchover::Outcome;

pub use drover_vmm_api::api::{DEFAULT_MAX_DOWNTIME_MS, MigrateRequest};

/// The number of lanes a request asks for, checked.
fn lanes(request: &MigrateRequest) -> Result<u32, Error> {
    match request.lanes {
        Some(n) if (1..=wire::MAX_LANES).contains(&n) => Ok(n),
        Some(n) => Err(Error::Config(format!("lanes is {n}: give 1 to {}", wire::MAX_LANES))),
        // A lane keeps one CPU busy at each end while pages flow (AES-GCM,
        // the kernel's TCP copies, CRC) and carries 2.5-3 GiB/s; lanes add up
        // until the host's memory or link is the limit. The work is the same
        // whatever the count, only spread: half the host's CPUs, up to 8,
        // leaves the other half to the guests for the second or less it
        // takes. Fully written 1 GiB guest on a 16-CPU host, 1/2/4/8 lanes:
        // 405/214/166/95 ms (QEMU 313 ms). On a 2-CPU host, which source and
        // target share, 2 lanes were no faster than 1.
        None => Ok((std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).clamp(1, 8) as u32),
    }
}

/// The shared secret a request gives, from the request or its file.
fn secret(request: &MigrateRequest) -> Result<Vec<u8>, Error> {
    match (&request.secret, &request.secret_file) {
        (Some(s), None) if !s.is_empty() => Ok(s.as_bytes().to_vec()),
        (None, Some(path)) => {
            let bytes =
                std::fs::read(path).map_err(|e| Error::Config(format!("secretFile {}: {e}", path.display())))?;
            let trimmed = bytes.trim_ascii().to_vec();
            if trimmed.is_empty() {
                Err(Error::Config(format!("secretFile {} is empty", path.display())))
            } else {
                Ok(trimmed)
            }
        }
        _ => Err(Error::Config("give exactly one of secret and secretFile".into())),
    }
}

/// Starts the migration in a thread of its own; progress goes to the control's
/// migration status. Refused if one is under way.
pub fn start(control: Arc<VmControl>, request: MigrateRequest) -> Result<(), Error> {
    let secret = secret(&request)?;
    let lanes = lanes(&request)?;
    control.migration().begin(&request.destination)?;
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let started = Instant::now();
            let result = migrate(&control, &request, &secret, lanes, started);
            control.migration().update(|s| s.total_ms = started.elapsed().as_millis() as u64);
            match result {
                Ok(()) => {
                    let s = control.migration_status();
                    tracing::info!(
                        destination = %request.destination,
                        downtime_ms = s.downtime_ms.unwrap_or(0),
                        downtime_us = s.downtime_us.unwrap_or(0),
                        total_ms = s.total_ms,
                        bytes_sent = s.bytes_sent,
                        passes = s.pass,
                        throttle_percent = s.throttle_percent,
                        "migration completed; the VM runs on the target"
                    );
                    write_status_file(&control, &request);
                    control.end(VmExit::MigratedOut(request.destination.clone()));
                }
                Err(Outcome::Failed(e)) => {
                    let cancelled = control.migration().cancelled();
                    tracing::warn!(
                        "migration to {} {}: {e}; the VM keeps running here",
                        request.destination,
                        if cancelled { "cancelled" } else { "failed" }
                    );
                    control.migration().update(|s| {
                        s.phase = if cancelled { Phase::Cancelled } else { Phase::Failed };
                        s.error = Some(e.to_string());
                    });
                }
                Err(Outcome::Unknown(e)) => {
                    tracing::error!(
                        "migration to {}: {e}; the VM stays paused here until someone checks the target",
                        request.destination
                    );
                    control.migration().update(|s| {
                        s.phase = Phase::Unknown;
                        s.error = Some(e.to_string());
                    });
                }
            }
            if !matches!(control.migration_status().phase, Phase::Completed) {
                write_status_file(&control, &request);
            }
            control.migration().finish();
        })
        .map_err(|e| Error::io("starting the migration thread", e))?;
    Ok(())
}

/// Writes the final figures where the request asked, as a whole file (temporary
/// file renamed) so that a reader never sees half.
fn write_status_file(control: &VmControl, request: &MigrateRequest) {
    let Some(path) = &request.status_file else { return };
    let tmp = path.with_extension("tmp");
    let result = serde_json::to_vec(&control.migration_status())
        .map_err(std::io::Error::other)
        .and_then(|json| std::fs::write(&tmp, json))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        tracing::warn!("cannot write the migration figures to {}: {e}", path.display());
    }
}

/// Connects, pre-copies and switches over; on a failure before the point of no
/// return, tells the target the source gave up (the VM runs here again).
fn migrate(
    control: &Arc<VmControl>,
    req: &MigrateRequest,
    secret: &[u8],
    lanes: u32,
    started: Instant,
) -> Result<(), Outcome> {
    let deadline = started + Duration::from_secs(req.timeout_seconds);
    let mut lanes = connect::open(control, &req.destination, secret, lanes)?;
    let vm = control.vm();
    vm.set_dirty_logging(true)?;
    // Start from an empty log: what the guest writes from now on shows in the next pass.
    vm.take_dirty_pages()?;
    let result = precopy::precopy(control, req, &mut lanes, started, deadline)
        .map_err(Outcome::Failed)
        .and_then(|converged| switchover::switch_over(control, &mut lanes, converged));
    if let Err(Outcome::Failed(_)) = result {
        if let Err(e) = vm.set_dirty_logging(false) {
            tracing::warn!("turning dirty logging off: {e}");
        }
        let _ = lanes[0].send(&Frame::Abort("the source gave up".into()));
    }
    result
}
