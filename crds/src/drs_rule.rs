//! `DRSRule`: affinity and anti-affinity between VMs, and between VMs and hosts.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, NAME_PATTERN};

/// A placement rule for VMs of one namespace, honoured by placement, DRS and HA.
/// VM-VM rules keep VMs together (affinity) or apart (anti-affinity); VM-Host rules
/// keep VMs on (or off) the hosts a node selector picks. Required rules are never
/// broken ("must"); Preferred ones are broken only when nothing else fits ("should").
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "drover.dev",
    version = "v1alpha1",
    kind = "DRSRule",
    doc = "An affinity or anti-affinity rule between VMs, or between VMs and hosts.",
    plural = "drsrules",
    namespaced,
    status = "DRSRuleStatus",
    shortname = "drsrule",
    category = "drover",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Enforcement", type_ = "string", json_path = ".spec.enforcement"),
    printcolumn(name = "Compliant", type_ = "boolean", json_path = ".status.compliant"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.enabled", priority = "1")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.vmNames) != has(self.vmSelector)")
        .message("set exactly one of vmNames and vmSelector"),
    validation = Rule::new("!self.type.startsWith('VmHost') || has(self.nodeSelector)")
        .message("VM-Host rules need a nodeSelector naming the hosts").field_path(".nodeSelector"),
    validation = Rule::new("self.type.startsWith('VmHost') || !has(self.nodeSelector)")
        .message("VM-VM rules take no nodeSelector; use VmHostAffinity or VmHostAntiAffinity").field_path(".nodeSelector"),
    validation = Rule::new("!self.type.startsWith('VmVm') || !has(self.vmNames) || size(self.vmNames) >= 2")
        .message("VM-VM rules need at least two VMs").field_path(".vmNames"),
)]
pub struct DRSRuleSpec {
    /// VmVmAffinity, VmVmAntiAffinity, VmHostAffinity or VmHostAntiAffinity. Cannot
    /// change once set.
    #[serde(rename = "type")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("type is immutable; create a new DRSRule"))]
    pub type_: DrsRuleType,

    /// Required ("must", never broken) or Preferred ("should", the default).
    #[serde(default)]
    pub enforcement: Enforcement,

    /// Whether the rule is in force (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// The VMs, by name (same namespace). Set this or vmSelector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), inner(length(max = 253), pattern(NAME_PATTERN)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub vm_names: Option<Vec<String>>,

    /// The VMs, by label. Set this or vmNames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_selector: Option<LabelSelector>,

    /// For VM-Host rules: the hosts (Nodes) the VMs must (or must not) run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

fn default_true() -> bool {
    true
}

/// Kind of DRS rule.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrsRuleType {
    VmVmAffinity,
    VmVmAntiAffinity,
    VmHostAffinity,
    VmHostAntiAffinity,
}

/// How strictly a rule holds.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Enforcement {
    Required,
    #[default]
    Preferred,
}

/// Whether the rule holds now.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DRSRuleStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Conditions, keyed by type.
    #[serde(default, skip_serializing_if = "crate::common::is_empty_conditions")]
    pub conditions: Conditions,

    /// True when no placement breaks the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliant: Option<bool>,

    /// Placements that break the rule now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<RuleViolation>,
}

/// One way the rule is broken now.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuleViolation {
    /// VMs involved.
    pub vms: Vec<String>,
    /// Hosts involved.
    pub nodes: Vec<String>,
    /// What is wrong.
    pub message: String,
}
