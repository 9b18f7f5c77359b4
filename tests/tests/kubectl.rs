//! kubectl as the operator's client: the agent follows the test API server
//! (`kpr_lab::apiserver`) in the node namespace while kubectl, run there with a
//! kubeconfig in the run's own directory, applies a Service and its EndpointSlice from
//! YAML (validation on, against the server's OpenAPI document), lists them with the
//! server's Table columns, is refused a manifest with an unknown field, and deletes
//! them; real connections from a client pod to the ClusterIP show what the datapath
//! made of each step.
//!
//! Needs kubectl on PATH (`cargo xtask test` installs Debian's `kubernetes-client`).
//! Every wait is bounded (at most [`DEADLINE`] per change); no assertion depends on how
//! fast something happened.
use std::{
    collections::BTreeSet,
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use anyhow::Result;
use kpr_lab::{
    apiserver::{TestApiServer, TestApiServerHandle},
    lab::Lab,
    scenario::{sock, CLIENT_IP},
    traffic::tcp_request,
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The backend pods: name and last octet of 10.244.1.x, all serving on port 8080.
const BACKENDS: [(&str, u8); 3] = [("web-0", 11), ("web-1", 12), ("web-2", 13)];
/// Per connection.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a change may take to reach the datapath before the test gives up.
const DEADLINE: Duration = Duration::from_secs(10);
const NODE: &str = "node-a";

const NODE_YAML: &str = "apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels:
    topology.kubernetes.io/zone: zone-a
";

/// The Service, as an operator would write it.
const SERVICE_YAML: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  clusterIP: 10.96.0.10
  selector:
    app: web
  ports:
    - name: http
      port: 80
      targetPort: 8080
";

/// Its EndpointSlice with the given backends, as the EndpointSlice controller would
/// write it.
fn slice_yaml(backends: &[&str]) -> String {
    let mut yaml = String::from(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
  - name: http
    port: 8080
    protocol: TCP
endpoints:
",
    );
    for name in backends {
        let last = BACKENDS
            .iter()
            .find(|(backend, _)| backend == name)
            .map(|(_, last)| *last)
            .unwrap_or_else(|| panic!("no backend {name}"));
        yaml.push_str(&format!(
            "  - addresses: [10.244.1.{last}]
    conditions: {{ready: true, serving: true, terminating: false}}
    nodeName: {NODE}
    targetRef: {{kind: Pod, namespace: demo, name: {name}}}
"
        ));
    }
    yaml
}

/// A lab node with a client pod and three backend pods, the test API server in the
/// node namespace, the agent following it, and kubectl pointed at it.
struct KubectlLab {
    /// Dropped first: stops the agent, removes the namespaces (and the run directory
    /// with the kubeconfig and kubectl's cache).
    lab: Lab,
    _server: TestApiServerHandle,
    kubeconfig: PathBuf,
    /// Dropped last: the server runs on it.
    _runtime: tokio::runtime::Runtime,
}

impl KubectlLab {
    fn start() -> Self {
        let mut lab = Lab::new().expect("lab");
        lab.node_name = NODE.into();
        lab.add_pod("client", CLIENT_IP).expect("client pod");
        for (name, last) in BACKENDS {
            lab.add_pod(name, Ipv4Addr::new(10, 244, 1, last))
                .expect("backend pod");
            lab.serve(name, 8080).expect("echo servers");
        }
        // Its worker thread lives in the node namespace: the server listens there.
        let runtime = lab
            .node
            .run(|| {
                Ok(tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?)
            })
            .expect("a runtime in the node namespace");
        let server = block_on(
            &runtime,
            TestApiServer::start(SocketAddr::from(([127, 0, 0, 1], 6443))),
        )
        .expect("the test API server");
        let kubeconfig = lab.run_dir().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        lab.use_api_source(&kubeconfig, 100);
        let this = Self {
            lab,
            _server: server,
            kubeconfig,
            _runtime: runtime,
        };
        // Our Node (its labels carry the topology zone), before the agent starts.
        let out = this.apply_ok("node.yaml", NODE_YAML);
        assert_eq!(out.trim(), format!("node/{NODE} created"));
        this
    }

    fn start_agent(&mut self) {
        self.lab
            .start_agent(&[])
            .expect("the agent starts and syncs");
        self.lab.wait_attached().expect("programs attached");
    }

    /// Runs kubectl in the node namespace with the test's kubeconfig and a cache in
    /// the run directory; returns its output whatever its exit status.
    fn kubectl(&self, args: &[&str]) -> Output {
        let cache = self.lab.run_dir().join("kubectl-cache");
        Command::new("ip")
            .args(["netns", "exec", self.lab.node.name(), "kubectl"])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&cache)
            .args(["--request-timeout", "10s"])
            .args(args)
            .output()
            .expect("kubectl runs (install it: Debian's kubernetes-client, or `cargo xtask test`)")
    }

    /// kubectl `args`, which must succeed; its stdout.
    fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f` of `yaml` (written to `file` in the run directory).
    fn apply(&self, file: &str, yaml: &str) -> Output {
        let path = self.lab.run_dir().join(file);
        std::fs::write(&path, yaml).expect("write the manifest");
        self.kubectl(&["apply", "-f", &path.display().to_string()])
    }

    fn apply_ok(&self, file: &str, yaml: &str) -> String {
        let out = self.apply(file, yaml);
        assert!(
            out.status.success(),
            "kubectl apply {file} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The backends answering `count` new connections to the ClusterIP from the client.
    fn backends(&self, count: usize) -> Result<BTreeSet<String>> {
        self.lab.pod("client").netns.run(|| {
            (0..count)
                .map(|_| tcp_request(sock(WEB_VIP, 80), TIMEOUT).map(|answer| answer.server))
                .collect()
        })
    }

    fn wait_backends(&self, what: &str, expected: &[&str]) {
        let expected: BTreeSet<String> = expected.iter().map(|&s| s.to_owned()).collect();
        self.lab
            .wait_for(what, DEADLINE, || Ok(self.backends(30)? == expected))
            .unwrap_or_else(|error| panic!("{error:#}"));
    }

    /// How a new connection to the ClusterIP fails (`None`: it succeeded).
    fn connect_error(&self, timeout: Duration) -> Option<std::io::ErrorKind> {
        let error = self
            .lab
            .pod("client")
            .netns
            .run(|| Ok(tcp_request(sock(WEB_VIP, 80), timeout).err()))
            .expect("run in the client pod")?;
        Some(kpr_lab::traffic::io_error_kind(&error))
    }

    fn programming_count(&self) -> f64 {
        self.lab
            .metric("kubeproxy_network_programming_duration_seconds_count")
            .expect("metrics answer")
            .unwrap_or(0.0)
    }
}

fn block_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    future: impl Future<Output = T> + Send + 'static,
) -> T {
    let bounded = async move { tokio::time::timeout(DEADLINE, future).await };
    runtime
        .block_on(runtime.spawn(bounded))
        .expect("the task panicked")
        .expect("an API call did not finish in time")
}

/// The words of each line of a kubectl table (columns are separated by runs of
/// spaces; no cell here contains a space).
fn table(text: &str) -> Vec<Vec<&str>> {
    text.lines()
        .map(|line| line.split_whitespace().collect())
        .collect()
}

#[test]
fn kubectl_applies_lists_and_deletes_a_service_that_the_datapath_serves() {
    let mut lab = KubectlLab::start();
    lab.start_agent();

    let out = lab.apply_ok(
        "web.yaml",
        &format!("{SERVICE_YAML}---\n{}", slice_yaml(&["web-0", "web-1"])),
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "service/web created",
            "endpointslice.discovery.k8s.io/web-1 created"
        ],
        "{out}"
    );
    lab.wait_backends("the applied service", &["web-0", "web-1"]);

    let services = lab.kubectl_ok(&["get", "services", "-n", "demo"]);
    let rows = table(&services);
    assert_eq!(
        rows[0],
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ],
        "{services}"
    );
    assert_eq!(rows.len(), 2, "{services}");
    assert_eq!(
        rows[1][..5],
        ["web", "ClusterIP", "10.96.0.10", "<none>", "80/TCP"],
        "{services}"
    );
    assert!(
        rows[1][5].ends_with(['s', 'm']),
        "AGE is a duration: {services}"
    );
    let slices = lab.kubectl_ok(&["get", "endpointslices", "-n", "demo"]);
    let rows = table(&slices);
    assert_eq!(
        rows[0],
        ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
        "{slices}"
    );
    assert_eq!(
        rows[1][..4],
        ["web-1", "IPv4", "8080", "10.244.1.11,10.244.1.12"],
        "{slices}"
    );

    // Scale up by applying the changed slice: a strategic merge patch of the server's
    // object, with a new trigger time from which the agent measures programming.
    let measured_before = lab.programming_count();
    let out = lab.apply_ok("web-slice.yaml", &slice_yaml(&["web-0", "web-1", "web-2"]));
    assert_eq!(
        out.trim(),
        "endpointslice.discovery.k8s.io/web-1 configured"
    );
    lab.wait_backends("web-2 to join", &["web-0", "web-1", "web-2"]);
    let trigger = lab.kubectl_ok(&[
        "get",
        "endpointslice",
        "-n",
        "demo",
        "web-1",
        "-o",
        r"jsonpath={.metadata.annotations.endpoints\.kubernetes\.io/last-change-trigger-time}",
    ]);
    assert!(
        trigger.starts_with("20") && trigger.ends_with('Z'),
        "trigger time {trigger:?}"
    );
    lab.lab
        .wait_for("the change's programming to be measured", DEADLINE, || {
            Ok(lab.programming_count() > measured_before)
        })
        .unwrap_or_else(|error| panic!("{error:#}"));

    // An unknown field is refused by kubectl's validation, before the server sees it.
    let bad = SERVICE_YAML.replace("  selector:", "  selectr:\n    app: web\n  selector:");
    let out = lab.apply("bad.yaml", &bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unknown field was accepted");
    assert!(
        stderr.contains(r#"unknown field "selectr""#),
        "kubectl's validation error: {stderr}"
    );
    lab.wait_backends("the service unchanged", &["web-0", "web-1", "web-2"]);

    let out = lab.kubectl_ok(&["delete", "-n", "demo", "service/web", "endpointslice/web-1"]);
    // (kubectl >= 1.33 adds " from demo namespace".)
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with(r#"service "web" deleted"#), "{out}");
    assert!(
        lines[1].starts_with(r#"endpointslice.discovery.k8s.io "web-1" deleted"#),
        "{out}"
    );
    assert_eq!(
        lab.kubectl_ok(&["get", "services", "-n", "demo", "-o", "name"]),
        ""
    );
    // Deleted: the ClusterIP is no frontend any more, nothing translates it.
    lab.lab
        .wait_for("the deleted service to stop answering", DEADLINE, || {
            Ok(lab
                .connect_error(Duration::from_millis(300))
                .is_some_and(|kind| kind != std::io::ErrorKind::ConnectionRefused))
        })
        .unwrap_or_else(|error| panic!("{error:#}"));
    let (code, body) = lab.lab.healthz().expect("healthz answers");
    assert_eq!(code, 200, "healthz: {body}");
}
