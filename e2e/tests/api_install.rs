//! The CRDs install on a real kube-apiserver, the examples apply, and the API reads
//! well from kubectl (short names, category, printer columns, explain).

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use drover_crds::{VirtualMachine, VirtualMachineStatus};
use drover_e2e::control_plane;
use kube::api::{Api, Patch, PatchParams, PostParams};

#[test]
fn crds_install_and_become_established() {
    let cp = control_plane();
    cp.install_crds();
    for crd in ["virtualmachines", "virtualmachinemigrations", "hostpolicies", "drsrules"] {
        let status = cp.kubectl_ok(
            &[
                "get",
                "crd",
                &format!("{crd}.drover.dev"),
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
            ],
            None,
        );
        assert_eq!(status, "True", "{crd} not Established");
    }
    let resources = cp.kubectl_ok(&["api-resources", "--api-group=drover.dev", "-o", "wide", "--no-headers"], None);
    let vm = resources.lines().find(|l| l.starts_with("virtualmachines ")).expect("virtualmachines served");
    assert!(vm.contains("dvm,vm") || vm.contains("vm,dvm"), "short names vm and dvm: {vm}");
    assert!(
        resources.lines().filter(|l| l.contains("drover")).count() >= 4,
        "category drover on every kind:\n{resources}"
    );
}

#[test]
fn every_example_applies_and_reads_well() {
    let cp = control_plane();
    cp.install_crds();
    let ns = cp.fresh_namespace("examples");
    let applied = cp.kubectl_ok(&["apply", "-n", &ns, "-f", "examples/"], None);
    let examples = std::fs::read_dir(drover_e2e::repo_root().join("examples")).expect("examples/").count();
    assert!(examples >= 4, "examples/ holds {examples} files");
    for object in [
        "virtualmachine.drover.dev/db-01",
        "virtualmachinemigration.drover.dev/db-01-move",
        "hostpolicy.drover.dev/production",
        "drsrule.drover.dev/web-spread",
    ] {
        assert!(applied.contains(object), "{object} not applied:\n{applied}");
    }

    // `kubectl get drover` lists every kind; `get vm -o wide` tells the story.
    let all = cp.kubectl_ok(&["get", "drover", "-n", &ns], None);
    for kind in [
        "virtualmachine.drover.dev/db-01",
        "virtualmachinemigration.drover.dev/db-01-move",
        "drsrule.drover.dev/web-spread",
    ] {
        assert!(all.contains(kind), "`kubectl get drover` misses {kind}:\n{all}");
    }
    let wide = cp.kubectl_ok(&["get", "vm", "-n", &ns, "-o", "wide"], None);
    let header: Vec<&str> = wide.lines().next().unwrap_or_default().split_whitespace().collect();
    for column in ["PHASE", "NODE", "VCPUS", "MEMORY", "AGE", "PLACEMENT", "PRIORITY"] {
        assert!(header.contains(&column), "column {column} missing from `kubectl get vm -o wide`:\n{wide}");
    }
    let db = wide.lines().find(|l| l.starts_with("db-01")).expect("db-01 listed");
    for value in ["1", "256Mi", "Dedicated", "High"] {
        assert!(db.split_whitespace().any(|v| v == value), "db-01 row lacks {value}: {db}");
    }
    let narrow = cp.kubectl_ok(&["get", "dvm", "-n", &ns], None);
    assert!(
        !narrow.contains("PLACEMENT") && narrow.contains("VCPUS"),
        "plain `get` keeps wide columns for -o wide:\n{narrow}"
    );
}

#[test]
fn kubectl_explain_describes_fields() {
    let cp = control_plane();
    cp.install_crds();
    let placement = cp.kubectl_ok(&["explain", "vm.spec.cpu.placement"], None);
    assert!(placement.contains("Dedicated: each vCPU gets a host CPU of its own"), "{placement}");
    let threshold = cp.kubectl_ok(&["explain", "hostpolicy.spec.drs.migrationThreshold"], None);
    assert!(threshold.contains("1 (conservative"), "{threshold}");
    let kind = cp.kubectl_ok(&["explain", "virtualmachinemigration"], None);
    assert!(kind.contains("live migration"), "{kind}");
}

#[tokio::test]
async fn status_is_written_only_through_the_status_subresource() {
    let cp = control_plane();
    cp.install_crds();
    let ns = cp.fresh_namespace("status");
    let client = cp.client().await.expect("client");
    let vms: Api<VirtualMachine> = Api::namespaced(client, &ns);
    let spec = serde_json::from_value(serde_json::json!({
        "cpu": {"vcpus": 2}, "memory": {"size": "256Mi"}, "boot": {"kernel": "/images/guest"}
    }))
    .expect("spec");
    let mut vm = VirtualMachine::new("status-test", spec);
    vm.status = Some(VirtualMachineStatus { node_name: Some("sneaky".into()), ..Default::default() });
    let created = vms.create(&PostParams::default(), &vm).await.expect("create");
    assert_eq!(created.status.and_then(|s| s.node_name), None, "status set on create must be dropped");

    // A patch of the main resource cannot write status.
    let patched = vms
        .patch(
            "status-test",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"nodeName": "sneaky"}})),
        )
        .await
        .expect("patch");
    assert_eq!(patched.status.and_then(|s| s.node_name), None, "status written through the main resource");

    // The status subresource writes status, and only status.
    let through_status = vms
        .patch_status(
            "status-test",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"nodeName": "host-1", "phase": "Scheduled"}, "spec": {"cpu": {"vcpus": 8}}})),
        )
        .await
        .expect("patch status");
    assert_eq!(through_status.status.as_ref().and_then(|s| s.node_name.as_deref()), Some("host-1"));
    assert_eq!(through_status.spec.cpu.vcpus, 2, "spec written through the status subresource");
    let shown = cp.kubectl_ok(&["get", "vm", "status-test", "-n", &ns, "--no-headers"], None);
    assert!(shown.contains("Scheduled") && shown.contains("host-1"), "{shown}");
}
