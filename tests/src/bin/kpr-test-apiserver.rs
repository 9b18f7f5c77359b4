//! Runs the test Kubernetes API server (a test tool, see `kpr_lab::apiserver`).
//!
//! ```text
//! kpr-test-apiserver --listen 127.0.0.1:0 --kubeconfig /tmp/kubeconfig
//! ```
//!
//! The first line on stdout is `listening on IP:PORT`; then it serves until SIGINT or
//! SIGTERM. Logs go to stderr (`RUST_LOG=debug` shows every request).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use kpr_lab::apiserver::{ServerConfig, TestApiServer};
use tokio::signal::unix::{signal, SignalKind};

/// A test Kubernetes API server (Services, EndpointSlices, Nodes) over plain HTTP.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig pointing at the server to this path.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Interval between watch bookmarks, in milliseconds (0: no bookmarks).
    #[arg(long, default_value_t = 1000)]
    bookmark_interval_ms: u64,
    /// Number of change events kept for watches to resume from.
    #[arg(long, default_value_t = 10_000)]
    history_limit: usize,
    /// Do not default or allocate Service fields (ClusterIPs, node ports, ...).
    #[arg(long)]
    no_service_defaults: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let config = ServerConfig {
        bookmark_interval: Duration::from_millis(args.bookmark_interval_ms),
        history_limit: args.history_limit,
        service_defaults: !args.no_service_defaults,
    };
    let server = TestApiServer::start_with(args.listen, config).await?;
    if let Some(path) = &args.kubeconfig {
        server.write_kubeconfig(path)?;
    }
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", server.addr()).context("writing to stdout")?;
        out.flush().context("flushing stdout")?;
    }

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        res = tokio::signal::ctrl_c() => res.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}
