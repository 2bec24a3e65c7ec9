//! Runs the VirtualMachines the operator placed on this host (`status.nodeName`),
//! and reports what they do.
//!
//! The agent starts a VM when it is placed here and `Scheduled` (the operator's
//! word for "start it"), the spec can run here, and the host holds its heartbeat
//! lease; the start is recorded (`Starting`) with the resourceVersion it was decided
//! on, so a VM that was meanwhile placed elsewhere is never started. A VM that stops
//! is reported `Stopped` or `Failed` with the reason; what happens next (restart,
//! placement elsewhere) is the operator's decision, and so is a stop: the agent
//! powers off a VM whose phase the operator set to `Stopping`, and reports it
//! `Stopped`. The start records what the VM boots with (`status.bootedWith`, for
//! the operator's RestartRequired). The vCPUs run on `spec.cpu.hostCpus`, else on
//! the CPUs the operator holds for the VM here (`status.allocatedCpus`), else on
//! every CPU the host offers; changes of either, and of the priority, are applied
//! to the running VM. A finalizer holds deletion until the VM has stopped.
//!
//! Each reconcile observes (`observe`: the object, this host's VMM of it, the lease,
//! the host's facts, the time), decides (`decide`, pure: a [`decide::Plan`]) and
//! carries the plan out (`act`: API writes, the supervisor, the VMM, Events). A VM
//! that runs here is looked at once more in detail (`running`, pure: the live
//! changes it needs and the status that reports it), with what its VMM says.

use std::sync::Arc;
use std::time::Duration;

use drover_crds::vm::VirtualMachine;
use kube::ResourceExt;
use kube::runtime::controller::Action;

use crate::Error;
use crate::context::Context;
use crate::status;

mod act;
mod decide;
mod observe;
mod running;

/// Held on every VM an agent has started, until its VMM has stopped.
pub use drover_crds::contract::finalizers::VM_AGENT as FINALIZER;

pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    let uid = vm.uid().ok_or_else(|| Error::Config("VirtualMachine without uid".into()))?;
    let facts = ctx.facts();
    let observed = observe::observe(&vm, &ctx, &uid, facts.as_ref()).await;
    let plan = decide::decide(&observed);
    act::act(plan, &vm, &ctx, &uid).await
}

/// What the controller does with an error: log it and look again soon. Conflicts
/// are routine (someone wrote first) and retried at once.
pub fn error_policy(vm: Arc<VirtualMachine>, error: &Error, _ctx: Arc<Context>) -> Action {
    status::retry(vm.as_ref(), error, Duration::from_secs(2))
}
