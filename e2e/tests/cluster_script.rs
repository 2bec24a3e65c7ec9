//! `e2e/cluster` itself: it starts a working control plane from the cached binaries
//! in seconds, with hosts (network namespaces on a bridge, each with a Node and an
//! agent) that can be stopped, cut off and healed, and `down` leaves nothing behind.
//! Hosts need root: run as another user, these tests fail and say so.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use drover_e2e::hosts::{self, Host, HostOptions, Reach};
use drover_e2e::{control_plane, repo_root};

/// A stand-in for drover-agent that prints its command line and stays up, so that
/// these tests check the harness whatever the real agent does today.
fn fake_agent_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // One fixed place (the binaries of this test run one at a time), rewritten
        // whole by a rename so that no agent ever starts a half-written script.
        let dir = std::env::temp_dir().join("drover-fake-agent");
        std::fs::create_dir_all(&dir).unwrap();
        let partial = dir.join(format!(".drover-agent-{}", std::process::id()));
        std::fs::write(&partial, "#!/bin/sh\necho \"fake agent: $*\"\nexec sleep 3600\n").unwrap();
        let executable = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
        std::fs::set_permissions(&partial, executable).unwrap();
        std::fs::rename(&partial, dir.join("drover-agent")).unwrap();
        dir
    })
}

fn netns_exists(name: &str) -> bool {
    Path::new("/var/run/netns").join(name).exists()
}

/// Network interfaces in the root namespace whose names start with `prefix`.
fn links_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// A bridge name, /24 and namespace prefix that nothing on this machine uses.
/// A cluster of a test's own (its state directory, ports and network), brought
/// down when dropped so that a failing test leaves nothing running.
struct OwnCluster {
    state: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl OwnCluster {
    fn new(state: PathBuf, env: Vec<(&'static str, String)>) -> Self {
        Self { state, env }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(repo_root().join("e2e/cluster"))
            .args(args)
            .env("DROVER_STATE", &self.state)
            .env_remove("DROVER_AGENT_ARGS")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("run e2e/cluster")
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.run(&["down"]);
    }
}

/// Clusters of their own (free_network, ports) are made one at a time.
fn own_cluster_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn free_network() -> (String, String, String) {
    let out = Command::new("ip").args(["-4", "-o", "addr", "show"]).output().expect("run ip addr");
    let addresses = String::from_utf8_lossy(&out.stdout);
    (200..=250)
        .map(|n| (format!("drovers{n}"), format!("10.{n}.0"), format!("drovers{n}-")))
        .find(|(bridge, net, _)| {
            !addresses.contains(&format!("inet {net}.")) && !Path::new("/sys/class/net").join(bridge).exists()
        })
        .expect("no free 10.N.0.0/24 for a test cluster's hosts")
}

fn assert_root() {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "hosts are network namespaces: these tests need root (run ./run-tests as root)"
    );
    for tool in ["ip", "flock", "timeout", "setsid"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().expect("run sh");
        assert!(found.status.success(), "{tool} is missing (e2e/install-prereqs installs it)");
    }
}

#[test]
fn cluster_up_serves_and_down_leaves_nothing_running() {
    let cp = control_plane(); // the binaries must be built already (./run-tests does it)
    assert_root();
    let _lock = own_cluster_lock();
    let state = std::env::temp_dir().join(format!("drover-cluster-test-{}", std::process::id()));
    // A network of its own, apart from the run-tests cluster's (drovert0, 10.78.0)
    // and any other on this machine.
    let (bridge, net, prefix) = free_network();
    let (bridge, net, prefix) = (bridge.as_str(), net.as_str(), prefix.as_str());
    let fake = fake_agent_dir();
    let own = OwnCluster::new(
        state.clone(),
        vec![
            ("DROVER_APISERVER_PORT", "27443".into()),
            ("DROVER_ETCD_PORT", "27379".into()),
            ("DROVER_BRIDGE", bridge.into()),
            ("DROVER_HOST_NET", net.into()),
            ("DROVER_NETNS_PREFIX", prefix.into()),
            ("DROVER_BIN_DIR", fake.display().to_string()),
            ("DROVER_AGENT_ARGS", "--extra-one --extra-two=2".into()),
        ],
    );
    let cluster = |args: &[&str]| own.run(args);

    let started = Instant::now();
    let up = cluster(&["up", "--bare", "--hosts", "2"]);
    let took = started.elapsed();
    assert!(up.status.success(), "e2e/cluster up failed: {}", String::from_utf8_lossy(&up.stderr));
    let kubeconfig = String::from_utf8_lossy(&up.stdout).trim().to_string();
    eprintln!("cached control-plane start with 2 hosts took {took:?}");

    let pids: Vec<String> = ["etcd", "kube-apiserver", "hosts/host-1/agent", "hosts/host-2/agent"]
        .iter()
        .map(|c| std::fs::read_to_string(state.join(format!("{c}.pid"))).expect("pid file").trim().to_string())
        .collect();

    // The hosts: listed with their addresses and running agents, each in its
    // namespace, on the bridge, with its Node, its agent started with the agreed
    // command line.
    let list = cluster(&["host", "list"]);
    assert!(list.status.success(), "host list: {}", String::from_utf8_lossy(&list.stderr));
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    for (i, name) in ["host-1", "host-2"].iter().enumerate() {
        let ip = format!("{net}.{}", 11 + i);
        let row: Vec<&str> = list
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} not in host list:\n{list}"))
            .split_whitespace()
            .collect();
        assert_eq!(row[1..5], [ip.as_str(), "on", "running", "connected"], "host list:\n{list}");
        assert!(netns_exists(&format!("{prefix}{name}")), "no network namespace {prefix}{name}");
        let node = Command::new(cp.tools_bin.join("kubectl"))
            .args(["--kubeconfig", &kubeconfig, "get", "node", name, "-o"])
            .arg("jsonpath={.metadata.labels.drover\\.dev/host} {.status.addresses[?(@.type==\"InternalIP\")].address}")
            .output()
            .expect("kubectl get node");
        assert_eq!(
            String::from_utf8_lossy(&node.stdout),
            format!("true {ip}"),
            "{}",
            String::from_utf8_lossy(&node.stderr)
        );
        let log = std::fs::read_to_string(state.join(format!("hosts/{name}/agent.log"))).unwrap();
        let dir = state.join(format!("hosts/{name}"));
        let want = format!(
            "fake agent: --kubeconfig {hosts}/kubeconfig --node-name {name} --address {ip} --namespace drover-system \
             --runtime-dir {d}/run --state-dir {d}/lib --extra-one --extra-two=2",
            hosts = state.join("hosts").display(),
            d = dir.display()
        );
        assert!(log.contains(&want), "agent log of {name} lacks {want:?}:\n{log}");
    }
    assert!(links_with_prefix(bridge).len() >= 3, "bridge and veths: {:?}", links_with_prefix(bridge));
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
        // A killed agent whose parent is gone may stay a zombie until init reaps it.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.contains(") Z "), "process {pid} still runs after down: {stat}");
    }
    assert!(!state.exists(), "state directory left behind");
    assert!(std::net::TcpStream::connect("127.0.0.1:27443").is_err(), "API server port still open");
    let namespaces = std::fs::read_dir("/var/run/netns")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(prefix)).collect())
        .unwrap_or_else(|_| Vec::new());
    assert!(namespaces.is_empty(), "network namespaces left behind: {namespaces:?}");
    assert!(links_with_prefix(bridge).is_empty(), "bridge or veths left behind: {:?}", links_with_prefix(bridge));
}

/// The README's main job: `e2e/cluster up` brings up the control plane, three hosts
/// with real agents, two operator replicas, and every example: the VMs placed by
/// the operator and running, the example migration done.
#[test]
fn the_main_job_brings_up_hosts_and_operators_and_runs_every_example() {
    let cp = control_plane();
    assert_root();
    let _lock = own_cluster_lock();
    let state = std::env::temp_dir().join(format!("drover-main-job-test-{}", std::process::id()));
    let (bridge, net, prefix) = free_network();
    let bin_dir = std::env::var_os("DROVER_BIN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug"));
    let own = OwnCluster::new(
        state.clone(),
        vec![
            ("DROVER_APISERVER_PORT", "28443".into()),
            ("DROVER_ETCD_PORT", "28379".into()),
            ("DROVER_OPERATOR_PORT", "28080".into()),
            ("DROVER_BRIDGE", bridge),
            ("DROVER_HOST_NET", net),
            ("DROVER_NETNS_PREFIX", prefix),
            ("DROVER_BIN_DIR", bin_dir.display().to_string()),
        ],
    );
    let cluster = |args: &[&str]| own.run(args);

    let started = Instant::now();
    let up = cluster(&["up"]);
    let log = String::from_utf8_lossy(&up.stderr).into_owned();
    assert!(up.status.success(), "e2e/cluster up failed:\n{log}");
    eprintln!("figure: main job (cached binaries) up in {:?}", started.elapsed());
    let kubeconfig = String::from_utf8_lossy(&up.stdout).trim().to_string();
    assert!(log.contains("VM demo placed by the operator and running on host-"), "{log}");
    let kubectl = |args: &[&str]| {
        let out = Command::new(cp.tools_bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .output()
            .expect("kubectl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let node = |vm: &str| kubectl(&["get", "vm", vm, "-o", "jsonpath={.status.nodeName}"]);
    // Every example VM placed by the operator and running; the web VMs apart.
    let deadline = Instant::now() + Duration::from_secs(60);
    let running = |vm: &str| kubectl(&["get", "vm", vm, "-o", "jsonpath={.status.phase}"]) == "Running";
    while !["demo", "web-01", "web-02", "db-01"].iter().all(|vm| running(vm)) {
        assert!(Instant::now() < deadline, "example VMs not all Running:\n{}", kubectl(&["get", "vm", "-o", "wide"]));
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_ne!(node("web-01"), node("web-02"), "the anti-affinity rule keeps the web VMs apart");
    let scheduled =
        kubectl(&["get", "vm", "web-01", "-o", "jsonpath={.status.conditions[?(@.type==\"Scheduled\")].message}"]);
    assert!(scheduled.starts_with("placed on host-"), "{scheduled}");
    // The example migration moves db-01.
    let deadline = Instant::now() + Duration::from_secs(60);
    while kubectl(&["get", "vmim", "db-01-move", "-o", "jsonpath={.status.phase}"]) != "Succeeded" {
        assert!(Instant::now() < deadline, "{}", kubectl(&["get", "vmim", "db-01-move", "-o", "yaml"]));
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(kubectl(&["get", "vmim", "db-01-move", "-o", "jsonpath={.status.targetNode}"]), node("db-01"));
    // The pools and rules report.
    assert_eq!(kubectl(&["get", "hp", "local", "-o", "jsonpath={.status.readyHosts}"]), "3");
    assert_eq!(kubectl(&["get", "drsrule", "web-spread", "-o", "jsonpath={.status.compliant}"]), "true");
    let operators = String::from_utf8_lossy(&cluster(&["operator", "list"]).stdout).into_owned();
    assert_eq!(operators.lines().filter(|l| l.contains("leader")).count(), 1, "{operators}");
    assert_eq!(operators.lines().filter(|l| l.contains("standby")).count(), 1, "{operators}");
    let list = String::from_utf8_lossy(&cluster(&["host", "list"]).stdout).into_owned();
    assert_eq!(list.lines().filter(|l| l.contains("running")).count(), 3, "three hosts with agents:\n{list}");

    let down = cluster(&["down"]);
    assert!(down.status.success(), "down: {}", String::from_utf8_lossy(&down.stderr));
    let vmms = Command::new("pgrep")
        .args(["-f", &format!("drover-vmm run --config {}", state.display())])
        .output()
        .expect("pgrep");
    assert!(vmms.stdout.is_empty(), "VMMs left after down: {}", String::from_utf8_lossy(&vmms.stdout));
}

/// A host of the run-tests cluster reaches the API server (over TLS, at the
/// gateway) and other hosts; isolated it reaches nothing while its processes live
/// on; healed it reaches them again; stopped, nothing runs in it and its /run is
/// gone but its /var/lib stays; started, its agent runs again with the same flags;
/// removed, nothing of it is left.
#[test]
fn hosts_reach_each_other_and_can_be_cut_off_stopped_and_started() {
    let cp = control_plane();
    assert_root();
    let options =
        HostOptions { agent_args: vec!["--lease-seconds=3".into()], bin_dir: Some(fake_agent_dir().to_path_buf()) };
    let started = Instant::now();
    let a = Host::add_with(&hosts::unique_name("net-a"), &options);
    eprintln!("host add took {:?}", started.elapsed());
    let b = Host::add_with(&hosts::unique_name("net-b"), &options);
    assert_ne!(a.ip(), b.ip());
    assert!(netns_exists(a.netns()), "no network namespace {}", a.netns());

    let node = cp.kubectl_ok(&["get", "node", a.name(), "-o", "jsonpath={.metadata.labels} {.status.addresses}"], None);
    for want in [
        format!("\"kubernetes.io/hostname\":\"{}\"", a.name()),
        "\"kubernetes.io/os\":\"linux\"".into(),
        "\"drover.dev/host\":\"true\"".into(),
        format!("{{\"address\":\"{}\",\"type\":\"InternalIP\"}}", a.ip()),
        format!("{{\"address\":\"{}\",\"type\":\"Hostname\"}}", a.name()),
    ] {
        assert!(node.contains(&want), "Node {} lacks {want}: {node}", a.name());
    }
    cp.kubectl_ok(&["get", "namespace", "drover-system"], None);

    let port: u16 = std::env::var("DROVER_APISERVER_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(16443);
    let api = SocketAddrV4::new(hosts::gateway(), port);
    let kubectl = cp.tools_bin.join("kubectl").display().to_string();
    let kubeconfig = hosts::hosts_kubeconfig().display().to_string();
    let readyz = |h: &Host| {
        let out = h.exec(&kubectl, &["--kubeconfig", &kubeconfig, "--request-timeout=2s", "get", "--raw", "/readyz"]);
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let short = Duration::from_secs(2);
    let eventually = |what: &str, f: &dyn Fn() -> bool| {
        let until = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < until, "not within 10 s: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let (ok, out) = readyz(&a);
    assert!(ok && out.trim() == "ok", "the API server is not reachable from host {} at {api}: {out}", a.name());
    assert_eq!(a.tcp_probe(SocketAddrV4::new(b.ip(), 1), short), Reach::Refused, "host a does not reach host b");
    assert_eq!(b.tcp_probe(SocketAddrV4::new(a.ip(), 1), short), Reach::Refused, "host b does not reach host a");

    // A process of its own in the host, besides the agent.
    let spawned = a.exec("bash", &["-c", "setsid -f sleep 600 </dev/null >/dev/null 2>&1"]);
    assert!(spawned.status.success(), "{}", String::from_utf8_lossy(&spawned.stderr));
    let agent = a.agent_pid().expect("the (fake) agent runs");
    let before = a.pids();
    assert!(before.contains(&agent) && before.len() >= 2, "processes in {}: {before:?}", a.netns());

    a.isolate();
    assert_eq!(a.tcp_probe(api, short), Reach::Unreachable, "isolated, it still reaches the API server");
    assert_eq!(a.tcp_probe(SocketAddrV4::new(b.ip(), 1), short), Reach::Unreachable, "isolated, it still reaches b");
    assert_eq!(b.tcp_probe(SocketAddrV4::new(a.ip(), 1), short), Reach::Unreachable, "b still reaches it");
    assert_eq!(a.pids(), before, "isolating it changed its processes");
    let list = hosts::cluster(&["host", "list"], &[]);
    assert!(list.lines().any(|l| l.starts_with(a.name()) && l.contains(" isolated ")), "{list}");

    a.heal();
    eventually("healed host reaches the API server", &|| readyz(&a).0);
    eventually("healed host reaches b", &|| a.tcp_probe(SocketAddrV4::new(b.ip(), 1), short) == Reach::Refused);
    assert_eq!(a.pids(), before);

    std::fs::write(a.runtime_dir().join("vm.sock"), "").unwrap();
    std::fs::write(a.state_dir().join("vm.json"), "{}").unwrap();
    a.stop();
    assert_eq!(a.pids(), Vec::<u32>::new(), "processes left in a stopped host");
    assert_eq!(a.agent_pid(), None);
    assert_eq!(std::fs::read_dir(a.runtime_dir()).unwrap().count(), 0, "the runtime dir survived a power failure");
    assert!(a.state_dir().join("vm.json").exists(), "the state dir did not survive a power failure");
    assert_eq!(b.tcp_probe(SocketAddrV4::new(a.ip(), 1), short), Reach::Unreachable, "a powered-off host answers");

    a.start();
    let agent = a.agent_pid().expect("the agent runs again after start");
    assert!(a.pids().contains(&agent));
    eventually("started host reaches the API server", &|| readyz(&a).0);
    let log = a.agent_log();
    let flags = format!("--node-name {} --address {} --namespace drover-system", a.name(), a.ip());
    assert_eq!(log.matches("fake agent: ").count(), 2, "two starts: {log}");
    assert_eq!(log.matches(&flags).count(), 4, "both starts with the same flags: {log}");
    assert_eq!(log.matches("--lease-seconds=3").count(), 4, "both starts with the extra flags: {log}");

    // Names are checked, and taken only once.
    let dup = Command::new(repo_root().join("e2e/cluster")).args(["host", "add", a.name()]).output().unwrap();
    assert!(!dup.status.success() && String::from_utf8_lossy(&dup.stderr).contains("exists already"));
    let bad = Command::new(repo_root().join("e2e/cluster")).args(["host", "add", "Not_A_Name"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("not a DNS label"));

    let (name, netns, dir) = (a.name().to_string(), a.netns().to_string(), a.state_dir());
    a.remove();
    assert!(!netns_exists(&netns), "network namespace {netns} left behind");
    assert!(!dir.exists(), "state of {name} left behind");
    let node = cp.kubectl(&["get", "node", &name], None);
    assert!(!node.status.success(), "Node {name} left behind");
}

/// The real agent (this checkout's, or DROVER_BIN_DIR's) is started in its host
/// and writes its log there.
#[test]
fn host_runs_the_real_agent() {
    control_plane();
    assert_root();
    let host = Host::add(&hosts::unique_name("agent"));
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let log = host.agent_log();
        // The script's own "[drover-e2e] ... starting ..." line, then the agent's.
        if log.lines().any(|l| !l.starts_with("[drover-e2e]")) {
            eprintln!("agent log of {}:\n{log}", host.name());
            break;
        }
        assert!(Instant::now() < until, "the agent of {} wrote nothing in 10 s: {log:?}", host.name());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(host.agent_log().contains(&format!("--node-name {} --address {}", host.name(), host.ip())));
}
