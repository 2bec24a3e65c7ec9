//! Builds Drover's test guest (guest/): freestanding x86-64 assembly and C compiled
//! with the host's C compiler through the `cc` crate and linked as an ELF image
//! with a PVH note. The image path reaches the crate as DROVER_TEST_GUEST.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let sources = ["guest/start.S", "guest/kernel.c", "guest/user.c", "guest/virtio.c", "guest/disk.c", "guest/net.c"];
    for f in sources.iter().chain(&["guest/guest.h", "guest/guest.ld"]) {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut build = cc::Build::new();
    build
        .cargo_metadata(false)
        .pic(false)
        .opt_level(2)
        .debug(false)
        .flag("-ffreestanding")
        .flag("-fno-pie")
        .flag("-fno-stack-protector")
        .flag("-fno-asynchronous-unwind-tables")
        .flag("-mno-red-zone")
        .flag("-mgeneral-regs-only")
        .flag("-mcmodel=small")
        .flag("-Wall")
        .flag("-Werror");
    for f in sources {
        build.file(f);
    }
    let objects = build.compile_intermediates();
    let image = out.join("drover-test-guest.elf");
    let status = build
        .get_compiler()
        .to_command()
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-Wl,-z,max-page-size=4096",
            "-Wl,-T,guest/guest.ld",
            "-o",
        ])
        .arg(&image)
        .args(&objects)
        .status()
        .expect("run the C compiler to link the test guest");
    assert!(status.success(), "linking the test guest failed");
    // A sanity check that the image holds the PVH note the loaders look for.
    let readelf = Command::new("readelf").args(["-n"]).arg(&image).output();
    if let Ok(o) = readelf {
        let notes = String::from_utf8_lossy(&o.stdout);
        assert!(!o.status.success() || notes.contains("Xen"), "test guest has no PVH note:\n{notes}");
    }
    println!("cargo:rustc-env=DROVER_TEST_GUEST={}", image.display());
}
