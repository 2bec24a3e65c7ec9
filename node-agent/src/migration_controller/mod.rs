//! Carries a VirtualMachineMigration the operator approved (`status.phase`
//! `Scheduled`, with `sourceNode`, `targetNode` and `secretName` set), at both ends.
//!
//! 1. Target agent: reads the Secret, starts a receiving `drover-vmm` under a
//!    monitor, listening on this host's address, and publishes it in
//!    `status.targetAddress` once it listens.
//! 2. Source agent: asks its VMM to migrate there (`PUT /vm/migrate`), then copies
//!    progress into the migration's status until the VMM reports an end.
//! 3. On success the VM's `status.nodeName` moves to the target, by whichever end
//!    sees the hand-over first: the source agent when its VMM completed the send,
//!    the target agent once its receiving VMM runs the guest (it asks every
//!    `target_side::decide::POLL_FOLLOW`; with the source's host dead, nobody else
//!    would). The target agent says what its VMM does in `status.targetState`
//!    (`Receiving`, `Running`, `Stopped`), and its VM controller takes the VM over.
//!    On failure the VM keeps running on the source, the target's VMM is stopped
//!    (`targetState: Stopped`), and the status says why.
//! 4. The operator may end a migration under way as `Failed` itself (deleted,
//!    timed out, a host failed): the source agent then cancels its VMM's send, or,
//!    if the send had already handed the VM over, moves the VM's status to the
//!    target all the same (`source_side::settle`); the target keeps a receiving VMM
//!    that runs the guest and moves the VM's status to itself (`target_side::stop`);
//!    the operator's status of the migration is left as it wrote it, but for
//!    `targetState`.
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
                next = next.sooner(target_side::stop(&migration, &api, &vms, &ctx).await?);
            }
            Ok(next.into())
        }
        Part::Drive { source, target } => {
            let mut next = Next::Change;
            if source {
                next = source_side::drive(&migration, &api, &vms, &ctx).await?;
            }
            if target {
                next = next.sooner(target_side::follow(&migration, &api, &vms, &ctx).await?);
            }
            Ok(next.into())
        }
        Part::Wait(next) => Ok(next.into()),
    }
}

pub fn error_policy(migration: Arc<VirtualMachineMigration>, error: &Error, _ctx: Arc<Context>) -> Action {
    status::retry(migration.as_ref(), error, Duration::from_secs(1))
}
