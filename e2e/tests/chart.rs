//! The Helm chart lints, renders, and what it renders is accepted by the real API
//! server (server-side dry run), with its CRDs the same as `crds/`.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use drover_e2e::{control_plane, repo_root};

#[test]
fn chart_lints_and_renders_objects_the_api_server_accepts() {
    let cp = control_plane();
    cp.install_crds();
    let lint = cp.helm(&["lint", "--strict", "charts/drover"]);
    assert!(
        lint.status.success(),
        "helm lint:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    let ns = cp.fresh_namespace("chart");
    let rendered = cp.helm(&["template", "drover", "charts/drover", "--namespace", &ns, "--include-crds"]);
    assert!(rendered.status.success(), "helm template: {}", String::from_utf8_lossy(&rendered.stderr));
    let manifests = String::from_utf8_lossy(&rendered.stdout).into_owned();
    for kind in ["kind: Deployment", "kind: DaemonSet", "kind: ClusterRole", "kind: CustomResourceDefinition"] {
        assert!(manifests.contains(kind), "chart renders no {kind}");
    }
    let applied = cp.kubectl_ok(&["apply", "--dry-run=server", "-n", &ns, "-f", "-"], Some(&manifests));
    assert!(
        applied.contains("daemonset.apps/drover-agent") && applied.contains("deployment.apps/drover-operator"),
        "{applied}"
    );
}

#[test]
fn chart_crds_are_the_generated_ones() {
    // The unit test in crds/ checks both copies against the types; this checks that
    // Helm picks them up from the place it reads CRDs from.
    let dir = repo_root().join("charts/drover/crds");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    for crd in ["virtualmachines", "virtualmachinemigrations", "hostpolicies", "drsrules"] {
        assert!(names.contains(&format!("{crd}.drover.dev.yaml")), "{crd} missing from charts/drover/crds: {names:?}");
    }
}
