//! Developer tasks: `cargo xtask <command>`.
//!
//! xtask depends on nothing of the workspace, so it compiles on a fresh machine before
//! the eBPF toolchain exists, and can install that toolchain first.
mod ebpf_toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, demo and test tasks of the kube-proxy replacement"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (proxy-ebpf), installing the toolchain first when run as
    /// root on Debian (apt packages and a pinned bpf-linker).
    BuildEbpf {
        /// Only report what is missing; install nothing.
        #[arg(long)]
        no_install: bool,
    },
    /// Build everything, create a lab, run the agent on manifests/examples, send
    /// traffic, print which backend answered each request, and clean up. Needs root.
    Demo {
        /// Directory of Services and EndpointSlices to demonstrate.
        #[arg(long, default_value = "manifests/examples")]
        manifests: PathBuf,
    },
    /// Benchmark the eBPF dataplane against kube-proxy's iptables and nftables rules
    /// and against no proxy, in a lab, with the same services and traffic. Builds
    /// everything in release mode, installs iptables and nftables if missing, prints a
    /// table and writes CSV, JSON and an SVG plot under target/bench/. Needs root.
    Bench {
        /// Modes, alternated in this order (ebpf, ebpf-tc, ebpf-api, iptables,
        /// iptables-legacy, nftables, none) [default: ebpf,ebpf-tc,iptables,nftables,none].
        #[arg(long)]
        modes: Option<String>,
        /// Service counts, comma-separated [default: 1,1000,10000].
        #[arg(long)]
        services: Option<String>,
        /// Endpoints per service [default: 3].
        #[arg(long)]
        endpoints: Option<usize>,
        /// Seconds of each connection-rate test [default: 5].
        #[arg(long)]
        duration: Option<f64>,
        /// Rounds; figures are medians over rounds [default: 3].
        #[arg(long)]
        rounds: Option<usize>,
        /// Seconds a mode may take to program all services before its cell says "not
        /// programmed in ..." and the run goes on [default: 180].
        #[arg(long)]
        program_limit: Option<f64>,
        /// Output directory [default: target/bench/<UTC timestamp>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Further kpr-bench flags, after `--`: --affinity, --clients, --stream-duration,
        /// --tc-repeat, --dump-rules.
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Clippy with `-D warnings` on every crate, proxy-ebpf included (checked for the
    /// host: the toolchain that builds it for the kernel has no clippy). Needs neither
    /// root nor the eBPF toolchain.
    Clippy,
    /// The whole test suite: formatting, clippy, unit, BPF_PROG_TEST_RUN and lab
    /// end-to-end tests. Needs root. `.ci/run` runs exactly this.
    Test {
        /// Extra arguments for `cargo test` (a filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true)]
        cargo_test_args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::BuildEbpf { no_install } => build_ebpf(&root, !no_install).map(drop),
        Task::Demo { manifests } => {
            require_root("the demo builds network namespaces and loads BPF programs")?;
            ensure_lab_tools()?;
            build_ebpf(&root, true)?;
            let kpr = build_agent(&root)?;
            let manifests = if manifests.is_absolute() {
                manifests
            } else {
                root.join(manifests)
            };
            step("running the demo");
            run(cargo(&root)
                .args([
                    "run",
                    "--quiet",
                    "--package",
                    "kpr-lab",
                    "--bin",
                    "kpr-demo",
                    "--",
                ])
                .arg(&manifests)
                .env("KPR_BIN", &kpr))
        }
        Task::Bench {
            modes,
            services,
            endpoints,
            duration,
            rounds,
            program_limit,
            out,
            extra,
        } => {
            require_root("the benchmark builds network namespaces and loads BPF programs")?;
            ensure_lab_tools()?;
            ensure_bench_tools()?;
            build_ebpf(&root, true)?;
            let kpr = build_agent_release(&root)?;
            let mut flags: Vec<String> = Vec::new();
            let mut flag = |name: &str, value: Option<String>| {
                if let Some(value) = value {
                    flags.push(format!("--{name}"));
                    flags.push(value);
                }
            };
            flag("modes", modes);
            flag("services", services);
            flag("endpoints", endpoints.map(|n| n.to_string()));
            flag("duration", duration.map(|s| s.to_string()));
            flag("rounds", rounds.map(|n| n.to_string()));
            flag("program-limit", program_limit.map(|s| s.to_string()));
            flag(
                "out",
                out.map(|dir| {
                    if dir.is_absolute() {
                        dir
                    } else {
                        root.join(dir)
                    }
                    .display()
                    .to_string()
                }),
            );
            step("running the benchmark");
            run(cargo(&root)
                .args([
                    "run",
                    "--release",
                    "--locked",
                    "--quiet",
                    "--package",
                    "kpr-lab",
                    "--bin",
                    "kpr-bench",
                    "--",
                ])
                .args(&flags)
                .args(&extra)
                .env("KPR_BIN", &kpr))
        }
        Task::Clippy => clippy(&root),
        Task::Test { cargo_test_args } => {
            require_root(
                "the datapath and lab tests load BPF programs and build network namespaces",
            )?;
            ensure_lab_tools()?;
            // The benchmark smoke test loads kube-proxy-style rules.
            ensure_bench_tools()?;
            build_ebpf(&root, true)?;
            step("cargo fmt --check");
            run(cargo(&root).args(["fmt", "--all", "--", "--check"]))?;
            clippy(&root)?;
            let kpr = build_agent(&root)?;
            step("cargo test");
            run(cargo(&root)
                .args(["test", "--locked", "--no-fail-fast"])
                .args(&cargo_test_args)
                .env("KPR_BIN", &kpr))
        }
    }
}

/// Clippy of every crate, proxy-ebpf included: it is checked for the host (a std
/// binary with an empty `main` there, see its `main.rs`), because the Debian toolchain
/// that builds it for bpfel-unknown-none ships no clippy. The code is the same; only
/// what the BPF backend itself rejects is left to `cargo xtask build-ebpf`.
fn clippy(root: &Path) -> Result<()> {
    step("cargo clippy --workspace -D warnings");
    run(cargo(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))
}

fn workspace_root() -> PathBuf {
    // xtask lives in <root>/xtask.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn step(what: &str) {
    eprintln!("\x1b[1m==> {what}\x1b[0m");
}

/// The cargo that runs this xtask (rustup's), for userspace builds.
fn cargo(root: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root);
    command
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("run this as root: {why}");
    }
    Ok(())
}

/// The commands the lab runs (`ip`, `sysctl`, `mount`; `hping3` for the SYN flood of
/// `tests/tests/real_network.rs`) and their Debian packages.
const LAB_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    ("mount", "mount"),
    ("hping3", "hping3"),
    // A real client of the test API server (tests/tests/apiserver.rs, kubectl.rs);
    // Debian's is kubectl 1.20, which the server serves as well as newer ones.
    ("kubectl", "kubernetes-client"),
];

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Installs the lab's command-line tools when they are missing.
fn ensure_lab_tools() -> Result<()> {
    ensure_programs("the lab's tools", LAB_TOOLS)
}

/// What the benchmark's kube-proxy modes run, and their Debian packages.
const BENCH_TOOLS: &[(&str, &str)] = &[
    ("iptables-nft-restore", "iptables"),
    ("iptables-legacy-restore", "iptables"),
    ("nft", "nftables"),
];

/// Installs iptables and nftables when they are missing (the benchmark loads
/// kube-proxy's rules with them, inside its own namespaces only).
fn ensure_bench_tools() -> Result<()> {
    ensure_programs("iptables and nftables for the benchmark", BENCH_TOOLS)
}

/// Installs the packages of the `(program, package)` pairs whose program is neither on
/// PATH nor in /usr/sbin.
fn ensure_programs(what: &str, tools: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(program, _)| !on_path(program) && !Path::new("/usr/sbin").join(program).is_file())
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing {what}"));
    apt_install(&missing)
}

/// `apt-get update` then `apt-get install` of `packages`, non-interactively.
fn apt_install(packages: &[&str]) -> Result<()> {
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Builds the agent in release mode: the benchmark measures the agent's own times,
/// CPU and memory, which a debug build would inflate.
fn build_agent_release(root: &Path) -> Result<PathBuf> {
    step("building the agent (kpr, release)");
    run(cargo(root).args([
        "build",
        "--release",
        "--locked",
        "--package",
        "proxy-userspace",
        "--bin",
        "kpr",
    ]))?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("release/kpr"))
}

/// Installs what the eBPF build lacks (as root), then builds the object.
fn build_ebpf(root: &Path, install: bool) -> Result<PathBuf> {
    let missing = ebpf_toolchain::missing();
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
        if !install || !is_root() {
            bail!(
                "the eBPF toolchain is incomplete (missing: {}).\n{}",
                names.join(", "),
                ebpf_toolchain::install_hint()
            );
        }
        install_toolchain(&missing)?;
    }
    let bpf_linker = ebpf_toolchain::find_bpf_linker()
        .context("bpf-linker is still missing after installing it")?;
    step("building the eBPF object (proxy-ebpf)");
    run(&mut ebpf_toolchain::build_command(root, &bpf_linker))?;
    let object = ebpf_toolchain::object_path(root);
    eprintln!("eBPF object: {}", object.display());
    Ok(object)
}

fn install_toolchain(missing: &[ebpf_toolchain::Missing]) -> Result<()> {
    use ebpf_toolchain::Missing;
    let needs_apt = missing.iter().any(|m| !matches!(m, Missing::BpfLinker));
    // bpf-linker links against LLVM 22: its build needs the apt packages too.
    let llvm_present = Path::new(ebpf_toolchain::LLVM_PREFIX)
        .join("bin/llvm-config")
        .is_file();
    if needs_apt || !llvm_present {
        step("installing Debian packages of the eBPF toolchain");
        apt_install(ebpf_toolchain::APT_PACKAGES)?;
    }
    if ebpf_toolchain::find_bpf_linker().is_none() {
        step("installing bpf-linker (a few minutes)");
        let path = std::env::var("PATH").unwrap_or_default();
        run(
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    ebpf_toolchain::BPF_LINKER_VERSION,
                ])
                .args(["--locked", "--no-default-features", "--features", "llvm-22"])
                .env(
                    "PATH",
                    format!("{}/bin:{path}", ebpf_toolchain::LLVM_PREFIX),
                )
                .env("LLVM_SYS_221_PREFIX", ebpf_toolchain::LLVM_PREFIX),
        )?;
    }
    let still: Vec<String> = ebpf_toolchain::missing()
        .iter()
        .map(ToString::to_string)
        .collect();
    if !still.is_empty() {
        bail!("still missing after installing: {}", still.join(", "));
    }
    Ok(())
}

/// Builds the agent binary (its build script embeds the eBPF object).
fn build_agent(root: &Path) -> Result<PathBuf> {
    step("building the agent (kpr)");
    run(cargo(root).args([
        "build",
        "--locked",
        "--package",
        "proxy-userspace",
        "--bin",
        "kpr",
    ]))?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("debug/kpr"))
}
