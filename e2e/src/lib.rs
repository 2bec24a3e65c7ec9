//! Helpers for tests that run against the real control plane of `e2e/cluster`.
//!
//! The tests need a running kube-apiserver: `./run-tests` starts one with
//! `e2e/cluster up --bare` and points `DROVER_E2E_KUBECONFIG` at it. Run alone, a
//! test without that variable fails and says how to provide it.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub mod hosts;
pub mod operator;
pub mod overlap;
pub mod vms;

/// Errors of the e2e helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A prerequisite of the tests is missing.
    #[error("{0}")]
    Missing(String),
    /// A command could not be run at all.
    #[error("cannot run {command}: {source}")]
    Spawn { command: String, source: std::io::Error },
    /// kube-rs could not load the kubeconfig.
    #[error("cannot load kubeconfig {path}: {source}")]
    Kubeconfig { path: String, source: kube::config::KubeconfigError },
    /// kube-rs could not build a client.
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The control plane the tests talk to.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// Path of its admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// Directory holding kubectl and helm.
    pub tools_bin: PathBuf,
}

/// The control plane named by `DROVER_E2E_KUBECONFIG` and `DROVER_E2E_TOOLS`.
/// Panics, saying what is missing, when the variables are not set or point nowhere:
/// a test that needs the API server must fail, not pass, without one.
pub fn control_plane() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| match find_control_plane() {
        Ok(cp) => cp,
        Err(e) => panic!("{e}"),
    })
}

fn find_control_plane() -> Result<ControlPlane, Error> {
    const HOW: &str = "run the tests with ./run-tests, or start a control plane with `e2e/cluster up --bare` and export \
                       DROVER_E2E_KUBECONFIG=$(e2e/cluster kubeconfig) DROVER_E2E_TOOLS=$(e2e/build-tools)";
    let kubeconfig = std::env::var_os("DROVER_E2E_KUBECONFIG").map(PathBuf::from).ok_or_else(|| {
        Error::Missing(format!("this test needs a running kube-apiserver: DROVER_E2E_KUBECONFIG is not set; {HOW}"))
    })?;
    let tools_bin = std::env::var_os("DROVER_E2E_TOOLS").map(PathBuf::from).ok_or_else(|| {
        Error::Missing(format!("this test needs kubectl and helm: DROVER_E2E_TOOLS is not set; {HOW}"))
    })?;
    if !kubeconfig.is_file() {
        return Err(Error::Missing(format!("kubeconfig {} does not exist; {HOW}", kubeconfig.display())));
    }
    for tool in ["kubectl", "helm"] {
        if !tools_bin.join(tool).is_file() {
            return Err(Error::Missing(format!("{tool} is not in {}; {HOW}", tools_bin.display())));
        }
    }
    Ok(ControlPlane { kubeconfig, tools_bin })
}

impl ControlPlane {
    /// Runs kubectl with these arguments (and `stdin`, if any) against the control plane.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.run("kubectl", args, stdin)
    }

    /// Runs helm with these arguments against the control plane.
    pub fn helm(&self, args: &[&str]) -> Output {
        self.run("helm", args, None)
    }

    fn run(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(self.tools_bin.join(tool))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .current_dir(repo_root())
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}", Error::Spawn { command: tool.into(), source: e }));
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).unwrap_or_else(|e| panic!("writing to {tool}: {e}"));
        }
        child.wait_with_output().unwrap_or_else(|e| panic!("waiting for {tool}: {e}"))
    }

    /// Runs kubectl and panics with its output unless it succeeds; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Installs the Drover CRDs from `crds/` (once per test process) and waits until
    /// the API server serves them.
    pub fn install_crds(&self) {
        static DONE: OnceLock<()> = OnceLock::new();
        DONE.get_or_init(|| {
            self.kubectl_ok(&["apply", "-f", "crds/"], None);
            self.kubectl_ok(&["wait", "--for", "condition=Established", "--timeout", "60s", "-f", "crds/"], None);
        });
    }

    /// Creates a namespace of its own for one test and returns its name.
    pub fn fresh_namespace(&self, prefix: &str) -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        self.kubectl_ok(&["create", "namespace", &name], None);
        name
    }

    /// A kube-rs client for the control plane.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        let path = self.kubeconfig.display().to_string();
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .map_err(|source| Error::Kubeconfig { path: path.clone(), source })?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|source| Error::Kubeconfig { path, source })?;
        Ok(kube::Client::try_from(config)?)
    }
}
