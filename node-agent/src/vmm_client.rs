//! Talking to a VMM through its control socket, from async code: `drover-vmm-api`'s
//! blocking client, run on tokio's blocking threads.

use std::path::{Path, PathBuf};

use drover_crds::VirtualMachineMigrationSpec;
pub use drover_vmm_api::api::{MigrationPhase as Phase, MigrationStatus, VmStatus};
use drover_vmm_api::{Client, MigrateRequest};

use crate::Error;

/// The host CPUs a VM's vCPUs may run on, as one CPU list (the union over vCPUs).
pub fn host_cpus(vm: &VmStatus) -> String {
    vm.host_cpus().to_string()
}

/// A VMM's control socket.
#[derive(Clone, Debug)]
pub struct VmmClient {
    client: Client,
}

impl VmmClient {
    pub fn new(socket: &Path) -> Self {
        Self { client: Client::new(PathBuf::from(socket)) }
    }

    /// Runs one request on a blocking thread.
    async fn call<T: Send + 'static>(
        &self,
        request: impl FnOnce(&Client) -> Result<T, drover_vmm_api::Error> + Send + 'static,
    ) -> Result<T, Error> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || request(&client))
            .await
            .map_err(|e| Error::Io(format!("VMM control API call did not finish: {e}")))?
            .map_err(Error::from)
    }

    pub async fn status(&self) -> Result<VmStatus, Error> {
        self.call(|c| c.status()).await
    }

    pub async fn migration(&self) -> Result<MigrationStatus, Error> {
        self.call(|c| c.migration()).await
    }

    pub async fn set_host_cpus(&self, host_cpus: &str) -> Result<(), Error> {
        let host_cpus = host_cpus.to_string();
        self.call(move |c| c.set_host_cpus(&host_cpus)).await
    }

    pub async fn set_shares(&self, shares: u32) -> Result<(), Error> {
        self.call(move |c| c.set_shares(shares)).await
    }

    /// Asks the VMM to power the VM off.
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.call(|c| c.shutdown()).await
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
        let request = migrate_request(destination, secret, spec, status_file);
        self.call(move |c| c.migrate(&request)).await
    }

    pub async fn cancel_migration(&self) -> Result<(), Error> {
        self.call(|c| c.cancel_migration()).await
    }
}

/// The VMM's migrate request for a VirtualMachineMigration's spec: its limits where
/// it sets them, the VMM's defaults elsewhere.
pub fn migrate_request(
    destination: &str,
    secret: &str,
    spec: &VirtualMachineMigrationSpec,
    status_file: &Path,
) -> MigrateRequest {
    let mut request = MigrateRequest::new(destination, secret);
    if let Some(ms) = spec.max_downtime_millis {
        request.max_downtime_ms = ms.into();
    }
    if let Some(s) = spec.timeout_seconds {
        request.timeout_seconds = s.into();
    }
    request.lanes = spec.lanes;
    request.status_file = Some(status_file.to_path_buf());
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_spec_sets_the_limits_it_names_and_keeps_the_vmms_defaults() {
        let spec: VirtualMachineMigrationSpec =
            serde_json::from_value(serde_json::json!({ "vmName": "db", "maxDowntimeMillis": 50, "lanes": 2 })).unwrap();
        let request = migrate_request("10.0.0.2:49200", "s3cret", &spec, Path::new("/run/m.json"));
        assert_eq!(request.max_downtime_ms, 50);
        assert_eq!(request.lanes, Some(2));
        assert_eq!(request.timeout_seconds, drover_vmm_api::api::DEFAULT_MIGRATION_TIMEOUT_SECONDS);
        assert_eq!(request.secret.as_deref(), Some("s3cret"));
        assert_eq!(request.status_file.as_deref(), Some(Path::new("/run/m.json")));
    }
}
