//! A lab node: one node namespace, pod namespaces on veth pairs, and the agent running
//! inside the node namespace as a real process.
//!
//! Topology (routed, like Calico): each pod has `eth0` with a /32 address and a default
//! route via 169.254.1.1 on-link; the node side of each pair (`veth<n>`) carries
//! 169.254.1.1/32 so it answers the pod's ARP, and the node routes each pod's /32 to
//! its veth. ClusterIPs are routed nowhere: only the datapath makes them answer.
//!
//! An IPv6-only lab ([`Lab::new_ipv6_only`]) has the same shape without IPv4: pods
//! with a /128 only and a default route via the link-local [`GATEWAY_V6`], no IPv4
//! address on any interface but the loopback.
//!
//! Everything lives under the run's prefix (see [`crate::netns`]): namespaces, the run
//! directory with the manifests the agent reads, a private bpffs for its pins, and its
//! log. Drop stops the agent and removes all of it, also when a test panics.
use std::{
    collections::BTreeMap,
    fs::File,
    io::Read as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    netns::{self, Netns, RUN_ROOT},
    traffic::EchoServer,
};

/// The node's address on every pod-facing veth (the pods' gateway).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The node's IPv6 address on every pod-facing veth (the pods' IPv6 gateway): a
/// link-local one, as routed CNIs use, so no global address repeats across veths.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Where the agent's health server listens inside the node namespace.
pub const HEALTHZ: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256);
/// Where an IPv6-only lab reaches the health server: the agent keeps its default
/// address (`0.0.0.0:10256`), which must serve IPv6 too.
pub const HEALTHZ_V6: SocketAddrV6 = SocketAddrV6::new(Ipv6Addr::LOCALHOST, 10256, 0, 0);
/// Where the agent's metrics server listens inside the node namespace.
pub const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);

/// A pod: a namespace with an address of one family or one of each.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    /// Its IPv4 address (none in an IPv6-only lab).
    pub ip: Option<Ipv4Addr>,
    /// Its IPv6 address, in a lab with IPv6.
    pub ipv6: Option<Ipv6Addr>,
    /// The node-side interface of its veth pair.
    pub host_interface: String,
    pub netns: Netns,
}

/// The agent process.
struct Agent {
    child: Child,
}

/// One lab node and its pods.
pub struct Lab {
    pub prefix: String,
    pub node_name: String,
    run_dir: PathBuf,
    pods: BTreeMap<String, Pod>,
    servers: Vec<EchoServer>,
    agent: Option<Agent>,
    /// Replaces `--manifests <dir>` on the agent's command line (e.g. `--kubeconfig`).
    source_args: Option<Vec<String>>,
    /// RLIMIT_NOFILE (soft, hard) the agent starts with, if not the test's own.
    open_files_limit: Option<(u64, u64)>,
    /// Leave `--metrics-bind-address` to the agent's default.
    default_metrics_address: bool,
    /// Whether the node namespace has IPv6 forwarding on ([`Lab::enable_ipv6`]).
    ipv6: bool,
    /// Where `/healthz` is asked: [`HEALTHZ`], given to the agent, or in an IPv6-only
    /// lab [`HEALTHZ_V6`] with the agent on its default address.
    healthz: std::net::SocketAddr,
    /// Declared last: dropped after the pods, whose veths live in it.
    pub node: Netns,
}

impl Lab {
    /// Builds an empty node namespace (forwarding on) and the run directory with its
    /// private bpffs. Removes what crashed earlier runs left first.
    ///
    /// # Errors
    /// When a namespace, the directory or the mount cannot be made.
    pub fn new() -> Result<Self> {
        crate::require_root();
        netns::sweep_stale();
        let prefix = netns::unique_prefix();
        let run_dir = Path::new(RUN_ROOT).join(&prefix);
        std::fs::create_dir_all(run_dir.join("manifests"))
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let bpffs = run_dir.join("bpffs");
        std::fs::create_dir_all(&bpffs)?;
        let guard = RunDirGuard(run_dir.clone());
        netns::run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs))?;
        let node = Netns::create(&format!("{prefix}-node"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        std::mem::forget(guard);
        Ok(Self {
            node_name: "node-a".into(),
            prefix,
            run_dir,
            pods: BTreeMap::new(),
            servers: Vec::new(),
            agent: None,
            source_args: None,
            open_files_limit: None,
            default_metrics_address: false,
            ipv6: false,
            healthz: HEALTHZ.into(),
            node,
        })
    }

    /// A node namespace for IPv6 only: IPv6 on ([`Lab::enable_ipv6`]), pods added with
    /// [`Lab::add_ipv6_pod`], and the agent's health server left on its default
    /// address and asked over IPv6 ([`HEALTHZ_V6`]). The node gets no IPv4 address:
    /// [`ipv4_state`] shows what IPv4 a namespace has besides its loopback.
    ///
    /// # Errors
    /// As [`Lab::new`] and [`Lab::enable_ipv6`].
    pub fn new_ipv6_only() -> Result<Self> {
        let mut lab = Self::new()?;
        lab.enable_ipv6()?;
        lab.healthz = HEALTHZ_V6.into();
        Ok(lab)
    }

    /// Turns IPv6 on in the node namespace: forwarding (in this namespace only: the
    /// sysctl is per network namespace) and no duplicate address detection, so the
    /// addresses the lab gives are usable at once instead of after a second of DAD.
    ///
    /// # Errors
    /// When a sysctl cannot be written.
    pub fn enable_ipv6(&mut self) -> Result<()> {
        self.node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        self.node.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        self.node.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        self.ipv6 = true;
        Ok(())
    }

    /// Adds a pod namespace with address `ip`, wired to the node.
    ///
    /// # Errors
    /// When a command fails.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<&Pod> {
        self.add_pod_with(name, Some(ip), None)
    }

    /// Adds a pod with an IPv6 address only (after [`Lab::enable_ipv6`]), wired as the
    /// IPv6 half of [`Lab::add_dual_pod`].
    ///
    /// # Errors
    /// When a command fails, or IPv6 was not enabled.
    pub fn add_ipv6_pod(&mut self, name: &str, ipv6: Ipv6Addr) -> Result<&Pod> {
        self.add_pod_with(name, None, Some(ipv6))
    }

    /// Adds a pod with an IPv4 address and, when given, an IPv6 one (after
    /// [`Lab::enable_ipv6`]): a /128 on its `eth0` (`nodad`), a default route via
    /// [`GATEWAY_V6`], and the node's route to the /128 on its veth.
    ///
    /// # Errors
    /// When a command fails, or IPv6 was not enabled.
    pub fn add_dual_pod(
        &mut self,
        name: &str,
        ip: Ipv4Addr,
        ipv6: Option<Ipv6Addr>,
    ) -> Result<&Pod> {
        self.add_pod_with(name, Some(ip), ipv6)
    }

    /// A pod with the addresses given: the IPv4 one routed through [`GATEWAY`], the
    /// IPv6 one through [`GATEWAY_V6`].
    fn add_pod_with(
        &mut self,
        name: &str,
        ip: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
    ) -> Result<&Pod> {
        if ip.is_none() && ipv6.is_none() {
            bail!("pod {name} without an address");
        }
        if ipv6.is_some() && !self.ipv6 {
            bail!("IPv6 pod {name} in a lab without IPv6 (Lab::enable_ipv6)");
        }
        let netns = Netns::create(&format!("{}-{name}", self.prefix))?;
        if self.ipv6 {
            // Before the veth is made, so its eth0 is born without DAD.
            netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        let host_interface = format!("veth{}", self.pods.len());
        self.node.add_veth(&host_interface, &netns, "eth0")?;
        self.node.ip(&["link", "set", &host_interface, "up"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        if let Some(ip) = ip {
            self.node.ip(&[
                "addr",
                "add",
                &format!("{GATEWAY}/32"),
                "dev",
                &host_interface,
            ])?;
            self.node
                .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_interface])?;
            netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            netns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &GATEWAY.to_string(),
                "dev",
                "eth0",
                "onlink",
            ])?;
        }
        if let Some(ipv6) = ipv6 {
            self.node.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{GATEWAY_V6}/64"),
                "dev",
                &host_interface,
                "nodad",
            ])?;
            self.node.ip(&[
                "-6",
                "route",
                "add",
                &format!("{ipv6}/128"),
                "dev",
                &host_interface,
            ])?;
            netns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ipv6}/128"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            netns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &GATEWAY_V6.to_string(),
                "dev",
                "eth0",
            ])?;
        }
        let pod = Pod {
            name: name.to_owned(),
            ip,
            ipv6,
            host_interface,
            netns,
        };
        Ok(self.pods.entry(name.to_owned()).or_insert(pod))
    }

    /// The pod called `name`.
    ///
    /// # Panics
    /// When there is none (a test bug).
    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .get(name)
            .unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }

    /// Pods by name.
    #[must_use]
    pub fn pods(&self) -> &BTreeMap<String, Pod> {
        &self.pods
    }

    /// Starts TCP and UDP echo servers named after the pod on `port` of its IPv4
    /// address.
    ///
    /// # Errors
    /// When the pod has no IPv4 address, or binding fails.
    pub fn serve(&mut self, pod: &str, port: u16) -> Result<()> {
        let pod = self.pod(pod);
        let Some(ip) = pod.ip else {
            bail!("pod {} has no IPv4 address", pod.name);
        };
        let server = EchoServer::start(&pod.netns, &pod.name, SocketAddrV4::new(ip, port))?;
        self.servers.push(server);
        Ok(())
    }

    /// Starts TCP and UDP echo servers on `port` of the pod's IPv6 address.
    ///
    /// # Errors
    /// When the pod has none, or binding fails.
    pub fn serve_v6(&mut self, pod: &str, port: u16) -> Result<()> {
        let pod = self.pod(pod);
        let Some(ipv6) = pod.ipv6 else {
            bail!("pod {} has no IPv6 address", pod.name);
        };
        let server = EchoServer::start(&pod.netns, &pod.name, SocketAddrV6::new(ipv6, port, 0, 0))?;
        self.servers.push(server);
        Ok(())
    }

    /// The directory the agent reads manifests from.
    #[must_use]
    pub fn manifests_dir(&self) -> PathBuf {
        self.run_dir.join("manifests")
    }

    /// Writes (or replaces) a manifest file atomically, as `kubectl`-driven tooling
    /// would: the agent never sees half a file.
    ///
    /// # Errors
    /// When the write fails.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        let path = self.manifests_dir().join(file);
        let temporary = self.run_dir.join(format!(".{file}.tmp"));
        std::fs::write(&temporary, yaml)?;
        std::fs::rename(&temporary, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// Removes a manifest file.
    ///
    /// # Errors
    /// When it does not exist.
    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        std::fs::remove_file(self.manifests_dir().join(file))
            .with_context(|| format!("removing manifest {file}"))
    }

    /// Copies every file of `dir` into the manifests directory.
    ///
    /// # Errors
    /// When reading or writing fails.
    pub fn copy_manifests(&self, dir: &Path) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                let name = entry.file_name().to_string_lossy().into_owned();
                self.write_manifest(&name, &std::fs::read_to_string(entry.path())?)?;
            }
        }
        Ok(())
    }

    /// Makes the agent follow the API server of `kubeconfig` instead of the manifests
    /// directory, batching changes over `min_sync_period_ms`.
    pub fn use_api_source(&mut self, kubeconfig: &Path, min_sync_period_ms: u64) {
        self.source_args = Some(vec![
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--min-sync-period-ms".into(),
            min_sync_period_ms.to_string(),
        ]);
    }

    /// Starts the agent with this open files limit (soft, hard), as a container runtime
    /// would set it, instead of the test's own.
    pub fn set_agent_open_files_limit(&mut self, soft: u64, hard: u64) {
        self.open_files_limit = Some((soft, hard));
    }

    /// Starts the agent without `--metrics-bind-address`, on its default address.
    pub fn use_default_metrics_address(&mut self) {
        self.default_metrics_address = true;
    }

    /// The agent's process id, while it runs.
    #[must_use]
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|agent| agent.child.id())
    }

    /// The run directory (for files a test wants cleaned up with the lab).
    #[must_use]
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The agent's pin directory (on the run's private bpffs).
    #[must_use]
    pub fn pin_dir(&self) -> PathBuf {
        self.run_dir.join("bpffs/kpr")
    }

    /// Runs `kpr <args> --bpffs <pin dir>` in the node namespace (where a command such
    /// as `kpr trace` sees the node's routes and pins) and returns its stdout.
    ///
    /// # Errors
    /// When it cannot run or exits non-zero (its stderr in the error).
    pub fn kpr(&self, args: &[&str]) -> Result<String> {
        let binary = agent_binary()?;
        let output = self.node.run(|| {
            Ok(Command::new(&binary)
                .args(args)
                .arg("--bpffs")
                .arg(self.pin_dir())
                .output()?)
        })?;
        if !output.status.success() {
            bail!(
                "kpr {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn log_path(&self) -> PathBuf {
        self.run_dir.join("agent.log")
    }

    /// Starts `kpr run` inside the node namespace with the lab's manifests, pins and
    /// node name, plus `extra_args`, and waits until it reports healthy.
    ///
    /// # Errors
    /// When it cannot start or does not become healthy in time.
    pub fn start_agent(&mut self, extra_args: &[&str]) -> Result<()> {
        self.spawn_agent(extra_args)?;
        self.wait_healthy(Duration::from_secs(30))
    }

    /// Starts `kpr run` like [`Lab::start_agent`], without waiting for it to become
    /// healthy (an agent that cannot sync yet, e.g. while its API server is down).
    ///
    /// # Errors
    /// When it cannot start.
    pub fn spawn_agent(&mut self, extra_args: &[&str]) -> Result<()> {
        if self.agent.is_some() {
            bail!("the agent is already running");
        }
        let binary = agent_binary()?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening the agent log")?;
        let node = File::open(self.node.path())?;
        let mut command = Command::new(&binary);
        command.arg("run");
        match &self.source_args {
            Some(args) => command.args(args),
            None => command.arg("--manifests").arg(self.manifests_dir()),
        };
        command
            .args(["--node-name", &self.node_name])
            .arg("--bpffs")
            .arg(self.pin_dir());
        // An IPv6-only lab leaves the health server on the agent's default address.
        if self.healthz == std::net::SocketAddr::from(HEALTHZ) {
            command.args(["--healthz-bind-address", &HEALTHZ.to_string()]);
        }
        if !self.default_metrics_address {
            command.args(["--metrics-bind-address", &METRICS.to_string()]);
        }
        command
            .args(extra_args)
            .env(
                "RUST_LOG",
                std::env::var("KPR_LAB_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let node_fd = node.as_raw_fd();
        let open_files_limit = self.open_files_limit.map(|(soft, hard)| libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        });
        // SAFETY: only async-signal-safe calls (setns, prctl, setrlimit) between fork and
        // exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(node_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(limit) = &open_files_limit {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // The agent never outlives the test that started it, even on SIGKILL.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        self.agent = Some(Agent { child });
        Ok(())
    }

    /// Waits until `/healthz` answers 200 (the first sync is done and programs attached).
    ///
    /// # Errors
    /// When the agent exits or the deadline passes.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(agent) = self.agent.as_mut() {
                if let Some(status) = agent.child.try_wait()? {
                    bail!("the agent exited ({status}); log:\n{}", self.agent_log());
                }
            }
            if self.healthz().is_ok_and(|(code, _)| code == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not become healthy; log:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until both programs are attached to every pod's interface (their link
    /// pins exist).
    ///
    /// # Errors
    /// When the deadline passes.
    pub fn wait_attached(&self) -> Result<()> {
        let links = self.pin_dir().join("links");
        let hooks = ["pod-ingress", "pod-egress"];
        self.wait_for(
            "programs attached to every pod interface",
            Duration::from_secs(10),
            || {
                let pins: Vec<String> = std::fs::read_dir(&links)?
                    .filter_map(Result::ok)
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .collect();
                // Pins are named `<ifname>@<ifindex>:<hook>`.
                Ok(self.pods.values().all(|pod| {
                    hooks.iter().all(|hook| {
                        pins.iter().any(|pin| {
                            pin.starts_with(&format!("{}@", pod.host_interface))
                                && pin.ends_with(&format!(":{hook}"))
                        })
                    })
                }))
            },
        )
        .map(drop)
    }

    /// Programs attached with TCX to the pods' interfaces, as
    /// `(interface, "ingress"|"egress", program name)`, read from the kernel.
    ///
    /// # Errors
    /// When the query fails.
    pub fn attached_programs(&self) -> Result<Vec<(String, &'static str, String)>> {
        let interfaces: Vec<String> = self
            .pods
            .values()
            .map(|pod| pod.host_interface.clone())
            .collect();
        self.attached_programs_on(&interfaces)
    }

    /// Programs attached with TCX to `interfaces` of the node namespace (the external
    /// one, say), as [`Lab::attached_programs`] gives them.
    ///
    /// # Errors
    /// When the query fails (an interface that does not exist, say).
    pub fn attached_programs_on(
        &self,
        interfaces: &[String],
    ) -> Result<Vec<(String, &'static str, String)>> {
        use aya::programs::{SchedClassifier, TcAttachType};
        self.node.run(|| {
            let mut attached = Vec::new();
            for interface in interfaces {
                for (direction, attach_type) in [
                    ("ingress", TcAttachType::Ingress),
                    ("egress", TcAttachType::Egress),
                ] {
                    let (_, programs) = SchedClassifier::query_tcx(interface, attach_type)
                        .with_context(|| format!("querying tcx {direction} of {interface}"))?;
                    for program in programs {
                        let name = program.name_as_str().unwrap_or("?").to_owned();
                        attached.push((interface.clone(), direction, name));
                    }
                }
            }
            Ok(attached)
        })
    }

    /// Waits until no program is attached to any pod interface, then checks that the
    /// pin directory is gone: the state after a clean exit or `kpr cleanup`. The kernel
    /// releases a link whose last reference (its pin) went away in deferred work, so the
    /// detach is observed, not assumed instant.
    ///
    /// # Errors
    /// When programs stay attached for 5 s, or pins remain.
    pub fn wait_detached_and_unpinned(&self) -> Result<()> {
        self.wait_for(
            "the programs to be detached",
            Duration::from_secs(5),
            || Ok(self.attached_programs()?.is_empty()),
        )?;
        if self.pin_dir().exists() {
            bail!("pins left in {}", self.pin_dir().display());
        }
        Ok(())
    }

    /// GET /healthz from inside the node namespace: status code and body.
    ///
    /// # Errors
    /// When the server does not answer.
    pub fn healthz(&self) -> Result<(u16, String)> {
        self.node.run(|| http_get(self.healthz, "/healthz"))
    }

    /// Adds an outside namespace `<prefix>-<name>` on a veth whose node end is
    /// `interface`: `node_addr`/64 on the node's end, `outside_addr`/64 on the outside
    /// `eth0`, no DAD on either (usable at once). The namespace goes when the returned
    /// [`Netns`] drops; the veth goes with it, or with the node.
    ///
    /// # Errors
    /// When a command fails.
    pub fn add_outside_ipv6(
        &self,
        name: &str,
        interface: &str,
        node_addr: Ipv6Addr,
        outside_addr: Ipv6Addr,
    ) -> Result<Netns> {
        let outside = Netns::create(&format!("{}-{name}", self.prefix))?;
        outside.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        outside.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        self.node.add_veth(interface, &outside, "eth0")?;
        self.node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{node_addr}/64"),
            "dev",
            interface,
            "nodad",
        ])?;
        self.node.ip(&["link", "set", interface, "up"])?;
        outside.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{outside_addr}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        outside.ip(&["link", "set", "eth0", "up"])?;
        Ok(outside)
    }

    /// Gives the node namespace an IPv6 default route via `gateway` on `interface`, as
    /// an IPv6-only node has (the agent takes that interface as external).
    ///
    /// # Errors
    /// When the route cannot be added.
    pub fn add_ipv6_default_route(&self, gateway: Ipv6Addr, interface: &str) -> Result<()> {
        self.node
            .ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
                "dev",
                interface,
            ])
            .map(drop)
    }

    /// GET /metrics from inside the node namespace.
    ///
    /// # Errors
    /// When the server does not answer 200.
    pub fn metrics(&self) -> Result<String> {
        let (code, body) = self.node.run(|| http_get(METRICS, "/metrics"))?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(body)
    }

    /// The value of the first sample of `/metrics` whose line starts with `prefix`
    /// (e.g. `kpr_map_entries{map="SVC_V4_V1"}`), if there is one.
    ///
    /// # Errors
    /// When the metrics server does not answer.
    pub fn metric(&self, prefix: &str) -> Result<Option<f64>> {
        Ok(sample(&self.metrics()?, prefix))
    }

    /// The agent's pinned service map, opened from outside as any tool could (to read
    /// it, or to change it behind the agent's back).
    ///
    /// # Errors
    /// When it is not pinned.
    pub fn pinned_service_map(
        &self,
    ) -> Result<
        aya::maps::HashMap<
            aya::maps::MapData,
            proxy_common::ServiceKeyV4,
            proxy_common::ServiceValueV4,
        >,
    > {
        let path = self.pin_dir().join(proxy_common::names::SERVICES_V4);
        let data = aya::maps::MapData::from_pin(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?)
    }

    /// Stops the agent with SIGTERM (it detaches and unpins unless told to keep state).
    ///
    /// # Errors
    /// When it does not exit in time.
    pub fn stop_agent(&mut self) -> Result<()> {
        let Some(mut agent) = self.agent.take() else {
            return Ok(());
        };
        let pid = i32::try_from(agent.child.id()).context("pid")?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = agent.child.kill();
                let _ = agent.child.wait();
                bail!("the agent ignored SIGTERM; log:\n{}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills the agent with SIGKILL, as a crash would.
    ///
    /// # Errors
    /// When it cannot be reaped.
    pub fn kill_agent(&mut self) -> Result<()> {
        if let Some(mut agent) = self.agent.take() {
            agent.child.kill()?;
            agent.child.wait()?;
        }
        Ok(())
    }

    /// The agent's log so far.
    #[must_use]
    pub fn agent_log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(self.log_path()) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// Polls `condition` every 50 ms until it holds or `timeout` passes. Returns how long
    /// it took.
    ///
    /// # Errors
    /// With the last error or a timeout message, and the agent's log.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut() -> Result<bool>,
    ) -> Result<Duration> {
        let started = Instant::now();
        let mut last = String::from("condition false");
        while started.elapsed() < timeout {
            match condition() {
                Ok(true) => return Ok(started.elapsed()),
                Ok(false) => last = String::from("condition false"),
                Err(error) => last = format!("{error:#}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "timed out after {timeout:?} waiting for {what} ({last}); agent log:\n{}",
            self.agent_log()
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(error) = self.stop_agent() {
            eprintln!("lab {}: {error:#}", self.prefix);
        }
        self.servers.clear();
        self.pods.clear();
        // The agent removes its names file when it stops; a killed one leaves it.
        proxy_userspace::names::remove(&proxy_userspace::names::path_for(&self.pin_dir()));
        netns::remove_run_dir(&self.run_dir);
    }
}

/// What IPv4 the namespace `netns` has besides its loopback: every IPv4 address on
/// another interface and every route of the main table, one line each (`ip -4 -o`).
/// Empty for a node or pod of an IPv6-only lab.
///
/// # Errors
/// When `ip` fails.
pub fn ipv4_state(netns: &Netns) -> Result<Vec<String>> {
    let text = |output: std::process::Output| String::from_utf8_lossy(&output.stdout).into_owned();
    let addresses = text(netns.ip(&["-4", "-o", "addr", "show"])?);
    let routes = text(netns.ip(&["-4", "-o", "route", "show", "table", "main"])?);
    Ok(addresses
        .lines()
        // `<index>: <name>    inet ...`
        .filter(|line| line.split_whitespace().nth(1) != Some("lo"))
        .chain(routes.lines())
        .map(str::to_owned)
        .collect())
}

/// Removes the run directory if construction fails halfway.
struct RunDirGuard(PathBuf);

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        netns::remove_run_dir(&self.0);
    }
}

/// The `kpr` binary: `$KPR_BIN`, or built on demand into a target directory of the
/// lab's own (the test's cargo still holds the lock of the main one).
///
/// # Errors
/// When the build fails.
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KPR_BIN") {
        return Ok(PathBuf::from(path));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let target_dir = workspace.join("target/lab");
    netns::run(
        Command::new(env!("CARGO"))
            .current_dir(&workspace)
            .args([
                "build",
                "--quiet",
                "--package",
                "proxy-userspace",
                "--bin",
                "kpr",
            ])
            .arg("--target-dir")
            .arg(&target_dir),
    )?;
    Ok(target_dir.join("debug/kpr"))
}

/// The value of the first sample in a metrics text whose line starts with `prefix`.
#[must_use]
pub fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// A minimal HTTP/1.0 GET (call inside the right namespace).
///
/// # Errors
/// When the server does not answer.
pub fn http_get(addr: impl Into<std::net::SocketAddr>, path: &str) -> Result<(u16, String)> {
    use std::io::Write as _;
    let addr = addr.into();
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("malformed response {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    Ok((code, body))
}

/// Every map the TC programs write, as text: entries sorted, per-CPU values whole.
///
/// # Panics
/// When a map is not pinned there or cannot be read.
#[must_use]
pub fn map_snapshot(pin_dir: &std::path::Path) -> String {
    use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
    use proxy_common::{
        names, service_stats, AffinityKeyV4, AffinityValueV4, BackendV4, CtEntryV4, CtKeyV4,
        DatapathConfig, FragKeyV4, FragValueV4, ServiceKeyV4, ServiceValueV4,
    };
    fn hash<K: aya::Pod + std::fmt::Debug + Ord + Copy, V: aya::Pod + std::fmt::Debug>(
        map: Map,
    ) -> String {
        let map: HashMap<MapData, K, V> = HashMap::try_from(map).expect("hash map");
        let mut entries: Vec<(K, V)> = map.iter().map(|entry| entry.expect("entry")).collect();
        entries.sort_by_key(|entry| entry.0);
        format!("{entries:?}")
    }
    let open = |name: &str| MapData::from_pin(pin_dir.join(name)).expect("pinned map");
    let mut text = String::new();
    text += &hash::<ServiceKeyV4, ServiceValueV4>(Map::HashMap(open(names::SERVICES_V4)));
    text += &hash::<u32, BackendV4>(Map::HashMap(open(names::BACKENDS_V4)));
    text += &hash::<CtKeyV4, CtEntryV4>(Map::HashMap(open(names::CONNTRACK_V4)));
    text += &hash::<CtKeyV4, CtEntryV4>(Map::LruHashMap(open(names::CONNTRACK_NEW_V4)));
    text += &hash::<AffinityKeyV4, AffinityValueV4>(Map::LruHashMap(open(names::AFFINITY_V4)));
    text += &hash::<FragKeyV4, FragValueV4>(Map::LruHashMap(open(names::FRAGMENTS_V4)));
    let full: Array<MapData, u64> =
        Array::try_from(Map::Array(open(names::CONNTRACK_FULL))).expect("array");
    text += &format!("{:?}", full.get(&0, 0).expect("ct full"));
    let config: Array<MapData, DatapathConfig> =
        Array::try_from(Map::Array(open(names::CONFIG))).expect("array");
    text += &format!("{:?}", config.get(&0, 0).expect("config"));
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(names::COUNTERS))).expect("counters");
    for index in 0..proxy_common::counter::COUNT {
        text += &format!(
            "{:?}",
            counters
                .get(&index, 0)
                .expect("counter")
                .iter()
                .collect::<Vec<_>>()
        );
    }
    let stats: PerCpuHashMap<MapData, u32, service_stats::ServiceStatsV1> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(open(service_stats::NAME))).expect("stats");
    let mut stats: Vec<(u32, Vec<service_stats::ServiceStatsV1>)> = stats
        .iter()
        .map(|entry| {
            let (id, values) = entry.expect("entry");
            (id, values.iter().copied().collect())
        })
        .collect();
    stats.sort_by_key(|(id, _)| *id);
    text += &format!("{stats:?}");
    text
}
