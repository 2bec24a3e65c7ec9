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

    /// How long after the last accepted renewal the host looks isolated, for the
    /// Shutdown isolation response (see `heartbeat`): half the fencing time `F`, so
    /// that guests get the other half to shut down, but never before two renewal
    /// intervals. By then the renewal sent one interval after the last accepted one
    /// has had a whole interval to be accepted (its attempt is cut off after one), so
    /// a single late or failed renewal never asks a guest to shut down: a request that
    /// cannot be taken back. `Timing::new` keeps `F` at two intervals or more, so the
    /// moment is never past the deadline; at the defaults (1 s, 3 s) it is 2 s, and
    /// guests get 0.4 s: Shutdown wants a longer failure detection time.
    pub fn isolated_after(&self) -> Duration {
        (self.fence_after / 2).max(2 * self.renew_interval).min(self.fence_after)
    }

    /// How long before the fencing deadline the Shutdown response asks guests to
    /// shut down: the most a guest has before it is powered off.
    pub fn shutdown_lead(&self) -> Duration {
        self.fence_after - self.isolated_after()
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

    #[test]
    fn a_host_looks_isolated_at_half_the_fencing_time_but_never_after_one_missed_renewal() {
        let ms = Duration::from_millis;
        // (interval ms, lease s) → (isolated after, guests' time before the deadline)
        for (interval_ms, lease_s, isolated, lead) in [
            (1000, 3, ms(2000), ms(400)),  // F 2.4 s: two intervals come after F/2
            (1000, 5, ms(2000), ms(2000)), // F 4 s: F/2 is two intervals
            (1000, 10, ms(4000), ms(4000)),
            (1000, 30, ms(12000), ms(12000)),
            (200, 2, ms(750), ms(750)), // F 1.5 s
            (5000, 60, ms(24000), ms(24000)),
            (2000, 5, ms(4000), ms(0)), // F 4 s = two intervals: no time to ask in
        ] {
            let t = Timing::new(ms(interval_ms), Duration::from_secs(lease_s)).unwrap();
            assert_eq!((t.isolated_after(), t.shutdown_lead()), (isolated, lead), "{t:?}");
            assert!(t.isolated_after() >= 2 * t.renew_interval, "{t:?}");
            assert!(t.isolated_after() <= t.fence_after, "{t:?}");
        }
    }
}
