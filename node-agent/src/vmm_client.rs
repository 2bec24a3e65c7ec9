//! Talking to a VMM through its control socket (`drover-vmm`'s API, read with the
//! VMM's own reply types), from async code.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::Error;
use drover_crds::VirtualMachineMigrationSpec;

pub use drover_hypervisor::control::VmStatus;
pub use drover_hypervisor::migration::status::{MigrationStatus, Phase};

/// The host CPUs a VM's vCPUs may run on, as one CPU list (the union over vCPUs).
pub fn host_cpus(vm: &VmStatus) -> String {
    let mut all = std::collections::BTreeSet::new();
    for vcpu in &vm.vcpus {
        if let Ok(set) = drover_topology::CpuSet::parse(&vcpu.host_cpus) {
            all.extend(set.iter());
        }
    }
    drover_topology::CpuSet::from_iter(all).to_string()
}

/// A VMM's control socket.
#[derive(Clone, Debug)]
pub struct VmmClient {
    socket: PathBuf,
}

impl VmmClient {
    pub fn new(socket: &Path) -> Self {
        Self { socket: socket.to_path_buf() }
    }

    async fn call(&self, method: &'static str, path: &'static str, body: Option<String>) -> Result<String, Error> {
        let socket = self.socket.clone();
        let (status, reply) = tokio::task::spawn_blocking(move || {
            drover_hypervisor::api::request(&socket, method, path, body.as_deref())
        })
        .await
        .map_err(|e| Error::Vmm(e.to_string()))?
        .map_err(|e| Error::Vmm(e.to_string()))?;
        if !(200..300).contains(&status) {
            return Err(Error::Vmm(format!("{method} {path}: {status} {}", reply.trim())));
        }
        Ok(reply)
    }

    async fn get<T: DeserializeOwned>(&self, path: &'static str) -> Result<T, Error> {
        let reply = self.call("GET", path, None).await?;
        serde_json::from_str(&reply).map_err(|e| Error::Vmm(format!("GET {path}: {e}")))
    }

    pub async fn status(&self) -> Result<VmStatus, Error> {
        self.get("/vm").await
    }

    pub async fn migration(&self) -> Result<MigrationStatus, Error> {
        self.get("/vm/migration").await
    }

    pub async fn set_host_cpus(&self, host_cpus: &str) -> Result<(), Error> {
        self.call("PATCH", "/vm/cpus", Some(serde_json::json!({ "hostCpus": host_cpus }).to_string())).await.map(drop)
    }

    pub async fn set_shares(&self, shares: u32) -> Result<(), Error> {
        self.call("PATCH", "/vm/priority", Some(serde_json::json!({ "shares": shares }).to_string())).await.map(drop)
    }

    /// Asks the VMM to power the VM off.
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.call("PUT", "/vm/shutdown", None).await.map(drop)
    }

    /// Starts a live migration to `destination`, with the limits `spec` sets.
    /// The VMM writes the final figures to `status_file` before it exits.
    pub async fn migrate(
        &self,
        destination: &str,
        secret: &str,
        spec: &VirtualMachineMigrationSpec,
        status_file: &Path,
    ) -> Result<(), Error> {
        let mut body = serde_json::json!({ "destination": destination, "secret": secret, "statusFile": status_file });
        if let Some(ms) = spec.max_downtime_millis {
            body["maxDowntimeMs"] = ms.into();
        }
        if let Some(s) = spec.timeout_seconds {
            body["timeoutSeconds"] = s.into();
        }
        if let Some(n) = spec.lanes {
            body["lanes"] = n.into();
        }
        self.call("PUT", "/vm/migrate", Some(body.to_string())).await.map(drop)
    }

    pub async fn cancel_migration(&self) -> Result<(), Error> {
        self.call("PUT", "/vm/migration/cancel", None).await.map(drop)
    }
}
