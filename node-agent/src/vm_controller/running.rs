//! A VM whose VMM runs here, decided from what its VMM says: which live changes the
//! spec asks for (host CPUs, priority: applied without a restart), and the status
//! that reports the VM once they were tried. Pure, like `decide`.

use drover_crds::contract::{conditions, reasons};
use drover_crds::vm::{CpuPlacement, VirtualMachine, VirtualMachineStatus, VmPhase};
use drover_topology::CpuSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::conditions::{condition, time_ms};
use crate::vm_config;
use crate::vmm_client::{VmStatus, host_cpus};

/// The live changes the spec asks of the running VMM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// A new host CPU list for the vCPUs.
    pub host_cpus: Option<String>,
    /// New CPU shares.
    pub shares: Option<u32>,
    /// Why the spec's host CPUs cannot apply here (the VM keeps running as it is).
    pub invalid: Option<String>,
}

/// How the VMM took the changes: `Err` with its refusal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub host_cpus: Option<Result<(), String>>,
    pub shares: Option<Result<(), String>>,
}

impl Outcome {
    /// Whether the VMM changed anything (its status is then read again).
    pub fn changed(&self) -> bool {
        [&self.host_cpus, &self.shares].iter().any(|r| matches!(r, Some(Ok(()))))
    }
}

/// What the spec asks of a VMM that reports `vmm`, on a host offering `offered`
/// (empty while the host's facts are unknown: no CPU change then).
pub fn changes(vm: &VirtualMachine, vmm: &VmStatus, offered: &CpuSet, node: &str) -> Changes {
    let mut changes = Changes::default();
    match vm_config::desired_host_cpus(vm, offered, node) {
        Ok(want) if !offered.is_empty() && !cpus_in_effect(vm, &want, &host_cpus(vmm)) => {
            changes.host_cpus = Some(want)
        }
        Ok(_) => {}
        Err(e) => changes.invalid = Some(e.to_string()),
    }
    let shares = vm.spec.cpu.effective_shares();
    if shares != vmm.shares {
        changes.shares = Some(shares);
    }
    changes
}

/// Whether the vCPUs already run where the spec wants them: on exactly those CPUs
/// (Shared), or each on one of them (Dedicated: the VMM pins to a subset of the list).
pub fn cpus_in_effect(vm: &VirtualMachine, want: &str, now: &str) -> bool {
    let (Ok(want), Ok(now)) = (CpuSet::parse(want), CpuSet::parse(now)) else {
        return false;
    };
    if vm.spec.cpu.placement == CpuPlacement::Dedicated {
        !now.is_empty() && now.iter().all(|cpu| want.contains(cpu))
    } else {
        now == want
    }
}

/// What a running VM's status is built from.
pub struct Seen<'a> {
    pub vm: &'a VirtualMachine,
    pub node: &'a str,
    /// What the VMM says, after the changes.
    pub vmm: &'a VmStatus,
    pub changes: &'a Changes,
    pub outcome: &'a Outcome,
    /// When the agent started the VMM (Unix ms).
    pub started_at_ms: u64,
    /// Host CPU the VMM used lately, in cores, once sampled.
    pub cpu_usage: Option<f64>,
    /// The agent's HTTP endpoint (the console URL starts with it).
    pub agent_url: &'a str,
    pub now: Time,
}

/// The status of a VM that runs here.
pub fn status(seen: &Seen) -> VirtualMachineStatus {
    let Seen { vm, node, vmm, changes, outcome, .. } = seen;
    let status = vm.status.clone().unwrap_or_default();
    let mut new = status.clone();
    let generation = vm.metadata.generation;
    let cpu_config = |ok, reason, message: &str| {
        condition(conditions::CPU_CONFIG_APPLIED, ok, reason, message, generation, seen.now.clone())
    };

    let mut applied = true;
    if let Some(why) = &changes.invalid {
        applied = false;
        new.conditions.set(cpu_config(false, reasons::INVALID_SPEC, why));
    }
    for refused in [&outcome.host_cpus, &outcome.shares].into_iter().flatten().filter_map(|r| r.as_ref().err()) {
        applied = false;
        new.conditions.set(cpu_config(false, reasons::CPU_CONFIG_REFUSED, refused));
    }
    if applied {
        new.observed_generation = generation;
        if status.conditions.get(conditions::CPU_CONFIG_APPLIED).is_some() {
            new.conditions.set(cpu_config(true, reasons::CPU_CONFIG_IN_EFFECT, "host CPUs and priority in effect"));
        }
    }

    new.phase = Some(if new.migration.is_some() { VmPhase::Migrating } else { VmPhase::Running });
    new.host_cpus = Some(host_cpus(vmm));
    new.numa_nodes = Some(vmm.numa_nodes.clone()).filter(|n| !n.is_empty());
    new.shares = Some(vmm.shares as i32);
    new.cpu_changed_at = vmm.cpus_changed_at_ms.max(vmm.priority_changed_at_ms).and_then(time_ms);
    // Kept across migrations: the guest started then, whatever VMM runs it now.
    if new.started_at.is_none() {
        new.started_at = time_ms(seen.started_at_ms);
    }
    if new.boot_millis.is_none() {
        new.boot_millis = vmm.boot_time_ms.map(|ms| ms as i64);
    }
    if let Some(cores) = seen.cpu_usage {
        new.cpu_usage = Some(drover_crds::quantity::format_cores(cores));
    }
    new.console_url =
        Some(format!("{}/vms/{}/{}/console", seen.agent_url, vm.namespace().unwrap_or_default(), vm.name_any()));
    new.conditions.set(condition(
        conditions::READY,
        true,
        reasons::RUNNING,
        format!("running on {node} ({})", vmm.state),
        generation,
        seen.now.clone(),
    ));
    new
}

#[cfg(test)]
mod tests {
    use drover_vmm_api::api::VcpuStatus;

    use super::*;

    fn vm(cpu: serde_json::Value) -> VirtualMachine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "drover.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": { "name": "v", "namespace": "ns", "generation": 4 },
            "spec": { "cpu": cpu, "memory": { "size": "64Mi" }, "boot": { "kernel": "/k" } }
        }))
        .unwrap()
    }

    fn placed(placement: &str) -> VirtualMachine {
        vm(serde_json::json!({ "vcpus": 2, "placement": placement }))
    }

    /// A VMM whose vCPUs may run on `cpus`, with `shares`.
    fn vmm(cpus: &[&str], shares: u32) -> VmStatus {
        let mut status: VmStatus = serde_json::from_value(serde_json::json!({
            "name": "v", "state": "running", "memoryMib": 64, "numaPolicy": "None", "numaNodes": "",
            "uptimeMs": 1, "bootTimeMs": 7, "shares": shares, "priorityMechanism": "cgroup", "vcpus": []
        }))
        .unwrap();
        status.vcpus = cpus
            .iter()
            .enumerate()
            .map(|(i, c)| {
                serde_json::from_value::<VcpuStatus>(serde_json::json!({
                    "index": i, "tid": 100 + i, "hostCpus": c, "cpuTimeMs": 0
                }))
                .unwrap()
            })
            .collect();
        status
    }

    fn offered() -> CpuSet {
        CpuSet::parse("0-3").unwrap()
    }

    #[test]
    fn dedicated_vcpus_on_a_subset_of_the_list_need_no_change_shared_ones_do() {
        // Dedicated: the VMM pinned the two vCPUs to 2 and 3 out of 2-5.
        assert!(cpus_in_effect(&placed("Dedicated"), "2-5", "2-3"));
        assert!(!cpus_in_effect(&placed("Dedicated"), "4-5", "2-3"), "pinned outside the new list");
        // Shared: the threads float over exactly the list.
        assert!(cpus_in_effect(&placed("Shared"), "0-3", "0-3"));
        assert!(!cpus_in_effect(&placed("Shared"), "0-3", "0-1"));
        assert!(!cpus_in_effect(&placed("Shared"), "0-3", ""), "unknown: apply");
    }

    #[test]
    fn the_changes_a_running_vm_needs() {
        let hc = |list: &str| serde_json::json!({ "vcpus": 2, "hostCpus": list });
        let low = serde_json::json!({ "vcpus": 2, "priority": "Low" });
        let none = Changes::default();
        // (spec cpu, VMM's CPUs, VMM's shares, offered) → changes.
        let cases: Vec<(serde_json::Value, &[&str], u32, CpuSet, Changes)> = vec![
            (serde_json::json!({ "vcpus": 2 }), &["0-3", "0-3"], 1000, offered(), none.clone()),
            (hc("1"), &["0-3", "0-3"], 1000, offered(), Changes { host_cpus: Some("1".into()), ..none.clone() }),
            (hc("1"), &["1", "1"], 1000, offered(), none.clone()),
            (low.clone(), &["0-3", "0-3"], 1000, offered(), Changes { shares: Some(500), ..none.clone() }),
            (low, &["0-3", "0-3"], 500, offered(), none.clone()),
            // Host facts unknown yet: every offered CPU is none, an explicit list not offered.
            (serde_json::json!({ "vcpus": 2 }), &["0-3", "0-3"], 1000, CpuSet::default(), none.clone()),
            (
                hc("1"),
                &["0-3", "0-3"],
                1000,
                CpuSet::default(),
                Changes { invalid: Some(String::new()), ..none.clone() },
            ),
            (hc("9"), &["0-3", "0-3"], 1000, offered(), Changes { invalid: Some(String::new()), ..none.clone() }),
        ];
        for (cpu, cpus, shares, offered, want) in cases {
            let vm = vm(cpu.clone());
            let mut got = changes(&vm, &vmm(cpus, shares), &offered, "host-1");
            if let Some(why) = &got.invalid {
                assert!(why.contains("spec.cpu.hostCpus"), "{why}");
                got.invalid = Some(String::new());
            }
            assert_eq!(got, want, "{cpu} on {cpus:?} with {shares} shares");
        }
    }

    /// The operator's choice (status.allocatedCpus) applies live as hostCpus does,
    /// and the spec's list wins over it.
    #[test]
    fn a_change_of_the_operators_cpus_applies_to_the_running_vm() {
        let none = Changes::default();
        // (spec cpu, status.allocatedCpus, VMM's CPUs) → changes.
        let shared = serde_json::json!({ "vcpus": 2 });
        let dedicated = serde_json::json!({ "vcpus": 2, "placement": "Dedicated" });
        let cases: Vec<(serde_json::Value, Option<&str>, &[&str], Changes)> = vec![
            (shared.clone(), None, &["0-3", "0-3"], none.clone()),
            (shared.clone(), Some("2-3"), &["0-3", "0-3"], Changes { host_cpus: Some("2-3".into()), ..none.clone() }),
            (shared.clone(), Some("2-3"), &["2-3", "2-3"], none.clone()),
            (shared.clone(), Some("0-3"), &["2-3", "2-3"], Changes { host_cpus: Some("0-3".into()), ..none.clone() }),
            // Dedicated: pinned 1:1 inside the operator's CPUs is in effect.
            (dedicated.clone(), Some("2-3"), &["2", "3"], none.clone()),
            (dedicated, Some("0-1"), &["2", "3"], Changes { host_cpus: Some("0-1".into()), ..none.clone() }),
            (serde_json::json!({ "vcpus": 2, "hostCpus": "1" }), Some("2-3"), &["1", "1"], none.clone()),
            (shared.clone(), Some("7"), &["0-3", "0-3"], Changes { invalid: Some(String::new()), ..none.clone() }),
        ];
        for (cpu, allocated, cpus, want) in cases {
            let mut vm = vm(cpu.clone());
            vm.status =
                Some(VirtualMachineStatus { allocated_cpus: allocated.map(str::to_string), ..Default::default() });
            let mut got = changes(&vm, &vmm(cpus, 1000), &offered(), "host-1");
            if let Some(why) = &got.invalid {
                assert_eq!(why, "status.allocatedCpus: CPU 7 is not offered to VMs on host-1 (offered: 0-3)");
                got.invalid = Some(String::new());
            }
            assert_eq!(got, want, "{cpu} with allocatedCpus {allocated:?} on {cpus:?}");
        }
    }

    fn seen<'a>(vm: &'a VirtualMachine, vmm: &'a VmStatus, changes: &'a Changes, outcome: &'a Outcome) -> Seen<'a> {
        Seen {
            vm,
            node: "host-1",
            vmm,
            changes,
            outcome,
            started_at_ms: 1_700_000_000_000,
            cpu_usage: Some(0.26),
            agent_url: "http://10.0.0.1:7445",
            now: Time("2026-01-02T03:04:05Z".parse().unwrap()),
        }
    }

    #[test]
    fn a_running_vm_is_reported_with_what_its_vmm_says() {
        let vm = placed("Shared");
        let vmm = vmm(&["0-3", "0-3"], 1000);
        let (changes, outcome) = (Changes::default(), Outcome::default());
        let status = status(&seen(&vm, &vmm, &changes, &outcome));
        assert_eq!(status.phase, Some(VmPhase::Running));
        assert_eq!(
            (status.host_cpus.as_deref(), status.shares, status.boot_millis),
            (Some("0-3"), Some(1000), Some(7))
        );
        assert_eq!(status.cpu_usage.as_deref(), Some("250m"), "rounded to 50m");
        assert_eq!(status.console_url.as_deref(), Some("http://10.0.0.1:7445/vms/ns/v/console"));
        assert_eq!(status.observed_generation, Some(4));
        assert!(status.started_at.is_some());
        let ready = status.conditions.get(conditions::READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.message.as_str()), ("True", "running on host-1 (running)"));
        assert!(status.conditions.get(conditions::CPU_CONFIG_APPLIED).is_none(), "only said once something failed");
        // What the VM booted with stays while it runs (only a start writes it).
        let mut booted = vm.clone();
        let with = drover_crds::vm::BootedWith::of(&vm.spec);
        booted.status = Some(VirtualMachineStatus { booted_with: Some(with.clone()), ..Default::default() });
        assert_eq!(status_of(&booted, &vmm, &changes, &outcome).booted_with, Some(with));
        // Under way to another host: Migrating.
        let mut moving = vm.clone();
        moving.status = Some(VirtualMachineStatus { migration: Some("m".into()), ..Default::default() });
        assert_eq!(status_of(&moving, &vmm, &changes, &outcome).phase, Some(VmPhase::Migrating));
    }

    fn status_of(vm: &VirtualMachine, vmm: &VmStatus, changes: &Changes, outcome: &Outcome) -> VirtualMachineStatus {
        status(&seen(vm, vmm, changes, outcome))
    }

    #[test]
    fn a_refused_or_invalid_change_is_a_condition_until_it_applies() {
        let mut vm = placed("Shared");
        let vmm = vmm(&["0-3", "0-3"], 1000);
        let refused = Outcome { host_cpus: Some(Err("VMM control API: no".into())), shares: Some(Ok(())) };
        let status = status_of(&vm, &vmm, &Changes::default(), &refused);
        let cond = status.conditions.get(conditions::CPU_CONFIG_APPLIED).unwrap();
        assert_eq!((cond.status.as_str(), cond.reason.as_str()), ("False", reasons::CPU_CONFIG_REFUSED));
        assert_eq!(status.observed_generation, None, "the generation is not done with");
        let invalid = Changes { invalid: Some("spec.cpu.hostCpus: CPU 900".into()), ..Default::default() };
        let status = status_of(&vm, &vmm, &invalid, &Outcome::default());
        assert_eq!(status.conditions.get(conditions::CPU_CONFIG_APPLIED).unwrap().reason, reasons::INVALID_SPEC);
        // Once the changes go through, the condition says so.
        vm.status = Some(status);
        let status = status_of(&vm, &vmm, &Changes::default(), &Outcome { host_cpus: Some(Ok(())), shares: None });
        let cond = status.conditions.get(conditions::CPU_CONFIG_APPLIED).unwrap();
        assert_eq!((cond.status.as_str(), cond.reason.as_str()), ("True", reasons::CPU_CONFIG_IN_EFFECT));
        assert_eq!(status.observed_generation, Some(4));
        assert!(Outcome { host_cpus: Some(Ok(())), shares: None }.changed() && !refused_only().changed());
    }

    fn refused_only() -> Outcome {
        Outcome { host_cpus: Some(Err("no".into())), shares: None }
    }
}
