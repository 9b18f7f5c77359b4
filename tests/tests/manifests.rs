//! The deployment manifests (`manifests/deploy`), the example manifests and the
//! Containerfile, checked as data: every document parses into its Kubernetes type
//! without losing a field, RBAC is read-only but for Events, the DaemonSet gives the
//! agent what it needs and no more (the capabilities are the ones its README lists),
//! the shipped configuration is one the agent accepts and the probes point where it
//! binds, and the image is built with the toolchain recipe of `xtask`.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, PodSpec, ServiceAccount, Volume},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{de::DeserializeOwned, Deserialize as _, Serialize};
use serde_yaml::Value;

/// The one place that knows the eBPF toolchain; the Containerfile must follow it.
#[path = "../../xtask/src/ebpf_toolchain.rs"]
mod ebpf_toolchain;

const NAMESPACE: &str = "kube-system";
/// The capabilities the agent needs (verified by running it under exactly this
/// bounding set), in the order the DaemonSet lists them.
const CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifests_dir(sub: &str) -> PathBuf {
    repo_root().join("manifests").join(sub)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// A YAML document and the file it came from.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    files
}

/// Every YAML document under `dir` (multi-document files split, empty documents
/// skipped).
fn documents(dir: &Path) -> Vec<Doc> {
    let mut out = Vec::new();
    for path in yaml_files(dir) {
        let text = read(&path);
        let file = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(document).unwrap_or_else(|error| panic!("{file}: {error}"));
            if !value.is_null() {
                out.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    out
}

fn deploy() -> Vec<Doc> {
    documents(&manifests_dir("deploy"))
}

/// Where two JSON values first differ, as a path.
fn first_difference(
    written: &serde_json::Value,
    typed: &serde_json::Value,
    path: &str,
) -> Option<String> {
    use serde_json::Value as J;
    match (written, typed) {
        (J::Object(a), J::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|key| {
                let here = format!("{path}.{key}");
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => first_difference(x, y, &here),
                    (Some(_), None) => Some(format!("{here} is not a field of the type")),
                    (None, _) => Some(format!("{here} appeared")),
                }
            })
        }
        (J::Array(a), J::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, &format!("{path}[{i}]"))),
        _ if written == typed => None,
        _ => Some(format!("{path}: {written} became {typed}")),
    }
}

/// Parses `doc` as `T` and checks that nothing was dropped on the way: a misspelt or
/// misplaced field, which the typed parse would silently ignore, fails here as it would
/// fail `kubectl apply` (strict field validation).
fn typed<T: DeserializeOwned + Serialize>(doc: &Doc) -> T {
    let object: T = serde_yaml::from_value(doc.value.clone())
        .unwrap_or_else(|error| panic!("{} ({}): {error}", doc.file, doc.kind()));
    let written = serde_json::to_value(&doc.value).expect("YAML as JSON");
    let round_trip = serde_json::to_value(&object).expect("typed object as JSON");
    if let Some(difference) = first_difference(&written, &round_trip, "") {
        panic!("{} ({}): {difference}", doc.file, doc.kind());
    }
    object
}

/// The one document of `kind`, typed.
fn the<T: DeserializeOwned + Serialize>(docs: &[Doc], kind: &str) -> T {
    let found: Vec<&Doc> = docs.iter().filter(|doc| doc.kind() == kind).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    typed(found[0])
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().expect("metadata.name")
}

fn pod_spec(daemonset: &DaemonSet) -> &PodSpec {
    daemonset
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("DaemonSet pod spec")
}

fn agent_container(daemonset: &DaemonSet) -> &Container {
    let containers = &pod_spec(daemonset).containers;
    assert_eq!(containers.len(), 1, "one container: the agent");
    &containers[0]
}

fn volume<'a>(pod: &'a PodSpec, name: &str) -> &'a Volume {
    pod.volumes
        .iter()
        .flatten()
        .find(|volume| volume.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The agent's configuration file as shipped in the ConfigMap.
fn shipped_config(docs: &[Doc]) -> String {
    let config_map: ConfigMap = the(docs, "ConfigMap");
    assert_eq!(name_of(&config_map.metadata), "kpr-config");
    config_map
        .data
        .as_ref()
        .and_then(|data| data.get("config.yaml"))
        .expect("kpr-config has config.yaml")
        .clone()
}

fn http_port(port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(port) => *port,
        IntOrString::String(name) => panic!("probe port {name:?}: use the number"),
    }
}

#[test]
fn every_document_has_identity() {
    for dir in ["deploy", "examples"] {
        for doc in documents(&manifests_dir(dir)) {
            if doc.kind() == "Kustomization" {
                continue;
            }
            for field in ["apiVersion", "kind"] {
                assert!(
                    doc.value[field].as_str().is_some(),
                    "{}: no {field}",
                    doc.file
                );
            }
            assert!(
                doc.value["metadata"]["name"].as_str().is_some(),
                "{}: no metadata.name",
                doc.file
            );
        }
    }
}

#[test]
fn deployment_objects_are_valid_typed_and_live_in_kube_system() {
    let docs = deploy();
    let mut kinds = Vec::new();
    for doc in &docs {
        let namespace = doc.value["metadata"]["namespace"].as_str();
        let namespaced = match doc.kind() {
            "Kustomization" => continue,
            "ServiceAccount" => {
                typed::<ServiceAccount>(doc);
                true
            }
            "ConfigMap" => {
                typed::<ConfigMap>(doc);
                true
            }
            "DaemonSet" => {
                typed::<DaemonSet>(doc);
                true
            }
            "ClusterRole" => {
                typed::<ClusterRole>(doc);
                false
            }
            "ClusterRoleBinding" => {
                typed::<ClusterRoleBinding>(doc);
                false
            }
            other => panic!("{}: {other} is new here: add it to this test", doc.file),
        };
        if namespaced {
            assert_eq!(namespace, Some(NAMESPACE), "{}: {}", doc.file, doc.kind());
        } else {
            assert_eq!(
                namespace,
                None,
                "{}: cluster-scoped {}",
                doc.file,
                doc.kind()
            );
        }
        kinds.push(doc.kind().to_owned());
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "ServiceAccount"
        ]
    );
}

#[test]
fn the_cluster_role_reads_and_only_writes_events() {
    let docs = deploy();
    let role: ClusterRole = the(&docs, "ClusterRole");
    let mut readable = BTreeSet::new();
    let mut event_groups = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        assert!(rule.resource_names.is_none(), "{rule:?}");
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        for item in groups.iter().chain(&resources).chain(&rule.verbs) {
            assert_ne!(item, "*", "no wildcards: {rule:?}");
        }
        if resources == ["events"] {
            let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
            assert_eq!(verbs, BTreeSet::from(["create", "patch"]), "{rule:?}");
            event_groups.extend(groups);
            continue;
        }
        assert!(
            rule.verbs
                .iter()
                .all(|verb| ["get", "list", "watch"].contains(&verb.as_str())),
            "write verbs on {resources:?}: {:?}",
            rule.verbs
        );
        for group in &groups {
            for resource in &resources {
                readable.insert(format!("{group}/{resource}"));
            }
        }
    }
    assert_eq!(
        readable,
        BTreeSet::from([
            "/nodes".to_owned(),
            "/services".to_owned(),
            "discovery.k8s.io/endpointslices".to_owned(),
        ])
    );
    assert_eq!(
        event_groups,
        BTreeSet::from([String::new(), "events.k8s.io".to_owned()])
    );

    let binding: ClusterRoleBinding = the(&docs, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, name_of(&role.metadata));
    let account: ServiceAccount = the(&docs, "ServiceAccount");
    let subjects = binding.subjects.expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, name_of(&account.metadata));
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
}

#[test]
fn the_daemonset_runs_the_agent_on_every_node_in_the_host_network() {
    let docs = deploy();
    let daemonset: DaemonSet = the(&docs, "DaemonSet");
    let account: ServiceAccount = the(&docs, "ServiceAccount");
    let pod = pod_spec(&daemonset);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some(name_of(&account.metadata))
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // The cluster DNS is a Service the agent has to translate first.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert!(pod.termination_grace_period_seconds.is_some());
    // A toleration without key and effect, operator Exists: every taint.
    assert!(
        pod.tolerations.iter().flatten().any(|toleration| {
            toleration.operator.as_deref() == Some("Exists")
                && toleration.key.is_none()
                && toleration.effect.is_none()
        }),
        "must tolerate every taint: {:?}",
        pod.tolerations
    );
    let strategy = daemonset
        .spec
        .as_ref()
        .and_then(|spec| spec.update_strategy.as_ref())
        .expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|rolling| rolling.max_unavailable.as_ref()),
        Some(&IntOrString::Int(1))
    );

    let container = agent_container(&daemonset);
    let env = container.env.as_deref().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|var| var.name == "NODE_NAME")
        .and_then(|var| var.value_from.as_ref())
        .and_then(|from| from.field_ref.as_ref())
        .expect("NODE_NAME from the downward API");
    assert_eq!(node_name.field_path, "spec.nodeName");
    // Values from the ConfigMap are optional, so the base works as shipped.
    for var in env {
        if let Some(key_ref) = var
            .value_from
            .as_ref()
            .and_then(|from| from.config_map_key_ref.as_ref())
        {
            assert_eq!(key_ref.name, "kpr-config", "{}", var.name);
            assert_eq!(key_ref.optional, Some(true), "{}", var.name);
        }
    }
    let args = container.args.as_deref().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    assert!(args.iter().any(|arg| arg == "--keep-state"), "{args:?}");
    let requests = container
        .resources
        .as_ref()
        .and_then(|resources| resources.requests.as_ref())
        .expect("resource requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
}

/// The capability table of manifests/deploy/README.md: the first cell of each row that
/// is a capability name.
fn documented_capabilities() -> Vec<String> {
    read(&manifests_dir("deploy").join("README.md"))
        .lines()
        .filter_map(|line| line.strip_prefix('|'))
        .filter_map(|row| row.split('|').next())
        .map(str::trim)
        .filter(|cell| !cell.is_empty() && cell.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_daemonset_has_the_documented_capabilities_and_no_more() {
    let docs = deploy();
    let daemonset: DaemonSet = the(&docs, "DaemonSet");
    let pod = pod_spec(&daemonset);
    let container = agent_container(&daemonset);
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added = capabilities.add.clone().unwrap_or_default();
    assert_eq!(added, CAPABILITIES);
    assert_eq!(documented_capabilities(), CAPABILITIES);
    assert!(pod.host_pid != Some(true) && pod.host_ipc != Some(true));

    // Exactly the host paths the agent uses: the bpffs for its pins, the cgroup tree
    // (read-only) for the cgroup hooks, /run/kpr for the names file `kpr inspect`
    // reads.
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let mut host_paths = BTreeSet::new();
    for mount in mounts {
        // The API server allows Bidirectional only in privileged containers.
        assert_ne!(
            mount.mount_propagation.as_deref(),
            Some("Bidirectional"),
            "{}",
            mount.mount_path
        );
        let Some(host_path) = volume(pod, &mount.name).host_path.as_ref() else {
            continue;
        };
        assert_eq!(
            host_path.path, mount.mount_path,
            "mounted where the host has it"
        );
        let read_only = mount.read_only == Some(true);
        match host_path.path.as_str() {
            "/sys/fs/bpf" => assert!(!read_only, "pins are written"),
            "/sys/fs/cgroup" => assert!(read_only, "the cgroup tree is only read"),
            "/run/kpr" => assert!(!read_only, "the names file is written"),
            other => panic!("unexpected host path {other}"),
        }
        host_paths.insert(host_path.path.clone());
    }
    assert_eq!(
        host_paths,
        BTreeSet::from([
            "/run/kpr".to_owned(),
            "/sys/fs/bpf".to_owned(),
            "/sys/fs/cgroup".to_owned()
        ])
    );
}

#[test]
fn the_probes_ports_and_mounts_match_the_configuration() {
    let docs = deploy();
    let daemonset: DaemonSet = the(&docs, "DaemonSet");
    let pod = pod_spec(&daemonset);
    let container = agent_container(&daemonset);
    let config = proxy_userspace::config::parse(&shipped_config(&docs))
        .expect("the shipped configuration is accepted by the agent");
    let bound = |address: Option<&String>, name: &str| -> u16 {
        address
            .unwrap_or_else(|| panic!("the configuration sets {name}"))
            .parse::<SocketAddr>()
            .unwrap_or_else(|error| panic!("{name}: {error}"))
            .port()
    };
    let healthz = bound(config.healthz_bind_address.as_ref(), "healthzBindAddress");
    let metrics = bound(config.metrics_bind_address.as_ref(), "metricsBindAddress");
    assert_eq!(healthz, 10256);
    // Least exposure, as kube-proxy's default: metrics on the loopback only.
    assert!(config
        .metrics_bind_address
        .as_deref()
        .and_then(|address| address.parse::<SocketAddr>().ok())
        .is_some_and(|address| address.ip().is_loopback()));

    for (probe, path) in [
        (container.readiness_probe.as_ref(), "/healthz"),
        (container.liveness_probe.as_ref(), "/livez"),
    ] {
        let get = probe
            .and_then(|probe| probe.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(http_port(&get.port), i32::from(healthz), "{path}");
    }
    let port = |name: &str| {
        container
            .ports
            .iter()
            .flatten()
            .find(|port| port.name.as_deref() == Some(name))
            .map(|port| port.container_port)
            .unwrap_or_else(|| panic!("no port {name}"))
    };
    assert_eq!(port("healthz"), i32::from(healthz));
    assert_eq!(port("metrics"), i32::from(metrics));

    // --config names the file the ConfigMap volume puts in place.
    let args = container.args.as_deref().unwrap_or_default();
    let config_path = args
        .iter()
        .find_map(|arg| arg.strip_prefix("--config="))
        .expect("--config=FILE");
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let config_mount = mounts
        .iter()
        .find(|mount| {
            volume(pod, &mount.name)
                .config_map
                .as_ref()
                .is_some_and(|source| source.name == "kpr-config")
        })
        .expect("kpr-config is mounted");
    let item = volume(pod, &config_mount.name)
        .config_map
        .as_ref()
        .and_then(|source| source.items.as_ref())
        .and_then(|items| items.iter().find(|item| item.key == "config.yaml"))
        .expect("the config.yaml item");
    assert_eq!(
        Path::new(config_path),
        Path::new(&config_mount.mount_path).join(&item.path)
    );
    assert_eq!(config_path, "/etc/kpr/config.yaml");

    // The pin directory is on the host's bpffs mount.
    let bpffs = config.bpffs.expect("the configuration sets bpffs");
    assert!(
        mounts.iter().any(|mount| {
            volume(pod, &mount.name)
                .host_path
                .as_ref()
                .is_some_and(|host| host.path == "/sys/fs/bpf")
                && bpffs.starts_with(&mount.mount_path)
        }),
        "{} is not under the bpffs mount",
        bpffs.display()
    );

    // The cgroup the socket-layer hooks go on is in the host's cgroup tree mount.
    let cgroup = config
        .cgroup_path
        .expect("the configuration sets cgroupPath");
    assert!(
        mounts.iter().any(|mount| {
            volume(pod, &mount.name)
                .host_path
                .as_ref()
                .is_some_and(|host| host.path == "/sys/fs/cgroup")
                && cgroup.starts_with(&mount.mount_path)
        }),
        "{} is not under the cgroup mount",
        cgroup.display()
    );
}

#[test]
fn the_shipped_configuration_has_the_expected_settings() {
    let text = shipped_config(&deploy());
    let config: Value = serde_yaml::from_str(&text).expect("config.yaml is YAML");
    let keys = |value: &Value| -> BTreeSet<String> {
        value
            .as_mapping()
            .expect("a mapping")
            .keys()
            .filter_map(|key| key.as_str().map(str::to_owned))
            .collect()
    };
    let expected = |names: &[&str]| -> BTreeSet<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    };
    assert_eq!(
        keys(&config),
        expected(&[
            "apiVersion",
            "kind",
            "healthzBindAddress",
            "metricsBindAddress",
            "minSyncPeriod",
            "conntrack",
            "bpffs",
            "podInterfaces",
            "cgroupPath",
            "socketLb",
        ])
    );
    assert_eq!(
        keys(&config["conntrack"]),
        expected(&[
            "maxPerCore",
            "min",
            "tcpEstablishedTimeout",
            "tcpCloseWaitTimeout",
            "udpTimeout",
        ])
    );
    assert_eq!(config["kind"], "KubeProxyConfiguration");
    let parsed = proxy_userspace::config::parse(&text).expect("accepted by the agent");
    assert_eq!(parsed.bpffs.as_deref(), Some(Path::new("/sys/fs/bpf/kpr")));
    // Host-network clients are translated on a production node: the hooks go on the
    // host's cgroup2 root.
    assert_eq!(
        parsed.cgroup_path.as_deref(),
        Some(Path::new("/sys/fs/cgroup"))
    );
    // ... and pods are translated at connect() too.
    assert_eq!(
        parsed.socket_lb,
        Some(proxy_userspace::socket_lb::Mode::All)
    );

    // The settings shown commented out are valid when an operator uncomments them.
    let mut uncommented = 0;
    let enabled: String = text
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            match trimmed.strip_prefix("# ") {
                Some(setting)
                    if ["clusterCIDR:", "nodePortAddresses:"]
                        .iter()
                        .any(|name| setting.starts_with(name)) =>
                {
                    uncommented += 1;
                    format!("{}{setting}\n", &line[..line.len() - trimmed.len()])
                }
                _ => format!("{line}\n"),
            }
        })
        .collect();
    assert_eq!(uncommented, 2, "clusterCIDR and nodePortAddresses examples");
    let parsed = proxy_userspace::config::parse(&enabled).expect("uncommented examples");
    assert!(parsed.cluster_cidr.is_some() && parsed.node_port_addresses.is_some());
}

#[test]
fn the_kustomization_lists_every_file_and_names_the_image() {
    let dir = manifests_dir("deploy");
    let docs = documents(&dir);
    let kustomization = docs
        .iter()
        .find(|doc| doc.kind() == "Kustomization")
        .expect("kustomization.yaml");
    assert_eq!(kustomization.file, "kustomization.yaml");
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_sequence()
            .expect("a list")
            .iter()
            .map(|item| item.as_str().expect("a string").to_owned())
            .collect()
    };
    let mut listed = strings(&kustomization.value["resources"]);
    listed.sort();
    let mut files: Vec<String> = yaml_files(&dir)
        .iter()
        .filter_map(|path| path.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name != "kustomization.yaml")
        .collect();
    files.sort();
    assert_eq!(listed, files);

    let image_names: Vec<&str> = kustomization.value["images"]
        .as_sequence()
        .expect("images")
        .iter()
        .filter_map(|image| image["name"].as_str())
        .collect();
    let daemonset: DaemonSet = the(&docs, "DaemonSet");
    let image = agent_container(&daemonset).image.clone().expect("image");
    let name = image
        .split_once(':')
        .map_or(image.as_str(), |(name, _)| name);
    assert!(
        image_names.contains(&name),
        "{image} not in {image_names:?}"
    );
}

#[test]
fn the_containerfile_follows_the_toolchain_recipe() {
    let containerfile = read(&repo_root().join("Containerfile"));
    for package in ebpf_toolchain::APT_PACKAGES {
        assert!(
            containerfile
                .split_whitespace()
                .any(|word| word == *package),
            "Containerfile does not install {package}"
        );
    }
    assert!(
        containerfile.contains(&format!(
            "ARG BPF_LINKER_VERSION={}\n",
            ebpf_toolchain::BPF_LINKER_VERSION
        )),
        "bpf-linker version differs from xtask's"
    );
    for needed in [
        format!("LLVM_SYS_221_PREFIX={}", ebpf_toolchain::LLVM_PREFIX),
        "--features llvm-22".to_owned(),
        "--package proxy-userspace --bin kpr".to_owned(),
        "ENTRYPOINT [\"/usr/local/bin/kpr\"]".to_owned(),
    ] {
        assert!(
            containerfile.contains(&needed),
            "Containerfile lacks {needed}"
        );
    }

    // The build context keeps what the build reads (the workspace's members and the
    // toolchain file the build script includes) and drops the build output.
    let ignored: Vec<String> = read(&repo_root().join(".dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.trim_end_matches('/').to_owned())
        .collect();
    assert!(ignored.iter().any(|line| line == "target"), "{ignored:?}");
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "proxy-common",
        "proxy-ebpf",
        "proxy-userspace",
        "xtask",
        "tests",
    ] {
        assert!(
            !ignored.iter().any(|line| line == needed),
            "{needed} must stay in the build context"
        );
    }
}
