//! Whether a live migration may start now, and where it goes: the VM must run and
//! not be moving already; a target the user named must be able to take it (the
//! placement filter: ready, rules, capacity), else placement picks one away from
//! the source; and the limits on migrations at once (per cluster, out of each
//! host, into each host) must leave room. A request that can never work is
//! refused (the migration ends Failed, nothing moves); one that only has to wait
//! for a slot or for capacity stays Pending with the reason.

use drover_topology::CpuSet;
use serde::{Deserialize, Serialize};

use crate::lifecycle::Phase;
use crate::placement::{Cluster, Reason};
use crate::snapshot::{Key, Migration, Vm};

/// Migrations at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// In the whole cluster.
    pub cluster: u32,
    /// Out of one host.
    pub outgoing_per_host: u32,
    /// Into one host.
    pub incoming_per_host: u32,
}

impl Default for Limits {
    /// KubeVirt's defaults for the first two (5 per cluster, 2 out of a node); 2
    /// into a host, which KubeVirt does not limit: a host receiving many VMs at
    /// once (an evacuation) spends its memory bandwidth and CPUs on all of them.
    fn default() -> Self {
        Self { cluster: 5, outgoing_per_host: 2, incoming_per_host: 2 }
    }
}

/// A migration to decide on.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub key: &'a Key,
    /// The VM, if it exists.
    pub vm: Option<&'a Vm>,
    pub vm_phase: Option<Phase>,
    /// The host the user named, if any.
    pub target: Option<&'a str>,
}

/// The decision.
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// Reserve the target and let the agents go.
    Approve { source: String, target: String, cpus: Option<CpuSet>, why: String },
    /// Not now; why.
    Wait { why: String },
    /// Never; why (the migration fails, the VM stays where it is).
    Refuse { why: String },
}

/// Decides on `request`; `active` are the approved migrations that have not ended.
pub fn admit(cluster: &Cluster, request: &Request, active: &[Migration], limits: &Limits) -> Admission {
    let refuse = |why: String| Admission::Refuse { why };
    let Some(vm) = request.vm else {
        return refuse(format!("VirtualMachine {} not found", request.key.name));
    };
    let name = &vm.key.name;
    let phase_name = request.vm_phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "no phase".into());
    if matches!(request.vm_phase, None | Some(Phase::Pending | Phase::Scheduled | Phase::Starting)) {
        // On its way to running (a migration applied with its VM): worth the wait,
        // within the migration's timeout.
        return Admission::Wait { why: format!("VM {name} is not running yet ({phase_name})") };
    }
    let (Some(source), Some(Phase::Running)) = (vm.host.as_deref(), request.vm_phase) else {
        return refuse(format!("VM {name} is not running ({phase_name}): only a running VM migrates"));
    };
    if let Some(why) = cluster.host(source).and_then(|h| h.health.problem()) {
        // Its host failed or went quiet: HA may restart it elsewhere; moving it
        // now could start it twice.
        return Admission::Wait { why: format!("VM {name}'s host {source} is not ready ({why})") };
    }
    if let Some(other) = active.iter().find(|m| m.vm == vm.key && &m.key != request.key) {
        return refuse(format!("VM {name} is already moving (migration {})", other.key.name));
    }
    if request.target == Some(source) {
        return refuse(format!("the target {source} is the host VM {name} runs on"));
    }
    let others: Vec<&Migration> = active.iter().filter(|m| &m.key != request.key).collect();
    if others.len() as u32 >= limits.cluster {
        return Admission::Wait { why: format!("{} migrations run at once, the cluster's limit", others.len()) };
    }
    let outgoing = others.iter().filter(|m| m.source == source).count() as u32;
    if outgoing >= limits.outgoing_per_host {
        return Admission::Wait { why: format!("{outgoing} migrations leave {source} already, its limit") };
    }
    let incoming = |host: &str| others.iter().filter(|m| m.target.as_deref() == Some(host)).count() as u32;
    // A move keeps the capacity HA admission control holds for failover free.
    let admission = crate::admission::Admission::new(cluster);
    let admit = |host: &crate::snapshot::Host| admission.check(cluster, vm, host);
    match request.target {
        Some(target) => match cluster.fit_on(vm, target).and_then(|p| match cluster.host(target).and_then(admit) {
            Some(reason) => Err(reason),
            None => Ok(p),
        }) {
            Err(reason) => refuse(format!("target {target} cannot take VM {name}: {}", explain_one(target, reason))),
            Ok(_) if incoming(target) >= limits.incoming_per_host => Admission::Wait {
                why: format!("{} migrations come into {target} already, its limit", incoming(target)),
            },
            Ok(placement) => Admission::Approve {
                source: source.to_string(),
                target: target.to_string(),
                cpus: placement.cpus.clone(),
                why: format!("to {}, as requested", placement.message()),
            },
        },
        None => {
            let veto = |host: &crate::snapshot::Host| {
                if host.name == source {
                    Some(Reason::Source)
                } else if incoming(&host.name) >= limits.incoming_per_host {
                    Some(Reason::IncomingLimit(limits.incoming_per_host))
                } else {
                    None
                }
            };
            match cluster.place_admitted(vm, veto, admit) {
                Ok(placement) => Admission::Approve {
                    source: source.to_string(),
                    target: placement.host.clone(),
                    cpus: placement.cpus.clone(),
                    why: format!("to {}, chosen by placement", placement.message()),
                },
                Err(none) => Admission::Wait { why: none.message() },
            }
        }
    }
}

fn explain_one(host: &str, reason: Reason) -> String {
    let u = crate::placement::Unschedulable { vm: Key::new("", ""), reasons: vec![(host.to_string(), reason)] };
    u.per_host().pop().map(|s| s.trim_start_matches(&format!("{host}: ")).to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Host, Snapshot};

    fn host(name: &str) -> Host {
        Host { policy: None, ..crate::fixtures::host(name, 4, 8, 8192) }
    }

    fn vm(name: &str, on: &str) -> Vm {
        crate::fixtures::vm(name, 2, 512, Some(on))
    }

    fn migration(name: &str, vm: &str, from: &str, to: &str) -> Migration {
        Migration {
            key: Key::new("ns", name),
            vm: Key::new("ns", vm),
            source: from.into(),
            target: Some(to.into()),
            approved: true,
            target_state: None,
        }
    }

    #[test]
    fn requests_that_cannot_work_are_refused_and_the_rest_wait_or_go() {
        let snapshot = Snapshot { hosts: vec![host("h1"), host("h2"), host("h3")], ..Default::default() };
        let cluster = Cluster::new(&snapshot);
        let db = vm("db", "h1");
        let key = Key::new("ns", "m");
        let ask =
            |vm: Option<&Vm>, phase: Option<Phase>, target: Option<&str>, active: &[Migration], limits: &Limits| {
                admit(&cluster, &Request { key: &key, vm, vm_phase: phase, target }, active, limits)
            };
        let limits = Limits::default();
        let running = Some(Phase::Running);
        assert!(matches!(ask(None, None, None, &[], &limits), Admission::Refuse { why } if why.contains("not found")));
        assert!(matches!(ask(Some(&db), Some(Phase::Starting), None, &[], &limits), Admission::Wait { .. }));
        assert!(matches!(ask(Some(&db), Some(Phase::Stopped), None, &[], &limits), Admission::Refuse { .. }));
        assert!(
            matches!(ask(Some(&db), running, Some("h1"), &[], &limits), Admission::Refuse { why } if why.contains("runs on"))
        );
        let moving = [migration("other", "db", "h1", "h2")];
        assert!(
            matches!(ask(Some(&db), running, None, &moving, &limits), Admission::Refuse { why } if why.contains("already moving"))
        );
        // Limits: out of h1, into h2, in the cluster.
        let busy = [migration("a", "x", "h1", "h3"), migration("b", "y", "h1", "h3")];
        assert!(
            matches!(ask(Some(&db), running, None, &busy, &limits), Admission::Wait { why } if why.contains("leave h1"))
        );
        let into = [migration("a", "x", "h3", "h2"), migration("b", "y", "h3", "h2")];
        assert!(
            matches!(ask(Some(&db), running, Some("h2"), &into, &limits), Admission::Wait { why } if why.contains("into h2"))
        );
        match ask(Some(&db), running, None, &into, &Limits { outgoing_per_host: 5, ..limits }) {
            Admission::Approve { target, .. } => assert_eq!(target, "h3", "h2 is at its incoming limit"),
            other => panic!("{other:?}"),
        }
        let one = Limits { cluster: 1, ..limits };
        assert!(
            matches!(ask(Some(&db), running, None, &moving[..0].iter().chain(&busy[..1]).cloned().collect::<Vec<_>>(), &one), Admission::Wait { why } if why.contains("cluster"))
        );
    }

    #[test]
    fn a_named_target_that_cannot_take_the_vm_is_refused_with_the_reason() {
        let mut full = host("h2");
        full.capacity.vcpus = 1;
        let snapshot = Snapshot { hosts: vec![host("h1"), full], ..Default::default() };
        let cluster = Cluster::new(&snapshot);
        let db = vm("db", "h1");
        let key = Key::new("ns", "m");
        let request = Request { key: &key, vm: Some(&db), vm_phase: Some(Phase::Running), target: Some("h2") };
        match admit(&cluster, &request, &[], &Limits::default()) {
            Admission::Refuse { why } => assert_eq!(why, "target h2 cannot take VM db: has 1 of 2 free vCPUs"),
            other => panic!("{other:?}"),
        }
    }
}
