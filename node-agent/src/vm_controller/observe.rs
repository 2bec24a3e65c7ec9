//! What the VM controller looks at before it decides: gathered here, so that
//! `decide` reads no file, socket or clock.

use drover_crds::vm::VirtualMachine;

use super::decide::{LocalVmm, Observed};
use crate::context::Context;
use crate::host_facts::HostFacts;
use crate::status;
use crate::supervisor::VmmState;
use crate::vm_dir::Role;
use crate::vmm_client::{Phase, VmmClient};

/// Observes `vm` (uid `uid`) from this host.
pub async fn observe<'a>(
    vm: &'a VirtualMachine,
    ctx: &'a Context,
    uid: &str,
    facts: Option<&'a HostFacts>,
) -> Observed<'a> {
    let here = vm.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(ctx.node());
    let local = match (ctx.supervisor.get(uid), ctx.supervisor.state(uid)) {
        (Some(local), Some(state)) => {
            let stop_reason = if matches!(state, VmmState::Ended(_)) { local.dir.read_stop_reason() } else { None };
            // Only a VMM that runs a VM placed elsewhere is asked: it may be the
            // source of a migration that has just handed the VM over.
            let handed_over = if !here && local.meta.role == Role::Run && state == VmmState::Running {
                let client = VmmClient::new(&local.dir.api_socket());
                client.migration().await.is_ok_and(|m| m.phase == Phase::Completed)
            } else {
                false
            };
            Some(LocalVmm { role: local.meta.role, state, stop_reason, handed_over })
        }
        _ => None,
    };
    Observed { vm, node: ctx.node(), local, leased: ctx.leased(), facts, now: status::now() }
}
