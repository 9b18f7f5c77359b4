//! Builds the eBPF object (proxy-ebpf) with the Debian toolchain and tells the agent
//! where it is, so `cargo build` of the agent never needs a manual copy step. Cargo's
//! own fingerprinting in the nested build makes a second build a no-op.
use std::{env, path::PathBuf, process::ExitCode};

#[path = "../xtask/src/ebpf_toolchain.rs"]
mod ebpf_toolchain;

fn main() -> ExitCode {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let Some(workspace_root) = manifest_dir.parent().map(PathBuf::from) else {
        println!("cargo::error=cannot find the workspace root");
        return ExitCode::FAILURE;
    };
    for watched in [
        "proxy-ebpf/src",
        "proxy-ebpf/Cargo.toml",
        "proxy-common/src",
    ] {
        println!(
            "cargo::rerun-if-changed={}",
            workspace_root.join(watched).display()
        );
    }
    println!("cargo::rerun-if-changed=../xtask/src/ebpf_toolchain.rs");
    println!("cargo::rerun-if-env-changed=KPR_EBPF_OBJECT");

    // A prebuilt object (container builds, packaging) short-circuits the build.
    if let Some(object) = env::var_os("KPR_EBPF_OBJECT") {
        println!(
            "cargo::rustc-env=KPR_EBPF_OBJECT={}",
            PathBuf::from(object).display()
        );
        return ExitCode::SUCCESS;
    }

    let missing = ebpf_toolchain::missing();
    let Some(bpf_linker) = ebpf_toolchain::find_bpf_linker().filter(|_| missing.is_empty()) else {
        let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
        println!(
            "cargo::error=the eBPF toolchain is incomplete (missing: {}); {}",
            names.join(", "),
            ebpf_toolchain::install_hint().replace('\n', " ")
        );
        return ExitCode::FAILURE;
    };
    let output = ebpf_toolchain::build_command(&workspace_root, &bpf_linker).output();
    match output {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            for line in stderr.lines() {
                println!("cargo::warning={line}");
            }
            println!("cargo::error=building proxy-ebpf failed (see the warnings above)");
            return ExitCode::FAILURE;
        }
        Err(error) => {
            println!(
                "cargo::error=cannot run {}: {error}",
                ebpf_toolchain::DEBIAN_CARGO
            );
            return ExitCode::FAILURE;
        }
    }
    println!(
        "cargo::rustc-env=KPR_EBPF_OBJECT={}",
        ebpf_toolchain::object_path(&workspace_root).display()
    );
    ExitCode::SUCCESS
}
