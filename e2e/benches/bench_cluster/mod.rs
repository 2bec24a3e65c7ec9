//! A control plane of a benchmark's own, for the e2e benchmarks: its ports,
//! bridge, host network and state directory, `e2e/cluster up --bare` with release
//! binaries, the CRDs, every host in the pool `bench` under a HostPolicy, the test
//! guest written, the namespace `bench`, and the operator started. Down when dropped.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// What one benchmark's cluster is named and numbered by.
pub struct Names {
    /// The state directory is `drover-bench-<bench>-<pid>` in the temp dir.
    pub bench: &'static str,
    /// Bridge `drover<short>0`, netns `drover<short>-…`.
    pub short: &'static str,
    pub apiserver_port: u16,
    pub etcd_port: u16,
    /// The hosts' /24, e.g. `10.83.0`.
    pub host_net: &'static str,
}

pub struct Cluster {
    env: Vec<(&'static str, String)>,
    pub tools: PathBuf,
    pub kubeconfig: PathBuf,
    pub state: PathBuf,
    pub release: PathBuf,
    /// The test guest, written for the VMs.
    pub guest: PathBuf,
}

impl Cluster {
    /// The cluster of `names` with `hosts` hosts in a pool whose HostPolicy spec has
    /// `policy` (YAML lines, indented two spaces) beside its node selector.
    pub fn up(names: &Names, hosts: usize, policy: &str) -> Cluster {
        let release = repo().join("target/release");
        for bin in ["drover-agent", "drover-vmm", "drover-monitor", "drover-operator"] {
            assert!(
                release.join(bin).is_file(),
                "{} missing: cargo build --release --bins -p drover-node-agent -p drover-hypervisor -p drover-operator",
                release.join(bin).display()
            );
        }
        let state = std::env::temp_dir().join(format!("drover-bench-{}-{}", names.bench, std::process::id()));
        let env = vec![
            ("DROVER_STATE", state.display().to_string()),
            ("DROVER_APISERVER_PORT", names.apiserver_port.to_string()),
            ("DROVER_ETCD_PORT", names.etcd_port.to_string()),
            ("DROVER_BRIDGE", format!("drover{}0", names.short)),
            ("DROVER_HOST_NET", names.host_net.to_string()),
            ("DROVER_NETNS_PREFIX", format!("drover{}-", names.short)),
            ("DROVER_BIN_DIR", release.display().to_string()),
        ];
        let tools = PathBuf::from(
            String::from_utf8_lossy(&Command::new(repo().join("e2e/build-tools")).output().unwrap().stdout).trim(),
        );
        let guest = state.join("guest.elf");
        let mut cluster = Cluster { env, tools, kubeconfig: PathBuf::new(), state, release, guest };
        cluster.kubeconfig = PathBuf::from(cluster.script(&["up", "--bare", "--hosts", &hosts.to_string()]));
        let crds = repo().join("crds").display().to_string();
        cluster.kubectl(&["apply", "-f", &crds], None);
        cluster.kubectl(&["wait", "--for", "condition=Established", "--timeout", "60s", "-f", &crds], None);
        cluster.kubectl(&["label", "nodes", "--all", "drover.dev/pool=bench"], None);
        cluster.kubectl(
            &["apply", "-f", "-"],
            Some(&format!(
                "apiVersion: drover.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: bench}}\nspec:\n  \
                 nodeSelector: {{matchLabels: {{drover.dev/pool: bench}}}}\n{policy}"
            )),
        );
        let written = Command::new(cluster.release.join("drover-vmm"))
            .arg("write-test-guest")
            .arg(&cluster.guest)
            .status()
            .unwrap()
            .success();
        assert!(written, "drover-vmm write-test-guest {}", cluster.guest.display());
        cluster.kubectl(&["create", "namespace", "bench"], None);
        cluster
    }

    /// The operator (one replica), logging warnings to `operator-bench.log`.
    pub fn start_operator(&self) -> Child {
        let log = std::fs::File::create(self.state.join("operator-bench.log")).unwrap();
        Command::new(self.release.join("drover-operator"))
            .args(["--kubeconfig", &self.kubeconfig.display().to_string(), "--identity", "bench"])
            .args(["--http-address", "127.0.0.1:0", "--leader-lease-seconds", "6"])
            .env("RUST_LOG", "warn")
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub fn script(&self, args: &[&str]) -> String {
        let out = Command::new(repo().join("e2e/cluster"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v)))
            .output()
            .unwrap();
        assert!(out.status.success(), "e2e/cluster {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new(self.tools.join("kubectl"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The hosts' names.
    pub fn hosts(&self) -> Vec<String> {
        self.kubectl(&["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"], None)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ =
            Command::new(repo().join("e2e/cluster")).arg("down").envs(self.env.iter().map(|(k, v)| (*k, v))).output();
    }
}

/// A client of the cluster behind `kubeconfig` (for the benchmarks' watches).
pub async fn client(kubeconfig: &Path) -> kube::Client {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}
