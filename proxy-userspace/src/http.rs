//! The agent's HTTP listeners (`/healthz` on 10256, `/metrics` on 10249, the
//! healthCheckNodePorts), bounded so no client can take the file descriptors the
//! datapath needs ([`Limits::DEFAULT`]): at most 64 connections per listener (one more
//! is accepted and closed at once, which frees its descriptor, where not accepting
//! would leave it queued), 5 s to send a request's headers, and 15 s for a whole
//! connection. Probes and scrapes open a connection, ask, and go: far inside these
//! bounds.
//!
//! kube-proxy (Go's net/http) has no such bounds; Go raises the soft descriptor limit
//! to the hard one at start, which is what keeps it alive against a thousand idle
//! connections. The agent does that too (`main.rs`), and bounds its listeners as well,
//! so even a low hard limit holds.
use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus_client::metrics::counter::Counter;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};
use tracing::{debug, warn};

/// The bounds of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers (also between two
    /// requests of a kept-alive connection).
    pub header_timeout: Duration,
    /// How long one connection may live.
    pub connection_timeout: Duration,
}

impl Limits {
    pub const DEFAULT: Self = Self {
        max_connections: 64,
        header_timeout: Duration::from_secs(5),
        connection_timeout: Duration::from_secs(15),
    };
}
/// How long to pause accepting after the process ran out of descriptors.
const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// Binds `addr` (see [`bind`]) and serves `router` on it within the bounds, until the
/// task is dropped.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind_and_serve(addr: SocketAddr, router: Router, rejected: Counter) -> io::Result<()> {
    let listener = bind(addr).await?;
    serve(
        listener,
        router,
        Limits::DEFAULT,
        rejected,
        std::future::pending(),
    )
    .await;
    Ok(())
}

/// Binds a listener on `addr`. The IPv4 wildcard (`/healthz`'s default,
/// `0.0.0.0:10256`) becomes a dual-stack `[::]` socket (`IPV6_V6ONLY` off) that takes
/// both families: an IPv4 socket would leave the server unreachable on a node with
/// IPv6 addresses only, where the kubelet and load balancers probe over IPv6. That is
/// what kube-proxy's default gives in effect: Go listens on a wildcard address with a
/// dual-stack AF_INET6 socket wherever the kernel has IPv4-mapped addresses. Where
/// IPv6 is unavailable (no AF_INET6 sockets, or `[::]` cannot be bound), the IPv4
/// wildcard itself. Any other address is bound as it is.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let SocketAddr::V4(v4) = addr else {
        return TcpListener::bind(addr).await;
    };
    if !v4.ip().is_unspecified() {
        return TcpListener::bind(addr).await;
    }
    match bind_dual_stack(v4.port()) {
        Ok(listener) => Ok(listener),
        Err(error) => {
            debug!(%addr, %error, "no dual-stack [::] socket; listening on IPv4 only");
            TcpListener::bind(addr).await
        }
    }
}

/// A listener on `[::]:port` that also takes IPv4 (as IPv4-mapped addresses).
fn bind_dual_stack(port: u16) -> io::Result<TcpListener> {
    let addr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // Explicit: `net.ipv6.bindv6only` may make IPv6-only the namespace's default.
    socket.set_only_v6(false)?;
    // As tokio's own bind: a port closed a moment ago can be bound again at once.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves; then
/// closes the listener and every connection. Connections turned away for the bound
/// are counted in `rejected`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    rejected: Counter,
    shutdown: impl Future<Output = ()>,
) {
    let addr = listener.local_addr().ok();
    let service = TowerToHyperService::new(router);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Whether the bound was hit since the last connection was served: logged once.
    let full = AtomicBool::new(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        let exhausted = matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                        debug!(?addr, %error, "accept failed");
                        if exhausted {
                            tokio::time::sleep(EXHAUSTED_PAUSE).await;
                        }
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    rejected.inc();
                    if !full.swap(true, Ordering::Relaxed) {
                        warn!(?addr, limit = limits.max_connections, "too many connections; closing new ones until some end");
                    }
                    drop(stream);
                    continue;
                };
                full.store(false, Ordering::Relaxed);
                let service = service.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    // A client that connects and sends nothing (hyper's header timer
                    // may wait for its first byte) is closed like a slow one.
                    if !matches!(tokio::time::timeout(limits.header_timeout, stream.readable()).await, Ok(Ok(()))) {
                        debug!("connection idle from the start; closed");
                        return;
                    }
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(limits.header_timeout)
                        .serve_connection(TokioIo::new(stream), service);
                    match tokio::time::timeout(limits.connection_timeout, connection).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => debug!(%error, "connection ended with an error"),
                        Err(_) => debug!("connection open too long; closed"),
                    }
                });
            }
        }
    }
    drop(listener);
    connections.abort_all();
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{Ipv4Addr, TcpStream},
    };

    use axum::routing::get;

    use super::*;

    /// One request on a fresh connection: the status line, or the error.
    fn get_status(addr: SocketAddr) -> io::Result<String> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.lines().next().unwrap_or_default().to_owned())
    }

    /// An IPv4 wildcard address serves both families: a client of the IPv6 loopback
    /// is answered as one of the IPv4 loopback. Before, the listener was an IPv4
    /// socket and `[::1]` was refused, as every IPv6 address of an IPv6-only node.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_ipv4_wildcard_listens_on_both_families() {
        let listener = bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            Router::new().route("/", get(|| async { "ok" })),
            Limits::DEFAULT,
            Counter::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        let statuses = tokio::task::spawn_blocking(move || {
            [
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            ]
            .map(|addr| (addr, get_status(addr).map_err(|error| error.to_string())))
        })
        .await
        .expect("client");
        for (addr, status) in statuses {
            assert!(
                status.as_ref().is_ok_and(|status| status.contains("200")),
                "{addr}: {status:?}"
            );
        }
        let _ = stop.send(());
        server.await.expect("server stops");
    }

    /// A specific address is bound as given: the loopback stays the loopback.
    #[tokio::test]
    async fn a_specific_address_is_bound_as_given() {
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind");
        let local = listener.local_addr().expect("address");
        assert_eq!(local.ip(), std::net::IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_beyond_the_bound_are_closed_and_the_server_answers_again() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let rejected = Counter::default();
        let limits = Limits {
            max_connections: 8,
            header_timeout: Duration::from_millis(200),
            connection_timeout: Duration::from_secs(5),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            Router::new().route("/", get(|| async { "ok" })),
            limits,
            rejected.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let result = tokio::task::spawn_blocking(move || {
            // Fill every slot with a connection that never sends a byte, then more.
            let idle: Vec<TcpStream> = (0..limits.max_connections + 20)
                .map(|_| TcpStream::connect(addr).expect("connect"))
                .collect();
            // The ones beyond the bound are closed by the server: they read EOF.
            let mut closed = 0;
            for mut stream in idle.iter().skip(limits.max_connections) {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let mut byte = [0u8; 1];
                if matches!(stream.read(&mut byte), Ok(0) | Err(_)) {
                    closed += 1;
                }
            }
            // The idle ones inside the bound go at the header timeout; then a
            // request is served again.
            let status = (0..200).find_map(|_| {
                get_status(addr)
                    .ok()
                    .filter(|status| status.contains("200"))
                    .or_else(|| {
                        std::thread::sleep(Duration::from_millis(100));
                        None
                    })
            });
            drop(idle);
            (closed, status)
        })
        .await
        .expect("client");
        assert_eq!(result.0, 20, "connections beyond the bound not closed");
        assert!(result.1.is_some(), "never served again");
        assert!(rejected.get() >= 20, "{}", rejected.get());
        let _ = stop.send(());
        server.await.expect("server stops");
        assert!(
            TcpStream::connect(addr).is_err(),
            "the listener is closed after shutdown"
        );
    }
}
