//! Pieces shared by every Drover kind: conditions, CPU lists, and the patterns and
//! limits the schemas validate against.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Drover kind.
pub const GROUP: &str = "drover.dev";
/// The API version of every Drover kind.
pub const VERSION: &str = "v1alpha1";

/// The most vCPUs one VM may have. Guests address CPUs by xAPIC ID (8 bits, 255 is
/// the broadcast ID), which is what the MP table and MADT we build describe.
pub const MAX_VCPUS: u32 = 254;

/// A Kubernetes object name (RFC 1123 subdomain), for fields that refer to objects.
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// CEL that holds when `L` is a well-formed Linux CPU list, as in
/// `/sys/devices/system/cpu/online` or `taskset -c`: comma-separated CPU numbers and
/// inclusive ranges, e.g. `0-3,8,10-11`. Kept in CEL rather than an
/// OpenAPI `pattern` so that the message can say what is expected, and so that the
/// rules below can be guarded by it (they would fail to evaluate on garbage).
pub(crate) const CEL_CPU_LIST_VALID: &str = "L.matches('^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$')";

/// CEL (Kubernetes strings and lists libraries) for the number of CPUs in a CPU list
/// that already matched [`CEL_CPU_LIST_VALID`]; `L` is replaced by the field.
pub(crate) const CEL_CPU_LIST_COUNT: &str =
    "L.split(',').map(r, r.contains('-') ? int(r.split('-')[1]) - int(r.split('-')[0]) + 1 : 1).sum()";

/// CEL that holds when no range of a CPU list runs backwards (`5-2`).
pub(crate) const CEL_CPU_LIST_ORDERED: &str =
    "L.split(',').all(r, !r.contains('-') || int(r.split('-')[0]) <= int(r.split('-')[1]))";

/// Substitutes the field expression into one of the `CEL_*` templates above.
pub(crate) fn cel(template: &str, field: &str) -> String {
    template.replace('L', field)
}

/// The CEL rule for a CPU-list field: well formed, and no range backwards.
pub(crate) fn cpu_list_rule() -> kube::core::Rule {
    kube::core::Rule::new(format!("{} && {}", cel(CEL_CPU_LIST_VALID, "self"), cel(CEL_CPU_LIST_ORDERED, "self")))
        .message("must be a CPU list such as 0-3,8 (numbers and low-high ranges, comma-separated)")
}

/// Conditions of a status, as the Kubernetes API conventions describe them: a list
/// keyed by `type`, so that server-side apply merges one condition at a time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Conditions(pub Vec<Condition>);

impl JsonSchema for Conditions {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Conditions".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mut schema = <Vec<Condition>>::json_schema(generator);
        schema.insert("x-kubernetes-list-type".into(), "map".into());
        schema.insert("x-kubernetes-list-map-keys".into(), serde_json::json!(["type"]));
        schema
    }

    fn inline_schema() -> bool {
        true
    }
}

impl Conditions {
    /// The condition of this type, if present.
    pub fn get(&self, type_: &str) -> Option<&Condition> {
        self.0.iter().find(|c| c.type_ == type_)
    }

    /// Sets a condition, keeping `lastTransitionTime` when its status did not change
    /// (the Kubernetes convention: the time records when the status last flipped).
    pub fn set(&mut self, new: Condition) {
        match self.0.iter_mut().find(|c| c.type_ == new.type_) {
            Some(old) if old.status == new.status => {
                let since = old.last_transition_time.clone();
                *old = Condition { last_transition_time: since, ..new };
            }
            Some(old) => *old = new,
            None => self.0.push(new),
        }
    }
}

/// For `skip_serializing_if` on status conditions.
pub(crate) fn is_empty_conditions(c: &Conditions) -> bool {
    c.0.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_keep_transition_time_when_status_is_unchanged() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let t = |s: &str| Time(s.parse().unwrap());
        let cond = |status: &str, time: &str, reason: &str| Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: t(time),
        };
        let mut conditions = Conditions::default();
        conditions.set(cond("True", "2026-01-01T00:00:00Z", "Booted"));
        conditions.set(cond("True", "2026-01-02T00:00:00Z", "StillBooted"));
        let ready = conditions.get("Ready").unwrap();
        assert_eq!(ready.reason, "StillBooted");
        assert_eq!(ready.last_transition_time, t("2026-01-01T00:00:00Z"));
        conditions.set(cond("False", "2026-01-03T00:00:00Z", "Crashed"));
        assert_eq!(conditions.get("Ready").unwrap().last_transition_time, t("2026-01-03T00:00:00Z"));
        assert_eq!(conditions.0.len(), 1);
    }
}
