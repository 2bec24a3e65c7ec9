//! Hosts' heartbeats, timed on the operator's own clock.
//!
//! The agent's fencing argument (`node-agent/src/heartbeat.rs`) needs this: a host
//! counts as failed only when its Lease has not changed for the lease duration,
//! measured from when *this process* saw the last change — never by comparing the
//! Lease's `renewTime` with our clock, so clock skew between hosts plays no part. A
//! Lease seen for the first time counts as a change now: an operator that just
//! started waits a full lease duration before it calls a host failed.
//!
//! Every replica keeps this clock from its start, standbys too ([`Heartbeats`]):
//! a standby that takes over knows how long each host has been silent, so a host
//! that failed with the old leader (the leader ran on it, say) is declared failed
//! as soon as the new leader leads, not one lease duration later. All Leases come
//! through one watch: if that watch stalls, every host goes stale together and
//! no host is left to restart anything on, so a stalled watch never restarts a VM
//! that still runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};

/// What the operator saw of one host's Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    /// The renewal (holder and renew time, as written) last seen.
    renewal: String,
    /// When it was seen to change, on our clock.
    changed_at: Instant,
    /// The duration the Lease declares.
    duration: Duration,
}

/// A host's heartbeat as judged now.
#[derive(Clone, Debug, PartialEq)]
pub enum Heartbeat {
    /// Renewed within its lease duration.
    Fresh,
    /// Not renewed for `silent` (more than its duration).
    Stale { silent: Duration, duration: Duration },
    /// No Lease seen.
    Missing,
}

impl Heartbeat {
    pub fn is_fresh(&self) -> bool {
        matches!(self, Heartbeat::Fresh)
    }

    /// Seen, then not renewed for its duration: the host failed.
    pub fn is_stale(&self) -> bool {
        matches!(self, Heartbeat::Stale { .. })
    }

    /// Why the host is not ready, if it is not.
    pub fn problem(&self) -> Option<String> {
        match self {
            Heartbeat::Fresh => None,
            // Without the time silent, which grows: the reason stays the same
            // while the host stays failed (a VM waiting on it is not rewritten,
            // nor an Event sent, on every look).
            Heartbeat::Stale { duration, .. } => {
                Some(format!("no heartbeat for more than its Lease's {} s", duration.as_secs()))
            }
            Heartbeat::Missing => Some("no heartbeat Lease".into()),
        }
    }
}

/// Every host's Lease, as last seen.
#[derive(Clone, Debug, Default)]
pub struct LeaseClock {
    seen: HashMap<String, Seen>,
}

impl LeaseClock {
    /// Records a Lease seen at `now`; true if its renewal changed.
    pub fn observe(&mut self, lease: &Lease, now: Instant) -> bool {
        let Some(name) = lease.metadata.name.clone() else { return false };
        let spec = lease.spec.clone().unwrap_or_default();
        let renewal = format!(
            "{}|{}",
            spec.holder_identity.unwrap_or_default(),
            spec.renew_time.map(|t| t.0.to_string()).unwrap_or_default()
        );
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(3).max(1) as u64);
        match self.seen.get_mut(&name) {
            Some(seen) if seen.renewal == renewal => {
                seen.duration = duration;
                false
            }
            _ => {
                self.seen.insert(name, Seen { renewal, changed_at: now, duration });
                true
            }
        }
    }

    /// Forgets a deleted Lease.
    pub fn forget(&mut self, name: &str) {
        self.seen.remove(name);
    }

    /// `host`'s heartbeat at `now`.
    pub fn heartbeat(&self, host: &str, now: Instant) -> Heartbeat {
        match self.seen.get(host) {
            None => Heartbeat::Missing,
            Some(seen) => {
                let silent = now.saturating_duration_since(seen.changed_at);
                if silent <= seen.duration {
                    Heartbeat::Fresh
                } else {
                    Heartbeat::Stale { silent, duration: seen.duration }
                }
            }
        }
    }

    /// Hosts whose heartbeat is fresh at `now`.
    pub fn fresh_hosts(&self, now: Instant) -> Vec<String> {
        let mut hosts: Vec<String> = self.seen.keys().filter(|h| self.heartbeat(h, now).is_fresh()).cloned().collect();
        hosts.sort();
        hosts
    }
}

/// The shared clock, kept up to date by [`watch`].
pub type SharedClock = Arc<Mutex<LeaseClock>>;

fn lock(clock: &SharedClock) -> std::sync::MutexGuard<'_, LeaseClock> {
    clock.lock().unwrap_or_else(|p| p.into_inner())
}

/// `host`'s heartbeat now.
pub fn heartbeat(clock: &SharedClock, host: &str) -> Heartbeat {
    lock(clock).heartbeat(host, Instant::now())
}

/// The hosts' heartbeats as this replica sees them, kept from the process's start
/// whether it leads or not.
#[derive(Clone)]
pub struct Heartbeats {
    pub clock: SharedClock,
    flips: tokio::sync::watch::Receiver<u64>,
}

impl Heartbeats {
    /// Starts watching the heartbeat Leases of `namespace` (for the process's life).
    pub fn start(client: kube::Client, namespace: String) -> Heartbeats {
        let clock = SharedClock::default();
        let (tx, flips) = tokio::sync::watch::channel(0u64);
        tokio::spawn(watch(client, namespace, clock.clone(), move || tx.send_modify(|n| *n = n.wrapping_add(1))));
        Heartbeats { clock, flips }
    }

    /// Changes whenever the set of hosts with a fresh heartbeat changes.
    pub fn flips(&self) -> tokio::sync::watch::Receiver<u64> {
        let mut flips = self.flips.clone();
        flips.mark_unchanged();
        flips
    }
}

/// Watches the heartbeat Leases of `namespace` into `clock`, and calls `on_flip`
/// whenever the set of hosts with a fresh heartbeat changes (checked every 100
/// ms: a host goes stale without any event, and HA's restart time starts there).
pub async fn watch(client: kube::Client, namespace: String, clock: SharedClock, on_flip: impl Fn() + Send + 'static) {
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    let mut events = watcher(leases, watcher::Config::default()).default_backoff().boxed();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut fresh = Vec::new();
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease))) => {
                    lock(&clock).observe(&lease, Instant::now());
                }
                Some(Ok(watcher::Event::Delete(lease))) => {
                    if let Some(name) = lease.metadata.name.as_deref() {
                        lock(&clock).forget(name);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!("watching heartbeat Leases: {e}"),
                None => return,
            },
            _ = tick.tick() => {}
        }
        let now_fresh = lock(&clock).fresh_hosts(Instant::now());
        if now_fresh != fresh {
            tracing::info!(fresh = ?now_fresh, "hosts with a fresh heartbeat changed");
            fresh = now_fresh;
            on_flip();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, renew: &str, seconds: i32) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "spec": { "holderIdentity": name, "renewTime": renew, "leaseDurationSeconds": seconds }
        }))
        .unwrap()
    }

    #[test]
    fn a_host_is_stale_only_after_its_lease_duration_without_a_change_on_our_clock() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::default();
        assert_eq!(clock.heartbeat("h1", t0), Heartbeat::Missing);
        assert!(clock.observe(&lease("h1", "2026-01-01T00:00:00.000000Z", 3), t0));
        assert!(clock.heartbeat("h1", t0 + Duration::from_secs(3)).is_fresh());
        // The same renewal seen again is no heartbeat.
        assert!(!clock.observe(&lease("h1", "2026-01-01T00:00:00.000000Z", 3), t0 + Duration::from_secs(2)));
        let stale = clock.heartbeat("h1", t0 + Duration::from_millis(3100));
        assert!(matches!(stale, Heartbeat::Stale { .. }), "{stale:?}");
        assert_eq!(stale.problem().unwrap(), "no heartbeat for more than its Lease's 3 s");
        let later = clock.heartbeat("h1", t0 + Duration::from_secs(9));
        assert_eq!(later.problem(), stale.problem(), "the reason does not change while the host stays silent");
        // A renewal, whatever its timestamp says (a skewed clock), is a change now.
        assert!(clock.observe(&lease("h1", "1999-01-01T00:00:00.000000Z", 3), t0 + Duration::from_secs(4)));
        assert!(clock.heartbeat("h1", t0 + Duration::from_secs(6)).is_fresh());
        assert_eq!(clock.fresh_hosts(t0 + Duration::from_secs(6)), vec!["h1".to_string()]);
        clock.forget("h1");
        assert_eq!(clock.heartbeat("h1", t0), Heartbeat::Missing);
    }
}
