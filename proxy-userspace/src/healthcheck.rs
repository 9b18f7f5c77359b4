//! healthCheckNodePort servers: what kube-proxy's `pkg/proxy/healthcheck/service_health.go`
//! does for LoadBalancer services with externalTrafficPolicy Local.
//!
//! Cloud load balancers probe every node on the service's healthCheckNodePort and send
//! traffic only to nodes that answer 200, because with Local policy a node without a
//! ready endpoint of the service drops external traffic. Each wanted port gets one
//! HTTP listener per bind address; any method and path gets the same JSON answer.
//! Counts change in place (the listener is never reopened for that), ports no longer
//! wanted are closed, and a port that cannot be bound is reported and retried without
//! disturbing the others.
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use axum::{
    http::{
        header::{CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS},
        HeaderName, HeaderValue, StatusCode,
    },
    response::{IntoResponse, Response},
    Router,
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
};
use tracing::{debug, info, warn};

use crate::{health::SyncHealth, metrics::ReasonLabels, model::ServiceHealth, state::ObjectKey};

/// The header kube-proxy sets to the local endpoint count, for load balancers that
/// weigh nodes by it (GCP's WEIGHTED_MAGLEV reads this name).
const ENDPOINT_WEIGHT: HeaderName = HeaderName::from_static("x-load-balancing-endpoint-weight");

/// How long closing a port may wait for its listener to be dropped. Dropping takes a
/// task wake-up; the bound only keeps a stuck task from stalling the sync loop.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a health check port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr} for the health check of {service}")]
    Bind {
        addr: SocketAddr,
        service: ObjectKey,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Label of `kpr_health_check_bind_failures_total{reason}`.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Bind { source, .. } => match source.kind() {
                io::ErrorKind::AddrInUse => "address_in_use",
                io::ErrorKind::AddrNotAvailable => "address_not_available",
                io::ErrorKind::PermissionDenied => "permission_denied",
                _ => "other",
            },
        }
    }

    /// Every label [`Self::metric_label`] can give, to export them at 0.
    pub const METRIC_LABELS: [&'static str; 4] = [
        "address_in_use",
        "address_not_available",
        "permission_denied",
        "other",
    ];

    /// The port that failed.
    #[must_use]
    pub fn port(&self) -> u16 {
        match self {
            Self::Bind { addr, .. } => addr.port(),
        }
    }
}

/// The health check listeners of this node, kept equal to the model's
/// [`crate::model::Desired::health_checks`].
pub struct HealthCheckServers {
    /// Where each port listens: kube-proxy's nodePortAddresses, or `0.0.0.0`.
    addresses: Vec<IpAddr>,
    /// The proxy's own health, part of every answer.
    health: SyncHealth,
    /// `kpr_health_check_bind_failures_total{reason}`.
    failures: Family<ReasonLabels, Counter>,
    /// What the last update asked for.
    wanted: BTreeMap<u16, ServiceHealth>,
    /// Ports being served.
    open: BTreeMap<u16, OpenPort>,
    /// Wanted ports whose last bind failed, so a port failing on every retry is
    /// logged as a warning once and its recovery is logged too.
    failing: BTreeSet<u16>,
    /// Connections turned away by the listeners' bound ([`crate::http`]).
    rejected: Counter,
}

/// One served port: the answer's data and a listener per bind address.
struct OpenPort {
    state: watch::Sender<ServiceHealth>,
    listeners: Vec<Served>,
}

/// One listener's serving task, seen from outside.
struct Served {
    addr: SocketAddr,
    /// Sending (or dropping) it stops accepting and closes idle connections.
    shutdown: oneshot::Sender<()>,
    /// Resolves once the listening socket is closed.
    closed: oneshot::Receiver<()>,
}

impl HealthCheckServers {
    /// Servers listening on `addresses` (kube-proxy listens on every address of
    /// nodePortAddresses, or on `0.0.0.0` when it is unset), answering with `health`
    /// as the proxy's health, counting failed binds in `failures`.
    #[must_use]
    pub fn new(
        addresses: Vec<IpAddr>,
        health: SyncHealth,
        failures: Family<ReasonLabels, Counter>,
    ) -> Self {
        for reason in Error::METRIC_LABELS {
            let _ = failures.get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            });
        }
        Self {
            addresses,
            health,
            failures,
            wanted: BTreeMap::new(),
            open: BTreeMap::new(),
            failing: BTreeSet::new(),
            rejected: Counter::default(),
        }
    }

    /// Counts the connections the listeners turn away in `rejected`.
    #[must_use]
    pub fn with_rejected_counter(self, rejected: Counter) -> Self {
        Self { rejected, ..self }
    }

    /// Serves exactly `wanted`: closes ports no longer wanted, updates the answers of
    /// open ones in place, and opens (or retries) the rest. Returns the ports that could
    /// not be opened; they are logged, counted and retried by the next call of this or
    /// of [`Self::retry`].
    pub async fn update(&mut self, wanted: &BTreeMap<u16, ServiceHealth>) -> Vec<Error> {
        self.wanted.clone_from(wanted);
        let gone: Vec<u16> = self
            .open
            .keys()
            .filter(|port| !wanted.contains_key(port))
            .copied()
            .collect();
        for port in gone {
            if let Some(open) = self.open.remove(&port) {
                let service = open.state.borrow().service.clone();
                open.close().await;
                info!(port, %service, "closed the health check port");
            }
        }
        self.failing.retain(|port| wanted.contains_key(port));
        for (port, health) in wanted {
            if let Some(open) = self.open.get(port) {
                open.state.send_if_modified(|current| {
                    let changed = current != health;
                    if changed {
                        debug!(port, service = %health.service, local_endpoints = health.local_endpoints, "health check updated");
                        current.clone_from(health);
                    }
                    changed
                });
            }
        }
        self.retry().await
    }

    /// Listens on `addresses` from now on (the nodePortAddresses changed with the
    /// node's network): every open port is closed and opened again there. Returns the
    /// ports that could not be opened, as [`Self::update`].
    pub async fn set_addresses(&mut self, addresses: Vec<IpAddr>) -> Vec<Error> {
        if addresses == self.addresses {
            return Vec::new();
        }
        info!(
            ?addresses,
            "health check ports move to the node's new NodePort addresses"
        );
        self.addresses = addresses;
        for (_, open) in std::mem::take(&mut self.open) {
            open.close().await;
        }
        self.retry().await
    }

    /// Tries again to open wanted ports that are not open (a port held by another
    /// process may be freed at any time; kube-proxy retries on every sync).
    pub async fn retry(&mut self) -> Vec<Error> {
        let mut errors = Vec::new();
        for (&port, health) in &self.wanted {
            if self.open.contains_key(&port) {
                continue;
            }
            match open_port(&self.addresses, port, health, &self.health, &self.rejected).await {
                Ok(open) => {
                    let addresses: Vec<String> =
                        open.listeners.iter().map(|l| l.addr.to_string()).collect();
                    if self.failing.remove(&port) {
                        info!(port, service = %health.service, ?addresses, "opened the health check port after failures");
                    } else {
                        info!(port, service = %health.service, ?addresses, local_endpoints = health.local_endpoints, "opened the health check port");
                    }
                    self.open.insert(port, open);
                }
                Err(error) => {
                    self.failures
                        .get_or_create(&ReasonLabels {
                            reason: error.metric_label().to_owned(),
                        })
                        .inc();
                    let message = crate::error_chain(&error);
                    if self.failing.insert(port) {
                        warn!(
                            port,
                            service = %health.service,
                            error = %message,
                            "cannot open the health check port: load balancers see this node as \
                             unhealthy for the service; retrying"
                        );
                    } else {
                        debug!(port, error = %message, "health check port still cannot be opened");
                    }
                    errors.push(error);
                }
            }
        }
        errors
    }

    /// Ports being served, each with the addresses it listens on.
    #[must_use]
    pub fn open_ports(&self) -> BTreeMap<u16, Vec<SocketAddr>> {
        self.open
            .iter()
            .map(|(&port, open)| (port, open.listeners.iter().map(|l| l.addr).collect()))
            .collect()
    }
}

impl OpenPort {
    /// Stops every listener of the port and waits until their sockets are closed.
    async fn close(self) {
        for served in self.listeners {
            // An error means the task already ended, and with it the listener.
            let _ = served.shutdown.send(());
            if tokio::time::timeout(CLOSE_TIMEOUT, served.closed)
                .await
                .is_err()
            {
                warn!(addr = %served.addr, "health check listener not closed in time");
            }
        }
    }
}

/// A listener on `addr`. The IPv6 wildcard takes IPv6 only: the IPv4 wildcard beside
/// it has its own listener (kube-proxy's per-family servers), and a dual-stack `[::]`
/// would hold the IPv4 port too and make that bind fail.
async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let SocketAddr::V6(v6) = addr else {
        return TcpListener::bind(addr).await;
    };
    if !v6.ip().is_unspecified() {
        return TcpListener::bind(addr).await;
    }
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_only_v6(true)?;
    // As tokio's own bind: a port closed a moment ago can be bound again at once.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Binds `port` on every address, then serves it. All or nothing, as kube-proxy: a
/// port bound on some addresses only would be closed again.
async fn open_port(
    addresses: &[IpAddr],
    port: u16,
    health: &ServiceHealth,
    proxy_health: &SyncHealth,
    rejected: &Counter,
) -> Result<OpenPort, Error> {
    let mut bound = Vec::with_capacity(addresses.len());
    for &ip in addresses {
        let addr = SocketAddr::new(ip, port);
        // Dropping `bound` on error closes the listeners already bound.
        let listener = bind(addr).await.map_err(|source| Error::Bind {
            addr,
            service: health.service.clone(),
            source,
        })?;
        bound.push((addr, listener));
    }
    let (state, state_rx) = watch::channel(health.clone());
    let listeners = bound
        .into_iter()
        .map(|(addr, listener)| {
            serve(
                addr,
                listener,
                state_rx.clone(),
                proxy_health.clone(),
                rejected.clone(),
            )
        })
        .collect();
    Ok(OpenPort { state, listeners })
}

/// Serves one listener until its shutdown sender is used or dropped, within
/// [`crate::http::Limits::DEFAULT`].
fn serve(
    addr: SocketAddr,
    listener: TcpListener,
    state: watch::Receiver<ServiceHealth>,
    proxy_health: SyncHealth,
    rejected: Counter,
) -> Served {
    let addr = listener.local_addr().unwrap_or(addr);
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    // Dropped once the listener is: closing a port waits for it, so a port removed and
    // added again at once binds.
    let (closed_tx, closed) = oneshot::channel::<()>();
    let app = Router::new().fallback(move || {
        let health = state.borrow().clone();
        let healthy = proxy_health.status(SystemTime::now()).0;
        async move { answer(&health, healthy) }
    });
    tokio::spawn(async move {
        crate::http::serve(
            listener,
            app,
            crate::http::Limits::DEFAULT,
            rejected,
            async move {
                // Sent or dropped: either way, stop.
                let _ = shutdown_rx.await;
            },
        )
        .await;
        drop(closed_tx);
    });
    Served {
        addr,
        shutdown,
        closed,
    }
}

/// kube-proxy's answer: 200 when the node has a ready local endpoint and the proxy is
/// healthy, else 503, with its headers and its body byte for byte (tab-indented, no
/// final newline), so probes and tools written against kube-proxy see no difference.
fn answer(health: &ServiceHealth, proxy_healthy: bool) -> Response {
    let count = health.local_endpoints;
    let status = if count > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // JSON string literals; for Kubernetes names (DNS labels) the same text as Go's %q.
    let namespace = serde_json::Value::from(health.service.namespace.as_ref());
    let name = serde_json::Value::from(health.service.name.as_ref());
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {namespace},\n\t\t\"name\": {name}\n\t}},\n\t\
         \"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}"
    );
    (
        status,
        [
            (CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (ENDPOINT_WEIGHT, HeaderValue::from(count)),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Write},
        net::{Ipv4Addr, TcpListener as StdListener, TcpStream as StdStream},
    };

    use super::*;
    use crate::metrics::Metrics;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// A port free right now on 127.0.0.1, chosen by the kernel.
    fn free_port() -> u16 {
        StdListener::bind((LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("an ephemeral port")
    }

    fn synced_health() -> SyncHealth {
        let health = SyncHealth::new(Duration::from_secs(60));
        health.synced();
        health
    }

    fn new_servers(
        addresses: Vec<IpAddr>,
        health: SyncHealth,
        metrics: &Metrics,
    ) -> HealthCheckServers {
        HealthCheckServers::new(
            addresses,
            health,
            metrics.health_check_bind_failures.clone(),
        )
    }

    fn wanted(entries: &[(u16, &str, usize)]) -> BTreeMap<u16, ServiceHealth> {
        entries
            .iter()
            .map(|&(port, name, local_endpoints)| {
                (
                    port,
                    ServiceHealth {
                        service: ObjectKey::new("default", name),
                        local_endpoints,
                    },
                )
            })
            .collect()
    }

    /// The exact body kube-proxy writes.
    fn kube_proxy_body(name: &str, count: usize, healthy: bool) -> String {
        format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"{name}\"\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}"
        )
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        /// Lower-case names.
        headers: BTreeMap<String, String>,
        body: String,
    }

    /// Reads one response (status line, headers, Content-Length body) from `reader`.
    fn read_reply(reader: &mut impl BufRead) -> io::Result<Reply> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| bad("status line"))?;
        let mut headers = BTreeMap::new();
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').ok_or_else(|| bad("header"))?;
            headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|length| length.parse().ok())
            .ok_or_else(|| bad("content-length"))?;
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let body = String::from_utf8(body).map_err(|_| bad("utf-8 body"))?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Sends `method path` on `stream` and reads the reply.
    fn exchange(stream: &mut BufReader<StdStream>, method: &str, path: &str) -> io::Result<Reply> {
        write!(
            stream.get_mut(),
            "{method} {path} HTTP/1.1\r\nHost: node\r\nUser-Agent: GoogleHC/1.0\r\n\r\n"
        )?;
        read_reply(stream)
    }

    fn connect(port: u16) -> io::Result<BufReader<StdStream>> {
        let stream = StdStream::connect((LOCALHOST, port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(BufReader::new(stream))
    }

    /// One request on a fresh connection, as a load balancer probes.
    async fn probe(port: u16, method: &'static str, path: &'static str) -> io::Result<Reply> {
        tokio::task::spawn_blocking(move || exchange(&mut connect(port)?, method, path))
            .await
            .expect("client thread")
    }

    fn refused(port: u16) -> bool {
        matches!(
            StdStream::connect((LOCALHOST, port)),
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused
        )
    }

    #[tokio::test]
    async fn answers_200_with_kube_proxys_json_and_headers() {
        let metrics = Metrics::new();
        let mut servers = new_servers(vec![LOCALHOST], synced_health(), &metrics);
        let port = free_port();
        assert!(servers
            .update(&wanted(&[(port, "web", 2)]))
            .await
            .is_empty());
        let reply = probe(port, "GET", "/healthz").await.expect("reply");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, kube_proxy_body("web", 2, true));
        let json: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
        assert_eq!(
            json,
            serde_json::json!({
                "service": {"namespace": "default", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true,
            })
        );
        for (name, value) in [
            ("content-type", "application/json"),
            ("x-content-type-options", "nosniff"),
            ("x-load-balancing-endpoint-weight", "2"),
        ] {
            assert_eq!(
                reply.headers.get(name).map(String::as_str),
                Some(value),
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn every_method_and_path_gets_the_answer() {
        let metrics = Metrics::new();
        let mut servers = new_servers(vec![LOCALHOST], synced_health(), &metrics);
        let port = free_port();
        assert!(servers
            .update(&wanted(&[(port, "web", 1)]))
            .await
            .is_empty());
        for (method, path) in [("GET", "/"), ("GET", "/anything?x=1"), ("POST", "/healthz")] {
            let reply = probe(port, method, path).await.expect("reply");
            assert_eq!(reply.status, 200, "{method} {path}: {reply:?}");
            assert_eq!(
                reply.body,
                kube_proxy_body("web", 1, true),
                "{method} {path}"
            );
        }
    }

    #[tokio::test]
    async fn answers_503_without_local_endpoints_or_when_the_proxy_is_unhealthy() {
        let metrics = Metrics::new();
        let mut servers = new_servers(vec![LOCALHOST], synced_health(), &metrics);
        let port = free_port();
        assert!(servers
            .update(&wanted(&[(port, "web", 0)]))
            .await
            .is_empty());
        let reply = probe(port, "GET", "/").await.expect("reply");
        assert_eq!(reply.status, 503);
        assert_eq!(reply.body, kube_proxy_body("web", 0, true));
        assert_eq!(
            reply
                .headers
                .get("x-load-balancing-endpoint-weight")
                .map(String::as_str),
            Some("0")
        );

        // Never synced: endpoints here, but the datapath does not hold them yet.
        let unsynced = SyncHealth::new(Duration::from_secs(60));
        let mut servers = new_servers(vec![LOCALHOST], unsynced, &metrics);
        let port = free_port();
        assert!(servers
            .update(&wanted(&[(port, "web", 3)]))
            .await
            .is_empty());
        let reply = probe(port, "GET", "/").await.expect("reply");
        assert_eq!(reply.status, 503);
        assert_eq!(reply.body, kube_proxy_body("web", 3, false));
    }

    #[tokio::test]
    async fn counts_and_names_change_in_place_without_reopening() {
        let metrics = Metrics::new();
        let mut servers = new_servers(vec![LOCALHOST], synced_health(), &metrics);
        let port = free_port();
        assert!(servers
            .update(&wanted(&[(port, "web", 1)]))
            .await
            .is_empty());
        // A kept-alive connection survives only if the listener is left alone.
        let mut connection = tokio::task::spawn_blocking(move || {
            let mut connection = connect(port)?;
            let reply = exchange(&mut connection, "GET", "/")?;
            Ok::<_, io::Error>((connection, reply))
        })
        .await
        .expect("client thread")
        .expect("first request");
        assert_eq!(connection.1.status, 200);

        assert!(servers
            .update(&wanted(&[(port, "web", 0)]))
            .await
            .is_empty());
        let (stream, reply) = tokio::task::spawn_blocking(move || {
            let reply = exchange(&mut connection.0, "GET", "/");
            (connection.0, reply)
        })
        .await
        .expect("client thread");
        let reply = reply.expect("second request on the same connection");
        assert_eq!(reply.status, 503);
        assert_eq!(reply.body, kube_proxy_body("web", 0, true));
        drop(stream);

        // The port now belongs to another service (the old one gave it up).
        assert!(servers
            .update(&wanted(&[(port, "api", 4)]))
            .await
            .is_empty());
        let reply = probe(port, "GET", "/").await.expect("reply");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, kube_proxy_body("api", 4, true));
    }

    #[tokio::test]
    async fn removed_ports_are_closed_and_can_be_reopened_at_once() {
        let metrics = Metrics::new();
        let mut servers = new_servers(vec![LOCALHOST], synced_health(), &metrics);
        let (a, b) = (free_port(), free_port());
        assert!(servers
            .update(&wanted(&[(a, "web", 1), (b, "api", 1)]))
            .await
            .is_empty());
        assert_eq!(servers.open_ports().len(), 2);
        assert!(servers.update(&wanted(&[(b, "api", 1)])).await.is_empty());
        assert!(refused(a), "port {a} still open after removal");
        assert_eq!(probe(b, "GET", "/").await.expect("reply").status, 200);
        assert_eq!(
            servers.open_ports().keys().copied().collect::<Vec<_>>(),
            [b]
        );

        assert!(servers
            .update(&wanted(&[(a, "web", 1), (b, "api", 1)]))
            .await
            .is_empty());
        assert_eq!(probe(a, "GET", "/").await.expect("reply").status, 200);

        assert!(servers.update(&BTreeMap::new()).await.is_empty());
        assert!(refused(a) && refused(b));
    }

    #[tokio::test]
    async fn a_busy_port_is_reported_retried_and_does_not_affect_others() {
        let metrics = Metrics::new();
        let mut servers = new_servers(vec![LOCALHOST], synced_health(), &metrics);
        let blocker = StdListener::bind((LOCALHOST, 0)).expect("blocker");
        let busy = blocker.local_addr().expect("blocker address").port();
        let free = free_port();
        let errors = servers
            .update(&wanted(&[(busy, "web", 1), (free, "api", 1)]))
            .await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].port(), busy);
        assert_eq!(errors[0].metric_label(), "address_in_use");
        assert!(
            errors[0].to_string().contains("default/web"),
            "{}",
            errors[0]
        );
        assert_eq!(probe(free, "GET", "/").await.expect("reply").status, 200);
        assert_eq!(
            servers.open_ports().keys().copied().collect::<Vec<_>>(),
            [free]
        );

        // Still busy: counted again, still reported.
        assert_eq!(servers.retry().await.len(), 1);
        let text = metrics.render();
        assert!(
            text.contains("kpr_health_check_bind_failures_total{reason=\"address_in_use\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("kpr_health_check_bind_failures_total{reason=\"permission_denied\"} 0"),
            "{text}"
        );

        drop(blocker);
        assert!(servers.retry().await.is_empty());
        let reply = probe(busy, "GET", "/").await.expect("reply");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, kube_proxy_body("web", 1, true));
    }

    /// kube-proxy opens a port on every address or on none.
    #[tokio::test]
    async fn a_port_busy_on_one_address_is_open_on_none() {
        let metrics = Metrics::new();
        let second = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let mut servers = new_servers(vec![LOCALHOST, second], synced_health(), &metrics);
        let blocker = StdListener::bind((second, 0)).expect("blocker on 127.0.0.2");
        let port = blocker.local_addr().expect("blocker address").port();
        let errors = servers.update(&wanted(&[(port, "web", 1)])).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(refused(port), "127.0.0.1:{port} left open");
        assert!(servers.open_ports().is_empty());

        drop(blocker);
        assert!(servers.retry().await.is_empty());
        assert_eq!(
            servers.open_ports().get(&port).map(Vec::len),
            Some(2),
            "{:?}",
            servers.open_ports()
        );
        assert_eq!(probe(port, "GET", "/").await.expect("reply").status, 200);
    }

    /// When the nodePortAddresses move, the ports follow: closed where they were,
    /// open where they are now.
    #[tokio::test]
    async fn ports_move_with_the_addresses() {
        let metrics = Metrics::new();
        let second = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let mut servers = new_servers(vec![LOCALHOST], synced_health(), &metrics);
        let port = free_port();
        assert!(servers
            .update(&wanted(&[(port, "web", 1)]))
            .await
            .is_empty());
        assert_eq!(probe(port, "GET", "/").await.expect("reply").status, 200);

        assert!(servers.set_addresses(vec![second]).await.is_empty());
        assert!(refused(port), "127.0.0.1:{port} still open");
        assert_eq!(
            servers.open_ports().get(&port),
            Some(&vec![SocketAddr::new(second, port)])
        );
        let reply = tokio::task::spawn_blocking(move || {
            let stream = StdStream::connect((second, port))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            exchange(&mut BufReader::new(stream), "GET", "/")
        })
        .await
        .expect("client thread")
        .expect("reply on the new address");
        assert_eq!(reply.status, 200);
    }
}
