//! From a `VirtualMachine` spec to the configuration `drover-vmm` runs, checking on
//! this host what the API server could not (files exist, CPUs are online). Errors
//! name the spec field, so that they read well in a status condition.

use std::path::PathBuf;

use drover_crds::vm::{CpuPlacement, NumaPolicy, VirtualMachine};
use drover_topology::CpuSet;
use drover_vmm_api::config::{self as vmm, VmConfig};

use crate::Error;
use crate::vm_dir::VmDir;

/// The VMM configuration for `vm` on this host. `offered` are the host CPUs VMs may
/// use here (all online CPUs minus those the HostPolicy reserves); the vCPUs run on
/// [`desired_host_cpus`].
pub fn build(vm: &VirtualMachine, offered: &CpuSet, node: &str, dir: &VmDir) -> Result<VmConfig, Error> {
    build_checked(vm, desired_host_cpus(vm, offered, node), node, dir, true)
}

/// The configuration a migration target expects: the same, on the `host_cpus` the
/// target chose (see `migration_controller`), without requiring the boot files here
/// (a migrated VM does not boot again; memory comes from the source).
pub fn build_expected(vm: &VirtualMachine, host_cpus: String, node: &str, dir: &VmDir) -> Result<VmConfig, Error> {
    build_checked(vm, Ok(host_cpus), node, dir, false)
}

/// `host_cpus` is checked where it always was (after the files), so that a spec
/// with several faults reports the same one first.
fn build_checked(
    vm: &VirtualMachine,
    host_cpus: Result<String, Error>,
    node: &str,
    dir: &VmDir,
    check_files: bool,
) -> Result<VmConfig, Error> {
    let spec = &vm.spec;
    if let Some(disk) = spec.disks.first() {
        return Err(Error::Config(format!(
            "spec.disks[0] ({}): drover-vmm has no block devices yet; remove the disks to run this VM",
            disk.name
        )));
    }
    let file =
        |field: &str, path: &str| if check_files { existing_file(field, path, node) } else { Ok(PathBuf::from(path)) };
    let kernel = file("spec.boot.kernel", &spec.boot.kernel)?;
    let initrd = spec.boot.initrd.as_deref().map(|p| file("spec.boot.initrd", p)).transpose()?;
    let host_cpus = host_cpus?;
    let config = VmConfig {
        name: vm.metadata.name.clone().unwrap_or_else(|| "vm".into()),
        vcpus: spec.cpu.vcpus,
        topology: spec.cpu.topology.map(|t| vmm::Topology { sockets: t.sockets, cores: t.cores, threads: t.threads }),
        memory_mib: memory_mib(&spec.memory.size)?,
        kernel,
        initrd,
        cmdline: spec.boot.cmdline.clone().unwrap_or_default(),
        // The monitor keeps the serial output (rotated log and live console).
        serial: vmm::SerialOutput::Stdout,
        cpus: vmm::CpuPlacement {
            host_cpus: Some(host_cpus),
            dedicated: spec.cpu.placement == CpuPlacement::Dedicated,
            allow_siblings: spec.cpu.allow_siblings,
        },
        numa: vmm::NumaConfig {
            policy: match spec.cpu.numa.policy {
                NumaPolicy::None => vmm::NumaPolicy::None,
                NumaPolicy::Preferred => vmm::NumaPolicy::Preferred,
                NumaPolicy::Strict => vmm::NumaPolicy::Strict,
                NumaPolicy::Interleave => vmm::NumaPolicy::Interleave,
            },
            nodes: spec.cpu.numa.nodes.clone(),
        },
        shares: spec.cpu.effective_shares(),
        api_socket: Some(dir.api_socket()),
        disks: Vec::new(),
        nics: Vec::new(),
    };
    config.validate().map_err(|e| Error::Config(e.to_string()))?;
    Ok(config)
}

/// A host CPU list someone other than the user chose for a VM, and the field that
/// carries it (errors name it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chosen<'a> {
    pub field: &'static str,
    pub list: &'a str,
}

/// The field the operator's choice of host CPUs for a VM on its host is in.
pub const ALLOCATED_CPUS: &str = "status.allocatedCpus";

/// The host CPUs the vCPUs of a VM placed here should run on now:
/// `spec.cpu.hostCpus` if set, else the CPUs the operator holds for it here
/// (`status.allocatedCpus`: a Dedicated VM's own, or for a Shared VM those no
/// Dedicated VM holds), else every CPU offered to VMs.
pub fn desired_host_cpus(vm: &VirtualMachine, offered: &CpuSet, node: &str) -> Result<String, Error> {
    let allocated = vm.status.as_ref().and_then(|s| s.allocated_cpus.as_deref());
    host_cpus(vm, allocated.map(|list| Chosen { field: ALLOCATED_CPUS, list }), offered, node)
}

/// `spec.cpu.hostCpus` if set, else `chosen`, else every CPU offered to VMs; every
/// CPU of a list must be offered here (the error names the list's field).
pub fn host_cpus(vm: &VirtualMachine, chosen: Option<Chosen>, offered: &CpuSet, node: &str) -> Result<String, Error> {
    let spec = vm.spec.cpu.host_cpus.as_deref().map(|list| Chosen { field: "spec.cpu.hostCpus", list });
    let Some(Chosen { field, list }) = spec.or(chosen) else {
        return Ok(offered.to_string());
    };
    let wanted = CpuSet::parse(list).map_err(|e| Error::Config(format!("{field}: {e}")))?;
    if let Some(cpu) = wanted.iter().find(|cpu| !offered.contains(*cpu)) {
        return Err(Error::Config(format!("{field}: CPU {cpu} is not offered to VMs on {node} (offered: {offered})")));
    }
    Ok(wanted.to_string())
}

fn existing_file(field: &str, path: &str, node: &str) -> Result<PathBuf, Error> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(PathBuf::from(path)),
        Ok(_) => Err(Error::Config(format!("{field}: {path} on {node} is not a regular file"))),
        Err(e) => Err(Error::Config(format!("{field}: cannot open {path} on {node}: {e}"))),
    }
}

/// A Kubernetes memory quantity (`512Mi`, `4Gi`, `1.5Gi`, `1073741824`) in whole MiB,
/// as `drover_crds::quantity` reads it; the error names `spec.memory.size`.
pub fn memory_mib(quantity: &str) -> Result<u64, Error> {
    drover_crds::quantity::memory_mib(quantity).map_err(|e| Error::Config(format!("spec.memory.size: {e}")))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn vm(json: &str) -> VirtualMachine {
        serde_json::from_str(json).unwrap()
    }

    fn guest() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"kernel").unwrap();
        file
    }

    fn spec(kernel: &str, cpu: &str) -> String {
        format!(
            r#"{{"apiVersion":"drover.dev/v1alpha1","kind":"VirtualMachine","metadata":{{"name":"db","namespace":"ns","uid":"u1"}},
            "spec":{{"cpu":{cpu},"memory":{{"size":"1536Mi"}},"boot":{{"kernel":"{kernel}","cmdline":"console=ttyS0"}}}}}}"#
        )
    }

    #[test]
    fn spec_becomes_a_vmm_config() {
        let kernel = guest();
        let dir = VmDir { path: "/run/drover/vms/u1".into() };
        let offered = CpuSet::parse("0-7").unwrap();
        let vm = vm(&spec(
            kernel.path().to_str().unwrap(),
            r#"{"vcpus":4,"placement":"Dedicated","hostCpus":"2-5","priority":"High","numa":{"policy":"Strict","nodes":[0]}}"#,
        ));
        let config = build(&vm, &offered, "host-1", &dir).unwrap();
        assert_eq!(config.name, "db");
        assert_eq!(config.vcpus, 4);
        assert_eq!(config.memory_mib, 1536);
        assert_eq!(config.cmdline, "console=ttyS0");
        assert_eq!(config.cpus.host_cpus.as_deref(), Some("2-5"));
        assert!(config.cpus.dedicated);
        assert_eq!(config.shares, 2000);
        assert_eq!(config.numa.policy, vmm::NumaPolicy::Strict);
        assert_eq!(config.numa.nodes, vec![0]);
        assert_eq!(config.api_socket.as_deref(), Some(Path::new("/run/drover/vms/u1/api.sock")));
    }

    #[test]
    fn shared_vm_without_host_cpus_gets_every_offered_cpu() {
        let kernel = guest();
        let vm = vm(&spec(kernel.path().to_str().unwrap(), r#"{"vcpus":2}"#));
        let offered = CpuSet::parse("1-3").unwrap();
        let config = build(&vm, &offered, "h", &VmDir { path: "/x".into() }).unwrap();
        assert_eq!(config.cpus.host_cpus.as_deref(), Some("1-3"));
        assert!(!config.cpus.dedicated);
        assert_eq!(config.shares, 1000);
    }

    #[test]
    fn errors_name_the_field_and_the_host() {
        let offered = CpuSet::parse("0-1").unwrap();
        let dir = VmDir { path: "/x".into() };
        let missing = vm(&spec("/nonexistent/vmlinux", r#"{"vcpus":1}"#));
        let e = build(&missing, &offered, "host-2", &dir).unwrap_err().to_string();
        assert!(e.contains("spec.boot.kernel") && e.contains("/nonexistent/vmlinux") && e.contains("host-2"), "{e}");

        let kernel = guest();
        let offline = vm(&spec(kernel.path().to_str().unwrap(), r#"{"vcpus":1,"hostCpus":"1-3"}"#));
        let e = build(&offline, &offered, "host-2", &dir).unwrap_err().to_string();
        assert!(e.contains("spec.cpu.hostCpus") && e.contains("CPU 2"), "{e}");
    }

    /// spec.cpu.hostCpus × the operator's choice (status.allocatedCpus) × what the
    /// host offers → the CPUs the vCPUs get, or the field the error names.
    #[test]
    fn host_cpus_come_from_the_spec_then_the_operator_then_the_host() {
        let offered = CpuSet::parse("0-3").unwrap();
        type Row = (Option<&'static str>, Option<&'static str>, Result<&'static str, &'static str>);
        let rows: &[Row] = &[
            (None, None, Ok("0-3")),
            (None, Some("2-3"), Ok("2-3")),
            (Some("1"), None, Ok("1")),
            (Some("1"), Some("2-3"), Ok("1")),
            (Some("1"), Some("7"), Ok("1")),
            (None, Some("7"), Err("status.allocatedCpus: CPU 7 is not offered to VMs on host-1 (offered: 0-3)")),
            (None, Some("x"), Err("status.allocatedCpus: ")),
            (Some("6"), Some("2-3"), Err("spec.cpu.hostCpus: CPU 6 is not offered to VMs on host-1 (offered: 0-3)")),
        ];
        for &(spec_cpus, allocated, want) in rows {
            let mut vm = vm(&spec("/k", r#"{"vcpus":1}"#));
            vm.spec.cpu.host_cpus = spec_cpus.map(str::to_string);
            vm.status = Some(drover_crds::vm::VirtualMachineStatus {
                allocated_cpus: allocated.map(str::to_string),
                ..Default::default()
            });
            let got = desired_host_cpus(&vm, &offered, "host-1").map_err(|e| e.to_string());
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{spec_cpus:?} × {allocated:?}"),
                (Err(got), Err(want)) => assert!(got.starts_with(want), "{spec_cpus:?} × {allocated:?}: {got}"),
                (got, want) => panic!("{spec_cpus:?} × {allocated:?}: {got:?}, want {want:?}"),
            }
            // Another choice (a migration's target CPUs) ranks the same, and the
            // VM's own allocation is then not looked at.
            let chosen = allocated.map(|list| Chosen { field: "status.targetCpus", list });
            let mut elsewhere = vm.clone();
            elsewhere.status.as_mut().unwrap().allocated_cpus = Some("9".into());
            let got = host_cpus(&elsewhere, chosen, &offered, "host-1").map_err(|e| e.to_string());
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(got), Err(want)) => {
                    assert!(got.starts_with(&want.replace("status.allocatedCpus", "status.targetCpus")), "{got}")
                }
                (got, want) => panic!("{spec_cpus:?} × {allocated:?}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_target_gets_the_cpus_it_chose_without_the_boot_files() {
        let vm = vm(&spec("/nonexistent/vmlinux", r#"{"vcpus":2,"hostCpus":"0-1"}"#));
        let config = build_expected(&vm, "4-5".into(), "host-2", &VmDir { path: "/x".into() }).unwrap();
        assert_eq!(config.cpus.host_cpus.as_deref(), Some("4-5"));
        assert_eq!(config.kernel, PathBuf::from("/nonexistent/vmlinux"));
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(memory_mib("512Mi").unwrap(), 512);
        assert_eq!(memory_mib("4Gi").unwrap(), 4096);
        assert_eq!(memory_mib("1.5Gi").unwrap(), 1536);
        assert_eq!(memory_mib("1048576").unwrap(), 1);
        assert_eq!(memory_mib("2048Ki").unwrap(), 2);
        for bad in ["", "Mi", "1G", "1.5", "12Xi", "0.0001Mi", "1e3Mi"] {
            let e = memory_mib(bad).unwrap_err().to_string();
            assert!(e.contains("spec.memory.size"), "{bad}: {e}");
        }
    }
}
