//! `drover-operator`: the cluster's brain. It places VMs on hosts, starts them
//! again by their run strategy, approves and limits migrations, empties hosts in
//! maintenance, balances pools (DRS), and reports on HostPolicies and DRSRules.
//!
//! Every decision comes from `drover-core` (pure: a snapshot in, decisions with
//! reasons out); the modules here observe the cluster, ask, and write the answers.
//!
//! - [`settings`]: flags and environment.
//! - [`stores`]: what the operator watches (reflectors), and the nudges that
//!   re-examine waiting VMs when capacity may have appeared.
//! - [`heartbeats`]: hosts' Leases timed on the operator's own clock.
//! - [`snapshot`]: API objects → the core's snapshot (pure).
//! - [`vm`]: VirtualMachines: placement and lifecycle (`decide` pure, `reconcile` acts).
//! - [`ha`]: the VMs of failed hosts: restarted elsewhere, left, or waiting, with why.
//! - [`migration`]: VirtualMachineMigrations: admission, Secrets, limits, cleanup.
//! - [`maintenance`]: hosts tainted `drover.dev/maintenance`.
//! - [`reports`]: HostPolicy and DRSRule status.
//! - [`drs`]: DRS balancing passes: migrations or recommendations, each explained.
//! - [`leader`]: leader election on a Lease; only the leader acts.
//! - [`metrics`], [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`writes`], [`events`]: status writes (server-side apply) and Events.

#![forbid(unsafe_code)]

pub mod context;
pub mod drs;
pub mod error;
pub mod events;
pub mod ha;
pub mod heartbeats;
pub mod http;
pub mod leader;
pub mod maintenance;
pub mod metrics;
pub mod migration;
pub mod reports;
pub mod run;
pub mod settings;
pub mod snapshot;
pub mod stores;
pub mod vm;
pub mod writes;

pub use error::Error;
