//! A host-network client for the lab (see `kpr_lab::host`): the test starts it in the
//! node's network namespace, inside or outside the cgroup the socket-layer hooks are on,
//! because cgroup membership belongs to a process, not to a thread of the test.
//!
//! `kpr-host-client tcp|udp-connected|udp-unconnected ADDR COUNT` makes COUNT requests
//! to ADDR, each on a fresh socket, and prints one JSON [`Outcome`] per request: who
//! answered and which addresses the socket calls reported, or the errno of the failure.
//! `tcp-session|udp-session ADDR 0` keeps one socket and makes one request per line
//! read from stdin, connecting again after a failure. ADDR is `IP:PORT` or
//! `[IPv6]:PORT`; an IPv6 one (`[::ffff:10.96.0.10]:80` included) is used from an
//! AF_INET6 socket.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

use kpr_lab::{
    host::{Mode, Outcome},
    traffic::Answer,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn failed(error: &std::io::Error) -> Outcome {
    Outcome {
        errno: error.raw_os_error(),
        error: Some(error.to_string()),
        ..Outcome::default()
    }
}

fn answered(text: &str, outcome: Outcome) -> Outcome {
    match Answer::parse(text) {
        Ok(answer) => Outcome {
            server: Some(answer.server),
            seen_client: Some(answer.seen_client.to_string()),
            ..outcome
        },
        Err(error) => Outcome {
            error: Some(format!("{error:#}")),
            ..outcome
        },
    }
}

fn tcp(dst: SocketAddr, connect_timeout: Duration) -> std::io::Result<Outcome> {
    let stream = TcpStream::connect_timeout(&dst, connect_timeout)?;
    let peer = stream.peer_addr()?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    (&stream).write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok(answered(
        &line,
        Outcome {
            peer: Some(peer.to_string()),
            ..Outcome::default()
        },
    ))
}

/// The unspecified address of `dst`'s family: an IPv6 destination (an IPv4-mapped one
/// included) gets an AF_INET6 socket, as a dual-stack client opens.
fn wildcard(dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => "0.0.0.0:0",
        SocketAddr::V6(_) => "[::]:0",
    }
    .parse()
    .unwrap_or(dst)
}

fn udp(dst: SocketAddr, connected: bool) -> std::io::Result<Outcome> {
    let socket = UdpSocket::bind(wildcard(dst))?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    let peer = if connected {
        socket.connect(dst)?;
        socket.send(b"hello\n")?;
        Some(socket.peer_addr()?)
    } else {
        socket.send_to(b"hello\n", dst)?;
        None
    };
    let mut buf = [0u8; 1500];
    let (len, source): (usize, SocketAddr) = socket.recv_from(&mut buf)?;
    let text = String::from_utf8_lossy(buf.get(..len).unwrap_or_default()).into_owned();
    Ok(answered(
        &text,
        Outcome {
            peer: peer.map(|peer| peer.to_string()),
            source: Some(source.to_string()),
            ..Outcome::default()
        },
    ))
}

/// A long-lived socket: a TCP connection or a connected UDP socket.
enum Held {
    Tcp(BufReader<TcpStream>),
    Udp(UdpSocket),
}

fn open(dst: SocketAddr, tcp: bool) -> std::io::Result<Held> {
    if tcp {
        let stream = TcpStream::connect_timeout(&dst, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        Ok(Held::Tcp(BufReader::new(stream)))
    } else {
        let socket = UdpSocket::bind(wildcard(dst))?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        socket.connect(dst)?;
        Ok(Held::Udp(socket))
    }
}

/// One request on the held socket.
fn ask(held: &mut Held) -> std::io::Result<Outcome> {
    match held {
        Held::Tcp(reader) => {
            let peer = reader.get_ref().peer_addr()?;
            reader.get_mut().write_all(b"hello\n")?;
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(answered(
                &line,
                Outcome {
                    peer: Some(peer.to_string()),
                    ..Outcome::default()
                },
            ))
        }
        Held::Udp(socket) => {
            socket.send(b"hello\n")?;
            let peer = socket.peer_addr()?;
            let mut buf = [0u8; 1500];
            let (len, source) = socket.recv_from(&mut buf)?;
            let text = String::from_utf8_lossy(buf.get(..len).unwrap_or_default()).into_owned();
            Ok(answered(
                &text,
                Outcome {
                    peer: Some(peer.to_string()),
                    source: Some(source.to_string()),
                    ..Outcome::default()
                },
            ))
        }
    }
}

/// The session modes: one request per stdin line on a socket kept between requests.
fn session(dst: SocketAddr, tcp: bool, out: &mut impl std::io::Write) -> ExitCode {
    let mut held: Option<Held> = None;
    for line in std::io::stdin().lines() {
        if line.is_err() {
            break;
        }
        let result = match held.take() {
            Some(socket) => Ok(socket),
            None => open(dst, tcp),
        }
        .and_then(|mut socket| {
            let outcome = ask(&mut socket)?;
            held = Some(socket);
            Ok(outcome)
        });
        // A failure leaves `held` empty: the next request connects again.
        let outcome = result.unwrap_or_else(|error| failed(&error));
        if print(out, &outcome).is_err() {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn print(out: &mut impl std::io::Write, outcome: &Outcome) -> Result<(), ()> {
    let line = serde_json::to_string(outcome).map_err(|error| {
        eprintln!("cannot encode {outcome:?}: {error}");
    })?;
    writeln!(out, "{line}").map_err(drop)?;
    out.flush().map_err(drop)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [mode, dst, count] => Mode::parse(mode)
            .zip(dst.parse().ok())
            .zip(count.parse().ok()),
        _ => None,
    };
    let Some(((mode, dst), count)) = parsed else {
        eprintln!(
            "usage: kpr-host-client tcp|udp-connected|udp-unconnected|tcp-session|udp-session \
             ADDR:PORT COUNT"
        );
        return ExitCode::from(2);
    };
    let mut stdout = std::io::stdout().lock();
    for _ in 0..count {
        let result = match mode {
            Mode::Tcp => tcp(dst, TIMEOUT),
            Mode::TcpWait => tcp(dst, Duration::from_secs(30)),
            Mode::UdpConnected => udp(dst, true),
            Mode::UdpUnconnected => udp(dst, false),
            Mode::TcpSession | Mode::UdpSession => break,
        };
        let outcome = result.unwrap_or_else(|error| failed(&error));
        if print(&mut stdout, &outcome).is_err() {
            return ExitCode::FAILURE;
        }
    }
    match mode {
        Mode::TcpSession => session(dst, true, &mut stdout),
        Mode::UdpSession => session(dst, false, &mut stdout),
        _ => ExitCode::SUCCESS,
    }
}
