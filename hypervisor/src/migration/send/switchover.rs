//! The switch-over: the guest paused, the last dirty pages and the VM's state
//! sent, then the handshake that hands the VM over. Until the target says it is
//! Ready, any failure resumes the guest here; once this VMM has sent `Go` it
//! never runs the guest again, whatever happens (the point of no return).

use std::time::Instant;

use drover_vmm_api::api::MigrationPhase as Phase;

use super::lanes::{Lane, send_pages, sent};
use super::precopy::Converged;
use crate::Error;
use crate::control::VmControl;
use crate::migration::wire::Frame;

/// How a migration that did not complete ended.
pub enum Outcome {
    /// The VM runs here again (or never stopped).
    Failed(Error),
    /// Past the point of no return: the VM is paused here, and may run there.
    Unknown(Error),
}

impl<E> From<E> for Outcome
where
    Error: From<E>,
{
    fn from(e: E) -> Self {
        Outcome::Failed(e.into())
    }
}

/// Pauses the guest, sends what pre-copy left and the VM's state, and hands the
/// VM over to the target. The downtime counts from the pause to the target's
/// confirmation that the VM runs there.
pub fn switch_over(control: &VmControl, lanes: &mut [Lane], converged: Converged) -> Result<(), Outcome> {
    let Converged { pending, throttle } = converged;
    throttle.hand_over();
    let vm = control.vm();
    control.migration().update(|s| s.phase = Phase::Switchover);
    let paused_at = Instant::now();
    // The vCPUs save their state as they park, while the last pages go.
    control.pause_and_save()?;
    let step = |what: &str| tracing::debug!(us = paused_at.elapsed().as_micros() as u64, "switch-over: {what}");
    step("paused");
    let handover = (|| -> Result<(), Error> {
        let mut dirty = vm.take_dirty_pages()?;
        step("dirty log read");
        dirty.merge(&pending);
        let last_pages = dirty.page_count();
        tracing::debug!(pages = last_pages, "switch-over: pages to send paused");
        send_pages(control, lanes, &dirty, last_pages, false)?;
        for lane in lanes.iter_mut().skip(1) {
            lane.send(&Frame::Done)?;
        }
        step("last pages sent");
        let state = control.save_state()?.encode()?;
        step("state captured");
        let main = &mut lanes[0];
        crate::migration::wire::write_frame(&mut main.out, &Frame::State(state))?;
        main.send(&Frame::Done)?;
        main.wait_for("Ready")?;
        step("target ready");
        Ok(())
    })();
    if let Err(e) = handover {
        control.resume();
        return Err(e.into());
    }
    // The point of no return: from here on this VMM never runs the guest again.
    control.migration().commit();
    let main = &mut lanes[0];
    let confirmed = (|| -> Result<(), Error> {
        crate::migration::wire::write_frame(&mut main.out, &Frame::Go)?;
        std::io::Write::flush(&mut main.out).map_err(|e| Error::Migration(format!("sending Go: {e}")))?;
        main.wait_for("Resumed")
    })();
    let downtime = paused_at.elapsed();
    let (bytes, pages) = sent(lanes);
    control.migration().update(|s| {
        s.downtime_ms = Some(downtime.as_millis() as u64);
        s.downtime_us = Some(downtime.as_micros() as u64);
        s.bytes_sent = bytes;
        s.pages_sent = pages;
    });
    confirmed.map_err(Outcome::Unknown)?;
    control.migration().update(|s| s.phase = Phase::Completed);
    Ok(())
}
