//! `e2e/cluster` itself: it starts a working control plane from the cached binaries
//! in seconds, and `down` leaves nothing running.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::process::Command;
use std::time::Instant;

use drover_e2e::{control_plane, repo_root};

#[test]
fn cluster_up_serves_and_down_leaves_nothing_running() {
    let cp = control_plane(); // the binaries must be built already (./run-tests does it)
    let state = std::env::temp_dir().join(format!("drover-cluster-test-{}", std::process::id()));
    let cluster = |args: &[&str]| {
        Command::new(repo_root().join("e2e/cluster"))
            .args(args)
            .env("DROVER_STATE", &state)
            .env("DROVER_APISERVER_PORT", "27443")
            .env("DROVER_ETCD_PORT", "27379")
            .output()
            .expect("run e2e/cluster")
    };
    // Whatever happens below, leave nothing running.
    struct Down<F: Fn(&[&str]) -> std::process::Output>(F);
    impl<F: Fn(&[&str]) -> std::process::Output> Drop for Down<F> {
        fn drop(&mut self) {
            (self.0)(&["down"]);
        }
    }
    let _down = Down(cluster);
    let cluster = &_down.0;

    let started = Instant::now();
    let up = cluster(&["up", "--bare"]);
    let took = started.elapsed();
    assert!(up.status.success(), "e2e/cluster up failed: {}", String::from_utf8_lossy(&up.stderr));
    let kubeconfig = String::from_utf8_lossy(&up.stdout).trim().to_string();
    eprintln!("cached control-plane start took {took:?}");

    let pids: Vec<String> = ["etcd", "kube-apiserver"]
        .iter()
        .map(|c| std::fs::read_to_string(state.join(format!("{c}.pid"))).expect("pid file").trim().to_string())
        .collect();
    let version = Command::new(cp.tools_bin.join("kubectl"))
        .args(["--kubeconfig", &kubeconfig, "version", "-o", "json"])
        .output()
        .expect("kubectl version");
    assert!(version.status.success(), "{}", String::from_utf8_lossy(&version.stderr));
    assert!(String::from_utf8_lossy(&version.stdout).contains("serverVersion"), "no server version");

    // A TokenRequest works: service-account token signing is configured. (There is
    // no controller-manager to create the `default` service account.)
    let sa = Command::new(cp.tools_bin.join("kubectl"))
        .args(["--kubeconfig", &kubeconfig, "create", "serviceaccount", "tester", "-n", "default"])
        .output()
        .expect("kubectl create serviceaccount");
    assert!(sa.status.success(), "{}", String::from_utf8_lossy(&sa.stderr));
    let token = Command::new(cp.tools_bin.join("kubectl"))
        .args(["--kubeconfig", &kubeconfig, "create", "token", "tester", "-n", "default"])
        .output()
        .expect("kubectl create token");
    assert!(token.status.success(), "TokenRequest failed: {}", String::from_utf8_lossy(&token.stderr));
    assert_eq!(String::from_utf8_lossy(&token.stdout).trim().split('.').count(), 3, "a JWT");

    let down = cluster(&["down"]);
    assert!(down.status.success(), "e2e/cluster down failed: {}", String::from_utf8_lossy(&down.stderr));
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} still runs after down");
    }
    assert!(!state.exists(), "state directory left behind");
    assert!(std::net::TcpStream::connect("127.0.0.1:27443").is_err(), "API server port still open");
}
