//! Writes the CRD YAML of every Drover kind into `crds/` and `charts/drover/crds/`.
//! `crdgen --check` only reports stale files (exit status 1).

use std::process::ExitCode;

use drover_crds::generate;

fn main() -> ExitCode {
    let root = generate::repo_root();
    let check = std::env::args().any(|a| a == "--check");
    let result = if check {
        generate::stale_files(&root).map(|stale| {
            for file in &stale {
                eprintln!("stale: {file} (regenerate with `{}`)", generate::REGENERATE);
            }
            stale.is_empty()
        })
    } else {
        generate::write_all(&root).map(|written| {
            for path in written {
                println!("wrote {}", path.display());
            }
            true
        })
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}
