//! The CRD YAML generated from the types, and the two places it is kept:
//! `crds/` (for `kubectl apply -f crds/`) and `charts/drover/crds/` (for Helm).

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

use crate::{DRSRule, Error, HostPolicy, VirtualMachine, VirtualMachineMigration};

/// The command that regenerates the files, for messages.
pub const REGENERATE: &str = "cargo run -p drover-crds --bin crdgen";

/// Directories (relative to the repository root) that hold a copy of the CRDs.
pub const OUTPUT_DIRS: [&str; 2] = ["crds", "charts/drover/crds"];

/// Every Drover CRD.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![VirtualMachine::crd(), VirtualMachineMigration::crd(), HostPolicy::crd(), DRSRule::crd()];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
                drop_unsigned_formats(schema);
            }
        }
    }
    crds
}

/// schemars marks unsigned integers `format: uint32`, a format the API server does
/// not know (kubectl warns on every apply); the `minimum: 0` beside it already says
/// what the format would.
fn drop_unsigned_formats(schema: &mut JSONSchemaProps) {
    if schema.format.as_deref().is_some_and(|f| f.starts_with("uint")) {
        schema.format = None;
    }
    let children = schema
        .properties
        .iter_mut()
        .flat_map(|p| p.values_mut())
        .chain(schema.items.iter_mut().filter_map(|items| match items {
            JSONSchemaPropsOrArray::Schema(s) => Some(s.as_mut()),
            JSONSchemaPropsOrArray::Schemas(_) => None,
        }))
        .chain(schema.additional_properties.iter_mut().filter_map(|a| match a {
            JSONSchemaPropsOrBool::Schema(s) => Some(s.as_mut()),
            JSONSchemaPropsOrBool::Bool(_) => None,
        }));
    for child in children {
        drop_unsigned_formats(child);
    }
}

/// `(file name, YAML)` for every CRD, e.g. `virtualmachines.drover.dev.yaml`.
pub fn rendered() -> Result<Vec<(String, String)>, Error> {
    crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let body =
                serde_norway::to_string(&crd).map_err(|source| Error::Serialize { name: name.clone(), source })?;
            let yaml = format!("# Generated from the types in crds/src by `{REGENERATE}`. Do not edit.\n{body}");
            Ok((format!("{name}.yaml"), yaml))
        })
        .collect()
}

/// The repository root, from this crate's manifest directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Writes every CRD into every output directory, removing stale `*.drover.dev.yaml`.
pub fn write_all(root: &Path) -> Result<Vec<PathBuf>, Error> {
    let files = rendered()?;
    let mut written = Vec::new();
    for dir in OUTPUT_DIRS {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).map_err(|source| io(&dir, source))?;
        for entry in std::fs::read_dir(&dir).map_err(|source| io(&dir, source))? {
            let path = entry.map_err(|source| io(&dir, source))?.path();
            let stale = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".drover.dev.yaml"))
                && !files.iter().any(|(name, _)| path.ends_with(name));
            if stale {
                std::fs::remove_file(&path).map_err(|source| io(&path, source))?;
            }
        }
        for (name, yaml) in &files {
            let path = dir.join(name);
            std::fs::write(&path, yaml).map_err(|source| io(&path, source))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// The generated files that are missing or differ from the types, as paths
/// relative to `root`.
pub fn stale_files(root: &Path) -> Result<Vec<String>, Error> {
    let files = rendered()?;
    let mut stale = Vec::new();
    for dir in OUTPUT_DIRS {
        for (name, yaml) in &files {
            let path = root.join(dir).join(name);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                stale.push(format!("{dir}/{name}"));
            }
        }
    }
    Ok(stale)
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_yaml_is_up_to_date() {
        let stale = stale_files(&repo_root()).expect("render CRDs");
        assert!(
            stale.is_empty(),
            "generated CRD YAML is stale: {stale:?}; regenerate it with `{REGENERATE}` and commit the result"
        );
    }

    #[test]
    fn every_kind_has_status_subresource_category_and_conditions_map() {
        for crd in crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            assert!(
                crd.spec.names.categories.as_ref().is_some_and(|c| c.contains(&"drover".to_string())),
                "{name}: category"
            );
            let version = &crd.spec.versions[0];
            assert!(
                version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
                "{name}: status subresource"
            );
            let schema = serde_json::to_value(&version.schema).expect("schema");
            let conditions = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
            assert_eq!(conditions["x-kubernetes-list-type"], "map", "{name}: conditions list-map");
            assert_eq!(
                conditions["x-kubernetes-list-map-keys"],
                serde_json::json!(["type"]),
                "{name}: conditions keyed by type"
            );
            assert!(
                schema["openAPIV3Schema"]["properties"]["status"]["properties"]["observedGeneration"].is_object(),
                "{name}: observedGeneration"
            );
        }
    }

    #[test]
    fn every_field_has_a_description() {
        fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
                for (key, child) in props {
                    let child_path = format!("{path}.{key}");
                    // metadata is Kubernetes' own, and apiVersion/kind are documented by it.
                    let exempt = ["metadata", "apiVersion", "kind"].contains(&key.as_str()) && path.is_empty();
                    if !exempt && child.get("description").is_none() {
                        missing.push(child_path.clone());
                    }
                    walk(&child_path, child, missing);
                }
            }
            if let Some(items) = schema.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
        }
        let mut missing = Vec::new();
        for crd in crds() {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
            walk(&crd.spec.names.kind, &schema["openAPIV3Schema"], &mut missing);
        }
        assert!(missing.is_empty(), "fields without a doc comment (kubectl explain shows nothing): {missing:#?}");
    }
}
