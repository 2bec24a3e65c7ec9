//! The host's heartbeat (a `Lease` renewed at a short interval) and the isolation
//! response: a host that cannot renew powers its VMs off before anyone may restart
//! them elsewhere.
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

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use tokio::sync::watch;

use crate::Error;
use crate::fence;
use crate::host_facts::HostFacts;
use crate::settings::Settings;
use crate::supervisor::Supervisor;
use crate::timing::Timing;
use crate::vm_dir::StopReason;

/// Renews the Lease forever. `leased` is true while the host may run VMs (a renewal
/// was accepted and the deadline has not passed); it turns false, and every VM is
/// powered off, when the deadline passes.
pub async fn run(
    client: kube::Client,
    settings: Arc<Settings>,
    supervisor: Arc<Supervisor>,
    facts: watch::Receiver<Option<HostFacts>>,
    leased: watch::Sender<bool>,
) {
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut timing = settings.timing;
    let mut deadline: Option<u64> = None;
    // The deadline an earlier agent promised (this one may run with a shorter lease).
    let mut inherited = fence::read_deadline(&fence::deadline_file(&settings.runtime_dir));
    let mut failures = 0u32;
    loop {
        let wanted = timing_for(&settings, facts.borrow().as_ref());
        if wanted != timing {
            tracing::info!(interval = ?wanted.renew_interval, lease_duration = ?wanted.lease_duration, fence_after = ?wanted.fence_after, "heartbeat timing changed");
            timing = wanted;
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
        // A renewal that takes longer than the time left before the deadline is
        // useless; cut it off there so the deadline is acted on in time.
        let left = deadline.map(|d| Duration::from_nanos(d.saturating_sub(sent))).unwrap_or(timing.renew_interval);
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
        let now = fence::boottime_ns();
        if deadline.is_none_or(|d| now >= d) && *leased.borrow() {
            leased.send_replace(false);
            let killed = supervisor.kill_all(StopReason::Fenced);
            tracing::error!(
                vms = killed,
                "fencing: the heartbeat lease was not renewed for {:?}; powered off every VM of this host; none starts until the lease is renewed",
                timing.fence_after
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
}
