//! Writing what the agent observes into VirtualMachine and VirtualMachineMigration
//! status. Every write carries the resourceVersion the agent read, so a write based
//! on stale information (the operator moved the VM meanwhile) fails with a conflict
//! and is recomputed, instead of overwriting newer facts.

use drover_crds::migration::{VirtualMachineMigration, VirtualMachineMigrationStatus};
use drover_crds::vm::{VirtualMachine, VirtualMachineStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::Error;

/// Now, for the shells that stamp conditions (decisions are given the time).
pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Writes a VM's status if it changed. Returns whether a write happened.
pub async fn write_vm(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    new: &VirtualMachineStatus,
    manager: &str,
) -> Result<bool, Error> {
    write(api, vm, vm.status.as_ref(), new, manager).await
}

/// Writes a migration's status if it changed.
pub async fn write_migration(
    api: &Api<VirtualMachineMigration>,
    migration: &VirtualMachineMigration,
    new: &VirtualMachineMigrationStatus,
    manager: &str,
) -> Result<bool, Error> {
    write(api, migration, migration.status.as_ref(), new, manager).await
}

async fn write<K, S>(api: &Api<K>, object: &K, old: Option<&S>, new: &S, manager: &str) -> Result<bool, Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize + PartialEq,
{
    if old == Some(new) {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": object.resource_version() },
        "status": status_with_nulls(old, new)?,
    });
    let params = PatchParams { field_manager: Some(manager.into()), ..Default::default() };
    api.patch_status(&object.name_any(), &params, &Patch::Merge(&patch)).await?;
    Ok(true)
}

/// The new status as a merge patch: fields that were set and are no longer are
/// written as `null`, which is how a merge patch removes them.
fn status_with_nulls<T: serde::Serialize>(old: Option<&T>, new: &T) -> Result<serde_json::Value, Error> {
    let mut patch = serde_json::to_value(new).map_err(|e| Error::Io(e.to_string()))?;
    if let (Some(old), Some(map)) =
        (old.map(serde_json::to_value).transpose().map_err(|e| Error::Io(e.to_string()))?, patch.as_object_mut())
        && let Some(old) = old.as_object()
    {
        for key in old.keys() {
            map.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
    }
    Ok(patch)
}

/// What a controller does with an error about `object`: a conflict is retried at
/// once; anything else is logged and tried again after `after`.
pub fn retry<K: kube::Resource<DynamicType = ()>>(
    object: &K,
    error: &Error,
    after: std::time::Duration,
) -> kube::runtime::controller::Action {
    use kube::runtime::controller::Action;
    if error.is_conflict() {
        return Action::requeue(std::time::Duration::from_millis(100));
    }
    tracing::warn!(kind = %K::kind(&()), name = %object.name_any(), "{error}");
    Action::requeue(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_fields_become_nulls() {
        let old =
            VirtualMachineStatus { node_name: Some("a".into()), migration: Some("m".into()), ..Default::default() };
        let new = VirtualMachineStatus { node_name: Some("b".into()), ..Default::default() };
        let patch = status_with_nulls(Some(&old), &new).unwrap();
        assert_eq!(patch["nodeName"], "b");
        assert!(patch["migration"].is_null() && patch.as_object().unwrap().contains_key("migration"));
    }
}
