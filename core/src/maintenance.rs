//! Emptying a host in maintenance (tainted `drover.dev/maintenance:NoExecute`):
//! each VM there leaves by its `onMaintenance` — LiveMigrate through a migration
//! (within the migration limits), Restart (stopped here, started elsewhere), or
//! Stop (stopped, and kept stopped while the maintenance lasts). The host is in
//! maintenance once no VM runs there; until then, every VM still there says what
//! it waits for.

use serde::{Deserialize, Serialize};

use crate::snapshot::VmKey;

/// What a VM does when its host enters maintenance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnMaintenance {
    LiveMigrate,
    Restart,
    Stop,
}

/// A VM still on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resident {
    pub vm: VmKey,
    pub action: OnMaintenance,
    /// It is stopping already.
    pub stopping: bool,
    /// A migration of it has not ended: its name, and why it waits if it does.
    pub migration: Option<(String, Option<String>)>,
}

/// One thing to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create a migration (trigger Maintenance, target chosen by placement).
    Migrate(VmKey),
    /// Stop it so it starts elsewhere.
    StopToRestart(VmKey),
    /// Stop it and keep it stopped while the maintenance lasts.
    StopAndHold(VmKey),
}

/// Where the evacuation stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evacuation {
    pub steps: Vec<Step>,
    /// VMs still running there, each with what it waits for.
    pub waiting: Vec<(VmKey, String)>,
}

impl Evacuation {
    /// No VM runs on the host any more.
    pub fn done(&self) -> bool {
        self.waiting.is_empty()
    }

    /// "in maintenance", or "evacuating: 2 VMs left (db-01: waiting for a target: ...)".
    pub fn summary(&self) -> String {
        if self.done() {
            return "in maintenance: no VM runs here".into();
        }
        let each: Vec<String> = self.waiting.iter().map(|(vm, why)| format!("{}: {why}", vm.name)).collect();
        format!("evacuating: {} left ({})", plural(self.waiting.len()), each.join("; "))
    }
}

fn plural(n: usize) -> String {
    if n == 1 { "1 VM".into() } else { format!("{n} VMs") }
}

/// The steps that empty a host holding `residents` (the VMs that run there).
pub fn evacuate(residents: &[Resident]) -> Evacuation {
    let mut steps = Vec::new();
    let mut waiting = Vec::new();
    for r in residents {
        let why = match (&r.action, &r.migration, r.stopping) {
            (_, _, true) => "stopping".to_string(),
            (OnMaintenance::LiveMigrate, Some((name, None)), _) => format!("migrating ({name})"),
            (OnMaintenance::LiveMigrate, Some((name, Some(why))), _) => format!("migration {name} waits: {why}"),
            (OnMaintenance::LiveMigrate, None, _) => {
                steps.push(Step::Migrate(r.vm.clone()));
                "migration requested".to_string()
            }
            (OnMaintenance::Restart, _, false) => {
                steps.push(Step::StopToRestart(r.vm.clone()));
                "stopping to start elsewhere".to_string()
            }
            (OnMaintenance::Stop, _, false) => {
                steps.push(Step::StopAndHold(r.vm.clone()));
                "stopping for the maintenance".to_string()
            }
        };
        waiting.push((r.vm.clone(), why));
    }
    Evacuation { steps, waiting }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Key;

    fn resident(name: &str, action: OnMaintenance) -> Resident {
        Resident { vm: Key::new("ns", name), action, stopping: false, migration: None }
    }

    #[test]
    fn each_vm_leaves_by_its_own_action_and_the_host_waits_for_all() {
        let residents = vec![
            resident("a", OnMaintenance::LiveMigrate),
            resident("b", OnMaintenance::Restart),
            resident("c", OnMaintenance::Stop),
            Resident {
                migration: Some(("d-move".into(), Some("0/2 hosts can run d: 2 are cordoned".into()))),
                ..resident("d", OnMaintenance::LiveMigrate)
            },
        ];
        let e = evacuate(&residents);
        assert_eq!(
            e.steps,
            vec![
                Step::Migrate(Key::new("ns", "a")),
                Step::StopToRestart(Key::new("ns", "b")),
                Step::StopAndHold(Key::new("ns", "c"))
            ]
        );
        assert!(!e.done());
        assert!(
            e.summary().contains("d: migration d-move waits: 0/2 hosts can run d: 2 are cordoned"),
            "{}",
            e.summary()
        );
        assert_eq!(evacuate(&[]).summary(), "in maintenance: no VM runs here");
    }

    #[test]
    fn a_vm_already_on_its_way_gets_no_second_step() {
        let moving = Resident { migration: Some(("a-move".into(), None)), ..resident("a", OnMaintenance::LiveMigrate) };
        let stopping = Resident { stopping: true, ..resident("b", OnMaintenance::Restart) };
        assert!(evacuate(&[moving, stopping]).steps.is_empty());
    }
}
