//! Leader election on a Lease (kube-lease-manager): every replica campaigns; the
//! one holding the Lease runs the controllers, the others wait. A new leader
//! starts from what is in the API server (its stores list everything afresh),
//! never from another replica's memory. Losing the Lease stops the controllers at
//! once; the replica campaigns again.

use std::future::Future;
use std::sync::Arc;

use kube_lease_manager::LeaseManagerBuilder;

use crate::Error;
use crate::metrics::Metrics;
use crate::settings::Settings;

/// The Lease every replica campaigns for.
pub const LEASE_NAME: &str = "drover-operator";

/// Runs `lead()` while this replica holds the Lease, forever.
pub async fn run<F, Fut>(client: kube::Client, settings: &Settings, metrics: Arc<Metrics>, lead: F) -> Result<(), Error>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), Error>> + Send + 'static,
{
    let duration = settings.leader_lease.as_secs();
    // Renew a third of the duration before it runs out (at least a second).
    let grace = (duration / 3).clamp(1, duration - 1);
    let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(settings.namespace.clone())
        .with_identity(settings.identity.clone())
        .with_duration(duration)
        .with_grace(grace)
        .build()
        .await?;
    let (mut leading, _task) = manager.watch().await;
    tracing::info!(identity = %settings.identity, lease = %format!("{}/{LEASE_NAME}", settings.namespace), duration_s = duration, "campaigning for leadership");
    loop {
        while !*leading.borrow_and_update() {
            metrics.leader.set(0);
            if leading.changed().await.is_err() {
                return Err(Error::Io("leader election stopped".into()));
            }
        }
        tracing::info!(identity = %settings.identity, "leading: starting the controllers");
        metrics.leader.set(1);
        let work = tokio::spawn(lead());
        let abort = work.abort_handle();
        tokio::select! {
            result = work => {
                metrics.leader.set(0);
                match result {
                    Ok(Ok(())) => tracing::warn!("controllers ended"),
                    Ok(Err(e)) => tracing::error!("controllers failed: {e}"),
                    Err(e) => tracing::error!("controllers panicked: {e}"),
                }
                return Err(Error::Io("the controllers ended while leading".into()));
            }
            lost = wait_lost(&mut leading) => {
                abort.abort();
                metrics.leader.set(0);
                metrics.synced.store(false, std::sync::atomic::Ordering::Release);
                if lost.is_err() {
                    return Err(Error::Io("leader election stopped".into()));
                }
                tracing::warn!(identity = %settings.identity, "lost the leader Lease: controllers stopped; campaigning again");
            }
        }
    }
}

async fn wait_lost(
    leading: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    while *leading.borrow_and_update() {
        leading.changed().await?;
    }
    Ok(())
}
