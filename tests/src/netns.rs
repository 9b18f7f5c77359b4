//! Network namespaces owned by one lab run.
//!
//! Every name a run creates starts with its prefix, `kpr<pid>x<n>`: unique per process
//! and per lab, and telling which process made it, so a later run can remove what a
//! crashed one left behind (its pid is gone) without touching a live run's.
use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Where lab runs keep their files (manifests, bpffs mount, logs).
pub const RUN_ROOT: &str = "/run/kpr-lab";

/// A fresh prefix for one lab: `kpr<pid>x<n>`.
#[must_use]
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "kpr{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid encoded in a name made by [`unique_prefix`], if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("kpr")?;
    let (pid, _) = rest.split_once('x')?;
    pid.parse().ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `name` was made by a lab run whose process is gone.
#[must_use]
pub fn is_stale_name(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !alive(pid))
}

/// Removes namespaces and run directories left by lab runs whose process is gone.
pub fn sweep_stale() {
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale_name(&name) {
                let _ = run_quiet(Command::new("ip").args(["netns", "del", &name]));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(RUN_ROOT) {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale_name(&name) {
                remove_run_dir(&entry.path());
            }
        }
    }
}

/// Unmounts anything mounted below `dir` (the run's bpffs) and removes it.
pub fn remove_run_dir(dir: &Path) {
    let bpffs = dir.join("bpffs");
    if bpffs.exists() {
        let _ = run_quiet(Command::new("umount").arg("-l").arg(&bpffs));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs a command; an error carries its stderr.
///
/// # Errors
/// When it cannot start or exits non-zero.
pub fn run(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

fn run_quiet(command: &mut Command) -> Result<Output> {
    run(command)
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` with its loopback up.
    ///
    /// # Errors
    /// When `ip netns add` fails (not root, name taken).
    pub fn create(name: &str) -> Result<Self> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    ///
    /// # Errors
    /// When the command fails.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Creates a veth pair: `local` in this namespace, `peer_name` in `peer`.
    ///
    /// # Errors
    /// When `ip link add` fails.
    pub fn add_veth(&self, local: &str, peer: &Netns, peer_name: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            local,
            "type",
            "veth",
            "peer",
            "name",
            peer_name,
            "netns",
            peer.name(),
        ])?;
        Ok(())
    }

    /// Any command inside the namespace (`ip netns exec`).
    ///
    /// # Errors
    /// When the command fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args))
    }

    /// Sets a sysctl of this namespace's network stack.
    ///
    /// # Errors
    /// When the write fails.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `work` on a thread that has entered this namespace; sockets it opens live
    /// there. The calling thread stays where it is.
    ///
    /// # Errors
    /// When the namespace cannot be entered; otherwise whatever `work` returns.
    pub fn run<R: Send>(&self, work: impl FnOnce() -> Result<R> + Send) -> Result<R> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    enter(&file)?;
                    work()
                })
                .join()
                .map_err(|_| anyhow::anyhow!("a thread in {} panicked", self.name))?
        })
    }

    /// Spawns a detached thread inside this namespace.
    ///
    /// # Errors
    /// When the namespace file cannot be opened.
    pub fn spawn<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<R>>> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        Ok(std::thread::spawn(move || {
            enter(&file)?;
            Ok(work())
        }))
    }
}

/// Moves the calling thread into the network namespace `file` refers to.
///
/// # Errors
/// When setns fails.
pub fn enter(file: &File) -> Result<()> {
    // SAFETY: setns on an open namespace file; it changes only this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("lab: cannot delete netns {}: {error:#}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_name_their_process() {
        let prefix = unique_prefix();
        assert_eq!(
            owner_pid(&format!("{prefix}-node")),
            Some(std::process::id())
        );
        assert_ne!(unique_prefix(), prefix);
        assert_eq!(owner_pid("kprfoo-node"), None);
        assert_eq!(owner_pid("cni-1234"), None);
    }
}
