//! What each pool's last DRS pass found and did: kept by the DRS task, published
//! in the HostPolicy status by the reports controller (a leaf module, so that the
//! context can hold it).

use std::collections::HashMap;

use drover_crds::host_policy::{DrsRecommendation, DrsStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// What a pool's last pass found and did, for its HostPolicy status.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub at: Time,
    pub status: DrsStatus,
    pub recommendations: Vec<DrsRecommendation>,
}

/// The last report of each pool, by HostPolicy name.
pub type Reports = std::sync::Mutex<HashMap<String, Report>>;
