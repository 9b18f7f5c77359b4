//! The benchmark's traffic: a server in each backend pod, and clients in the client
//! pod that open a new TCP connection per request (connect, 64-byte request, 64-byte
//! response, close: netperf's TCP_CRR) or stream over one long-lived connection.
//!
//! The servers are not the lab's echo servers, which start a thread per connection
//! and poll: here a fixed pool of threads accepts and answers, so the servers cost
//! the same in every mode and stay out of the way.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Barrier,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::netns::Netns;

/// Bytes of a request and of a response.
pub const MESSAGE_LEN: usize = 64;
/// The first request byte that asks for a stream (the server then only reads).
const STREAM: u8 = b'S';
const REQUEST: u8 = b'R';
/// How long a client waits to connect or for an answer before counting an error.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often idle server threads look at their stop flag.
const ACCEPT_WAKEUP: Duration = Duration::from_millis(100);

/// Sets `SO_RCVTIMEO` on a listening socket, which bounds `accept` too.
fn set_accept_timeout(listener: &TcpListener, timeout: Duration) -> Result<()> {
    let value = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(1),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: setsockopt reads a timeval of the size given from a valid pointer.
    let result = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const value).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(16),
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO");
    }
    Ok(())
}

/// A pool of threads answering on one address; stopped on drop.
pub struct BenchServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BenchServer {
    /// Binds `addr` inside `netns` and starts `workers` threads.
    ///
    /// # Errors
    /// When binding fails.
    pub fn start(netns: &Netns, addr: SocketAddrV4, workers: usize) -> Result<Self> {
        let listener = netns.run(|| {
            let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            set_accept_timeout(&listener, ACCEPT_WAKEUP)?;
            Ok(listener)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(workers);
        for _ in 0..workers.max(1) {
            let listener = listener.try_clone()?;
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || serve(&listener, &stop)));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = answer(stream, stop);
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// One connection: a request gets a response, a stream is read to its end; either
/// way the server closes after the client did.
fn answer(mut stream: TcpStream, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut request = [0u8; MESSAGE_LEN];
    stream.read_exact(&mut request)?;
    if request[0] != STREAM {
        stream.write_all(&[b'A'; MESSAGE_LEN])?;
    }
    let mut sink = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
            Err(error) => return Err(error),
        }
    }
}

/// What the connection clients measured.
#[derive(Clone, Debug, Default)]
pub struct CrrResult {
    /// Completed request/response connections.
    pub connections: u64,
    /// Connections that failed (refused, timed out, short answer).
    pub errors: u64,
    /// Per completed connection: connect + request + response, in nanoseconds, sorted.
    pub latencies_ns: Vec<u64>,
    /// From the common start to the last client's end.
    pub elapsed: Duration,
}

impl CrrResult {
    /// Completed connections per second.
    #[must_use]
    pub fn rate(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let connections = self.connections as f64;
        connections / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A small, fast, deterministic generator for picking targets.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One new connection per request, for `duration`, from `clients` threads inside
/// `netns`, each request to a target picked uniformly from `targets`.
///
/// # Errors
/// When a thread cannot enter the namespace.
pub fn connect_request_close(
    netns: &Netns,
    targets: &Arc<Vec<SocketAddrV4>>,
    clients: usize,
    duration: Duration,
) -> Result<CrrResult> {
    if targets.is_empty() {
        bail!("no targets");
    }
    let clients = clients.max(1);
    let barrier = Arc::new(Barrier::new(clients + 1));
    let mut threads = Vec::with_capacity(clients);
    for client in 0..clients {
        let targets = Arc::clone(targets);
        let barrier = Arc::clone(&barrier);
        threads.push(netns.spawn(move || {
            barrier.wait();
            client_loop(
                &targets,
                duration,
                0x9e37_79b9_7f4a_7c15 ^ (client as u64 + 1),
            )
        })?);
    }
    barrier.wait();
    let started = Instant::now();
    let mut total = CrrResult::default();
    for thread in threads {
        let result = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        total.connections += result.connections;
        total.errors += result.errors;
        total.latencies_ns.extend(result.latencies_ns);
    }
    total.elapsed = started.elapsed();
    total.latencies_ns.sort_unstable();
    Ok(total)
}

fn client_loop(targets: &[SocketAddrV4], duration: Duration, seed: u64) -> CrrResult {
    let mut random = XorShift(seed);
    let mut result = CrrResult::default();
    let request = {
        let mut request = [b'x'; MESSAGE_LEN];
        request[0] = REQUEST;
        request
    };
    let started = Instant::now();
    while started.elapsed() < duration {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "an index modulo the length"
        )]
        let target = targets[(random.next() % targets.len() as u64) as usize];
        let begun = Instant::now();
        match one_request(target, &request) {
            Ok(()) => {
                let took = u64::try_from(begun.elapsed().as_nanos()).unwrap_or(u64::MAX);
                result.latencies_ns.push(took);
                result.connections += 1;
            }
            Err(_) => {
                result.errors += 1;
                // A broken dataplane must not turn into a busy loop.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    result
}

fn one_request(target: SocketAddrV4, request: &[u8; MESSAGE_LEN]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target.into(), CLIENT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.write_all(request)?;
    let mut response = [0u8; MESSAGE_LEN];
    stream.read_exact(&mut response)?;
    Ok(())
}

/// Streams to `target` over one connection for `duration` (call inside the client's
/// namespace). Returns bytes per second as the server received them: the time runs
/// until the server has read everything and closed.
///
/// # Errors
/// When the connection fails.
pub fn stream_throughput(target: SocketAddrV4, duration: Duration) -> Result<f64> {
    let mut stream = TcpStream::connect_timeout(&target.into(), CLIENT_TIMEOUT)
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut header = [b'x'; MESSAGE_LEN];
    header[0] = STREAM;
    let chunk = vec![b's'; 128 * 1024];
    let started = Instant::now();
    stream.write_all(&header)?;
    let mut sent: u64 = 0;
    while started.elapsed() < duration {
        stream.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    // The server closes once it has read the end of the stream.
    let mut rest = [0u8; 64];
    while stream
        .read(&mut rest)
        .context("waiting for the server to finish")?
        > 0
    {}
    #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
    let rate = sent as f64 / started.elapsed().as_secs_f64();
    Ok(rate)
}

/// A few requests to each target in turn, which must all succeed: the mode works.
///
/// # Errors
/// With the first failure.
pub fn check_targets(targets: &[SocketAddrV4], count: usize) -> Result<()> {
    let request = {
        let mut request = [b'x'; MESSAGE_LEN];
        request[0] = REQUEST;
        request
    };
    for (index, target) in targets.iter().cycle().take(count).enumerate() {
        one_request(*target, &request)
            .with_context(|| format!("check request {index} to {target}"))?;
    }
    Ok(())
}
