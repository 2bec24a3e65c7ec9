//! The operator's decisions, as pure functions: a [`Snapshot`] of the cluster in
//! (hosts with their capacity and health, VMs with their resources and where they
//! are, DRS rules, migrations in flight), decisions with their reasons out.
//!
//! Nothing here does I/O, awaits, or reads a clock: the time, where a decision
//! needs one, is an input. The same snapshot always gives the same decision, so
//! the operator's controllers are thin (build the snapshot, ask, write the
//! answer), and placement, lifecycle, migration admission and maintenance are one
//! body of rules, tested with tables and properties and benchmarked on their own.
//! HA restarts and DRS balancing build on the same [`Cluster`] view.
//!
//! - [`snapshot`]: the input types.
//! - [`ledger`]: what each host has allocated, and what it has left.
//! - [`rules`]: DRS rules: which host a rule allows, prefers or forbids; compliance.
//! - [`placement`]: filter, score and choose a host for a VM, or say why none fits.
//! - [`explain`]: the reasons of a placement, as users read them.
//! - [`lifecycle`]: what a VM's run strategy asks for now.
//! - [`migration`]: whether a migration may start, and where it goes.
//! - [`maintenance`]: how a host in maintenance is emptied.
//! - [`ha`]: what HA does with the VMs of failed hosts, High priority first.
//! - [`admission`]: HA admission control: the failover capacity each pool keeps.
//! - [`drs`]: one DRS balancing pass: mandatory moves, then balance, each explained.

#![forbid(unsafe_code)]

pub mod admission;
pub mod drs;
pub mod explain;
#[cfg(test)]
mod fixtures;
pub mod ha;
pub mod ledger;
pub mod lifecycle;
pub mod maintenance;
pub mod mask;
pub mod migration;
pub mod placement;
pub mod rules;
pub mod snapshot;

pub use placement::{Cluster, Placement, Unschedulable};
pub use snapshot::{Host, HostHealth, Rule, Snapshot, Vm, VmKey};
