//! Carries a VirtualMachineMigration the operator approved (`status.phase`
//! `Scheduled`, with `sourceNode`, `targetNode` and `secretName` set), at both ends.
//!
//! 1. Target agent: reads the Secret, starts a receiving `drover-vmm` under a
//!    monitor, listening on this host's address, and publishes it in
//!    `status.targetAddress` once it listens.
//! 2. Source agent: asks its VMM to migrate there (`PUT /vm/migrate`), then copies
//!    progress into the migration's status until the VMM reports an end.
//! 3. On success the source agent moves the VM's `status.nodeName` to the target,
//!    whose agent then takes the VM over; on failure the VM keeps running on the
//!    source, the target's VMM is stopped, and the status says why.
//! 4. The operator may end a migration under way as `Failed` itself (deleted,
//!    timed out): the source agent then cancels its VMM's send, or, if the send had
//!    already handed the VM over, moves the VM's status to the target all the same
//!    (`source_side::settle`); the operator's status of the migration is left as
//!    it wrote it.
//!
//! Each reconcile first decides from the migration's status alone which end this
//! host plays now (`part`, pure); that end then observes what it needs (the VM,
//! this host's VMM of it, what the VMM reports), decides (`target_side::decide`,
//! `source_side::decide`, pure) and carries the plan out.

use std::sync::Arc;
use std::time::Duration;

use drover_crds::migration::VirtualMachineMigration;
use drover_crds::vm::VirtualMachine;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::Error;
use crate::context::Context;
use crate::next::Next;
use crate::status;

mod failure;
mod part;
mod ports;
mod report;
mod secret;
mod source_side;
mod target_side;

use part::Part;

pub async fn reconcile(migration: Arc<VirtualMachineMigration>, ctx: Arc<Context>) -> Result<Action, Error> {
    let Some(status) = &migration.status else { return Ok(Action::await_change()) };
    let ns = migration.namespace().unwrap_or_default();
    let api: Api<VirtualMachineMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    match part::part(status, ctx.node()) {
        Part::PrepareTarget => target_side::prepare(&migration, &api, &vms, &ctx).await,
        Part::Failed { source, target } => {
            // The source first: a target waits while the source may still send.
            let mut next = Next::Change;
            if source {
                next = source_side::settle(&migration, &vms, &ctx).await?;
            }
            if target {
                next = next.sooner(target_side::stop(&migration, &vms, &ctx).await?);
            }
            Ok(next.into())
        }
        Part::DriveSource => source_side::drive(&migration, &api, &vms, &ctx).await,
        Part::Wait(next) => Ok(next.into()),
    }
}

pub fn error_policy(migration: Arc<VirtualMachineMigration>, error: &Error, _ctx: Arc<Context>) -> Action {
    status::retry(migration.as_ref(), error, Duration::from_secs(1))
}
