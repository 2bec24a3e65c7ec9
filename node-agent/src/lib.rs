//! `drover-agent`: Drover's node agent. One per host; it runs the VMs the operator
//! places on its host, each in its own `drover-vmm` process kept by a
//! `drover-monitor`, reports their status, applies live CPU and priority changes,
//! renews the host's heartbeat and fences the host's VMs when it cannot, carries
//! both ends of live migrations, and keeps serial console logs.
//!
//! Modules, in the order a VM meets them:
//! - [`host_facts`]: what the host offers, published on its Node.
//! - [`heartbeat`] and [`fence`]: the Lease, and the deadline past which no VM runs;
//!   [`timing`]: how often, how long, and the margin between the two.
//! - [`vm_controller`]: VirtualMachines placed here → VMMs, and status back.
//! - [`vm_config`]: a VirtualMachine spec → the VMM's configuration.
//! - [`supervisor`], [`vm_dir`], [`monitor`]: VMM processes that outlive the agent;
//!   [`process`]: signalling them through pidfds; [`files`]: the files they share.
//! - [`vmm_client`]: the VMM's control API.
//! - [`migration_controller`]: VirtualMachineMigrations, source and target;
//!   [`handover`]: the VM's status once a migration handed it over.
//! - [`console`]: the HTTP endpoint (health, serial console logs).
//! - [`events`]: Kubernetes Events for what happened to a VM.

pub mod conditions;
pub mod console;
pub mod context;
pub mod error;
pub mod events;
pub mod fence;
pub mod files;
pub mod handover;
pub mod heartbeat;
pub mod host_facts;
pub mod migration_controller;
pub mod monitor;
pub mod next;
pub mod process;
pub mod settings;
pub mod status;
pub mod supervisor;
pub mod timing;
pub mod vm_config;
pub mod vm_controller;
pub mod vm_dir;
pub mod vmm_client;

pub use error::Error;
