//! The names behind the maps' numbers, for `kpr inspect` and `kpr trace`.
//!
//! The maps hold what the datapath needs: addresses, ports, service ids, backend ids.
//! An operator needs `namespace/name`, the port's name, the frontend's type and which
//! pod a backend is. The agent knows all of that after each sync pass and writes it to
//! a small JSON file; the tools join it with the maps (the maps stay the truth about
//! what the datapath does, the file only names things).
//!
//! Why a file and not a map: the names are strings of any length that only userspace
//! reads, so they need no fixed kernel layout, no versioned map name and no kernel
//! memory; and a pin directory cannot hold one (bpffs has no regular files). So the
//! file lives in `/run/kpr/` (tmpfs: gone at reboot, like the pins), named after the
//! pin directory so that agents on different pin directories never share one; 0600,
//! because it lists the cluster's services and pods, which the pins (root's) also
//! guard. It is replaced atomically (write, then rename), so a reader never sees half
//! of it; it goes with the pins on exit and stays with `--keep-state`.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    model::{Desired, FrontendKind, ServicePortName},
    state::{ClusterState, EndpointAddress, ObjectKey},
};

/// Where names files live.
pub const RUN_DIR: &str = "/run/kpr";

/// The layout version of the file; a reader refuses others.
pub const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a names file of this version")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The names file of the agent using `pin_dir`: `/run/kpr/<pin dir, / as ->.names.json`
/// (`/sys/fs/bpf/kpr` gives `/run/kpr/sys-fs-bpf-kpr.names.json`).
#[must_use]
pub fn path_for(pin_dir: &Path) -> PathBuf {
    let absolute = std::path::absolute(pin_dir).unwrap_or_else(|_| pin_dir.to_path_buf());
    let text = absolute.to_string_lossy();
    let escaped: String = text
        .trim_matches('/')
        .chars()
        .map(|c| if c == '/' { '-' } else { c })
        .collect();
    Path::new(RUN_DIR).join(format!("{escaped}.names.json"))
}

/// A service port by its id in the maps.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServicePortNames {
    pub service_id: u32,
    pub namespace: String,
    pub name: String,
    /// The port's name (empty for a single unnamed port, as the API allows).
    pub port: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// The Service's `spec.type`.
    pub service_type: String,
    /// `Cluster` or `Local`, as the spec says (unset: `Cluster`).
    pub internal_traffic_policy: String,
    pub external_traffic_policy: String,
}

/// A frontend (one address the service port answers on) and its kind.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FrontendNames {
    pub address: SocketAddrV4,
    pub protocol: String,
    /// [`proxy_common::scope`].
    pub scope: u8,
    /// `ClusterIP`, `NodePort`, `externalIP` or `LoadBalancer`.
    pub kind: String,
    pub service_id: u32,
}

/// One endpoint of a service as its EndpointSlices describe it. The agent keeps the
/// names it last wrote (one of these per endpoint, half a million at 50 000 services),
/// so the strings every endpoint of a slice repeats are shared, not copied.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EndpointNames {
    #[serde(with = "shared_text")]
    pub namespace: Arc<str>,
    /// The service the endpoint belongs to.
    #[serde(with = "shared_text")]
    pub service: Arc<str>,
    pub address: Ipv4Addr,
    /// `targetRef` name when it is a Pod.
    pub pod: Option<Box<str>>,
    #[serde(with = "shared_text::optional")]
    pub node: Option<Arc<str>>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// Shared strings as JSON strings (serde's own impls for `Arc` need its `rc` feature,
/// which would rebuild every crate that uses serde).
mod shared_text {
    use std::sync::Arc;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(text: &Arc<str>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Arc<str>, D::Error> {
        String::deserialize(deserializer).map(Arc::from)
    }

    pub mod optional {
        use std::sync::Arc;

        use serde::{Deserialize as _, Deserializer, Serializer};

        #[expect(
            clippy::ref_option,
            reason = "serde's `with` passes the field by reference"
        )]
        pub fn serialize<S: Serializer>(
            text: &Option<Arc<str>>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match text {
                Some(text) => serializer.serialize_some(&**text),
                None => serializer.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Arc<str>>, D::Error> {
            Option::<String>::deserialize(deserializer).map(|text| text.map(Arc::from))
        }
    }
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Names {
    pub version: u32,
    pub service_ports: Vec<ServicePortNames>,
    pub frontends: Vec<FrontendNames>,
    pub endpoints: Vec<EndpointNames>,
}

impl Names {
    /// A digest of the names: what the agent keeps of the names it last wrote, to
    /// tell whether the next ones differ, instead of the names themselves (tens of
    /// MiB at 50 000 services). Two different sets of names with one digest (a 64-bit
    /// hash: odds of 2^-64 per change) would leave the file one change behind until
    /// the next.
    #[must_use]
    pub fn digest(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::hash::DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }
}

/// The kind's name as operators know it (`kubectl get svc` columns, the API's fields).
#[must_use]
pub fn kind_name(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIp => "ClusterIP",
        FrontendKind::NodePort => "NodePort",
        FrontendKind::ExternalIp => "externalIP",
        FrontendKind::LoadBalancer => "LoadBalancer",
    }
}

/// Upper-case protocol name, as the API spells it.
#[must_use]
pub fn protocol_name(number: u8) -> String {
    match number {
        proxy_common::proto::TCP => "TCP".into(),
        proxy_common::proto::UDP => "UDP".into(),
        proxy_common::proto::SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

/// The names of everything `desired` programs, with the ids `service_id` gives (the
/// syncer's); service ports without an id (not programmed) are left out.
#[must_use]
pub fn collect(
    state: &ClusterState,
    desired: &Desired,
    service_id: impl Fn(&ServicePortName) -> Option<u32>,
) -> Names {
    let mut service_ports: BTreeMap<u32, ServicePortNames> = BTreeMap::new();
    let mut frontends = Vec::new();
    for (key, spec) in &desired.frontends {
        let Some(id) = service_id(&spec.service_port) else {
            continue;
        };
        service_ports
            .entry(id)
            .or_insert_with(|| port_names(state, &spec.service_port, id));
        frontends.push(FrontendNames {
            address: SocketAddrV4::new(key.addr, key.port),
            protocol: protocol_name(key.proto),
            scope: key.scope,
            kind: kind_name(spec.kind).to_owned(),
            service_id: id,
        });
    }
    let services: std::collections::BTreeSet<&ObjectKey> = desired
        .frontends
        .values()
        .map(|spec| &spec.service_port.service)
        .collect();
    let mut endpoints = Vec::new();
    for (key, slice) in &state.endpoint_slices {
        let Some(service) = slice.service_name.as_deref() else {
            continue;
        };
        if !services.contains(&ObjectKey::new(Arc::clone(&key.namespace), service)) {
            continue;
        }
        let namespace: Arc<str> = Arc::clone(&key.namespace);
        let service: Arc<str> = service.into();
        for endpoint in &slice.endpoints {
            let EndpointAddress::V4(address) = endpoint.address else {
                continue;
            };
            endpoints.push(EndpointNames {
                namespace: Arc::clone(&namespace),
                service: Arc::clone(&service),
                address,
                pod: endpoint.pod.clone(),
                node: endpoint.node_name.clone(),
                ready: endpoint.ready,
                serving: endpoint.serving,
                terminating: endpoint.terminating,
            });
        }
    }
    endpoints.sort_by(|a, b| {
        (&a.namespace, &a.service, a.address).cmp(&(&b.namespace, &b.service, b.address))
    });
    endpoints.dedup_by(|a, b| {
        (&a.namespace, &a.service, a.address) == (&b.namespace, &b.service, b.address)
    });
    Names {
        version: VERSION,
        service_ports: service_ports.into_values().collect(),
        frontends,
        endpoints,
    }
}

fn port_names(state: &ClusterState, name: &ServicePortName, service_id: u32) -> ServicePortNames {
    let spec = state
        .services
        .get(&name.service)
        .and_then(|service| service.spec.as_ref());
    let policy = |value: Option<&str>| value.unwrap_or("Cluster").to_owned();
    ServicePortNames {
        service_id,
        namespace: name.service.namespace.to_string(),
        name: name.service.name.to_string(),
        port: name.port.clone(),
        protocol: protocol_name(name.proto),
        service_type: spec
            .and_then(|spec| spec.type_.as_deref())
            .unwrap_or("ClusterIP")
            .to_owned(),
        internal_traffic_policy: policy(spec.and_then(|s| s.internal_traffic_policy.as_deref())),
        external_traffic_policy: policy(spec.and_then(|s| s.external_traffic_policy.as_deref())),
    }
}

/// Replaces the file at `path` with `names` (0600; a reader sees the old or the new
/// file whole).
///
/// # Errors
/// When the directory or the file cannot be written.
pub fn write(path: &Path, names: &Names) -> Result<(), Error> {
    let error = |source| Error::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    let temporary = path.with_extension("json.tmp");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(error)?;
    // Written as it is serialized: at 500 000 endpoints the text would be ~100 MB.
    let mut writer = std::io::BufWriter::new(file);
    serde_json::to_writer(&mut writer, names).map_err(|source| error(source.into()))?;
    writer
        .into_inner()
        .map_err(|failed| error(failed.into_error()))?;
    std::fs::rename(&temporary, path).map_err(error)
}

/// Reads the file at `path`; `Ok(None)` when there is none (no agent wrote it yet).
///
/// # Errors
/// When it exists but cannot be read or is not a names file of [`VERSION`].
pub fn read(path: &Path) -> Result<Option<Names>, Error> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Read {
                path: path.display().to_string(),
                source,
            })
        }
    };
    let names: Names = serde_json::from_slice(&text).map_err(|source| Error::Parse {
        path: path.display().to_string(),
        source,
    })?;
    if names.version != VERSION {
        return Ok(None);
    }
    Ok(Some(names))
}

/// Removes the file (the agent's exit without `--keep-state`, `kpr cleanup`).
pub fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed the names file"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot remove the names file")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_follows_the_pin_directory() {
        assert_eq!(
            path_for(Path::new("/sys/fs/bpf/kpr")),
            Path::new("/run/kpr/sys-fs-bpf-kpr.names.json")
        );
        assert_ne!(
            path_for(Path::new("/sys/fs/bpf/a")),
            path_for(Path::new("/sys/fs/bpf/b"))
        );
    }

    #[test]
    fn a_written_file_reads_back_whole_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("kpr-names-{}", std::process::id()));
        let path = dir.join("x.names.json");
        let names = Names {
            version: VERSION,
            service_ports: vec![ServicePortNames {
                service_id: 7,
                namespace: "default".into(),
                name: "web".into(),
                port: "http".into(),
                protocol: "TCP".into(),
                service_type: "NodePort".into(),
                internal_traffic_policy: "Cluster".into(),
                external_traffic_policy: "Local".into(),
            }],
            frontends: Vec::new(),
            endpoints: Vec::new(),
        };
        write(&path, &names).expect("write");
        assert_eq!(read(&path).expect("read"), Some(names));
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        remove(&path);
        assert_eq!(read(&path).expect("read"), None);
        let _ = std::fs::remove_dir(&dir);
    }
}
