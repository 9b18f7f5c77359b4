//! The deployment manifests and the example manifests, checked as data: every document
//! parses, RBAC is read-only where it must be, and the DaemonSet gives the agent what
//! it needs and no more.
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_yaml::Value;

fn manifests_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests")
        .join(sub)
}

/// Every YAML document under `dir`, with its file name.
fn documents(dir: &Path) -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("manifest dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let name = file
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(document).unwrap_or_else(|error| panic!("{name}: {error}"));
            if !value.is_null() {
                out.push((name.clone(), value));
            }
        }
    }
    out
}

fn find<'a>(docs: &'a [(String, Value)], kind: &str) -> &'a Value {
    docs.iter()
        .map(|(_, doc)| doc)
        .find(|doc| doc["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_document_has_identity() {
    for dir in ["deploy", "examples"] {
        for (file, doc) in documents(&manifests_dir(dir)) {
            if doc["kind"] == "Kustomization" {
                continue;
            }
            for field in ["apiVersion", "kind"] {
                assert!(doc[field].as_str().is_some(), "{file}: no {field}");
            }
            assert!(
                doc["metadata"]["name"].as_str().is_some(),
                "{file}: no metadata.name"
            );
        }
    }
}

#[test]
fn the_cluster_role_reads_and_only_writes_events() {
    let docs = documents(&manifests_dir("deploy"));
    let role = find(&docs, "ClusterRole");
    let mut readable = Vec::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let resources = strings(&rule["resources"]);
        let verbs = strings(&rule["verbs"]);
        if resources == ["events"] {
            continue;
        }
        assert!(
            verbs
                .iter()
                .all(|verb| ["get", "list", "watch"].contains(&verb.as_str())),
            "write verbs on {resources:?}: {verbs:?}"
        );
        readable.extend(resources);
    }
    readable.sort();
    assert_eq!(readable, ["endpointslices", "nodes", "services"]);
    let binding = find(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["name"],
        find(&docs, "ServiceAccount")["metadata"]["name"]
    );
}

#[test]
fn the_daemonset_has_what_the_agent_needs_and_no_more() {
    let docs = documents(&manifests_dir("deploy"));
    let daemonset = find(&docs, "DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(
        pod["serviceAccountName"],
        find(&docs, "ServiceAccount")["metadata"]["name"]
    );
    assert!(
        pod["tolerations"]
            .as_sequence()
            .expect("tolerations")
            .iter()
            .any(|t| t["operator"] == "Exists"),
        "must run on every node"
    );
    let container = &pod["containers"][0];
    let node_name = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .find(|env| env["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let security = &container["securityContext"];
    assert_ne!(security["privileged"], true);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        strings(&security["capabilities"]["add"]),
        ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"]
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], 10256);
    let mounts: Vec<String> = container["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .filter_map(|mount| mount["mountPath"].as_str().map(str::to_owned))
        .collect();
    for needed in ["/sys/fs/bpf", "/sys/fs/cgroup", "/etc/kpr"] {
        assert!(
            mounts.iter().any(|mount| mount == needed),
            "{needed} not mounted: {mounts:?}"
        );
    }
    // The agent reads the ConfigMap's file: it must be a valid configuration.
    let config_map = find(&docs, "ConfigMap");
    let text = config_map["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml");
    proxy_userspace::config::parse(text)
        .expect("the shipped configuration is accepted by the agent");
    let args = strings(&container["args"]);
    assert!(
        args.contains(&"--config=/etc/kpr/config.yaml".to_owned()),
        "{args:?}"
    );
}

#[test]
fn the_kustomization_lists_every_file() {
    let dir = manifests_dir("deploy");
    let docs = documents(&dir);
    let mut listed = strings(&find(&docs, "Kustomization")["resources"]);
    listed.sort();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    files.sort();
    assert_eq!(listed, files);
}
