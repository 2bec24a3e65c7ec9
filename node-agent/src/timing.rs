//! The host's heartbeat and fencing timings: how often the Lease is renewed, how
//! long it lasts, and how long after the last accepted renewal the host's VMs may
//! run. Read by the settings (the agent's flags), the heartbeat (which may take a
//! HostPolicy's instead) and, through the deadline file, every VM monitor; why the
//! numbers keep a VM from running on two hosts is spelled out in `heartbeat`.

use std::time::Duration;

use crate::Error;

/// Heartbeat and fencing timings: from the HostPolicy that selects the host
/// (`ha.heartbeatIntervalSeconds`, `ha.failureDetectionSeconds` as the lease
/// duration), else from the agent's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How often the Lease is renewed.
    pub renew_interval: Duration,
    /// `leaseDurationSeconds`: how long the operator waits before declaring the host failed.
    pub lease_duration: Duration,
    /// How long after the last accepted renewal the host's VMs may run.
    pub fence_after: Duration,
}

impl Timing {
    /// The defaults match HostPolicy's (1 s heartbeat, 3 s detection): VMs of a
    /// failed host can be restarted elsewhere 3 s after its last heartbeat, within
    /// the 5 s the design asks for, and an isolated host has fenced 0.6 s before.
    pub const DEFAULT: Timing = Timing {
        renew_interval: Duration::from_secs(1),
        lease_duration: Duration::from_secs(3),
        fence_after: Duration::from_millis(2400),
    };

    /// Timings for an interval and a lease duration: the margin is a fifth of the
    /// duration, at least 500 ms (ten monitor polls, a kill, and drift).
    pub fn new(renew_interval: Duration, lease_duration: Duration) -> Result<Self, Error> {
        let margin = (lease_duration / 5).max(Duration::from_millis(500));
        if lease_duration < 2 * renew_interval + margin {
            return Err(Error::Config(format!(
                "--lease-duration {lease_duration:?} must be at least two heartbeat intervals ({renew_interval:?} each) plus a {margin:?} margin"
            )));
        }
        if lease_duration.subsec_nanos() != 0 {
            return Err(Error::Config("--lease-duration must be whole seconds (a Lease counts seconds)".into()));
        }
        Ok(Self { renew_interval, lease_duration, fence_after: lease_duration - margin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_timing_is_what_new_computes() {
        assert_eq!(Timing::new(Duration::from_secs(1), Duration::from_secs(3)).unwrap(), Timing::DEFAULT);
    }

    #[test]
    fn fencing_always_comes_a_margin_before_the_lease_runs_out() {
        for (interval_ms, lease_s) in [(1000, 3), (200, 2), (1000, 10), (5000, 60)] {
            let t = Timing::new(Duration::from_millis(interval_ms), Duration::from_secs(lease_s)).unwrap();
            let margin = t.lease_duration - t.fence_after;
            assert!(margin >= Duration::from_millis(500), "{t:?}");
            assert!(margin >= crate::monitor::POLL * 5, "{t:?}");
            assert!(t.fence_after >= 2 * t.renew_interval, "a single late renewal must not fence: {t:?}");
        }
        assert!(Timing::new(Duration::from_secs(1), Duration::from_secs(2)).is_err());
        assert!(Timing::new(Duration::from_secs(1), Duration::from_millis(3500)).is_err());
    }
}
