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
/// use here (all online CPUs minus those the HostPolicy reserves).
pub fn build(vm: &VirtualMachine, offered: &CpuSet, node: &str, dir: &VmDir) -> Result<VmConfig, Error> {
    build_checked(vm, offered, node, dir, true)
}

/// The configuration a migration target expects: the same, without requiring the
/// boot files here (a migrated VM does not boot again; memory comes from the source).
pub fn build_expected(vm: &VirtualMachine, offered: &CpuSet, node: &str, dir: &VmDir) -> Result<VmConfig, Error> {
    build_checked(vm, offered, node, dir, false)
}

fn build_checked(
    vm: &VirtualMachine,
    offered: &CpuSet,
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
    let host_cpus = desired_host_cpus(vm, offered, node)?;
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
    };
    config.validate().map_err(|e| Error::Config(e.to_string()))?;
    Ok(config)
}

/// The host CPUs the vCPUs should run on now: the spec's list (which must be online
/// here and offered to VMs), or every CPU offered to VMs.
pub fn desired_host_cpus(vm: &VirtualMachine, offered: &CpuSet, node: &str) -> Result<String, Error> {
    let Some(list) = vm.spec.cpu.host_cpus.as_deref() else {
        return Ok(offered.to_string());
    };
    let wanted = CpuSet::parse(list).map_err(|e| Error::Config(format!("spec.cpu.hostCpus: {e}")))?;
    if let Some(cpu) = wanted.iter().find(|cpu| !offered.contains(*cpu)) {
        return Err(Error::Config(format!(
            "spec.cpu.hostCpus: CPU {cpu} is not offered to VMs on {node} (offered: {offered})"
        )));
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

/// A Kubernetes memory quantity (`512Mi`, `4Gi`, `1.5Gi`, `1073741824`) in whole MiB.
pub fn memory_mib(quantity: &str) -> Result<u64, Error> {
    let bad = || Error::Config(format!("spec.memory.size: {quantity:?} is not a whole number of MiB"));
    let split = quantity.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    // Decimal quantities (1.5Gi) are exact in integers: scale by the fraction's digits.
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() || frac.len() > 9 {
        return Err(bad());
    }
    let digits: u128 = format!("{whole}{frac}").parse().map_err(|_| bad())?;
    let scale = 10u128.pow(frac.len() as u32);
    let bytes = digits.checked_mul(multiplier).ok_or_else(bad)?;
    if bytes % scale != 0 || !(bytes / scale).is_multiple_of(1 << 20) {
        return Err(bad());
    }
    u64::try_from(bytes / scale / (1 << 20)).map_err(|_| bad())
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
