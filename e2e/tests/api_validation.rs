//! The API server refuses bad Drover objects at `kubectl apply`, with a message that
//! names the field. Runs against the real kube-apiserver of `e2e/cluster`.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use drover_e2e::control_plane;
use serde_json::{Value, json};

/// A valid object of each kind; each case below breaks one thing in it.
fn base(kind: &str) -> Value {
    let spec = match kind {
        "VirtualMachine" => {
            json!({"cpu": {"vcpus": 2}, "memory": {"size": "1Gi"}, "boot": {"kernel": "/images/guest"}})
        }
        "VirtualMachineMigration" => json!({"vmName": "vm-1"}),
        "HostPolicy" => json!({"nodeSelector": {"matchLabels": {"pool": "a"}}}),
        "DRSRule" => json!({"type": "VmVmAntiAffinity", "vmNames": ["vm-1", "vm-2"]}),
        other => panic!("unknown kind {other}"),
    };
    json!({"apiVersion": "drover.dev/v1alpha1", "kind": kind, "metadata": {"name": "subject"}, "spec": spec})
}

/// Sets (or, with `null`, removes) the value at a dotted path such as `spec.cpu.vcpus`.
fn with(mut obj: Value, changes: &[(&str, Value)]) -> Value {
    for (path, value) in changes {
        let keys: Vec<&str> = path.split('.').collect();
        let (last, parents) = keys.split_last().expect("non-empty path");
        let mut node = &mut obj;
        for key in parents {
            node = node.as_object_mut().expect("object").entry(*key).or_insert_with(|| json!({}));
        }
        let map = node.as_object_mut().expect("object");
        if value.is_null() {
            map.remove(*last);
        } else {
            map.insert((*last).to_string(), value.clone());
        }
    }
    obj
}

struct Case {
    what: &'static str,
    kind: &'static str,
    changes: Vec<(&'static str, Value)>,
    /// The field the message must name.
    field: &'static str,
    /// Words the message must contain.
    says: &'static str,
}

fn case(
    what: &'static str,
    kind: &'static str,
    changes: Vec<(&'static str, Value)>,
    field: &'static str,
    says: &'static str,
) -> Case {
    Case { what, kind, changes, field, says }
}

const VM: &str = "VirtualMachine";
const MIG: &str = "VirtualMachineMigration";
const HP: &str = "HostPolicy";
const RULE: &str = "DRSRule";

/// Bad input on creation. The README's table of refused input is this list.
fn create_cases() -> Vec<Case> {
    vec![
        case("vCPUs zero", VM, vec![("spec.cpu.vcpus", json!(0))], "spec.cpu.vcpus", "greater than or equal to 1"),
        case(
            "vCPUs above the maximum",
            VM,
            vec![("spec.cpu.vcpus", json!(255))],
            "spec.cpu.vcpus",
            "less than or equal to 254",
        ),
        case(
            "memory not a quantity",
            VM,
            vec![("spec.memory.size", json!("lots"))],
            "spec.memory.size",
            "must be a quantity",
        ),
        case(
            "memory below the minimum",
            VM,
            vec![("spec.memory.size", json!("8Mi"))],
            "spec.memory.size",
            "at least 16Mi",
        ),
        case(
            "memory above the maximum",
            VM,
            vec![("spec.memory.size", json!("8Ti"))],
            "spec.memory.size",
            "at most 4Ti",
        ),
        case(
            "memory not whole MiB",
            VM,
            vec![("spec.memory.size", json!("1.5G"))],
            "spec.memory.size",
            "whole number of MiB",
        ),
        case("memory missing", VM, vec![("spec.memory", Value::Null)], "spec.memory", "Required value"),
        case(
            "unknown runStrategy",
            VM,
            vec![("spec.runStrategy", json!("Sometimes"))],
            "spec.runStrategy",
            "Unsupported value",
        ),
        case(
            "malformed host CPU list",
            VM,
            vec![("spec.cpu.hostCpus", json!("0-3,,8"))],
            "spec.cpu.hostCpus",
            "must be a CPU list",
        ),
        case(
            "host CPU range backwards",
            VM,
            vec![("spec.cpu.hostCpus", json!("7-2"))],
            "spec.cpu.hostCpus",
            "low-high ranges",
        ),
        case(
            "Dedicated with fewer host CPUs than vCPUs",
            VM,
            vec![("spec.cpu", json!({"vcpus": 4, "placement": "Dedicated", "hostCpus": "0-2"}))],
            "spec.cpu.hostCpus",
            "at least one host CPU per vCPU",
        ),
        case(
            "unknown placement",
            VM,
            vec![("spec.cpu.placement", json!("Exclusive"))],
            "spec.cpu.placement",
            "Unsupported value",
        ),
        case(
            "topology that does not multiply to vCPUs",
            VM,
            vec![("spec.cpu.topology", json!({"sockets": 2, "cores": 2, "threads": 2}))],
            "spec.cpu.topology",
            "must equal vcpus",
        ),
        case(
            "Custom priority without shares",
            VM,
            vec![("spec.cpu.priority", json!("Custom"))],
            "spec.cpu.shares",
            "must be set when priority is Custom",
        ),
        case(
            "shares with a named priority",
            VM,
            vec![("spec.cpu.priority", json!("High")), ("spec.cpu.shares", json!(3000))],
            "spec.cpu.shares",
            "only then",
        ),
        case(
            "shares out of range",
            VM,
            vec![("spec.cpu.priority", json!("Custom")), ("spec.cpu.shares", json!(20000))],
            "spec.cpu.shares",
            "less than or equal to 10000",
        ),
        case(
            "NUMA nodes without a policy",
            VM,
            vec![("spec.cpu.numa", json!({"nodes": [0]}))],
            "spec.cpu.numa.policy",
            "needs a policy",
        ),
        case(
            "Preferred NUMA policy with two nodes",
            VM,
            vec![("spec.cpu.numa", json!({"policy": "Preferred", "nodes": [0, 1]}))],
            "spec.cpu.numa.nodes",
            "single node",
        ),
        case(
            "NUMA node listed twice",
            VM,
            vec![("spec.cpu.numa", json!({"policy": "Strict", "nodes": [0, 0]}))],
            "spec.cpu.numa.nodes[1]",
            "Duplicate value",
        ),
        case(
            "kernel path not absolute",
            VM,
            vec![("spec.boot.kernel", json!("vmlinux"))],
            "spec.boot.kernel",
            "absolute path",
        ),
        case("kernel missing", VM, vec![("spec.boot.kernel", Value::Null)], "spec.boot.kernel", "Required value"),
        case(
            "command line too long",
            VM,
            vec![("spec.boot.cmdline", json!("x".repeat(2049)))],
            "spec.boot.cmdline",
            "Too long",
        ),
        case(
            "two disks with one name",
            VM,
            vec![("spec.disks", json!([{"name": "root", "path": "/d/a.raw"}, {"name": "root", "path": "/d/b.raw"}]))],
            "spec.disks[1]",
            "Duplicate value",
        ),
        case(
            "disk path not absolute",
            VM,
            vec![("spec.disks", json!([{"name": "root", "path": "a.raw"}]))],
            "spec.disks[0].path",
            "absolute path",
        ),
        case(
            "unknown HA restart priority",
            VM,
            vec![("spec.ha.restartPriority", json!("Critical"))],
            "spec.ha.restartPriority",
            "Unsupported value",
        ),
        case(
            "unknown maintenance action",
            VM,
            vec![("spec.onMaintenance", json!("Evacuate"))],
            "spec.onMaintenance",
            "Unsupported value",
        ),
        case("migration without a VM name", MIG, vec![("spec.vmName", Value::Null)], "spec.vmName", "Required value"),
        case(
            "migration VM name not a name",
            MIG,
            vec![("spec.vmName", json!("Web_01"))],
            "spec.vmName",
            "should match",
        ),
        case(
            "migration downtime budget zero",
            MIG,
            vec![("spec.maxDowntimeMillis", json!(0))],
            "spec.maxDowntimeMillis",
            "greater than or equal to 1",
        ),
        case(
            "migration timeout too short",
            MIG,
            vec![("spec.timeoutSeconds", json!(5))],
            "spec.timeoutSeconds",
            "greater than or equal to 10",
        ),
        case(
            "migration without lanes",
            MIG,
            vec![("spec.lanes", json!(0))],
            "spec.lanes",
            "greater than or equal to 1",
        ),
        case(
            "migration with too many lanes",
            MIG,
            vec![("spec.lanes", json!(17))],
            "spec.lanes",
            "less than or equal to 16",
        ),
        case(
            "unknown migration trigger",
            MIG,
            vec![("spec.trigger", json!("Cron"))],
            "spec.trigger",
            "Unsupported value",
        ),
        case(
            "host policy without node selector",
            HP,
            vec![("spec.nodeSelector", Value::Null)],
            "spec.nodeSelector",
            "Required value",
        ),
        case(
            "CPU overcommit below 1",
            HP,
            vec![("spec.capacity.cpuOvercommitRatio", json!(0.5))],
            "spec.capacity.cpuOvercommitRatio",
            "between 1",
        ),
        case(
            "memory overcommit below 1",
            HP,
            vec![("spec.capacity.memoryOvercommitRatio", json!(0.9))],
            "spec.capacity.memoryOvercommitRatio",
            "between 1",
        ),
        case(
            "reserved memory not a quantity",
            HP,
            vec![("spec.capacity.reservedMemory", json!("2 GB"))],
            "spec.capacity.reservedMemory",
            "quantity",
        ),
        case(
            "reserved CPUs not a CPU list",
            HP,
            vec![("spec.capacity.reservedCpus", json!("all"))],
            "spec.capacity.reservedCpus",
            "must be a CPU list",
        ),
        case(
            "DRS threshold below 1",
            HP,
            vec![("spec.drs.migrationThreshold", json!(0))],
            "spec.drs.migrationThreshold",
            "greater than or equal to 1",
        ),
        case(
            "DRS threshold above 5",
            HP,
            vec![("spec.drs.migrationThreshold", json!(6))],
            "spec.drs.migrationThreshold",
            "less than or equal to 5",
        ),
        case(
            "unknown DRS automation level",
            HP,
            vec![("spec.drs.automationLevel", json!("Auto"))],
            "spec.drs.automationLevel",
            "Unsupported value",
        ),
        case(
            "DRS interval too short",
            HP,
            vec![("spec.drs.intervalSeconds", json!(1))],
            "spec.drs.intervalSeconds",
            "greater than or equal to 10",
        ),
        case(
            "HA failures to tolerate too many",
            HP,
            vec![("spec.ha.hostFailuresToTolerate", json!(40))],
            "spec.ha.hostFailuresToTolerate",
            "less than or equal to 31",
        ),
        case(
            "HA detection shorter than three heartbeats",
            HP,
            vec![("spec.ha.heartbeatIntervalSeconds", json!(2)), ("spec.ha.failureDetectionSeconds", json!(5))],
            "spec.ha.failureDetectionSeconds",
            "at least 3 heartbeat intervals",
        ),
        case(
            "unknown isolation response",
            HP,
            vec![("spec.ha.isolationResponse", json!("LeaveRunning"))],
            "spec.ha.isolationResponse",
            "Unsupported value",
        ),
        case(
            "VM-Host rule without node selector",
            RULE,
            vec![("spec.type", json!("VmHostAffinity"))],
            "spec.nodeSelector",
            "need a nodeSelector",
        ),
        case(
            "VM-VM rule with node selector",
            RULE,
            vec![("spec.nodeSelector", json!({"matchLabels": {"rack": "a"}}))],
            "spec.nodeSelector",
            "take no nodeSelector",
        ),
        case(
            "VM-VM rule with one VM",
            RULE,
            vec![("spec.vmNames", json!(["vm-1"]))],
            "spec.vmNames",
            "at least two VMs",
        ),
        case(
            "rule with both VM names and VM selector",
            RULE,
            vec![("spec.vmSelector", json!({"matchLabels": {"app": "web"}}))],
            "spec",
            "exactly one of vmNames and vmSelector",
        ),
        case(
            "rule with neither VM names nor VM selector",
            RULE,
            vec![("spec.vmNames", Value::Null)],
            "spec",
            "exactly one of vmNames and vmSelector",
        ),
        case("unknown rule type", RULE, vec![("spec.type", json!("VmVmMaybe"))], "spec.type", "Unsupported value"),
        case(
            "unknown rule enforcement",
            RULE,
            vec![("spec.enforcement", json!("Sometimes"))],
            "spec.enforcement",
            "Unsupported value",
        ),
    ]
}

/// Bad changes to an object that was valid when created.
fn update_cases() -> Vec<Case> {
    vec![
        case("migration spec changed", MIG, vec![("spec.targetNode", json!("host-9"))], "spec", "spec is immutable"),
        case("rule type changed", RULE, vec![("spec.type", json!("VmVmAffinity"))], "spec.type", "type is immutable"),
    ]
}

fn apply(ns: &str, obj: &Value) -> std::process::Output {
    control_plane().kubectl(&["apply", "-n", ns, "-f", "-"], Some(&obj.to_string()))
}

fn check_refused(ns: &str, case: &Case, obj: &Value, failures: &mut Vec<String>) {
    let out = apply(ns, obj);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        failures.push(format!("{}: accepted, should be refused", case.what));
    } else if !stderr.contains(&format!("{}:", case.field)) || !stderr.contains(case.says) {
        failures.push(format!(
            "{}: message should name `{}` and say `{}`, got: {}",
            case.what,
            case.field,
            case.says,
            stderr.trim()
        ));
    }
}

#[test]
fn every_base_object_is_accepted() {
    let cp = control_plane();
    cp.install_crds();
    let ns = cp.fresh_namespace("valid");
    for kind in [VM, MIG, HP, RULE] {
        let mut obj = base(kind);
        obj["metadata"]["name"] = json!(format!("base-{ns}"));
        let out = apply(&ns, &obj);
        assert!(out.status.success(), "valid {kind} refused: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn bad_input_is_refused_with_a_message_naming_the_field() {
    let cp = control_plane();
    cp.install_crds();
    let ns = cp.fresh_namespace("bad-input");
    let cases = create_cases();
    assert!(cases.len() >= 20, "the issue asks for at least 20 kinds of bad input");
    let mut failures = Vec::new();
    for case in &cases {
        let obj = with(base(case.kind), &case.changes);
        check_refused(&ns, case, &obj, &mut failures);
    }
    assert!(failures.is_empty(), "{} of {} cases wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn immutable_fields_cannot_change() {
    let cp = control_plane();
    cp.install_crds();
    let ns = cp.fresh_namespace("immutable");
    let mut failures = Vec::new();
    for case in update_cases() {
        let mut original = base(case.kind);
        original["metadata"]["name"] = json!(format!("immutable-{}", case.kind.to_lowercase()));
        let out = apply(&ns, &original);
        assert!(
            out.status.success(),
            "{}: creating the original failed: {}",
            case.what,
            String::from_utf8_lossy(&out.stderr)
        );
        let changed = with(original, &case.changes);
        check_refused(&ns, &case, &changed, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn cluster_scoped_host_policy_ignores_namespace() {
    // HostPolicy is cluster-scoped (like a vSphere cluster); a VirtualMachine is not.
    let cp = control_plane();
    cp.install_crds();
    let out = cp.kubectl_ok(&["api-resources", "--api-group=drover.dev", "--no-headers", "-o", "wide"], None);
    let line = |plural: &str| {
        out.lines()
            .find(|l| l.starts_with(plural))
            .unwrap_or_else(|| panic!("{plural} missing from api-resources:\n{out}"))
            .to_string()
    };
    assert!(line("hostpolicies").contains("false"), "hostpolicies should not be namespaced: {}", line("hostpolicies"));
    assert!(
        line("virtualmachines ").contains("true"),
        "virtualmachines should be namespaced: {}",
        line("virtualmachines ")
    );
}
