//! The `ebpf-api` mode's Kubernetes API: the test API server ([`crate::apiserver`])
//! on loopback in the lab's node namespace, as `tests/tests/kube_source.rs` runs it,
//! holding the node's Node and the benchmark's Services and EndpointSlices. The agent
//! follows it through a kubeconfig with its real kube-rs client (LIST, then WATCH),
//! as in a cluster.
//!
//! The objects are created as a client's POSTs would create them, through the
//! server's store ([`TestApiServerHandle::create`]: the same checks, resourceVersions
//! and watch events, without 200 000 HTTP round trips), and the endpoint change is a
//! PUT of one EndpointSlice the same way ([`TestApiServerHandle::replace`]), so the
//! agent sees it as a watch event. The server's Service defaulting is off: its
//! allocator scans every Service per create (quadratic at 100 000); the objects carry
//! the fields it would add ([`ServiceSet::service`]).
use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, Result};
use serde_json::json;

use super::services::ServiceSet;
use crate::{
    apiserver::{ServerConfig, TestApiServer, TestApiServerHandle},
    lab::Lab,
};

/// Where the server listens in the node namespace (the lab's own loopback).
const LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 6443);
/// The agent's `--min-sync-period-ms`: kube-proxy's default minSyncPeriod (1 s). A
/// change that arrives longer than this after the last pass is applied at once, so
/// it does not delay the measured change.
pub const MIN_SYNC_PERIOD_MS: u64 = 1000;

/// A running API server with the benchmark's objects. Drop it after the agent (the
/// agent must not lose its server while it runs); it stops the server, then its
/// runtime.
pub struct BenchApiServer {
    server: Option<TestApiServerHandle>,
    /// Its one worker thread lives in the node namespace, so the server's sockets do.
    runtime: tokio::runtime::Runtime,
    kubeconfig: PathBuf,
}

impl BenchApiServer {
    /// Starts the server in `lab`'s node namespace, creates the lab's Node and every
    /// Service and EndpointSlice of `set`, writes the kubeconfig into the lab's run
    /// directory.
    ///
    /// # Errors
    /// When the runtime or the server cannot start or an object is refused.
    pub fn start(lab: &Lab, set: &ServiceSet) -> Result<Self> {
        let runtime = lab.node.run(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("a tokio runtime in the node namespace")
        })?;
        let config = ServerConfig {
            service_defaults: false,
            ..ServerConfig::default()
        };
        // Spawned, so the listener is bound on the worker, in the node namespace.
        let server = runtime
            .block_on(runtime.spawn(TestApiServer::start_with(LISTEN, config)))
            .context("the API server's start task")?
            .context("starting the test API server")?;
        let kubeconfig = lab.run_dir().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        server.create(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": lab.node_name},
        }))?;
        for index in 0..set.len() {
            server
                .create(set.service(index))
                .with_context(|| format!("creating Service {}", ServiceSet::name(index)))?;
            server
                .create(set.endpoint_slice(index, false))
                .with_context(|| format!("creating the slice of {}", ServiceSet::name(index)))?;
        }
        Ok(Self {
            server: Some(server),
            runtime,
            kubeconfig,
        })
    }

    /// The kubeconfig pointing at the server.
    #[must_use]
    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }

    /// The endpoint change: service 0's EndpointSlice replaced by one with
    /// [`super::services::EXTRA_ENDPOINT`] added, as a PUT would.
    ///
    /// # Errors
    /// When the server refuses it.
    pub fn change_endpoints(&self, set: &ServiceSet) -> Result<()> {
        let server = self.server.as_ref().context("the API server is stopped")?;
        server.replace(set.endpoint_slice(0, true))?;
        Ok(())
    }
}

impl Drop for BenchApiServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown());
        }
    }
}
