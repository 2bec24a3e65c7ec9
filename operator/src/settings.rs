//! The operator's flags (each also from the environment).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use drover_core::lifecycle::Backoff;
use drover_core::migration::Limits;

/// Command line.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "drover-operator", version, about = "Drover's operator: places VMs, keeps them running, moves them")]
pub struct Cli {
    /// Path of a kubeconfig; without it, the in-cluster configuration or $KUBECONFIG.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "DROVER_OPERATOR_NAMESPACE", default_value = "drover-system")]
    pub namespace: String,
    /// Namespace of the hosts' heartbeat Leases (the agents' --namespace).
    #[arg(long, env = "DROVER_HEARTBEAT_NAMESPACE", default_value = drover_crds::contract::heartbeat::DEFAULT_NAMESPACE)]
    pub heartbeat_namespace: String,
    /// Manage VMs, migrations and DRS rules of this namespace only (default: all).
    /// Hosts are cluster-wide whatever this says.
    #[arg(long, env = "DROVER_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// This replica's name in leader election (default: host name and process id).
    #[arg(long, env = "DROVER_OPERATOR_IDENTITY")]
    pub identity: Option<String>,
    /// How long the leader's Lease lasts without renewal: a standby takes over after this.
    #[arg(long, env = "DROVER_LEADER_LEASE_SECONDS", default_value_t = 15)]
    pub leader_lease_seconds: u64,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "DROVER_OPERATOR_HTTP", default_value = "0.0.0.0:8080")]
    pub http_address: SocketAddr,
    /// Log lines as text or JSON (filter with RUST_LOG).
    #[arg(long, env = "DROVER_LOG_FORMAT", value_enum, default_value_t = drover_logging::LogFormat::Text)]
    pub log_format: drover_logging::LogFormat,
    /// Migrations at once in the cluster.
    #[arg(long, env = "DROVER_MIGRATIONS_PER_CLUSTER", default_value_t = 5)]
    pub migrations_per_cluster: u32,
    /// Migrations at once out of one host.
    #[arg(long, env = "DROVER_MIGRATIONS_OUT_PER_HOST", default_value_t = 2)]
    pub migrations_out_per_host: u32,
    /// Migrations at once into one host.
    #[arg(long, env = "DROVER_MIGRATIONS_IN_PER_HOST", default_value_t = 2)]
    pub migrations_in_per_host: u32,
    /// Finished migrations kept per VM (older ones are deleted).
    #[arg(long, env = "DROVER_MIGRATIONS_KEPT", default_value_t = 5)]
    pub migrations_kept: usize,
    /// First restart backoff after a failure, in seconds (doubling each failure in a row).
    #[arg(long, env = "DROVER_RESTART_BACKOFF_SECONDS", default_value_t = 2)]
    pub restart_backoff_seconds: u64,
    /// Longest restart backoff, in seconds.
    #[arg(long, env = "DROVER_RESTART_BACKOFF_MAX_SECONDS", default_value_t = 300)]
    pub restart_backoff_max_seconds: u64,
    /// A run this long (seconds) ends a streak of failures.
    #[arg(long, env = "DROVER_STABLE_RUN_SECONDS", default_value_t = 60)]
    pub stable_run_seconds: u64,
}

/// What the operator runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub watch_namespace: Option<String>,
    pub heartbeat_namespace: String,
    pub identity: String,
    pub leader_lease: Duration,
    pub http_address: SocketAddr,
    pub limits: Limits,
    pub migrations_kept: usize,
    pub backoff: Backoff,
}

impl Settings {
    /// The API of a namespaced kind, in the watched namespace or all.
    pub fn api<K>(&self, client: &kube::Client) -> kube::Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.watch_namespace {
            Some(ns) => kube::Api::namespaced(client.clone(), ns),
            None => kube::Api::all(client.clone()),
        }
    }

    pub fn from_cli(cli: &Cli) -> Result<Self, crate::Error> {
        if cli.leader_lease_seconds < 2 {
            return Err(crate::Error::Config("--leader-lease-seconds must be at least 2".into()));
        }
        for (flag, n) in [
            ("--migrations-per-cluster", cli.migrations_per_cluster),
            ("--migrations-out-per-host", cli.migrations_out_per_host),
            ("--migrations-in-per-host", cli.migrations_in_per_host),
        ] {
            if n == 0 {
                return Err(crate::Error::Config(format!("{flag} must be at least 1")));
            }
        }
        let identity = cli.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        Ok(Self {
            namespace: cli.namespace.clone(),
            watch_namespace: cli.watch_namespace.clone(),
            heartbeat_namespace: cli.heartbeat_namespace.clone(),
            identity,
            leader_lease: Duration::from_secs(cli.leader_lease_seconds),
            http_address: cli.http_address,
            limits: Limits {
                cluster: cli.migrations_per_cluster,
                outgoing_per_host: cli.migrations_out_per_host,
                incoming_per_host: cli.migrations_in_per_host,
            },
            migrations_kept: cli.migrations_kept,
            backoff: Backoff {
                base_ms: cli.restart_backoff_seconds.max(1) * 1000,
                max_ms: cli.restart_backoff_max_seconds.max(1) * 1000,
                stable_ms: cli.stable_run_seconds * 1000,
            },
        })
    }
}
