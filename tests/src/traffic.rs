//! Real sockets in lab namespaces: echo servers that say who they are and whom they
//! saw, and clients that ask them.
//!
//! The protocol is one line each way: the client sends any line, the server answers
//! `<server name> <peer address as the server saw it>`. TCP connections may carry many
//! lines (long-lived connections); UDP answers each datagram.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::netns::Netns;

/// An answer from an echo server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The server's name.
    pub server: String,
    /// The client address the server saw.
    pub seen_client: SocketAddr,
}

impl Answer {
    /// Parses a server's answer line (`name peer`).
    ///
    /// # Errors
    /// When the line is not an answer.
    pub fn parse(line: &str) -> Result<Self> {
        let (server, seen) = line
            .trim()
            .split_once(' ')
            .with_context(|| format!("malformed answer {line:?}"))?;
        Ok(Self {
            server: server.to_owned(),
            seen_client: seen
                .parse()
                .with_context(|| format!("malformed answer {line:?}"))?,
        })
    }
}

/// TCP and UDP echo servers on one address, stopped on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

const POLL: Duration = Duration::from_millis(5);

impl EchoServer {
    /// Starts TCP and UDP servers named `name` on `addr` (either family) inside
    /// `netns`.
    ///
    /// # Errors
    /// When binding fails.
    pub fn start(netns: &Netns, name: &str, addr: impl Into<SocketAddr>) -> Result<Self> {
        let addr: SocketAddr = addr.into();
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp, udp) = netns.run(|| {
            let tcp = TcpListener::bind(addr).with_context(|| format!("binding tcp {addr}"))?;
            tcp.set_nonblocking(true)?;
            let udp = UdpSocket::bind(addr).with_context(|| format!("binding udp {addr}"))?;
            udp.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok((tcp, udp))
        })?;
        let tcp_thread = {
            let stop = Arc::clone(&stop);
            let name = name.to_owned();
            std::thread::spawn(move || serve_tcp(&tcp, &name, &stop))
        };
        let udp_thread = {
            let stop = Arc::clone(&stop);
            let name = name.to_owned();
            std::thread::spawn(move || serve_udp(&udp, &name, &stop))
        };
        Ok(Self {
            stop,
            threads: vec![tcp_thread, udp_thread],
        })
    }
}

fn serve_tcp(listener: &TcpListener, name: &str, stop: &Arc<AtomicBool>) -> Result<()> {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let name = name.to_owned();
                let stop = Arc::clone(stop);
                std::thread::spawn(move || serve_connection(stream, peer, &name, &stop));
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL)
            }
            Err(error) => return Err(error).context("accept"),
        }
    }
    Ok(())
}

fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    name: &str,
    stop: &AtomicBool,
) -> Result<()> {
    stream.set_nonblocking(false)?;
    // Wakes up now and then to notice the stop flag on idle long-lived connections.
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {
                writer.write_all(format!("{name} {peer}\n").as_bytes())?;
                line.clear();
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

fn serve_udp(socket: &UdpSocket, name: &str, stop: &AtomicBool) -> Result<()> {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let _ = socket.send_to(format!("{name} {peer}\n").as_bytes(), peer);
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(error) => return Err(error).context("recv_from"),
        }
    }
    Ok(())
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The kind of the first I/O error in `error`'s chain (`Other` when there is none): how
/// a connection failed, for tests that expect a particular refusal.
#[must_use]
pub fn io_error_kind(error: &anyhow::Error) -> std::io::ErrorKind {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<std::io::Error>())
        .map_or(std::io::ErrorKind::Other, std::io::Error::kind)
}

/// One TCP request on a new connection. Must be called on a thread inside the client's
/// namespace (see [`Netns::run`]).
///
/// A connection that completes proves the reply translation: a SYN-ACK coming back
/// from any address other than the one connected to would not match the socket.
///
/// # Errors
/// When the connection is refused, times out, or the answer is malformed.
pub fn tcp_request(dst: impl Into<SocketAddr>, timeout: Duration) -> Result<Answer> {
    let dst: SocketAddr = dst.into();
    let mut stream = TcpStream::connect_timeout(&dst, timeout)
        .with_context(|| format!("connecting to {dst}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("reading the answer")?;
    Answer::parse(&line)
}

/// One UDP request from a fresh socket. Returns the answer and the address the answer
/// came from (what a client sees as its peer). Call inside the client's namespace.
///
/// # Errors
/// When no answer arrives in time.
pub fn udp_request(dst: impl Into<SocketAddr>, timeout: Duration) -> Result<(Answer, SocketAddr)> {
    let dst: SocketAddr = dst.into();
    // A socket of the destination's family.
    let socket = if dst.is_ipv4() {
        UdpSocket::bind("0.0.0.0:0")?
    } else {
        UdpSocket::bind("[::]:0")?
    };
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"hello\n", dst)?;
    let mut buf = [0u8; 1500];
    let (len, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP answer from {dst}"))?;
    let answer = Answer::parse(&String::from_utf8_lossy(&buf[..len]))?;
    Ok((answer, from))
}

/// A long-lived TCP connection that can be asked again and again.
pub struct Conversation {
    stream: BufReader<TcpStream>,
}

impl Conversation {
    /// Connects (inside the client's namespace).
    ///
    /// # Errors
    /// When the connection fails.
    pub fn open(dst: impl Into<SocketAddr>, timeout: Duration) -> Result<Self> {
        let dst: SocketAddr = dst.into();
        let stream = TcpStream::connect_timeout(&dst, timeout)
            .with_context(|| format!("connecting to {dst}"))?;
        stream.set_read_timeout(Some(timeout))?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    /// Wraps a connected stream (one with a read timeout set).
    #[must_use]
    pub fn from_stream(stream: TcpStream) -> Self {
        Self {
            stream: BufReader::new(stream),
        }
    }

    /// The connection's own address (the client's end).
    ///
    /// # Errors
    /// When the socket is gone.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.get_ref().local_addr()?)
    }

    /// Sends a line and reads the answer.
    ///
    /// # Errors
    /// When the connection broke.
    pub fn ask(&mut self) -> Result<Answer> {
        self.stream.get_mut().write_all(b"again\n")?;
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            bail!("the server closed the connection");
        }
        Answer::parse(&line)
    }
}
