//! Conditions and times as the Kubernetes API conventions write them. Pure: the
//! time a condition is stamped with is given, so decisions that build statuses
//! read no clock.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A condition of `type_`, stamped `at` (`Conditions::set` keeps the older stamp
/// while the condition's status does not change).
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    at: Time,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: at,
    }
}

/// `Time` from Unix milliseconds.
pub fn time_ms(ms: u64) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64).ok().map(Time)
}
