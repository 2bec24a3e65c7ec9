//! Which end of a migration this host is to play now, from the migration's status
//! alone (pure): the target gets ready and publishes where it listens, the source
//! sends once it knows while the target watches for its receiving VMM to run the
//! guest; once the migration failed (an agent or the operator ended it), the source
//! settles a send that may still be under way and the target lets go of its
//! receiving VMM (or keeps the one that runs the guest); otherwise the step is the
//! other side's.

use std::time::Duration;

use drover_crds::migration::{MigrationPhase, MigrationTargetState, VirtualMachineMigrationStatus};

use crate::next::Next;

/// How often the hosts involved look at a migration that waits on the other side,
/// in case an update was missed.
pub const POLL_INVOLVED: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Target: start a receiving VMM and publish its address.
    PrepareTarget,
    /// A failed migration, seen from its source (`source`: cancel a send still under
    /// way, or move the VM if the send had completed anyway) and its target
    /// (`target`: stop its receiving VMM). A host may be both.
    Failed { source: bool, target: bool },
    /// A migration under way whose target listens, seen from its source (`source`:
    /// start the send, or follow it) and its target (`target`: record whether its
    /// receiving VMM runs the guest, and take the VM over once it does). The target
    /// of a migration that Succeeded while its word was still `Receiving` follows
    /// too, to record `Running`.
    Drive { source: bool, target: bool },
    /// Nothing for this host to do now.
    Wait(Next),
}

/// The part `node` plays in a migration whose status is `status`.
pub fn part(status: &VirtualMachineMigrationStatus, node: &str) -> Part {
    let active =
        matches!(status.phase, Some(MigrationPhase::Scheduled | MigrationPhase::Running | MigrationPhase::Switchover));
    let source = status.source_node.as_deref() == Some(node);
    let target = status.target_node.as_deref() == Some(node);
    if target && active && status.target_address.is_none() {
        return Part::PrepareTarget;
    }
    if status.phase == Some(MigrationPhase::Failed) && (source || target) {
        return Part::Failed { source, target };
    }
    if active && status.target_address.is_some() && (source || target) {
        return Part::Drive { source, target };
    }
    let succeeded = status.phase == Some(MigrationPhase::Succeeded);
    if target && succeeded && status.target_state == Some(MigrationTargetState::Receiving) {
        return Part::Drive { source: false, target: true };
    }
    let involved = [&status.source_node, &status.target_node].iter().any(|n| n.as_deref() == Some(node));
    Part::Wait(if active && involved { Next::After(POLL_INVOLVED) } else { Next::Change })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHASES: [Option<MigrationPhase>; 7] = [
        None,
        Some(MigrationPhase::Pending),
        Some(MigrationPhase::Scheduled),
        Some(MigrationPhase::Running),
        Some(MigrationPhase::Switchover),
        Some(MigrationPhase::Succeeded),
        Some(MigrationPhase::Failed),
    ];

    fn status(
        phase: Option<MigrationPhase>,
        source: &str,
        target: &str,
        address: bool,
    ) -> VirtualMachineMigrationStatus {
        VirtualMachineMigrationStatus {
            phase,
            source_node: Some(source.into()),
            target_node: Some(target.into()),
            target_address: address.then(|| "10.0.0.2:49200".into()),
            ..Default::default()
        }
    }

    /// Every phase × this host's role × target address published or not.
    #[test]
    fn the_part_of_each_host() {
        use MigrationPhase::*;
        let wait_involved = Part::Wait(Next::After(POLL_INVOLVED));
        let wait = Part::Wait(Next::Change);
        for phase in PHASES {
            let active = matches!(phase, Some(Scheduled | Running | Switchover));
            for address in [false, true] {
                // (source, target) as seen from host "me".
                let source = status(phase, "me", "other", address);
                let target = status(phase, "other", "me", address);
                let neither = status(phase, "a", "b", address);
                let want_source = match (active, address, phase) {
                    (true, true, _) => Part::Drive { source: true, target: false },
                    (true, false, _) => wait_involved,
                    (_, _, Some(Failed)) => Part::Failed { source: true, target: false },
                    _ => wait,
                };
                let want_target = match (active, address, phase) {
                    (true, false, _) => Part::PrepareTarget,
                    (_, _, Some(Failed)) => Part::Failed { source: false, target: true },
                    (true, true, _) => Part::Drive { source: false, target: true },
                    _ => wait,
                };
                let case = format!("{phase:?}, address {address}");
                assert_eq!(part(&source, "me"), want_source, "source: {case}");
                assert_eq!(part(&target, "me"), want_target, "target: {case}");
                assert_eq!(part(&neither, "me"), wait, "neither: {case}");
            }
        }
    }

    #[test]
    fn a_host_that_is_both_ends_prepares_first() {
        let both = status(Some(MigrationPhase::Scheduled), "me", "me", false);
        assert_eq!(part(&both, "me"), Part::PrepareTarget);
        let both = status(Some(MigrationPhase::Scheduled), "me", "me", true);
        assert_eq!(part(&both, "me"), Part::Drive { source: true, target: true });
        let both = status(Some(MigrationPhase::Failed), "me", "me", true);
        assert_eq!(part(&both, "me"), Part::Failed { source: true, target: true });
    }

    /// A Succeeded migration × the target's word: only a target whose word is still
    /// `Receiving` (the source recorded the hand-over first) looks again, to say
    /// `Running`.
    #[test]
    fn the_target_of_a_succeeded_migration_records_that_it_runs_the_vm() {
        use MigrationTargetState::*;
        for state in [None, Some(Receiving), Some(Running), Some(Stopped)] {
            let mut target = status(Some(MigrationPhase::Succeeded), "other", "me", true);
            target.target_state = state;
            let want = if state == Some(Receiving) {
                Part::Drive { source: false, target: true }
            } else {
                Part::Wait(Next::Change)
            };
            assert_eq!(part(&target, "me"), want, "{state:?}");
            let source =
                VirtualMachineMigrationStatus { target_state: state, ..status(target.phase, "me", "other", true) };
            assert_eq!(part(&source, "me"), Part::Wait(Next::Change), "source, {state:?}");
        }
    }
}
