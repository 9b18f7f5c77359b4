//! Labs built from manifests: every endpoint of every EndpointSlice becomes a pod with
//! echo servers on the slice's ports, plus a client pod; the agent then reads the same
//! manifests. The demo and the end-to-end tests share this.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Deserialize as _;

use crate::{lab::Lab, netns::Netns, traffic::tcp_request};

/// How long one of [`NewConnections`]' connections may take.
const NEW_CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// The client pod's address (in the example pod CIDR, distinct from every endpoint).
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

/// `manifests/examples` of this repository.
#[must_use]
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples")
}

/// A pod the manifests expect: its name, address and the ports it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendPod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ports: Vec<u16>,
}

/// Every YAML document of the files in `dir`, in file-name order.
fn documents(dir: &Path) -> Result<Vec<serde_yaml::Value>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .collect();
    files.sort();
    let mut documents = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            documents.push(
                serde_yaml::Value::deserialize(document)
                    .with_context(|| format!("parsing {}", file.display()))?,
            );
        }
    }
    Ok(documents)
}

/// The pods behind every IPv4 EndpointSlice found in `dir`, by address. A pod is named
/// after the endpoint's targetRef, else after its address.
///
/// # Errors
/// When a file cannot be read or parsed as YAML.
pub fn backend_pods(dir: &Path) -> Result<Vec<BackendPod>> {
    let mut pods: BTreeMap<Ipv4Addr, BackendPod> = BTreeMap::new();
    for value in documents(dir)? {
        if value["kind"].as_str() != Some("EndpointSlice")
            || value["addressType"].as_str() != Some("IPv4")
        {
            continue;
        }
        let ports: Vec<u16> = value["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|port| port["port"].as_u64())
            .filter_map(|port| u16::try_from(port).ok())
            .collect();
        for endpoint in value["endpoints"].as_sequence().into_iter().flatten() {
            for address in endpoint["addresses"].as_sequence().into_iter().flatten() {
                let Some(ip) = address.as_str().and_then(|ip| ip.parse::<Ipv4Addr>().ok()) else {
                    continue;
                };
                let name = endpoint["targetRef"]["name"].as_str().map_or_else(
                    || format!("ep-{}", ip.to_string().replace('.', "-")),
                    str::to_owned,
                );
                let pod = pods.entry(ip).or_insert_with(|| BackendPod {
                    name,
                    ip,
                    ports: Vec::new(),
                });
                for port in &ports {
                    if !pod.ports.contains(port) {
                        pod.ports.push(*port);
                    }
                }
            }
        }
    }
    Ok(pods.into_values().collect())
}

/// A lab with a `client` pod and the pods of `manifests`, serving; the manifests are
/// copied in and the agent started (healthy and attached when this returns).
///
/// # Errors
/// When any step fails.
pub fn lab_for_manifests(manifests: &Path) -> Result<Lab> {
    let mut lab = lab_without_agent(manifests)?;
    lab.start_agent(&[])?;
    lab.wait_attached()?;
    Ok(lab)
}

/// The lab of [`lab_for_manifests`] before its agent starts, for tests that must
/// prepare something named after the lab (its prefix) and pass it to the agent.
///
/// # Errors
/// When any step fails.
pub fn lab_without_agent(manifests: &Path) -> Result<Lab> {
    let mut lab = Lab::new()?;
    lab.add_pod("client", CLIENT_IP)?;
    for pod in backend_pods(manifests)? {
        lab.add_pod(&pod.name, pod.ip)?;
        for port in pod.ports {
            lab.serve(&pod.name, port)?;
        }
    }
    lab.copy_manifests(manifests)?;
    Ok(lab)
}

/// `ip:port`.
#[must_use]
pub fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A ClusterIP frontend named in the manifests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFrontend {
    /// `namespace/name:port-name`.
    pub name: String,
    pub addr: SocketAddrV4,
    /// "TCP" or "UDP".
    pub protocol: String,
}

/// Every IPv4 ClusterIP port of the Services in `dir`, in file order.
///
/// # Errors
/// When a file cannot be read or parsed as YAML.
pub fn service_frontends(dir: &Path) -> Result<Vec<ServiceFrontend>> {
    let mut frontends = Vec::new();
    for value in documents(dir)? {
        if value["kind"].as_str() != Some("Service") {
            continue;
        }
        let Some(ip) = value["spec"]["clusterIP"]
            .as_str()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let namespace = value["metadata"]["namespace"].as_str().unwrap_or("default");
        let service = value["metadata"]["name"].as_str().unwrap_or("?");
        for port in value["spec"]["ports"].as_sequence().into_iter().flatten() {
            let Some(number) = port["port"].as_u64().and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            frontends.push(ServiceFrontend {
                name: format!(
                    "{namespace}/{service}:{}",
                    port["name"].as_str().unwrap_or("")
                ),
                addr: SocketAddrV4::new(ip, number),
                protocol: port["protocol"].as_str().unwrap_or("TCP").to_owned(),
            });
        }
    }
    Ok(frontends)
}

/// Background new TCP connections from a namespace to one address, one every few
/// milliseconds, counting the answered and failed ones and the longest time between
/// two answers: the datapath serving through whatever the agent does meanwhile
/// (crashes, restarts, upgrades).
pub struct NewConnections {
    stop: Arc<AtomicBool>,
    /// Successful connections so far.
    answered: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Result<(usize, usize, Duration)>>,
}

impl NewConnections {
    /// Starts connecting from `netns` to `target`, each connection one request.
    ///
    /// # Panics
    /// When the thread cannot enter the namespace.
    #[must_use]
    pub fn start(netns: &Netns, target: impl Into<SocketAddr>) -> Self {
        let target = target.into();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let answered = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&answered);
        let thread = netns
            .spawn(move || {
                let (mut ok, mut failed) = (0, 0);
                let mut longest_gap = Duration::ZERO;
                let mut last_success = Instant::now();
                while !flag.load(Ordering::Relaxed) {
                    if tcp_request(target, NEW_CONNECTION_TIMEOUT).is_ok() {
                        ok += 1;
                        counted.fetch_add(1, Ordering::Relaxed);
                        longest_gap = longest_gap.max(last_success.elapsed());
                        last_success = Instant::now();
                    } else {
                        failed += 1;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                (ok, failed, longest_gap)
            })
            .expect("spawn in the namespace");
        let thread =
            std::thread::spawn(move || thread.join().map_err(|_| anyhow::anyhow!("panicked"))?);
        Self {
            stop,
            answered,
            thread,
        }
    }

    /// Waits until `more` new connections have been answered from now on: the
    /// datapath served through whatever the agent is doing meanwhile.
    ///
    /// # Panics
    /// When they are not answered within 20 s.
    pub fn wait_answered(&self, lab: &Lab, more: usize, while_what: &str) {
        let target = self.answered.load(Ordering::Relaxed) + more;
        lab.wait_for(
            &format!("{more} new connections answered {while_what}"),
            Duration::from_secs(20),
            || Ok(self.answered.load(Ordering::Relaxed) >= target),
        )
        .unwrap_or_else(|error| panic!("{error:#}"));
    }

    /// Stops and returns (successful, failed, longest time between two successes).
    ///
    /// # Panics
    /// When the client thread panicked.
    #[must_use]
    pub fn finish(self) -> (usize, usize, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("join").expect("client thread")
    }
}
