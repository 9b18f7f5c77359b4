//! Builds the eBPF object (proxy-ebpf) with the Debian toolchain and tells the agent
//! where it is, so `cargo build` of the agent never needs a manual copy step. Cargo's
//! own fingerprinting in the nested build makes a second build a no-op.
use std::{env, path::PathBuf, process::ExitCode};

#[path = "src/ebpf_stub.rs"]
mod ebpf_stub;
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
    println!("cargo::rerun-if-env-changed=KPR_EBPF_STUB");

    // A prebuilt object (container builds, packaging) short-circuits the build.
    if let Some(object) = env::var_os("KPR_EBPF_OBJECT") {
        println!(
            "cargo::rustc-env=KPR_EBPF_OBJECT={}",
            PathBuf::from(object).display()
        );
        return ExitCode::SUCCESS;
    }

    // KPR_EBPF_STUB=1 asks for the stub outright (a userspace-only check or build).
    if env::var_os("KPR_EBPF_STUB").is_some_and(|value| value == "1") {
        println!("cargo::warning=KPR_EBPF_STUB=1: building with a stub eBPF object; the agent will refuse to run");
        return write_stub();
    }
    let missing = ebpf_toolchain::missing();
    let Some(bpf_linker) = ebpf_toolchain::find_bpf_linker().filter(|_| missing.is_empty()) else {
        // Without the toolchain the agent still builds, with a marked stub in place of
        // the object (as aya-template does), so `cargo check`/`clippy`/`build` of the
        // userspace crates never need bpf-linker; the agent refuses to start on it.
        let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
        println!(
            "cargo::warning=the eBPF toolchain is incomplete (missing: {}): building with a stub eBPF object; the agent will refuse to run until `cargo xtask build-ebpf` works",
            names.join(", "),
        );
        return write_stub();
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

/// Writes the stub object ([`ebpf_stub::MARKER`], nothing else) and points the agent at it.
fn write_stub() -> ExitCode {
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        println!("cargo::error=OUT_DIR is not set");
        return ExitCode::FAILURE;
    };
    let stub = out_dir.join("kpr-ebpf-stub.o");
    if let Err(error) = std::fs::write(&stub, ebpf_stub::MARKER) {
        println!("cargo::error=cannot write {}: {error}", stub.display());
        return ExitCode::FAILURE;
    }
    println!("cargo::rustc-env=KPR_EBPF_OBJECT={}", stub.display());
    ExitCode::SUCCESS
}
