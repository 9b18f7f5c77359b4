//! A lab whose agent hooks a cgroup of the test's own, for the socket-layer tests
//! (`host_client.rs`, `socket_lb.rs`): client processes in the node's namespace or in a
//! pod's, inside that cgroup or outside it, and readers of what the agent reports.
use std::{collections::BTreeSet, net::SocketAddr, path::Path, time::Duration};

use proxy_userspace::datapath::cgroup::{self, SockHook};

use crate::{
    host::{run_client, Mode, Outcome, Session, TestCgroup},
    lab::Lab,
    scenario::{examples_dir, lab_without_agent},
};

/// How long a test waits for the agent to act.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A lab whose agent hooks the test's own cgroup. Fields drop in order: the lab (and its
/// agent, which detaches) before the cgroup.
pub struct SocketLab {
    pub lab: Lab,
    pub cgroup: TestCgroup,
    /// The `kpr-host-client` binary of the test crate.
    client: std::path::PathBuf,
}

impl SocketLab {
    /// The example lab plus `extra_pods` (name, address) with a fresh cgroup; the agent
    /// is not started yet. `client` is the test's `kpr-host-client`.
    ///
    /// # Panics
    /// When the lab cannot be built.
    #[must_use]
    pub fn new(client: &Path, extra_pods: &[(&str, std::net::Ipv4Addr)]) -> Self {
        let mut lab = lab_without_agent(&examples_dir()).expect("lab");
        for (name, ip) in extra_pods {
            lab.add_pod(name, *ip).expect("pod");
        }
        let cgroup = TestCgroup::create(&lab.prefix).expect("the test's cgroup");
        Self {
            lab,
            cgroup,
            client: client.to_path_buf(),
        }
    }

    /// A socket lab on a lab built by the caller (one with IPv6, say), with a fresh
    /// cgroup; the agent is not started yet.
    ///
    /// # Panics
    /// When the cgroup cannot be made.
    #[must_use]
    pub fn from_lab(lab: Lab, client: &Path) -> Self {
        let cgroup = TestCgroup::create(&lab.prefix).expect("the test's cgroup");
        Self {
            lab,
            cgroup,
            client: client.to_path_buf(),
        }
    }

    /// Starts the agent on the test's cgroup (plus `extra` arguments) and waits until
    /// every TC and cgroup hook is attached.
    ///
    /// # Panics
    /// When the agent does not come up.
    pub fn start_agent(&mut self, extra: &[&str]) {
        self.start_agent_until(
            extra,
            "the cgroup hooks to be attached",
            SockHook::ALL.len(),
        );
    }

    /// Starts the agent with `extra` arguments that keep the hooks off
    /// (`--socket-lb off`): waits for TC and for the cgroup to hold none of ours.
    ///
    /// # Panics
    /// When the agent does not come up or hooks stay attached.
    pub fn start_agent_without_hooks(&mut self, extra: &[&str]) {
        self.start_agent_until(extra, "the cgroup hooks to be detached", 0);
    }

    /// Starts the agent on the test's cgroup and waits for TC and for `hooks` of ours
    /// on the cgroup.
    fn start_agent_until(&mut self, extra: &[&str], what: &str, hooks_wanted: usize) {
        let path = self.cgroup.path().display().to_string();
        let mut args = vec!["--cgroup-path", path.as_str()];
        args.extend_from_slice(extra);
        self.lab.start_agent(&args).expect("agent");
        self.lab.wait_attached().expect("TC hooks attached");
        self.lab
            .wait_for(what, DEADLINE, || {
                Ok(hooks(self.cgroup.path()).len() == hooks_wanted)
            })
            .unwrap_or_else(|error| panic!("{error:#}"));
    }

    /// `count` requests from a client process in the node namespace, inside the test's
    /// cgroup or not.
    #[must_use]
    pub fn client(
        &self,
        in_cgroup: bool,
        mode: Mode,
        dst: impl Into<SocketAddr>,
        count: usize,
    ) -> Vec<Outcome> {
        self.client_in(&self.lab.node.path(), in_cgroup, mode, dst, count)
    }

    /// `count` requests from a client process in pod `pod`'s namespace.
    #[must_use]
    pub fn pod_client(
        &self,
        pod: &str,
        in_cgroup: bool,
        mode: Mode,
        dst: impl Into<SocketAddr>,
        count: usize,
    ) -> Vec<Outcome> {
        self.client_in(&self.lab.pod(pod).netns.path(), in_cgroup, mode, dst, count)
    }

    /// Like [`SocketLab::client`], in the network namespace at `netns`.
    ///
    /// # Panics
    /// When the client cannot run.
    #[must_use]
    pub fn client_in(
        &self,
        netns: &Path,
        in_cgroup: bool,
        mode: Mode,
        dst: impl Into<SocketAddr>,
        count: usize,
    ) -> Vec<Outcome> {
        let dst = dst.into();
        run_client(
            &self.client,
            netns,
            in_cgroup.then_some(&self.cgroup),
            mode,
            dst,
            count,
        )
        .unwrap_or_else(|error| panic!("client {mode:?} {dst}: {error:#}"))
    }

    /// A long-lived client socket in the namespace at `netns`, inside the test's cgroup.
    ///
    /// # Panics
    /// When the client cannot start.
    #[must_use]
    pub fn session(&self, netns: &Path, mode: Mode, dst: impl Into<SocketAddr>) -> Session {
        let dst = dst.into();
        Session::start(&self.client, netns, Some(&self.cgroup), mode, dst)
            .unwrap_or_else(|error| panic!("session {mode:?} {dst}: {error:#}"))
    }

    /// The datapath counters by name (`kpr inspect counters`).
    #[must_use]
    pub fn counters(&self) -> serde_json::Value {
        inspect_json(&self.lab, "counters")
    }
}

/// `kpr inspect WHAT --json` of the lab's pinned maps.
///
/// # Panics
/// When it fails.
#[must_use]
pub fn inspect_json(lab: &Lab, what: &str) -> serde_json::Value {
    let output = std::process::Command::new(crate::lab::agent_binary().expect("kpr"))
        .args(["inspect", what, "--json", "--bpffs"])
        .arg(lab.pin_dir())
        .output()
        .expect("kpr inspect");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from kpr inspect")
}

/// A counter of [`SocketLab::counters`].
#[must_use]
pub fn counter(counters: &serde_json::Value, name: &str) -> u64 {
    counters[name].as_u64().unwrap_or(0)
}

/// The programs attached to `cgroup`, one entry per (hook, program id).
///
/// # Panics
/// When the cgroup cannot be queried.
#[must_use]
pub fn hooks(cgroup: &Path) -> Vec<(SockHook, u32)> {
    cgroup::query(cgroup).expect("BPF_PROG_QUERY of the test's cgroup")
}

/// Asserts that every socket of `outcomes` shows `frontend` as its peer
/// (`getpeername()`): the address the client asked for, whatever path translated it.
///
/// # Panics
/// When one shows another peer, or none.
pub fn assert_peer(outcomes: &[Outcome], frontend: &str) {
    for outcome in outcomes {
        assert_eq!(outcome.peer.as_deref(), Some(frontend), "{outcome:?}");
    }
}

/// Asserts that every outcome got an answer from one of `backends`, and returns who
/// answered.
///
/// # Panics
/// When one did not.
pub fn answered_by<'a>(outcomes: &[Outcome], backends: &[&'a str]) -> BTreeSet<&'a str> {
    assert!(!outcomes.is_empty());
    outcomes
        .iter()
        .map(|outcome| {
            let server = outcome
                .server
                .as_deref()
                .unwrap_or_else(|| panic!("no answer: {outcome:?}"));
            *backends
                .iter()
                .find(|backend| **backend == server)
                .unwrap_or_else(|| panic!("answered by {server}, not a backend: {outcome:?}"))
        })
        .collect()
}

/// The agent's log without the terminal colours tracing puts around field names.
#[must_use]
pub fn plain_log(lab: &Lab) -> String {
    let mut plain = String::new();
    let log = lab.agent_log();
    let mut chars = log.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            // CSI: parameters up to a final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The value of the first metric line starting with `prefix`.
#[must_use]
pub fn metric(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Asks `session` until a backend other than `gone` answers; returns the errors seen
/// on the way.
///
/// # Panics
/// When `gone` keeps answering (a socket pinned to it) for [`DEADLINE`].
pub fn until_moved(lab: &Lab, session: &mut Session, gone: &str) -> Vec<Outcome> {
    let mut errors = Vec::new();
    let mut last = None;
    let moved = lab.wait_for("the socket to leave the removed backend", DEADLINE, || {
        let outcome = session.ask()?;
        let server = outcome.server.clone();
        if server.is_none() {
            errors.push(outcome.clone());
        }
        last = Some(outcome);
        Ok(server.is_some_and(|server| server != gone))
    });
    assert!(
        moved.is_ok(),
        "still pinned to {gone}: last answer {last:?}, errors {errors:?}"
    );
    errors
}

/// Asserts that between the counters `before` and `after` at least `translated` pod
/// sockets were translated at the socket layer and the TC programs created no flow (no
/// conntrack entry, no per-packet rewrite); `what` names the connections in the message.
///
/// # Panics
/// When either does not hold.
pub fn assert_socket_path_only(
    before: &serde_json::Value,
    after: &serde_json::Value,
    translated: u64,
    what: &str,
) {
    assert!(
        counter(after, "sock_translated_pod")
            >= counter(before, "sock_translated_pod") + translated,
        "{before} -> {after}"
    );
    assert_eq!(
        counter(after, "new_flow"),
        counter(before, "new_flow"),
        "{what} went through TC: {before} -> {after}"
    );
}
