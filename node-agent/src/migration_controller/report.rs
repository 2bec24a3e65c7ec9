//! Writing a migration's status, and telling of its failure (log line, Event).

use drover_crds::migration::{VirtualMachineMigration, VirtualMachineMigrationStatus};
use kube::{Api, ResourceExt};

use super::failure::Failure;
use crate::Error;
use crate::context::Context;
use crate::status;

/// The controller's log lines keep the target they had before it was split into
/// modules (operators filter on it).
pub const TARGET: &str = "drover_agent::migration_controller";

/// Writes `status` (a failed one) over `migration`'s, after logging and publishing why.
pub async fn fail(
    api: &Api<VirtualMachineMigration>,
    migration: &VirtualMachineMigration,
    status: &VirtualMachineMigrationStatus,
    failure: &Failure,
    ctx: &Context,
) -> Result<(), Error> {
    tracing::warn!(target: TARGET, migration = %migration.name_any(), "failed ({}): {}", failure.reason, failure.why);
    ctx.events.warning(migration, failure.reason, "Migrate", failure.note());
    status::write_migration(api, migration, status, &ctx.manager()).await?;
    Ok(())
}
