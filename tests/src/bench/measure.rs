//! What the benchmark reads from the kernel and from processes: CPU time (machine-wide
//! from `/proc/stat`, per process from `/proc/<pid>/stat`, of waited-for children from
//! `getrusage`), peak memory (`VmHWM`), timed commands inside a namespace, the
//! agent's "synced" log lines, and percentiles.
use std::{
    fs::File,
    io::Write as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::netns::Netns;

/// Clock ticks per second of `/proc` CPU times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        #[expect(clippy::cast_precision_loss, reason = "a small positive number")]
        let ticks = ticks as f64;
        ticks
    } else {
        100.0
    }
}

#[expect(clippy::cast_precision_loss, reason = "tick counts are far below 2^52")]
fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / ticks_per_second())
}

/// Machine-wide CPU time, summed over CPUs (the `cpu` line of `/proc/stat`).
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineCpu {
    /// Everything but idle and iowait: user, nice, system, irq, softirq, steal.
    pub busy: Duration,
    /// Time in softirq context (where TC programs and netfilter hooks of received
    /// packets mostly run).
    pub softirq: Duration,
}

impl MachineCpu {
    /// Reads `/proc/stat`.
    ///
    /// # Errors
    /// When it cannot be read or parsed.
    pub fn read() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat
            .lines()
            .find(|line| line.starts_with("cpu "))
            .context("/proc/stat has no cpu line")?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|field| field.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let get = |index: usize| fields.get(index).copied().unwrap_or(0);
        let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
        Ok(Self {
            busy: ticks_to_duration(busy),
            softirq: ticks_to_duration(get(6)),
        })
    }

    /// The time spent since `earlier`.
    #[must_use]
    pub fn since(self, earlier: Self) -> Self {
        Self {
            busy: self.busy.saturating_sub(earlier.busy),
            softirq: self.softirq.saturating_sub(earlier.softirq),
        }
    }
}

/// User plus system time of process `pid` so far.
///
/// # Errors
/// When the process is gone.
pub fn process_cpu(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces; fields resume after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ... utime(11) stime(12).
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(ticks_to_duration(utime + stime))
}

/// Peak resident memory (`VmHWM`) of process `pid`, in bytes.
///
/// # Errors
/// When the process is gone.
pub fn peak_memory(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM")?
        .parse()?;
    Ok(kib * 1024)
}

/// The process whose command line holds `argument` exactly (the lab's agent, found by
/// its private pin directory).
#[must_use]
pub fn find_process_with_argument(argument: &Path) -> Option<u32> {
    let wanted = argument.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.split(|&byte| byte == 0).any(|arg| arg == wanted))
        })
}

/// CPU time of every waited-for child so far (`RUSAGE_CHILDREN`, user + system).
fn children_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &raw mut usage);
        usage
    };
    let micros = |time: libc::timeval| {
        Duration::from_secs(u64::try_from(time.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(time.tv_usec).unwrap_or(0))
    };
    micros(usage.ru_utime) + micros(usage.ru_stime)
}

/// A command's wall-clock and CPU time (CPU: the child's user + system time, which
/// includes the kernel work of its netlink or setsockopt commits).
#[derive(Clone, Copy, Debug, Default)]
pub struct Timed {
    pub wall: Duration,
    pub cpu: Duration,
}

impl std::ops::Add for Timed {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self {
            wall: self.wall + other.wall,
            cpu: self.cpu + other.cpu,
        }
    }
}

/// A step that did not finish by its deadline: [`run_timed_within`] killed its
/// command, or the agent was not healthy in time.
#[derive(Debug, thiserror::Error)]
#[error("{what} did not finish within {limit:?}")]
pub struct OverLimit {
    pub what: String,
    pub limit: Duration,
}

/// Runs `program args` inside `netns` (setns before exec, so no `ip netns exec` in
/// the timing) with `input` on stdin, and times it. With `must_succeed` false a
/// non-zero exit is tolerated (kube-proxy's listings of a table that does not exist
/// yet fail that way).
///
/// # Errors
/// When it cannot start, or fails while `must_succeed`.
pub fn run_timed(
    netns: &Netns,
    program: &str,
    args: &[&str],
    input: Option<&str>,
    must_succeed: bool,
) -> Result<Timed> {
    run_timed_until(netns, program, args, input, must_succeed, None)
}

/// [`run_timed`], killing the command at `deadline` (`limit` is what the deadline
/// stands for, for the error).
///
/// # Errors
/// As [`run_timed`], and [`OverLimit`] when the command was still running at the
/// deadline (also when that had passed before it started).
pub fn run_timed_within(
    netns: &Netns,
    program: &str,
    args: &[&str],
    input: Option<&str>,
    must_succeed: bool,
    deadline: Instant,
    limit: Duration,
) -> Result<Timed> {
    run_timed_until(
        netns,
        program,
        args,
        input,
        must_succeed,
        Some((deadline, limit)),
    )
}

fn run_timed_until(
    netns: &Netns,
    program: &str,
    args: &[&str],
    input: Option<&str>,
    must_succeed: bool,
    deadline: Option<(Instant, Duration)>,
) -> Result<Timed> {
    let over_limit = |limit: Duration| OverLimit {
        what: format!("{program} {}", args.join(" ")),
        limit,
    };
    if let Some((deadline, limit)) = deadline {
        if Instant::now() >= deadline {
            return Err(over_limit(limit).into());
        }
    }
    let namespace =
        File::open(netns.path()).with_context(|| format!("opening {}", netns.path().display()))?;
    let namespace_fd = namespace.as_raw_fd();
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only setns, which is async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(namespace_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let cpu_before = children_cpu();
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let writer = match (input, child.stdin.take()) {
        (Some(text), Some(mut stdin)) => {
            let text = text.to_owned();
            Some(std::thread::spawn(move || stdin.write_all(text.as_bytes())))
        }
        _ => None,
    };
    // The watchdog kills the child at the deadline unless told it was reaped first.
    // The child is not reaped before the watchdog has answered, so its pid cannot
    // have been reused when it is signalled.
    let watchdog = deadline.map(|(deadline, _)| {
        let pid = libc::pid_t::try_from(child.id()).unwrap_or(0);
        let (reaped_tx, reaped_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let wait = deadline.saturating_duration_since(Instant::now());
            let killed = matches!(
                reaped_rx.recv_timeout(wait),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if killed && pid > 0 {
                // SAFETY: signalling our own child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            killed
        });
        (reaped_tx, thread)
    });
    let (output, killed) = match watchdog {
        None => (child.wait_with_output()?, false),
        Some((reaped_tx, thread)) => {
            // Read the output without reaping: wait for the pipes to close, then ask
            // the watchdog, then reap.
            let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
            let (stdout, stderr) = std::thread::scope(|scope| {
                let out = scope.spawn(|| read_to_end(stdout.as_mut()));
                let err = read_to_end(stderr.as_mut());
                (out.join().unwrap_or_default(), err)
            });
            // The pipes close when the child exits or is killed: stop the watchdog.
            let _ = reaped_tx.send(());
            let killed = thread
                .join()
                .map_err(|_| anyhow::anyhow!("the watchdog panicked"))?;
            let status = child.wait()?;
            (
                std::process::Output {
                    status,
                    stdout,
                    stderr,
                },
                killed,
            )
        }
    };
    let wall = started.elapsed();
    let cpu = children_cpu().saturating_sub(cpu_before);
    if let Some(writer) = writer {
        let written = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the stdin writer panicked"))?;
        if must_succeed && !killed {
            written.with_context(|| format!("writing {program}'s input"))?;
        }
    }
    if let (true, Some((_, limit))) = (killed, deadline) {
        return Err(over_limit(limit).into());
    }
    if must_succeed && !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(Timed { wall, cpu })
}

/// Everything `pipe` yields until it closes (what could be read when it fails).
fn read_to_end(pipe: Option<&mut impl std::io::Read>) -> Vec<u8> {
    let mut buffer = Vec::new();
    if let Some(pipe) = pipe {
        let _ = pipe.read_to_end(&mut buffer);
    }
    buffer
}

/// Removes ANSI escape sequences (the agent's log may be colored).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `elapsed_ms` of every "synced" line of the agent's log, in order: how long each
/// sync pass (model, map writes, flow cleanup) took, as the agent measured it.
#[must_use]
pub fn synced_passes(log: &str) -> Vec<f64> {
    strip_ansi(log)
        .lines()
        .filter(|line| line.split_whitespace().any(|word| word == "synced"))
        .filter_map(|line| {
            let (_, rest) = line.split_once("elapsed_ms=")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// The `fraction` percentile (0..=1) of sorted `values`, nearest rank.
#[must_use]
pub fn percentile(sorted: &[u64], fraction: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index within the slice"
    )]
    let rank = ((fraction * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The median of `values` (NaN-free), or None when empty.
#[must_use]
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_synced_lines_colored_or_not() {
        let log = "2026-01-01T00:00:00Z  INFO kpr::agent: attached\n\
                   2026-01-01T00:00:00Z  INFO kpr::agent: synced services=3 frontends=3 elapsed_ms=1.25\n\
                   \x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m \x1b[2mkpr::agent\x1b[0m\x1b[2m:\x1b[0m synced \x1b[3mservices\x1b[0m\x1b[2m=\x1b[0m3 \x1b[3melapsed_ms\x1b[0m\x1b[2m=\x1b[0m0.5\n";
        assert_eq!(synced_passes(log), vec![1.25, 0.5]);
    }

    #[test]
    fn percentiles_and_medians() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.5), 50);
        assert_eq!(percentile(&values, 0.99), 99);
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(peak_memory(pid).expect("VmHWM") > 0);
        process_cpu(pid).expect("cpu");
        MachineCpu::read().expect("/proc/stat");
    }
}
