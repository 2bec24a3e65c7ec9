//! Pre-copy: guest memory copied while the guest runs, pass after pass, each
//! pass sending what the guest dirtied during the last, until the convergence
//! decision (`converge::decide`) calls for the switch-over, or gives up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_vmm_api::api::{MigrateRequest, MigrationPhase as Phase};

use super::converge::{self, Decision, Limits, Pass};
use super::lanes::{Lane, send_pages, sent, sync};
use super::throttle::Throttle;
use crate::Error;
use crate::control::VmControl;
use crate::memory::PageBitmap;
use crate::migration::wire::PAGE_SIZE;

/// A pass that moves less than this measures latency more than bandwidth: it
/// can only raise the bandwidth estimate, never lower it.
const BANDWIDTH_SAMPLE_BYTES: u64 = 1 << 20;

/// What pre-copy leaves to the switch-over.
pub struct Converged {
    /// Pages dirtied since the last pass, taken from KVM but not sent yet: they
    /// go with the last ones at switch-over.
    pub pending: PageBitmap,
    /// The throttle, which the switch-over takes over (it may hold the vCPUs).
    pub throttle: Throttle,
}

/// Copies guest memory over `lanes` while the guest runs, until the switch-over
/// may come (or `req`'s limits, its deadline or a cancel say stop). Dirty logging
/// is on, and its log was just read.
pub fn precopy(
    control: &Arc<VmControl>,
    req: &MigrateRequest,
    lanes: &mut [Lane],
    started: Instant,
    deadline: Instant,
) -> Result<Converged, Error> {
    let vm = control.vm();
    let limits = Limits { max_downtime_ms: req.max_downtime_ms, max_passes: req.max_passes };
    control.migration().update(|s| s.phase = Phase::PreCopy);
    // Pass 1: every page that is not zero (the target starts with zeroed memory).
    // Pages the host never gave the guest are zero without reading them; the rest
    // are read and their zero pages skipped.
    let pass_start = Instant::now();
    let candidates = crate::memory::populated_pages(&vm.memory, lanes.len()).unwrap_or_else(|e| {
        tracing::warn!("reading every guest page ({e})");
        PageBitmap::all_of(&vm.memory)
    });
    tracing::debug!(us = pass_start.elapsed().as_micros() as u64, "pass 1: pages the host has, read from pagemap");
    send_pages(control, lanes, &candidates, candidates.page_count(), true)?;
    sync(lanes)?;
    let (bytes, pages) = sent(lanes);
    let mut bandwidth = rate(bytes, pass_start.elapsed());
    control.migration().update(|s| {
        s.pass = 1;
        s.bandwidth_bps = bandwidth;
        s.bytes_sent = bytes;
        s.total_ms = started.elapsed().as_millis() as u64;
    });

    let throttle = Throttle::new(control.clone());
    let mut pass = 1;
    // What the last pass sent: a pass that dirties half of it or more does not converge.
    let mut last_sent = pages.max(1);
    // When the dirty log was last read: the guest's dirty rate is what it dirtied since.
    let mut logged_at = pass_start;
    // The pages dirtied since the last pass, once the decision is to switch over.
    let pending = loop {
        check(control, deadline)?;
        let pass_start = Instant::now();
        let dirty = vm.take_dirty_pages()?;
        let count = dirty.page_count();
        let figures = Pass {
            number: pass,
            dirty_pages: count,
            last_sent,
            dirty_rate: rate(count * PAGE_SIZE as u64, logged_at.elapsed()),
            bandwidth,
            throttle_percent: throttle.percent(),
        };
        logged_at = pass_start;
        let estimate = converge::estimate(count, bandwidth);
        let decision = converge::decide(&figures, &limits);
        tracing::debug!(
            pass,
            dirty_pages = count,
            estimate_us = estimate.pages_us,
            bandwidth,
            ?decision,
            "migration pass"
        );
        control.migration().update(|s| {
            s.dirty_pages = count;
            s.estimated_downtime_ms = estimate.total_ms;
            s.bytes_sent = sent(lanes).0;
            s.total_ms = started.elapsed().as_millis() as u64;
        });
        match decision {
            Decision::SwitchOver(_) => break dirty,
            Decision::GiveUp => {
                throttle.stop();
                return Err(Error::Migration(format!(
                    "did not converge in {} passes: the guest still dirties {} MiB per pass (estimated pause {} ms, budget {} ms)",
                    req.max_passes,
                    (count * PAGE_SIZE as u64) >> 20,
                    estimate.total_ms,
                    req.max_downtime_ms
                )));
            }
            Decision::Throttle { percent } => throttle.set(percent),
            Decision::Continue(_) => {}
        }
        pass += 1;
        last_sent = count;
        let before = sent(lanes).0;
        send_pages(control, lanes, &dirty, count, false)?;
        sync(lanes)?;
        let elapsed = pass_start.elapsed();
        // The link as the last pass found it (end to end, see `sync`), as QEMU
        // measures it, rather than the best rate seen so far.
        let moved = sent(lanes).0 - before;
        let measured = rate(moved, elapsed);
        if moved >= BANDWIDTH_SAMPLE_BYTES || measured > bandwidth {
            bandwidth = measured;
        }
        control.migration().update(|s| {
            s.pass = pass;
            s.bandwidth_bps = bandwidth;
            s.dirty_rate_bps = rate(count * PAGE_SIZE as u64, elapsed);
            s.throttle_percent = throttle.percent();
        });
    };
    Ok(Converged { pending, throttle })
}

/// Stops between passes when the migration was cancelled or ran out of time.
fn check(control: &VmControl, deadline: Instant) -> Result<(), Error> {
    if control.migration().cancelled() {
        return Err(Error::Migration("cancelled".into()));
    }
    if Instant::now() > deadline {
        return Err(Error::Migration("timed out".into()));
    }
    Ok(())
}

fn rate(bytes: u64, elapsed: Duration) -> u64 {
    (bytes as f64 / elapsed.as_secs_f64().max(1e-6)) as u64
}
