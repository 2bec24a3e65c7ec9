//! The host's heartbeat (a `Lease` renewed at a short interval) and the isolation
//! response: a host that cannot renew powers its VMs off before anyone may restart
//! them elsewhere, after asking their guests to shut down if its HostPolicy says
//! `ha.isolationResponse: Shutdown`.
//!
//! # Why a VM never runs on two hosts
//!
//! Let `D` be the lease duration (written in the Lease as `leaseDurationSeconds`)
//! and `F = D - margin` the fencing deadline. The agent notes the time `s` (its own
//! `CLOCK_BOOTTIME`) just *before* sending each renewal; when the API server accepts
//! that renewal, the host's VMs may run until `s + F` (the deadline file of `fence`),
//! and no VM starts on a host past its deadline. The monitor of every VM kills it
//! within `monitor::POLL` of the deadline, even if the agent is dead.
//!
//! The operator declares a host failed only when it has seen no change of the
//! Lease's renewal for `D`, timed on *its own* clock from the moment it observed the
//! last change — it never compares the Lease's timestamps with its clock, so skew
//! between the two clocks plays no part. That observation happens after the write,
//! which happens after `s`; so the operator restarts a VM at the earliest at
//! `s + D` in real time, while the VM was killed by `s + F + POLL`. The margin
//! `D - F` covers `POLL`, the time a kill takes, and clock *rate* differences
//! (drift, bounded by NTP at 500 ppm: 1.5 ms over 3 s). A renewal the agent saw fail
//! may still have been written: that only makes the operator's `s` later, never the
//! agent's deadline later, so the bound holds.
//!
//! # The isolation response
//!
//! PowerOff (the default): nothing happens before the deadline; at it the agent
//! SIGKILLs every VMM, as the monitors do on their own.
//!
//! Shutdown asks the guests first, and changes nothing above: the deadline is set
//! and kept exactly as for PowerOff, and the monitors still kill whatever runs at
//! `s + F`, agent or no agent. The host *looks isolated* once no renewal has been
//! accepted for `Timing::isolated_after` since `s`: half of `F`, so that guests get
//! the other half, but never less than two renewal intervals, so that a single late
//! or failed renewal never counts (the request cannot be taken back). From then on
//! the agent asks each running VMM's guest to shut down, once per VM and isolation
//! (`PUT /vm/ctrl-alt-del`: Ctrl+Alt+Del on its keyboard), recording
//! `StopReason::IsolationShutdown` first, and goes on trying to renew. A guest has
//! at most `Timing::shutdown_lead` before the deadline. One that powers off in time
//! ends cleanly, its VM Stopped with the reason; one that reboots (what systemd
//! does with Ctrl+Alt+Del unless told otherwise) ends with the reset exit and is not
//! booted again (a stop reason is recorded); one that ignores the request, or whose
//! VMM refuses it (a migration under way), is powered off at the deadline, and the
//! fencing reason replaces the request's. The moment is taken from the deadline in
//! force (`deadline - shutdown_lead`, the current timing's lead), so an agent that
//! restarted asks on the deadline it inherited; renewal attempts are cut off at it,
//! as they are at the deadline, so that it is not missed by a renewal that hangs.
//!
//! A renewal accepted again before the deadline ends the isolation: VMs still
//! running are left alone and their requests withdrawn (the stop reason removed),
//! so a later end is not blamed on an isolation that passed. Their guests may be
//! shutting down already, and nothing calls that back: that is the cost of
//! Shutdown, and why it waits for two missed renewals. Such a guest's end is then
//! its own (a power-off Stopped, a reboot booted again in place).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use drover_crds::host_policy::IsolationResponse;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use tokio::sync::watch;

use crate::Error;
use crate::fence;
use crate::host_facts::HostFacts;
use crate::settings::Settings;
use crate::supervisor::{Supervisor, VmmState};
use crate::timing::Timing;
use crate::vm_dir::StopReason;

/// How long a VMM may take to answer a request to shut its guest down (it answers
/// in milliseconds; one that does not is powered off at the deadline anyway).
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Renews the Lease forever. `leased` is true while the host may run VMs (a renewal
/// was accepted and the deadline has not passed); it turns false, and every VM is
/// powered off, when the deadline passes. `isolation` is the HostPolicy's isolation
/// response: with Shutdown, guests are asked to shut down before the deadline.
pub async fn run(
    client: kube::Client,
    settings: Arc<Settings>,
    supervisor: Arc<Supervisor>,
    facts: watch::Receiver<Option<HostFacts>>,
    isolation: watch::Receiver<IsolationResponse>,
    leased: watch::Sender<bool>,
) {
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut timing = settings.timing;
    let mut response = IsolationResponse::default();
    let mut deadline: Option<u64> = None;
    // The deadline an earlier agent promised (this one may run with a shorter lease).
    let mut inherited = fence::read_deadline(&fence::deadline_file(&settings.runtime_dir));
    let mut failures = 0u32;
    // The VMs (by uid) whose guests were asked to shut down in this isolation.
    let mut asked: HashSet<String> = HashSet::new();
    loop {
        let wanted = timing_for(&settings, facts.borrow().as_ref());
        if wanted != timing {
            tracing::info!(interval = ?wanted.renew_interval, lease_duration = ?wanted.lease_duration, fence_after = ?wanted.fence_after, "heartbeat timing changed");
            timing = wanted;
        }
        let wanted = *isolation.borrow();
        if wanted != response {
            tracing::info!(response = ?wanted, shutdown_lead = ?timing.shutdown_lead(), "isolation response changed");
            response = wanted;
        }
        let sent = fence::boottime_ns();
        // A shorter lease takes effect with this renewal; the deadline promised by
        // the last one may lie beyond what the new lease allows. Bring it in first,
        // so that even a crash right after the renewal cannot leave VMs running
        // past the new lease.
        let next = sent + timing.fence_after.as_nanos() as u64;
        if deadline.or(inherited).is_some_and(|d| d > next) {
            if let Err(e) = fence::write_deadline(&settings.runtime_dir, sent, timing.fence_after) {
                tracing::error!("cannot bring the fencing deadline in: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            deadline = Some(next);
            inherited = None;
        }
        // A renewal that takes longer than the time left before the deadline (or,
        // for Shutdown, before the guests are to be asked) is useless; cut it off
        // there so that the isolation response acts in time.
        let left = deadline
            .map(|d| Duration::from_nanos(next_step_at(response, &timing, d, sent).saturating_sub(sent)))
            .unwrap_or(timing.renew_interval);
        let attempt = tokio::time::timeout(
            left.clamp(Duration::from_millis(100), timing.renew_interval),
            renew(&leases, &settings, timing),
        )
        .await;
        match attempt {
            Ok(Ok(())) => {
                match fence::write_deadline(&settings.runtime_dir, sent, timing.fence_after) {
                    Ok(()) => {
                        deadline = Some(sent + timing.fence_after.as_nanos() as u64);
                        if !*leased.borrow() {
                            tracing::info!(lease = %format!("{}/{}", settings.namespace, settings.node), "holding the heartbeat lease: VMs may run");
                        }
                        failures = 0;
                        leased.send_replace(true);
                        if !asked.is_empty() {
                            end_isolation(&supervisor, &mut asked);
                        }
                    }
                    Err(e) => tracing::error!("cannot move the fencing deadline: {e}"),
                }
                tokio::time::sleep(
                    timing.renew_interval.saturating_sub(Duration::from_nanos(fence::boottime_ns() - sent)),
                )
                .await;
                continue;
            }
            Ok(Err(e)) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!("heartbeat not renewed: {e}");
                }
            }
            Err(_) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!("heartbeat not renewed: no answer from the API server in time");
                }
            }
        }
        match isolation_step(response, &timing, deadline.or(inherited), fence::boottime_ns()) {
            Step::PowerOff if *leased.borrow() => {
                leased.send_replace(false);
                let killed = supervisor.kill_all(StopReason::Fenced);
                tracing::error!(
                    vms = killed,
                    "fencing: the heartbeat lease was not renewed for {:?}; powered off every VM of this host; none starts until the lease is renewed",
                    timing.fence_after
                );
            }
            Step::AskGuests => {
                let first = asked.is_empty();
                let count = ask_guests(&supervisor, &mut asked);
                if first && count > 0 {
                    tracing::warn!(
                        vms = count,
                        "the host looks isolated: no heartbeat renewal accepted for {:?}; asking every guest to shut down (isolation response Shutdown); what still runs in {:?} is powered off",
                        timing.isolated_after(),
                        timing.shutdown_lead()
                    );
                }
            }
            Step::PowerOff | Step::Wait => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the isolation response does now, while renewals fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet: a renewal may still be accepted.
    Wait,
    /// Shutdown, and the host looks isolated: ask every guest not asked yet to shut down.
    AskGuests,
    /// The deadline passed, or none was ever promised: every VM is to be powered off.
    PowerOff,
}

/// The isolation response's decision for `now`, given the deadline in force (all
/// on `CLOCK_BOOTTIME`, in nanoseconds). PowerOff only waits for the deadline;
/// Shutdown asks the guests from `Timing::shutdown_lead` before it.
pub fn isolation_step(response: IsolationResponse, timing: &Timing, deadline: Option<u64>, now: u64) -> Step {
    match deadline {
        None => Step::PowerOff,
        Some(d) if now >= d => Step::PowerOff,
        Some(d) if response == IsolationResponse::Shutdown && now >= ask_at(timing, d) => Step::AskGuests,
        Some(_) => Step::Wait,
    }
}

/// The next moment at or after `now` at which [`isolation_step`] may change: the
/// request to the guests while it lies ahead (Shutdown), else the deadline.
pub fn next_step_at(response: IsolationResponse, timing: &Timing, deadline: u64, now: u64) -> u64 {
    let ask = ask_at(timing, deadline);
    if response == IsolationResponse::Shutdown && now < ask { ask } else { deadline }
}

/// When the Shutdown response asks the guests, for a deadline.
fn ask_at(timing: &Timing, deadline: u64) -> u64 {
    deadline.saturating_sub(timing.shutdown_lead().as_nanos() as u64)
}

/// Asks the guest of every running VMM not asked yet to shut down; returns how many
/// were asked. The stop reason is recorded here, before the request leaves (an end
/// that follows at once is reported with it, and a renewal that ends the isolation
/// finds it to withdraw); the requests themselves run on blocking threads, so that
/// a VMM slow to answer never holds up the heartbeat.
fn ask_guests(supervisor: &Supervisor, asked: &mut HashSet<String>) -> usize {
    let mut count = 0;
    for vm in supervisor.all() {
        let uid = vm.meta.uid.clone();
        if asked.contains(&uid) || supervisor.state(&uid) != Some(VmmState::Running) {
            continue;
        }
        asked.insert(uid.clone());
        let Some(request) = supervisor.ask_to_shut_down(&uid, StopReason::IsolationShutdown, ASK_TIMEOUT) else {
            continue;
        };
        count += 1;
        let name = format!("{}/{}", vm.meta.namespace, vm.meta.name);
        tokio::task::spawn_blocking(move || match request() {
            Ok(()) => tracing::info!(vm = %name, "asked the guest to shut down (isolation response Shutdown)"),
            Err(e) => {
                tracing::warn!(vm = %name, "cannot ask the guest to shut down ({e}); it is powered off at the deadline if it still runs")
            }
        });
    }
    count
}

/// A renewal was accepted again: the VMs whose guests were asked and still run are
/// left alone, and their requests withdrawn.
fn end_isolation(supervisor: &Supervisor, asked: &mut HashSet<String>) {
    let mut running = 0;
    for uid in asked.drain() {
        if supervisor.state(&uid) == Some(VmmState::Running) {
            supervisor.withdraw_stop_reason(&uid, StopReason::IsolationShutdown);
            running += 1;
        }
    }
    tracing::warn!(
        vms = running,
        "heartbeat lease renewed again before the deadline: VMs asked to shut down that still run are left alone (their guests may be shutting down)"
    );
}

/// The timing to use: the HostPolicy's, when one selects the host and its values
/// leave room for the margin; else the agent's flags.
pub fn timing_for(settings: &Settings, facts: Option<&HostFacts>) -> Timing {
    let Some(hb) = facts.and_then(|f| f.heartbeat) else { return settings.timing };
    match Timing::new(
        Duration::from_secs(hb.interval_seconds.into()),
        Duration::from_secs(hb.lease_duration_seconds.into()),
    ) {
        Ok(timing) => timing,
        Err(e) => {
            tracing::warn!("HostPolicy heartbeat settings not used ({e}); keeping the agent's");
            settings.timing
        }
    }
}

/// One renewal: a merge patch of the Lease's holder and times (only this host's
/// agent writes its Lease), creating it the first time.
async fn renew(leases: &Api<Lease>, settings: &Settings, timing: Timing) -> Result<(), Error> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let seconds = timing.lease_duration.as_secs() as i32;
    let patch = serde_json::json!({
        "spec": { "holderIdentity": settings.node, "leaseDurationSeconds": seconds, "renewTime": now }
    });
    match leases.patch(&settings.node, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            let lease: Lease = serde_json::from_value(serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": { "name": settings.node, "namespace": settings.namespace,
                              "labels": { "drover.dev/heartbeat": "true" } },
                "spec": { "holderIdentity": settings.node, "leaseDurationSeconds": seconds,
                          "acquireTime": now, "renewTime": now }
            }))
            .map_err(|e| Error::Io(e.to_string()))?;
            leases.create(&PostParams::default(), &lease).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_policy_sets_the_timing_unless_it_leaves_no_margin() {
        use drover_crds::contract::{HeartbeatFact, HostFacts, KvmFact, Offered, TopologyFact};
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::settings::tests::settings(dir.path());
        let facts = |interval_seconds, lease_duration_seconds| HostFacts {
            kvm: KvmFact { usable: true, reason: None, max_vcpus: 1 },
            topology: TopologyFact {
                cpus: "0".into(),
                cores: 1,
                threads_per_core: 1,
                numa_nodes: vec![],
                memory_mib: 1,
                sibling_groups: vec![],
            },
            offered: Offered { cpus: "0".into(), vcpus: 1, memory_mib: 1, memory_overcommit_ratio: 1.0 },
            policy: Some("p".into()),
            heartbeat: Some(HeartbeatFact { interval_seconds, lease_duration_seconds }),
        };
        assert_eq!(timing_for(&settings, None), Timing::DEFAULT);
        let t = timing_for(&settings, Some(&facts(2, 10)));
        assert_eq!(
            (t.renew_interval, t.lease_duration, t.fence_after),
            (Duration::from_secs(2), Duration::from_secs(10), Duration::from_secs(8))
        );
        // 1 s heartbeats in a 2 s lease leave no margin: the flags stay.
        assert_eq!(timing_for(&settings, Some(&facts(1, 2))), Timing::DEFAULT);
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn power_off_waits_for_the_deadline_and_shutdown_asks_the_guests_first() {
        use IsolationResponse::{PowerOff, Shutdown};
        // 1 s heartbeats, 10 s lease: F = 8 s; the host looks isolated 4 s after the
        // last accepted renewal's send time s, 4 s before the deadline s + 8 s.
        let timing = Timing::new(Duration::from_secs(1), Duration::from_secs(10)).unwrap();
        let s = 1_000_000 * MS;
        let deadline = Some(s + 8000 * MS);
        // (response, deadline, now - s in ms) → step
        let cases = [
            (PowerOff, deadline, 0, Step::Wait),
            (PowerOff, deadline, 4000, Step::Wait),
            (PowerOff, deadline, 7999, Step::Wait),
            (PowerOff, deadline, 8000, Step::PowerOff),
            (PowerOff, deadline, 60_000, Step::PowerOff),
            (Shutdown, deadline, 0, Step::Wait),
            (Shutdown, deadline, 1500, Step::Wait), // one renewal missed: not yet
            (Shutdown, deadline, 3999, Step::Wait),
            (Shutdown, deadline, 4000, Step::AskGuests),
            (Shutdown, deadline, 7999, Step::AskGuests),
            // The deadline does not move for Shutdown.
            (Shutdown, deadline, 8000, Step::PowerOff),
            (Shutdown, deadline, 60_000, Step::PowerOff),
            // No deadline was ever promised: nothing may run.
            (PowerOff, None, 0, Step::PowerOff),
            (Shutdown, None, 0, Step::PowerOff),
        ];
        for (response, deadline, after_ms, step) in cases {
            assert_eq!(
                isolation_step(response, &timing, deadline, s + after_ms * MS),
                step,
                "{response:?} at {after_ms} ms"
            );
        }
    }

    #[test]
    fn shutdown_at_the_default_timing_asks_after_two_missed_renewals_and_never_with_no_time_left() {
        use IsolationResponse::Shutdown;
        // Defaults (1 s, 3 s): F = 2.4 s; asked at 2 s, 0.4 s before the deadline.
        let timing = Timing::DEFAULT;
        let deadline = 2400 * MS;
        let step = |now_ms| isolation_step(Shutdown, &timing, Some(deadline), now_ms * MS);
        assert_eq!((step(1999), step(2000), step(2400)), (Step::Wait, Step::AskGuests, Step::PowerOff));
        // 2 s heartbeats in a 5 s lease: F = 4 s = two intervals, no time to ask in.
        let tight = Timing::new(Duration::from_secs(2), Duration::from_secs(5)).unwrap();
        for now_ms in [0, 3999, 4000] {
            assert_ne!(isolation_step(Shutdown, &tight, Some(4000 * MS), now_ms * MS), Step::AskGuests, "{now_ms}");
        }
    }

    #[test]
    fn a_renewal_attempt_is_cut_off_at_the_next_step() {
        use IsolationResponse::{PowerOff, Shutdown};
        let timing = Timing::new(Duration::from_secs(1), Duration::from_secs(10)).unwrap();
        let deadline = 8000 * MS;
        // (response, now ms) → the next moment, ms
        for (response, now_ms, next_ms) in [
            (PowerOff, 0, 8000),
            (PowerOff, 5000, 8000),
            (Shutdown, 0, 4000),
            (Shutdown, 3999, 4000),
            (Shutdown, 4000, 8000), // asked: the deadline is next
            (Shutdown, 9000, 8000),
        ] {
            assert_eq!(
                next_step_at(response, &timing, deadline, now_ms * MS),
                next_ms * MS,
                "{response:?} at {now_ms}"
            );
        }
    }
}
