//! Puts a kernel and what it needs to boot into guest memory: ELF images with a PVH
//! note (Drover's test guest, PVH-capable Linux) boot through PVH; a bzImage or an
//! ELF vmlinux without the note boots through the Linux 64-bit boot protocol. Both
//! get ACPI tables (RSDP, XSDT, MADT) and an MP table describing every vCPU.

use crate::memory::GuestRam;
use std::fs::File;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, Error as ElfError, PvhBootCapability};
use linux_loader::loader::{Error as LoaderError, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress};

use crate::Error;
use crate::arch::x86_64::{acpi, layout, linux, mptable, pvh, regs};
use crate::config::VmConfig;
use crate::devices::virtio;

/// How the boot CPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode at `entry`, %ebx = `start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode at `entry`, %rsi = the zero page.
    Linux { entry: u64 },
}

/// The kernel formats `drover-vmm` boots.
enum Kernel {
    Pvh(u64),
    LinuxElf(KernelLoaderResult),
    BzImage(KernelLoaderResult),
}

/// Loads the kernel of `config` and its boot structures into `memory`.
pub fn load(config: &VmConfig, memory: &GuestRam, apic_ids: &[u32], ram: &[(u64, u64)]) -> Result<BootEntry, Error> {
    let kernel = load_kernel(config, memory)?;
    let memmap = pvh::memory_map(ram);
    let (rsdp, tables) = acpi::tables(layout::ACPI_START, apic_ids);
    write(memory, layout::ACPI_START, &tables, "ACPI tables")?;
    write(memory, mptable::address(), &mptable::mptable(apic_ids), "MP table")?;

    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| Error::Config(format!("cmdline: {e}")))?;
    if !config.cmdline.is_empty() {
        cmdline.insert_str(&config.cmdline).map_err(|e| Error::Config(format!("cmdline: {e}")))?;
    }
    // Every virtio device, as Linux's virtio_mmio driver (and the test guest) finds them.
    for index in 0..config.disks.len() + config.nics.len() {
        let (base, irq) = virtio::slot(index);
        cmdline.add_virtio_mmio_device(virtio::MMIO_SIZE, GuestAddress(base), irq, None).map_err(|e| {
            Error::Config(format!("cmdline: no room for virtio device {index} after the configured command line: {e}"))
        })?;
    }
    let cmdline_len = cmdline.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(config.cmdline.len());

    match kernel {
        Kernel::Pvh(entry) => {
            if config.initrd.is_some() {
                return Err(Error::Config(
                    "initrd: not supported with PVH boot yet; boot a bzImage to use an initrd".into(),
                ));
            }
            load_cmdline(memory, layout::CMDLINE_START, &cmdline)?;
            let (info, map) = pvh::start_info(&memmap, rsdp);
            write(memory, layout::PVH_INFO_START, &info, "start_info")?;
            write(memory, layout::MEMMAP_START, &map, "memory map")?;
            Ok(BootEntry::Pvh { entry, start_info: pvh::START_INFO_ADDR })
        }
        Kernel::LinuxElf(r) | Kernel::BzImage(r) => {
            let hdr = r.setup_header;
            // A bzImage's 64-bit entry is 0x200 past where its protected-mode part loads.
            let entry = if hdr.is_some() { r.kernel_load.0 + 0x200 } else { r.kernel_load.0 };
            load_cmdline(memory, layout::LINUX_CMDLINE_START, &cmdline)?;
            let initrd = load_initrd(config, memory, ram, hdr.map(|h| u64::from(h.initrd_addr_max)))?;
            let mut zero_page = linux::zero_page(hdr, cmdline_len, initrd, &memmap);
            zero_page.0.acpi_rsdp_addr = rsdp;
            memory
                .write_obj(zero_page, GuestAddress(layout::ZERO_PAGE_START))
                .map_err(|e| Error::Memory(format!("writing the zero page: {e}")))?;
            let gdt: Vec<u8> = regs::LINUX_BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
            write(memory, layout::BOOT_GDT_START, &gdt, "boot GDT")?;
            write(memory, layout::BOOT_IDT_START, &[0; 8], "boot IDT")?;
            for (addr, table) in regs::linux_page_tables() {
                write(memory, addr, &table, "boot page tables")?;
            }
            Ok(BootEntry::Linux { entry })
        }
    }
}

fn load_kernel(config: &VmConfig, memory: &GuestRam) -> Result<Kernel, Error> {
    let kernel_err = |why: String| Error::Kernel { path: config.kernel.display().to_string(), why };
    let mut file = File::open(&config.kernel).map_err(|e| kernel_err(format!("cannot open: {e}")))?;
    let high = Some(GuestAddress(layout::HIMEM_START));
    match Elf::load(memory, None, &mut file, high) {
        Ok(r) => match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => Ok(Kernel::Pvh(addr.0)),
            _ => Ok(Kernel::LinuxElf(r)),
        },
        Err(LoaderError::Elf(ElfError::InvalidElfMagicNumber | ElfError::ReadElfHeader)) => {
            BzImage::load(memory, None, &mut file, high)
                .map(Kernel::BzImage)
                .map_err(|e| kernel_err(format!("neither an ELF image nor a bzImage ({e})")))
        }
        Err(e) => Err(kernel_err(format!("not a bootable ELF image ({e})"))),
    }
}

fn load_initrd(
    config: &VmConfig,
    memory: &GuestRam,
    ram: &[(u64, u64)],
    max: Option<u64>,
) -> Result<Option<(u64, u64)>, Error> {
    let Some(path) = &config.initrd else { return Ok(None) };
    let err = |why: String| Error::Kernel { path: path.display().to_string(), why };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read initrd: {e}")))?;
    let low_end = ram.first().map(|(start, size)| start + size).unwrap_or(0);
    let limit = max.filter(|m| *m > 0).map(|m| m.min(low_end)).unwrap_or(low_end);
    let addr = linux::initrd_address(limit, bytes.len() as u64)
        .filter(|a| *a >= layout::HIMEM_START)
        .ok_or_else(|| err(format!("initrd of {} bytes does not fit in guest memory below {limit:#x}", bytes.len())))?;
    write(memory, addr, &bytes, "initrd")?;
    Ok(Some((addr, bytes.len() as u64)))
}

fn load_cmdline(memory: &GuestRam, at: u64, cmdline: &Cmdline) -> Result<(), Error> {
    linux_loader::loader::load_cmdline(memory, GuestAddress(at), cmdline)
        .map_err(|e| Error::Memory(format!("writing the command line: {e}")))
}

fn write(memory: &GuestRam, at: u64, bytes: &[u8], what: &str) -> Result<(), Error> {
    memory.write_slice(bytes, GuestAddress(at)).map_err(|e| Error::Memory(format!("writing the {what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn config(kernel: &Path, cmdline: &str) -> VmConfig {
        serde_json::from_value(serde_json::json!({"vcpus": 2, "memoryMib": 64, "kernel": kernel, "cmdline": cmdline}))
            .unwrap()
    }

    #[test]
    fn pvh_image_boots_through_pvh() {
        let mem = memory();
        let entry =
            load(&config(Path::new(env!("DROVER_TEST_GUEST")), "x=1"), &mem, &[0, 1], &[(0, 64 << 20)]).unwrap();
        assert!(matches!(entry, BootEntry::Pvh { entry: 0x100000, start_info: layout::PVH_INFO_START }), "{entry:?}");
        let magic: u32 = mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!(magic, 0x336e_c578);
        let mut mp = [0u8; 4];
        mem.read_slice(&mut mp, GuestAddress(mptable::address())).unwrap();
        assert_eq!(&mp, b"_MP_");
    }

    #[test]
    fn virtio_devices_are_announced_on_the_command_line() {
        let mem = memory();
        let mut config = config(Path::new(env!("DROVER_TEST_GUEST")), "drover.mode=disk");
        let disk = crate::config::DiskConfig { path: "/d".into(), read_only: false, id: String::new() };
        config.disks = vec![disk.clone(), disk];
        config.nics = vec![crate::config::NicConfig { tap: "t0".into(), mac: "52:54:00:00:00:01".into() }];
        load(&config, &mem, &[0, 1], &[(0, 64 << 20)]).unwrap();
        let mut cmdline = vec![0u8; 160];
        mem.read_slice(&mut cmdline, GuestAddress(layout::CMDLINE_START)).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let cmdline = cmdline.trim_end_matches('\0');
        assert_eq!(
            cmdline,
            "drover.mode=disk virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7"
        );
    }

    #[test]
    fn elf_without_pvh_note_boots_as_linux() {
        // The test guest without its PVH note stands in for a vmlinux.
        let stripped = std::env::temp_dir().join(format!("drover-vmlinux-like-{}", std::process::id()));
        let ok = std::process::Command::new("objcopy")
            .args(["--remove-section", ".note"])
            .arg(env!("DROVER_TEST_GUEST"))
            .arg(&stripped)
            .status()
            .expect("objcopy (binutils) strips the PVH note");
        assert!(ok.success());
        let mem = memory();
        let entry = load(&config(&stripped, "console=ttyS0"), &mem, &[0, 1], &[(0, 64 << 20)]).unwrap();
        assert_eq!(entry, BootEntry::Linux { entry: 0x100000 });
        let zp: linux::ZeroPage = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        let p = zp.0;
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.cmd_line_ptr } as u64, layout::LINUX_CMDLINE_START);
        assert_eq!({ p.acpi_rsdp_addr }, layout::ACPI_START);
        assert_eq!(p.e820_entries, 3);
        let mut cmdline = [0u8; 13];
        mem.read_slice(&mut cmdline, GuestAddress(layout::LINUX_CMDLINE_START)).unwrap();
        assert_eq!(&cmdline, b"console=ttyS0");
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPTE_START | 3);
    }

    #[test]
    fn garbage_is_refused() {
        let junk = std::env::temp_dir().join(format!("drover-junk-kernel-{}", std::process::id()));
        std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
        let err = load(&config(&junk, ""), &memory(), &[0], &[(0, 64 << 20)]).unwrap_err().to_string();
        assert!(err.contains("neither an ELF image nor a bzImage"), "{err}");
    }
}
