//! Each VM's CPU demand over a window: the agents publish `status.cpuUsage` (host
//! cores, sampled over a few seconds); DRS balances on their mean over its
//! interval, so a burst does not move a VM and a busy hour does. Kept by the
//! leader in memory: a new leader starts from the current figures.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use drover_core::snapshot::VmKey;

/// The longest window kept (the longest DRS interval).
const KEPT: Duration = Duration::from_secs(3600);

/// CPU use samples per VM.
#[derive(Debug, Default)]
pub struct DemandWindow {
    samples: HashMap<VmKey, VecDeque<(Instant, f64)>>,
}

impl DemandWindow {
    /// Records that `vm` used `cores` at `now`.
    pub fn record(&mut self, vm: &VmKey, cores: f64, now: Instant) {
        let samples = self.samples.entry(vm.clone()).or_default();
        samples.push_back((now, cores));
        while samples.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) > KEPT) {
            samples.pop_front();
        }
    }

    /// `vm`'s mean use over the `window` before `now`, if it has samples there.
    pub fn mean(&self, vm: &VmKey, window: Duration, now: Instant) -> Option<f64> {
        let samples = self.samples.get(vm)?;
        let recent: Vec<f64> =
            samples.iter().filter(|(at, _)| now.saturating_duration_since(*at) <= window).map(|(_, c)| *c).collect();
        (!recent.is_empty()).then(|| recent.iter().sum::<f64>() / recent.len() as f64)
    }

    /// Forgets the VMs not in `live` (deleted, or no longer running).
    pub fn retain(&mut self, live: &HashSet<VmKey>) {
        self.samples.retain(|vm, _| live.contains(vm));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mean_is_over_the_window_only() {
        let t0 = Instant::now();
        let vm = VmKey::new("ns", "a");
        let mut w = DemandWindow::default();
        assert_eq!(w.mean(&vm, Duration::from_secs(10), t0), None);
        w.record(&vm, 4.0, t0);
        for i in 1..=10 {
            w.record(&vm, 1.0, t0 + Duration::from_secs(20 + i));
        }
        let now = t0 + Duration::from_secs(30);
        assert_eq!(w.mean(&vm, Duration::from_secs(10), now), Some(1.0));
        assert_eq!(w.mean(&vm, Duration::from_secs(60), now), Some(14.0 / 11.0));
        w.retain(&HashSet::new());
        assert_eq!(w.mean(&vm, Duration::from_secs(60), now), None);
    }
}
