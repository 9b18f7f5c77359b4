//! The one place that knows how the eBPF object is built.
//!
//! `core` must be compiled for `bpfel-unknown-none`, which needs the standard library's
//! source. The rustup toolchain of these machines has no `rust-src` and cannot fetch it,
//! so the kernel side is built with Debian's `rustc-web` (Rust 1.96 on LLVM 22) plus
//! `rust-web-src`, and linked by `bpf-linker` built against LLVM 22.
//!
//! This file is compiled twice: as a module of `xtask` (which also installs what is
//! missing) and, through `#[path]`, by `proxy-userspace/build.rs` (which only builds and
//! points the agent at the object). It therefore uses `std` alone.
#![allow(dead_code, reason = "each includer uses a different subset")]

use std::{
    env,
    ffi::OsString,
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

/// Debian's compiler and cargo (packages rustc-web, cargo-web).
pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
pub const DEBIAN_CARGO: &str = "/usr/bin/cargo";
/// Where rust-web-src puts the library source that `-Z build-std` needs.
pub const RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
pub const BPF_LINKER_VERSION: &str = "0.13.0";
pub const TARGET: &str = "bpfel-unknown-none";
/// Debian packages the build needs.
pub const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// A piece of the toolchain that is not installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    DebianRust,
    RustSource,
    Llvm,
    BpfLinker,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DebianRust => write!(f, "Debian's rustc-web/cargo-web ({DEBIAN_RUSTC})"),
            Self::RustSource => write!(f, "Debian's rust-web-src ({RUST_SRC})"),
            Self::Llvm => write!(f, "LLVM 22 development files ({LLVM_PREFIX})"),
            Self::BpfLinker => write!(f, "bpf-linker {BPF_LINKER_VERSION} (built for llvm-22)"),
        }
    }
}

/// The commands that install everything, for messages.
#[must_use]
pub fn install_hint() -> String {
    format!(
        "run `cargo xtask build-ebpf` as root (it installs what is missing), or by hand:\n  \
         apt-get install -y {}\n  \
         PATH={LLVM_PREFIX}/bin:$PATH LLVM_SYS_221_PREFIX={LLVM_PREFIX} cargo install bpf-linker \
         --version {BPF_LINKER_VERSION} --locked --no-default-features --features llvm-22",
        APT_PACKAGES.join(" ")
    )
}

/// Finds `bpf-linker` on PATH or in cargo's install directory.
#[must_use]
pub fn find_bpf_linker() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|path| env::split_paths(&path).collect())
        .unwrap_or_default();
    if let Some(cargo_home) = env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(cargo_home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}

/// What is missing for the build, in install order.
#[must_use]
pub fn missing() -> Vec<Missing> {
    let mut missing = Vec::new();
    if !Path::new(DEBIAN_RUSTC).is_file() || !Path::new(DEBIAN_CARGO).is_file() {
        missing.push(Missing::DebianRust);
    }
    if !Path::new(RUST_SRC).is_dir() {
        missing.push(Missing::RustSource);
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").is_file() {
        missing.push(Missing::Llvm);
    }
    if find_bpf_linker().is_none() {
        missing.push(Missing::BpfLinker);
    }
    missing
}

/// Where the nested eBPF build keeps its artifacts: a target directory of its own, so
/// it never contends for the lock of the cargo invocation that started it.
#[must_use]
pub fn target_dir(workspace_root: &Path) -> PathBuf {
    workspace_root.join("target/ebpf")
}

/// The built object.
#[must_use]
pub fn object_path(workspace_root: &Path) -> PathBuf {
    target_dir(workspace_root)
        .join(TARGET)
        .join("release/proxy-ebpf")
}

/// The build command. It starts from an empty environment: a cargo run from a build
/// script or from clippy inherits variables (RUSTC_WORKSPACE_WRAPPER, CARGO_*, rustup's
/// toolchain selection) that would point the nested build at the wrong compiler.
#[must_use]
pub fn build_command(workspace_root: &Path, bpf_linker: &Path) -> Command {
    let mut path: Vec<PathBuf> = vec![bpf_linker
        .parent()
        .map_or_else(|| PathBuf::from("/usr/bin"), Path::to_path_buf)];
    path.extend(
        ["/usr/local/bin", "/usr/bin", "/bin"]
            .iter()
            .map(PathBuf::from),
    );
    let path = env::join_paths(path).unwrap_or_else(|_| OsString::from("/usr/bin:/bin"));
    let mut command = Command::new(DEBIAN_CARGO);
    command
        .env_clear()
        .env("PATH", path)
        .env(
            "HOME",
            env::var_os("HOME").unwrap_or_else(|| "/root".into()),
        )
        .env("RUSTC", DEBIAN_RUSTC)
        // build-std is a nightly feature; the stable Debian compiler allows it this way.
        .env("RUSTC_BOOTSTRAP", "1")
        // --btf makes the linker emit BTF for maps and programs.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        )
        .current_dir(workspace_root.join("proxy-ebpf"))
        .args(["build", "--release", "--locked", "--package", "proxy-ebpf"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir(workspace_root));
    if let Some(cargo_home) = env::var_os("CARGO_HOME") {
        command.env("CARGO_HOME", cargo_home);
    }
    command
}
