//! Host-network clients in the lab: a cgroup v2 directory of the test's own, and client
//! processes (`kpr-host-client`) running in the lab's node namespace, inside that
//! cgroup or outside it.
//!
//! The socket-layer hooks apply to processes by cgroup, not by thread, so a client
//! must be a process of its own: the test process itself never joins the cgroup.
//! Everything here touches only the cgroup it created, named with the lab's prefix
//! under the machine's cgroup2 mount, and removes it on drop (after killing any of its
//! own clients still inside), also when the test fails.
use std::{
    fs::File,
    io::Read as _,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::netns;

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mountinfo` (unified
/// machines have it at /sys/fs/cgroup, hybrid ones at /sys/fs/cgroup/unified).
///
/// # Errors
/// When no cgroup2 file system is mounted.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            // `<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> ...`
            let (fields, rest) = line.split_once(" - ")?;
            let fstype = rest.split(' ').next()?;
            let mount_point = fields.split(' ').nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .context("no cgroup2 file system is mounted (see /proc/self/mountinfo)")
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok());
        if let Some(byte) = octal {
            out.push(byte);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup v2 directory made by one lab, removed on drop.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 mount>/<prefix>-hosts`, after removing (empty) cgroups that
    /// crashed lab runs left.
    ///
    /// # Errors
    /// When there is no cgroup2 mount or the directory cannot be made.
    pub fn create(prefix: &str) -> Result<Self> {
        crate::require_root();
        let mount = cgroup2_mount()?;
        sweep_stale(&mount);
        let path = mount.join(format!("{prefix}-hosts"));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pids in the cgroup.
    ///
    /// # Errors
    /// When `cgroup.procs` cannot be read.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let text = std::fs::read_to_string(self.path.join("cgroup.procs"))?;
        Ok(text.lines().filter_map(|line| line.parse().ok()).collect())
    }
}

/// Removes cgroups named by lab runs whose process is gone. rmdir only succeeds on an
/// empty cgroup, so nothing alive is ever disturbed.
pub(crate) fn sweep_stale(mount: &Path) {
    let Ok(entries) = std::fs::read_dir(mount) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if netns::is_stale_name(&name) {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Only clients this test started can be in here; a failed test may leave one.
        if let Ok(pids) = self.pids() {
            for pid in pids {
                // SAFETY: signalling a process of our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
                // EBUSY until the last process has exited.
                Err(error) if Instant::now() > deadline => {
                    eprintln!("lab: cannot remove cgroup {}: {error}", self.path.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// What a client saw for one request (one JSON line of `kpr-host-client`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The backend that answered.
    pub server: Option<String>,
    /// The client address the backend saw.
    pub seen_client: Option<String>,
    /// The socket's peer by `getpeername()` (TCP, connected UDP).
    pub peer: Option<String>,
    /// The source of the answer by `recvfrom()` (UDP).
    pub source: Option<String>,
    /// The errno of a failed request.
    pub errno: Option<i32>,
    /// The error of a failed request, as text.
    pub error: Option<String>,
}

/// How a client talks to its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// connect(), one line each way, getpeername().
    Tcp,
    /// connect() on UDP, getpeername(), send(), recvfrom().
    UdpConnected,
    /// sendto() and recvfrom() on an unconnected UDP socket.
    UdpUnconnected,
    /// connect() that waits up to 30 s (a handshake that gets no answer stays in
    /// SYN-SENT), then one line each way.
    TcpWait,
    /// One TCP connection kept open, one request per line on stdin ([`Session`]); a
    /// failed request closes it and the next one connects again.
    TcpSession,
    /// One connected UDP socket kept open, one request per line on stdin; a failed
    /// request (say `ECONNABORTED` after the socket was destroyed) closes it and the next
    /// one connects again, as a DNS client does.
    UdpSession,
}

impl Mode {
    #[must_use]
    pub fn arg(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::UdpConnected => "udp-connected",
            Self::UdpUnconnected => "udp-unconnected",
            Self::TcpWait => "tcp-wait",
            Self::TcpSession => "tcp-session",
            Self::UdpSession => "udp-session",
        }
    }

    pub const ALL: [Self; 6] = [
        Self::Tcp,
        Self::UdpConnected,
        Self::UdpUnconnected,
        Self::TcpWait,
        Self::TcpSession,
        Self::UdpSession,
    ];

    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|mode| mode.arg() == text)
    }
}

/// Runs `client` (the `kpr-host-client` binary) in the network namespace `netns` and,
/// with `cgroup`, inside that cgroup: `count` requests to `dst`, each on a fresh socket.
///
/// # Errors
/// When it cannot start, fails or prints something other than outcomes.
pub fn run_client(
    client: &Path,
    netns: &Path,
    cgroup: Option<&TestCgroup>,
    mode: Mode,
    dst: impl Into<std::net::SocketAddr>,
    count: usize,
) -> Result<Vec<Outcome>> {
    let dst = dst.into();
    let mut child = spawn_client(client, netns, cgroup, mode, dst, count, Stdio::null())?;
    // Every request has its own 2 s timeouts (30 s for tcp-wait); this only bounds a
    // hung client.
    let deadline = Instant::now()
        + Duration::from_secs(40)
        + Duration::from_secs(5) * u32::try_from(count).unwrap_or(u32::MAX);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} {mode:?} {dst} hung", client.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout)?;
    }
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr)?;
    }
    if !status.success() {
        bail!(
            "{} {mode:?} {dst} failed ({status}): {stderr}",
            client.display()
        );
    }
    stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line).with_context(|| format!("malformed outcome {line:?}"))
        })
        .collect()
}

/// A client process with a long-lived socket ([`Mode::TcpSession`],
/// [`Mode::UdpSession`]): one request per [`Session::ask`]. Killed on drop.
pub struct Session {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Session {
    /// Starts a session client like [`run_client`] starts a client.
    ///
    /// # Errors
    /// When it cannot start.
    pub fn start(
        client: &Path,
        netns: &Path,
        cgroup: Option<&TestCgroup>,
        mode: Mode,
        dst: impl Into<std::net::SocketAddr>,
    ) -> Result<Self> {
        let dst = dst.into();
        let mut child = spawn_client(client, netns, cgroup, mode, dst, 0, Stdio::piped())?;
        let stdin = child.stdin.take().context("client stdin")?;
        let stdout = child.stdout.take().context("client stdout")?;
        Ok(Self {
            child,
            stdin,
            stdout: std::io::BufReader::new(stdout),
        })
    }

    /// One request on the session's socket (each bounded by the client's 2 s
    /// timeouts).
    ///
    /// # Errors
    /// When the client has died or prints something other than an outcome.
    pub fn ask(&mut self) -> Result<Outcome> {
        use std::io::{BufRead as _, Write as _};
        self.stdin.write_all(b"ask\n")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the session client exited");
        }
        serde_json::from_str(&line).with_context(|| format!("malformed outcome {line:?}"))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `client` in `netns` (and `cgroup`) with `stdin`.
fn spawn_client(
    client: &Path,
    netns: &Path,
    cgroup: Option<&TestCgroup>,
    mode: Mode,
    dst: std::net::SocketAddr,
    count: usize,
    stdin: Stdio,
) -> Result<std::process::Child> {
    let netns_file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let procs = cgroup
        .map(|cgroup| {
            let path = cgroup.path().join("cgroup.procs");
            File::options()
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))
        })
        .transpose()?;
    let mut command = Command::new(client);
    command
        .args([mode.arg(), &dst.to_string(), &count.to_string()])
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let netns_fd = netns_file.as_raw_fd();
    let procs_fd = procs.as_ref().map(AsRawFd::as_raw_fd);
    // SAFETY: only async-signal-safe calls (setns, write, prctl) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself; sockets it creates from now on
            // belong to the cgroup.
            if let Some(fd) = procs_fd {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .spawn()
        .with_context(|| format!("starting {}", client.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_fields_are_unescaped() {
        assert_eq!(unescape_mountinfo("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mountinfo("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(unescape_mountinfo("/odd\\"), "/odd\\");
    }

    #[test]
    fn modes_round_trip() {
        for mode in Mode::ALL {
            assert_eq!(Mode::parse(mode.arg()), Some(mode));
        }
        assert_eq!(Mode::parse("sctp"), None);
    }
}
