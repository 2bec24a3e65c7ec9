//! Hosts of the test cluster: network namespaces made by `e2e/cluster host add`, each
//! with its own address on the cluster's bridge, its own `Node` and its own
//! `drover-agent` (see the script's `lib/hosts.sh`).
//!
//! The cluster is the one `./run-tests` starts: its `DROVER_STATE`, bridge, network
//! and namespace prefix come from the environment, which the script reads. Hosts need
//! root. A [`Host`] is removed (processes killed, namespace, veth, `Node` and state
//! deleted) when it is dropped, so a failing test leaves nothing behind.
//!
//! Tests in one binary run in parallel threads and share the cluster: give every
//! host a name of its own, e.g. with [`unique_name`].

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::repo_root;

/// The state directory of the test cluster (`DROVER_STATE`). Panics, saying how to
/// get one, when it is not set: a host test must fail, not pass, without a cluster.
pub fn cluster_state() -> PathBuf {
    match std::env::var_os("DROVER_STATE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => panic!(
            "this test adds hosts to the test cluster: DROVER_STATE is not set; run it under ./run-tests \
             (or export the DROVER_* variables run-tests sets and start the cluster with e2e/cluster up --bare, as root)"
        ),
    }
}

/// The hosts' gateway: the bridge's address, where they reach the API server.
pub fn gateway() -> Ipv4Addr {
    let path = cluster_state().join("network");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e} (is the cluster up?)", path.display()));
    let net = text
        .lines()
        .find_map(|l| l.strip_prefix("HOST_NET="))
        .unwrap_or_else(|| panic!("no HOST_NET in {}", path.display()));
    format!("{net}.1").parse().unwrap_or_else(|e| panic!("HOST_NET {net} in {}: {e}", path.display()))
}

/// The kubeconfig the agents use: the API server at the gateway's address.
pub fn hosts_kubeconfig() -> PathBuf {
    cluster_state().join("hosts/kubeconfig")
}

/// A host name no other test (in this process or another) uses: `prefix-PID-N`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Runs `e2e/cluster ARGS` with the test cluster's environment (and `extra_env`);
/// panics with its output unless it succeeds; returns its stdout.
pub fn cluster(args: &[&str], extra_env: &[(&str, &str)]) -> String {
    let state = cluster_state();
    let out = Command::new(repo_root().join("e2e/cluster"))
        .args(args)
        .env("DROVER_STATE", &state)
        .envs(extra_env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run e2e/cluster: {e}"));
    assert!(
        out.status.success(),
        "e2e/cluster {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How to start a host's agent.
#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    /// Extra flags after the standard ones (e.g. shorter intervals). No spaces inside
    /// one flag: the script splits them at spaces.
    pub agent_args: Vec<String>,
    /// Where `drover-agent` (and `drover-vmm`, `drover-monitor`) are; default
    /// `DROVER_BIN_DIR`, else the checkout's `target/debug`.
    pub bin_dir: Option<PathBuf>,
}

/// What a TCP connection attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Something listens there.
    Open,
    /// The address answered with a reset: reachable, nothing listens.
    Refused,
    /// No answer within the time (or no route): cut off.
    Unreachable,
}

/// One host of the test cluster. Dropping it removes it.
#[derive(Debug)]
pub struct Host {
    name: String,
    ip: Ipv4Addr,
    netns: String,
    dir: PathBuf,
    removed: bool,
}

impl Host {
    /// Adds host `name` with its agent started the standard way.
    pub fn add(name: &str) -> Host {
        Host::add_with(name, &HostOptions::default())
    }

    /// Adds host `name`; panics with the script's output when that fails.
    pub fn add_with(name: &str, options: &HostOptions) -> Host {
        let state = cluster_state();
        assert!(
            options.agent_args.iter().all(|a| !a.contains(char::is_whitespace)),
            "agent arguments may not contain white space: {:?}",
            options.agent_args
        );
        let args = options.agent_args.join(" ");
        let bin_dir = options.bin_dir.as_ref().map(|d| d.display().to_string());
        let mut env = vec![("DROVER_AGENT_ARGS", args.as_str())];
        if let Some(dir) = &bin_dir {
            env.push(("DROVER_BIN_DIR", dir));
        }
        let out = cluster(&["host", "add", name], &env);
        let ip = out
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("e2e/cluster host add {name} printed {out:?}, not an address: {e}"));
        let prefix = std::fs::read_to_string(state.join("network"))
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("NETNS_PREFIX=").map(str::to_string)))
            .unwrap_or_else(|| panic!("no NETNS_PREFIX in {}", state.join("network").display()));
        Host {
            name: name.to_string(),
            ip,
            netns: format!("{prefix}{name}"),
            dir: state.join("hosts").join(name),
            removed: false,
        }
    }

    /// Its name (also its `Node`'s name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its address on the bridge.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The name of its network namespace (`ip netns`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Power failure: SIGKILL every process in it (agent and VMMs), wipe its runtime
    /// dir; its state dir stays. Its network is down until [`Host::start`].
    pub fn stop(&self) {
        self.host("stop");
    }

    /// Power back: starts its agent again with the same command line.
    pub fn start(&self) {
        self.host("start");
    }

    /// Cuts its network: it reaches neither the API server nor other hosts; its
    /// processes keep running.
    pub fn isolate(&self) {
        self.host("isolate");
    }

    /// Undoes [`Host::isolate`].
    pub fn heal(&self) {
        self.host("heal");
    }

    fn host(&self, what: &str) {
        cluster(&["host", what, &self.name], &[]);
    }

    /// Everything its agents wrote so far (the log is kept across stop/start; the
    /// script adds a `[drover-e2e] ... starting ...` line before each start).
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The pid of its agent, while that runs.
    pub fn agent_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.dir.join("agent.pid")).ok()?.trim().parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next())?;
        (state != Some('Z')).then_some(pid)
    }

    /// Its runtime dir (the agent's `--runtime-dir`; models /run: wiped by `stop`).
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Its state dir (the agent's `--state-dir`; models /var/lib: kept by `stop`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("lib")
    }

    /// The processes in its network namespace.
    pub fn pids(&self) -> Vec<u32> {
        let out = Command::new("ip").args(["netns", "pids", &self.netns]).output().expect("run ip netns pids");
        assert!(out.status.success(), "ip netns pids {}: {}", self.netns, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    }

    /// Runs `program args` inside the host (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip netns exec {} {program}: {e}", self.netns))
    }

    /// Tries a TCP connection from inside the host to `addr`, for at most `timeout`.
    pub fn tcp_probe(&self, addr: SocketAddrV4, timeout: Duration) -> Reach {
        let secs = format!("{:.1}", timeout.as_secs_f64());
        let script = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
        let out = self.exec("timeout", &[&secs, "bash", "-c", &script]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            Reach::Open
        } else if stderr.contains("Connection refused") {
            Reach::Refused
        } else {
            Reach::Unreachable
        }
    }

    /// Removes it now (also what dropping it does, without the panic on failure).
    pub fn remove(mut self) {
        self.removed = true;
        cluster(&["host", "remove", &self.name], &[]);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let out = Command::new(repo_root().join("e2e/cluster"))
            .args(["host", "remove", &self.name])
            .env("DROVER_STATE", cluster_state())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("removing host {} failed: {}", self.name, String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("removing host {}: cannot run e2e/cluster: {e}", self.name),
        }
    }
}
