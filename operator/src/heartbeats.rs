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
//! as soon as the new leader leads, not one lease duration later.
//!
//! All Leases come through one watch, and a watch can stall or lag (a hung stream,
//! the API server's watch cache behind, a backoff after an error) while the agents
//! go on renewing. The hosts would then go silent one after another, each at its
//! own last renewal plus the duration, and the first ones would look failed while
//! they run their VMs. So silence alone is only `Overdue`: a host is `Stale`
//! (failed) once a fresh read of its Lease from the API server (a GET, served
//! from etcd) shows the very renewal last seen. A renewal that read finds counts
//! as seen now: with the watch stalled, the reads keep the clock going.

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
    /// A read of the Lease made after it was overdue showed this renewal still.
    confirmed: bool,
}

/// A host's heartbeat as judged now.
#[derive(Clone, Debug, PartialEq)]
pub enum Heartbeat {
    /// Renewed within its lease duration.
    Fresh,
    /// Silent for more than its duration as the watch tells it; a fresh read of
    /// the Lease is to say whether it was renewed meanwhile.
    Overdue { duration: Duration },
    /// Not renewed for `silent` (more than its duration), and a read of the Lease
    /// made since it was overdue agrees.
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
            Heartbeat::Overdue { duration } => {
                Some(format!("no heartbeat seen for its Lease's {} s; reading the Lease again", duration.as_secs()))
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
                self.seen.insert(name, Seen { renewal, changed_at: now, duration, confirmed: false });
                true
            }
        }
    }

    /// Records a Lease read from the API server at `now`, after it was overdue:
    /// the same renewal confirms the silence, another is a heartbeat.
    pub fn confirm(&mut self, lease: &Lease, now: Instant) {
        if !self.observe(lease, now)
            && let Some(seen) = lease.metadata.name.as_deref().and_then(|n| self.seen.get_mut(n))
        {
            seen.confirmed = true;
        }
    }

    /// Hosts silent for their duration whose silence no read has confirmed yet.
    pub fn overdue(&self, now: Instant) -> Vec<String> {
        let mut hosts: Vec<String> =
            self.seen.keys().filter(|h| matches!(self.heartbeat(h, now), Heartbeat::Overdue { .. })).cloned().collect();
        hosts.sort();
        hosts
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
                } else if seen.confirmed {
                    Heartbeat::Stale { silent, duration: seen.duration }
                } else {
                    Heartbeat::Overdue { duration: seen.duration }
                }
            }
        }
    }

    /// Hosts failed (stale, confirmed) at `now`.
    pub fn stale_hosts(&self, now: Instant) -> Vec<String> {
        let mut hosts: Vec<String> = self.seen.keys().filter(|h| self.heartbeat(h, now).is_stale()).cloned().collect();
        hosts.sort();
        hosts
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

/// Watches the heartbeat Leases of `namespace` into `clock`, reads the Lease of
/// every host that has gone overdue, and calls `on_flip` whenever the set of
/// hosts with a fresh heartbeat, or of failed ones, changes (checked every 100 ms:
/// a host goes silent without any event, and HA's restart time starts there).
pub async fn watch(client: kube::Client, namespace: String, clock: SharedClock, on_flip: impl Fn() + Send + 'static) {
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    let mut events = watcher(leases.clone(), watcher::Config::default()).default_backoff().boxed();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut fresh = (Vec::new(), Vec::new());
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
        let overdue = lock(&clock).overdue(Instant::now());
        if !overdue.is_empty() {
            reread(&leases, &clock, &overdue).await;
        }
        let now = Instant::now();
        let now_fresh = {
            let clock = lock(&clock);
            (clock.fresh_hosts(now), clock.stale_hosts(now))
        };
        if now_fresh != fresh {
            tracing::info!(fresh = ?now_fresh.0, failed = ?now_fresh.1, "hosts' heartbeats changed");
            fresh = now_fresh;
            on_flip();
        }
    }
}

/// Reads the Leases of `hosts` (overdue) from the API server into `clock`. A read
/// that fails or takes over a second leaves the host overdue, to be read again at
/// the next tick: no host is called failed on the watch's word alone.
async fn reread(leases: &Api<Lease>, clock: &SharedClock, hosts: &[String]) {
    let reads = hosts
        .iter()
        .map(|host| async move { (host, tokio::time::timeout(Duration::from_secs(1), leases.get_opt(host)).await) });
    for (host, read) in futures::future::join_all(reads).await {
        match read {
            Ok(Ok(Some(lease))) => lock(clock).confirm(&lease, Instant::now()),
            Ok(Ok(None)) => lock(clock).forget(host),
            Ok(Err(e)) => tracing::warn!(host, "reading the heartbeat Lease of an overdue host: {e}"),
            Err(_) => tracing::warn!(host, "reading the heartbeat Lease of an overdue host: no answer within 1 s"),
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
        // Silent on the watch: overdue, not failed, until a read agrees.
        let overdue = clock.heartbeat("h1", t0 + Duration::from_millis(3100));
        assert_eq!(overdue, Heartbeat::Overdue { duration: Duration::from_secs(3) });
        assert!(!overdue.is_fresh() && !overdue.is_stale());
        assert_eq!(clock.overdue(t0 + Duration::from_millis(3100)), vec!["h1".to_string()]);
        clock.confirm(&lease("h1", "2026-01-01T00:00:00.000000Z", 3), t0 + Duration::from_millis(3100));
        assert!(clock.overdue(t0 + Duration::from_millis(3100)).is_empty());
        assert_eq!(clock.stale_hosts(t0 + Duration::from_millis(3100)), vec!["h1".to_string()]);
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

    #[test]
    fn a_stalled_watch_fails_no_host_that_renews() {
        // The watch saw h1's renewal at t0 and nothing since; the agent renewed
        // all along, so the read finds a newer renewal: a heartbeat, seen now.
        let t0 = Instant::now();
        let mut clock = LeaseClock::default();
        clock.observe(&lease("h1", "2026-01-01T00:00:00.000000Z", 3), t0);
        let t1 = t0 + Duration::from_millis(3100);
        assert_eq!(clock.overdue(t1), vec!["h1".to_string()]);
        clock.confirm(&lease("h1", "2026-01-01T00:00:03.000000Z", 3), t1);
        assert!(clock.heartbeat("h1", t1).is_fresh());
        assert!(clock.heartbeat("h1", t1 + Duration::from_secs(3)).is_fresh());
        // Still stalled a lease later: overdue again, read again, never failed.
        let t2 = t1 + Duration::from_millis(3100);
        assert_eq!(clock.heartbeat("h1", t2), Heartbeat::Overdue { duration: Duration::from_secs(3) });
        clock.confirm(&lease("h1", "2026-01-01T00:00:06.000000Z", 3), t2);
        assert!(clock.heartbeat("h1", t2).is_fresh());
        assert!(clock.stale_hosts(t2).is_empty());
        // A confirmed silence ends with the next renewal the watch brings.
        clock.confirm(&lease("h1", "2026-01-01T00:00:06.000000Z", 3), t2 + Duration::from_millis(3100));
        assert!(clock.heartbeat("h1", t2 + Duration::from_millis(3200)).is_stale());
        assert!(clock.observe(&lease("h1", "2026-01-01T00:00:10.000000Z", 3), t2 + Duration::from_secs(4)));
        assert!(clock.heartbeat("h1", t2 + Duration::from_secs(4)).is_fresh());
    }
}
