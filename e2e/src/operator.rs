//! `drover-operator` replicas for tests: started on this machine against the test
//! control plane, each scoped to one test's namespace (so tests do not act on each
//! other's VMs) and electing a leader on a Lease in that namespace.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::control_plane;
use crate::vms::bin_dir;

/// One replica; killed when dropped.
pub struct Operator {
    child: Option<Child>,
    pub identity: String,
    log: PathBuf,
    args: Vec<String>,
}

impl Operator {
    /// Starts replica `identity` for the VMs of `namespace`, with `extra` flags.
    pub fn start(identity: &str, namespace: &str, extra: &[&str]) -> Operator {
        let log = crate::hosts::cluster_state().join(format!("operator-{namespace}-{identity}.log"));
        let mut args: Vec<String> = [
            "--kubeconfig",
            &control_plane().kubeconfig.display().to_string(),
            "--watch-namespace",
            namespace,
            "--namespace",
            namespace,
            "--identity",
            identity,
            "--http-address",
            "127.0.0.1:0",
            "--leader-lease-seconds",
            "4",
            "--restart-backoff-seconds",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut op = Operator { child: None, identity: identity.into(), log, args };
        op.spawn();
        op
    }

    fn spawn(&mut self) {
        let program = bin_dir().join("drover-operator");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("operator log {}: {e}", self.log.display()));
        let child = Command::new(&program)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e} (cargo build -p drover-operator)", program.display()));
        self.child = Some(child);
    }

    /// SIGKILL, as a crash would; waits until it is gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same flags (same identity).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The identity holding the operators' leader Lease in `namespace`, if any.
pub fn leader(namespace: &str) -> Option<String> {
    let out = control_plane()
        .kubectl(&["get", "lease", "drover-operator", "-n", namespace, "-o", "jsonpath={.spec.holderIdentity}"], None);
    let holder = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !holder.is_empty()).then_some(holder)
}
