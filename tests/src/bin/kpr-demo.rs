//! The README's demo (`cargo xtask demo`): a lab built from a directory of manifests,
//! the agent translating, real requests from a client pod to every ClusterIP port, and
//! a table of which backend answered each one. Everything is removed at the end.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use kpr_lab::{
    scenario::{backend_pods, lab_for_manifests, service_frontends, CLIENT_IP},
    traffic::{tcp_request, udp_request},
};

const REQUESTS_PER_PORT: usize = 6;
const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(kpr_lab::scenario::examples_dir, PathBuf::from);
    println!("manifests: {}", dir.display());
    let pods = backend_pods(&dir)?;
    println!("lab: client pod {CLIENT_IP}, backend pods:");
    for pod in &pods {
        println!(
            "  {:<8} {:<14} serving TCP+UDP on {:?}",
            pod.name, pod.ip, pod.ports
        );
    }
    let frontends = service_frontends(&dir)?;
    let lab = lab_for_manifests(&dir).context("building the lab")?;
    println!(
        "agent running in the node namespace {}, programs attached\n",
        lab.node.name()
    );

    println!("#   service            PROTO to              answered by backend saw client   client saw peer");
    let client = &lab.pod("client").netns;
    let mut tally: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut row = 0;
    for frontend in &frontends {
        for _ in 0..REQUESTS_PER_PORT {
            row += 1;
            let started = Instant::now();
            let outcome = client.run(|| {
                Ok(match frontend.protocol.as_str() {
                    "UDP" => udp_request(frontend.addr, TIMEOUT)
                        .map(|(answer, from)| (answer, from.to_string())),
                    _ => tcp_request(frontend.addr, TIMEOUT)
                        .map(|answer| (answer, frontend.addr.to_string())),
                })
            })?;
            let (answered_by, seen, peer) = match outcome {
                Ok((answer, peer)) => {
                    *tally
                        .entry((frontend.name.clone(), answer.server.clone()))
                        .or_default() += 1;
                    (answer.server, answer.seen_client.to_string(), peer)
                }
                Err(error) => {
                    let refused = error
                        .chain()
                        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                        .any(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
                    let what = if refused { "refused" } else { "failed" };
                    (
                        what.to_owned(),
                        format!("after {:.1} ms", started.elapsed().as_secs_f64() * 1e3),
                        String::new(),
                    )
                }
            };
            println!(
                "{row:<3} {:<18} {:<4} {:<15} {answered_by:<11} {seen:<20} {peer}",
                frontend.name,
                frontend.protocol,
                frontend.addr.to_string()
            );
        }
        // One row per service is enough for a refusing service.
    }
    println!("\nanswers per backend:");
    for ((service, backend), count) in &tally {
        println!("  {service:<18} {backend:<8} {count}");
    }
    drop(lab);
    println!("\nlab removed (namespaces, agent, pins)");
    Ok(())
}
