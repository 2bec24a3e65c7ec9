//! The migration's shared secret, from the Secret the operator names when it
//! approves (`status.secretName`, key [`MIGRATION_SECRET_KEY`]).

use drover_crds::contract::MIGRATION_SECRET_KEY;
use drover_crds::migration::VirtualMachineMigration;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};

use crate::Error;
use crate::context::Context;

/// The secret's bytes. A missing name, Secret or key is an [`Error::Reference`]
/// that says which.
pub async fn read(ctx: &Context, migration: &VirtualMachineMigration) -> Result<Vec<u8>, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let name = migration.status.as_ref().and_then(|s| s.secret_name.clone()).ok_or_else(|| {
        Error::Reference(
            "status.secretName is not set: the operator names the migration Secret when it approves".into(),
        )
    })?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = secrets
        .get_opt(&name)
        .await?
        .ok_or_else(|| Error::Reference(format!("Secret {ns}/{name} (status.secretName) not found")))?;
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(MIGRATION_SECRET_KEY))
        .map(|b| b.0.clone())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Error::Reference(format!("Secret {ns}/{name} has no key {MIGRATION_SECRET_KEY:?}")))?;
    Ok(value)
}
