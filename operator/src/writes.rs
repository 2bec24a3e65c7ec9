//! The operator's writes. Status goes through the status subresource by
//! server-side apply, under one field manager, forced (the operator's decision
//! wins over a field an agent wrote last) but with the resourceVersion the
//! decision was made on: if the object changed meanwhile (an agent started the VM,
//! a user deleted it), the API server refuses with a conflict and the decision is
//! made again on what is there now. Metadata (annotations, finalizers) goes by
//! merge patch, with the same precondition.

use drover_crds::contract::OPERATOR_FIELD_MANAGER;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::Error;

/// Applies `status` (the operator's fields, all of them: what it leaves out and
/// owned before is removed) to `object`'s status.
pub async fn apply_status<K>(api: &Api<K>, object: &K, status: serde_json::Value) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let name = object.name_any();
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name, "resourceVersion": object.resource_version() },
        "status": status,
    });
    let params = PatchParams::apply(OPERATOR_FIELD_MANAGER).force();
    Ok(api.patch_status(&name, &params, &Patch::Apply(&patch)).await?)
}

/// Merges `metadata` into `object`'s metadata, if it has not changed since it was read.
pub async fn patch_metadata<K>(api: &Api<K>, object: &K, mut metadata: serde_json::Value) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    metadata["resourceVersion"] = object.resource_version().into();
    let params = PatchParams { field_manager: Some(OPERATOR_FIELD_MANAGER.into()), ..Default::default() };
    Ok(api.patch(&object.name_any(), &params, &Patch::Merge(&serde_json::json!({ "metadata": metadata }))).await?)
}

/// A condition as the API conventions describe it, stamped now.
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now(),
    }
}

/// Now, as the API keeps times: in whole seconds (so a status compared with its
/// read-back copy is equal when nothing changed).
pub fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now),
    )
}

/// Unix milliseconds of an API time.
pub fn time_ms(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> u64 {
    t.0.as_millisecond().max(0) as u64
}

/// An API time from Unix milliseconds.
pub fn ms_time(ms: u64) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// Now in Unix milliseconds.
pub fn now_ms() -> u64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond().max(0) as u64
}
