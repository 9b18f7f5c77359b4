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
    net::{IpAddr, SocketAddr},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    family::Family,
    model::{Desired, FrontendKind, ServicePortName},
    state::{AddressType, ClusterState, ObjectKey},
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendNames {
    /// `10.96.0.10:80` or `[fd00::10]:80` (a file of an IPv4-only agent reads the same).
    pub address: SocketAddr,
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointNames {
    #[serde(with = "shared_text")]
    pub namespace: Arc<str>,
    /// The service the endpoint belongs to.
    #[serde(with = "shared_text")]
    pub service: Arc<str>,
    /// Either family: a dual-stack service lists its IPv4 and IPv6 endpoints.
    pub address: IpAddr,
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Names {
    pub version: u32,
    pub service_ports: Vec<ServicePortNames>,
    pub frontends: Vec<FrontendNames>,
    pub endpoints: Vec<EndpointNames>,
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

/// The service id a family's syncer gave a service port (`None`: not programmed in
/// that family). A dual-stack service port has one per family.
pub trait ServiceIds: Fn(&AddressType, &ServicePortName) -> Option<u32> {}

impl<T: Fn(&AddressType, &ServicePortName) -> Option<u32>> ServiceIds for T {}

/// The names of everything `desired` programs in both families, with the ids
/// `service_id` gives (the syncers'); service ports without an id (not programmed)
/// are left out.
#[must_use]
pub fn collect(state: &ClusterState, desired: &Desired, service_id: impl ServiceIds) -> Names {
    let ports = programmed_ports(desired, &service_id);
    Names {
        version: VERSION,
        service_ports: ports
            .iter()
            .map(|(id, name)| port_names(state, name, *id))
            .collect(),
        frontends: frontend_names(desired, &service_id).collect(),
        endpoints: endpoint_names(&endpoint_groups(state, desired)).collect(),
    }
}

/// The programmed service ports of both families by id (the families' ids are
/// disjoint: [`Family::SERVICE_IDS`]).
fn programmed_ports<'d>(
    desired: &'d Desired,
    service_id: &impl ServiceIds,
) -> BTreeMap<u32, &'d ServicePortName> {
    let mut ports = BTreeMap::new();
    family_ports::<std::net::Ipv4Addr>(desired, service_id, &mut ports);
    family_ports::<std::net::Ipv6Addr>(desired, service_id, &mut ports);
    ports
}

fn family_ports<'d, F: Family>(
    desired: &'d Desired,
    service_id: &impl ServiceIds,
    ports: &mut BTreeMap<u32, &'d ServicePortName>,
) {
    ports.extend(F::part(desired).frontends.values().filter_map(|spec| {
        Some((
            service_id(&F::ADDRESS_TYPE, &spec.service_port)?,
            &spec.service_port,
        ))
    }));
}

fn frontend_names<'d>(
    desired: &'d Desired,
    service_id: &'d impl ServiceIds,
) -> impl Iterator<Item = FrontendNames> + 'd {
    family_frontend_names::<std::net::Ipv4Addr>(desired, service_id).chain(family_frontend_names::<
        std::net::Ipv6Addr,
    >(
        desired, service_id
    ))
}

fn family_frontend_names<'d, F: Family>(
    desired: &'d Desired,
    service_id: &'d impl ServiceIds,
) -> impl Iterator<Item = FrontendNames> + 'd {
    F::part(desired).frontends.iter().filter_map(|(key, spec)| {
        Some(FrontendNames {
            address: SocketAddr::new(key.addr.into(), key.port),
            protocol: protocol_name(key.proto),
            scope: key.scope,
            kind: kind_name(spec.kind).to_owned(),
            service_id: service_id(&F::ADDRESS_TYPE, &spec.service_port)?,
        })
    })
}

/// The slices of each service with a frontend, by (namespace, service name): the
/// order the endpoints are listed in.
type EndpointGroups<'s> = BTreeMap<(Arc<str>, &'s str), Vec<&'s crate::state::SliceInfo>>;

fn endpoint_groups<'s>(state: &'s ClusterState, desired: &Desired) -> EndpointGroups<'s> {
    let services: std::collections::BTreeSet<&ObjectKey> = desired
        .v4
        .frontends
        .values()
        .map(|spec| &spec.service_port.service)
        .chain(
            desired
                .v6
                .frontends
                .values()
                .map(|spec| &spec.service_port.service),
        )
        .collect();
    let mut groups = EndpointGroups::new();
    for (key, slice) in &state.endpoint_slices {
        let Some(service) = slice.service_name.as_deref() else {
            continue;
        };
        if !services.contains(&ObjectKey::new(Arc::clone(&key.namespace), service)) {
            continue;
        }
        groups
            .entry((Arc::clone(&key.namespace), service))
            .or_default()
            .push(slice);
    }
    groups
}

/// Every endpoint of each group, by address, once (slices of one service may repeat
/// an address); one group at a time, so a writer never holds them all.
fn endpoint_names<'g>(groups: &'g EndpointGroups<'_>) -> impl Iterator<Item = EndpointNames> + 'g {
    groups.iter().flat_map(|((namespace, service), slices)| {
        let service: Arc<str> = (*service).into();
        let mut endpoints: Vec<EndpointNames> = slices
            .iter()
            .flat_map(|slice| slice.endpoints.iter())
            .filter_map(|endpoint| {
                let address = endpoint.address().ip()?;
                Some(EndpointNames {
                    namespace: Arc::clone(namespace),
                    service: Arc::clone(&service),
                    address,
                    pod: endpoint.pod().map(|pod| (**pod).into()),
                    node: endpoint.node_name().cloned(),
                    ready: endpoint.ready(),
                    serving: endpoint.serving(),
                    terminating: endpoint.terminating(),
                })
            })
            .collect();
        // Stable: of one address, the first slice's endpoint stays.
        endpoints.sort_by_key(|endpoint| endpoint.address);
        endpoints.dedup_by_key(|endpoint| endpoint.address);
        endpoints
    })
}

/// What [`write_current`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// The file now holds names with this digest.
    Replaced(u64),
    /// The names were those of the digest given: the file was left as it was.
    Unchanged,
}

/// Writes the names of what `desired` programs to `path` as [`collect`] would give
/// them, without holding them all (at 50 000 services of 10 endpoints they were 78
/// MiB, on top of everything else the agent holds after a pass): each is serialized
/// as it is made. `previous`: the digest of the file's content (a 64-bit hash of its
/// bytes); names that serialize to the same digest leave the file as it is.
///
/// # Errors
/// When the directory or the file cannot be written.
pub fn write_current(
    path: &Path,
    state: &ClusterState,
    desired: &Desired,
    service_id: impl ServiceIds,
    previous: Option<u64>,
) -> Result<Written, Error> {
    let ports = programmed_ports(desired, &service_id);
    let groups = endpoint_groups(state, desired);
    let view = NamesView {
        service_ports: Streamed(std::cell::Cell::new(Some(
            ports.iter().map(|(id, name)| port_names(state, name, *id)),
        ))),
        frontends: Streamed(std::cell::Cell::new(Some(frontend_names(
            desired,
            &service_id,
        )))),
        endpoints: Streamed(std::cell::Cell::new(Some(endpoint_names(&groups)))),
    };
    replace_file(path, previous, |writer| {
        serde_json::to_writer(writer, &view).map_err(std::io::Error::from)
    })
}

/// [`Names`], its lists made as they are serialized (the same fields in the same
/// order, so [`read`] takes the file either way).
struct NamesView<A, B, C> {
    service_ports: Streamed<A>,
    frontends: Streamed<B>,
    endpoints: Streamed<C>,
}

impl<A, B, C> Serialize for NamesView<A, B, C>
where
    A: Iterator<Item = ServicePortNames>,
    B: Iterator<Item = FrontendNames>,
    C: Iterator<Item = EndpointNames>,
{
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut names = serializer.serialize_struct("Names", 4)?;
        names.serialize_field("version", &VERSION)?;
        names.serialize_field("service_ports", &self.service_ports)?;
        names.serialize_field("frontends", &self.frontends)?;
        names.serialize_field("endpoints", &self.endpoints)?;
        names.end()
    }
}

/// A list serialized from an iterator, once.
struct Streamed<I>(std::cell::Cell<Option<I>>);

impl<I> Serialize for Streamed<I>
where
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.take() {
            Some(items) => serializer.collect_seq(items),
            None => serializer.collect_seq(std::iter::empty::<I::Item>()),
        }
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
        port: name.port.to_string(),
        protocol: protocol_name(name.proto),
        service_type: spec
            .and_then(|spec| spec.type_.as_deref())
            .unwrap_or("ClusterIP")
            .to_owned(),
        internal_traffic_policy: policy(spec.and_then(|s| s.internal_traffic_policy.as_deref())),
        external_traffic_policy: policy(spec.and_then(|s| s.external_traffic_policy())),
    }
}

/// Replaces the file at `path` with `names` (0600; a reader sees the old or the new
/// file whole).
///
/// # Errors
/// When the directory or the file cannot be written.
pub fn write(path: &Path, names: &Names) -> Result<(), Error> {
    replace_file(path, None, |writer| {
        serde_json::to_writer(writer, names).map_err(std::io::Error::from)
    })
    .map(drop)
}

/// Writes what `fill` writes to a temporary file and renames it over `path` (0600),
/// unless its bytes have the digest `previous`.
fn replace_file(
    path: &Path,
    previous: Option<u64>,
    fill: impl FnOnce(&mut std::io::BufWriter<Digesting<std::fs::File>>) -> std::io::Result<()>,
) -> Result<Written, Error> {
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
    // Hashed in the buffer's large chunks (the hash does not depend on how the bytes
    // are cut).
    let mut writer = std::io::BufWriter::with_capacity(
        1 << 16,
        Digesting {
            inner: file,
            hasher: std::hash::DefaultHasher::new(),
        },
    );
    fill(&mut writer).map_err(error)?;
    let digesting = writer
        .into_inner()
        .map_err(|failed| error(failed.into_error()))?;
    let digest = std::hash::Hasher::finish(&digesting.hasher);
    drop(digesting);
    if previous == Some(digest) {
        std::fs::remove_file(&temporary).map_err(error)?;
        return Ok(Written::Unchanged);
    }
    std::fs::rename(&temporary, path).map_err(error)?;
    Ok(Written::Replaced(digest))
}

/// A writer that hashes what passes through it. Two different contents with one
/// digest (odds of 2^-64 per change) would leave the file one change behind, until
/// the next.
struct Digesting<W> {
    inner: W,
    hasher: std::hash::DefaultHasher,
}

impl<W: std::io::Write> std::io::Write for Digesting<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(bytes)?;
        std::hash::Hasher::write(&mut self.hasher, &bytes[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
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

    /// Two services, slices of one repeating an address (the first slice's wins), a
    /// slice of no service; ids for all but one port.
    fn cluster() -> (ClusterState, Desired) {
        let service = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
                 spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n---\n"
            )
        };
        let slice = |name: &str, service: &str, endpoints: &[(&str, &str)]| {
            let endpoints: Vec<String> = endpoints
                .iter()
                .map(|(ip, pod)| {
                    format!(
                        "{{addresses: [{ip}], conditions: {{ready: true}}, \
                         targetRef: {{kind: Pod, name: {pod}}}, nodeName: node-a}}"
                    )
                })
                .collect();
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, \
                 namespace: demo, labels: {{kubernetes.io/service-name: {service}}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n---\n",
                endpoints.join(", ")
            )
        };
        let text = [
            service("web", "10.96.0.10"),
            service("db", "10.96.0.11"),
            slice(
                "web-b",
                "web",
                &[("10.0.0.2", "web-2b"), ("10.0.0.3", "web-3")],
            ),
            slice(
                "web-a",
                "web",
                &[("10.0.0.2", "web-2a"), ("10.0.0.1", "web-1")],
            ),
            slice("db-a", "db", &[("10.0.1.1", "db-1")]),
            slice("gone-a", "gone", &[("10.0.9.9", "gone-1")]),
        ]
        .concat();
        let mut snapshot = crate::source::Snapshot::for_node(Some("node-a"));
        crate::source::manifests::parse_documents(&text, "test.yaml", &mut snapshot);
        let desired =
            crate::model::desired(&snapshot.state, &crate::model::ModelSettings::default());
        (snapshot.state, desired)
    }

    #[test]
    fn names_written_as_they_are_made_read_back_as_collected_and_unchanged_ones_stay() {
        let dir = std::env::temp_dir().join(format!("kpr-names-stream-{}", std::process::id()));
        let path = dir.join("x.names.json");
        let (state, desired) = cluster();
        let ids =
            |_: &AddressType, name: &ServicePortName| (&*name.service.name == "web").then_some(3);
        let collected = collect(&state, &desired, ids);
        let listed: Vec<(&str, String, Option<&str>)> = collected
            .endpoints
            .iter()
            .map(|e| (&*e.service, e.address.to_string(), e.pod.as_deref()))
            .collect();
        assert_eq!(
            listed,
            [
                ("db", "10.0.1.1".into(), Some("db-1")),
                ("web", "10.0.0.1".into(), Some("web-1")),
                // Of a repeated address, the first slice's endpoint.
                ("web", "10.0.0.2".into(), Some("web-2a")),
                ("web", "10.0.0.3".into(), Some("web-3")),
            ],
            "by service and address, once each, no slice without a service"
        );
        let Ok(Written::Replaced(digest)) = write_current(&path, &state, &desired, ids, None)
        else {
            panic!("the first write replaces the file");
        };
        assert_eq!(read(&path).expect("readable"), Some(collected));
        // The same names again: the file is not replaced.
        let modified = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .expect("stat");
        assert_eq!(
            write_current(&path, &state, &desired, ids, Some(digest)).expect("written"),
            Written::Unchanged
        );
        assert_eq!(
            std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .expect("stat"),
            modified
        );
        assert!(!path.with_extension("json.tmp").exists());
        // Other ids: other names.
        let all = |_: &AddressType, _: &ServicePortName| Some(4);
        assert!(matches!(
            write_current(&path, &state, &desired, all, Some(digest)),
            Ok(Written::Replaced(other)) if other != digest
        ));
        assert_eq!(
            read(&path).expect("readable"),
            Some(collect(&state, &desired, all))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A dual-stack service (IPv4 and IPv6 clusterIPs, a slice of each family) and an
    /// IPv6-only one: each family's frontends are named with that family's id, in
    /// `[addr]:port` form for IPv6, and the endpoints of both families are listed.
    #[test]
    fn both_families_are_named_each_with_its_own_id() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
             spec: {ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv4, IPv6], \
             clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00:96::10'], \
             ports: [{name: http, port: 80}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: six, namespace: demo}\n\
             spec: {ipFamilyPolicy: SingleStack, ipFamilies: [IPv6], \
             clusterIP: 'fd00:96::11', clusterIPs: ['fd00:96::11'], ports: [{port: 53, protocol: UDP}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-4, \
             namespace: demo, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\n\
             ports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.0.0.1], \
             conditions: {ready: true}, targetRef: {kind: Pod, name: web-1}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-6, \
             namespace: demo, labels: {kubernetes.io/service-name: web}}\naddressType: IPv6\n\
             ports: [{name: http, port: 8080}]\nendpoints: [{addresses: ['fd00:244::1'], \
             conditions: {ready: true}, targetRef: {kind: Pod, name: web-1}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: six-6, \
             namespace: demo, labels: {kubernetes.io/service-name: six}}\naddressType: IPv6\n\
             ports: [{port: 5353, protocol: UDP}]\nendpoints: [{addresses: ['fd00:244::2'], \
             conditions: {ready: false}, targetRef: {kind: Pod, name: six-1}}]\n";
        let mut snapshot = crate::source::Snapshot::for_node(Some("node-a"));
        crate::source::manifests::parse_documents(text, "test.yaml", &mut snapshot);
        let desired =
            crate::model::desired(&snapshot.state, &crate::model::ModelSettings::default());
        let ids = |family: &AddressType, name: &ServicePortName| {
            let base = match family {
                AddressType::IPv4 => 1,
                AddressType::IPv6 => 0x8000_0001,
                _ => return None,
            };
            Some(base + u32::from(&*name.service.name == "six"))
        };
        let names = collect(&snapshot.state, &desired, ids);
        let ports: Vec<(u32, &str)> = names
            .service_ports
            .iter()
            .map(|port| (port.service_id, port.name.as_str()))
            .collect();
        assert_eq!(
            ports,
            [(1, "web"), (0x8000_0001, "web"), (0x8000_0002, "six")]
        );
        let frontends: Vec<(String, &str, u32)> = names
            .frontends
            .iter()
            .map(|f| (f.address.to_string(), f.kind.as_str(), f.service_id))
            .collect();
        assert_eq!(
            frontends,
            [
                ("10.96.0.10:80".to_owned(), "ClusterIP", 1),
                ("[fd00:96::10]:80".to_owned(), "ClusterIP", 0x8000_0001),
                ("[fd00:96::11]:53".to_owned(), "ClusterIP", 0x8000_0002),
            ]
        );
        let endpoints: Vec<(&str, String, Option<&str>, bool)> = names
            .endpoints
            .iter()
            .map(|e| {
                (
                    &*e.service,
                    e.address.to_string(),
                    e.pod.as_deref(),
                    e.ready,
                )
            })
            .collect();
        assert_eq!(
            endpoints,
            [
                ("six", "fd00:244::2".to_owned(), Some("six-1"), false),
                ("web", "10.0.0.1".to_owned(), Some("web-1"), true),
                ("web", "fd00:244::1".to_owned(), Some("web-1"), true),
            ]
        );
        // Through the file and back, as `kpr inspect` reads it.
        let dir = std::env::temp_dir().join(format!("kpr-names-v6-{}", std::process::id()));
        let path = dir.join("x.names.json");
        write_current(&path, &snapshot.state, &desired, ids, None).expect("written");
        assert_eq!(read(&path).expect("readable"), Some(names));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The file of an agent that named IPv4 only (`SocketAddrV4`, `Ipv4Addr`) reads.
    #[test]
    fn an_ipv4_only_file_still_reads() {
        let text = r#"{"version":1,"service_ports":[],"frontends":[{"address":"10.96.0.10:80",
            "protocol":"TCP","scope":0,"kind":"ClusterIP","service_id":1}],
            "endpoints":[{"namespace":"demo","service":"web","address":"10.0.0.1","pod":"web-1",
            "node":null,"ready":true,"serving":true,"terminating":false}]}"#;
        let names: Names = serde_json::from_str(text).expect("an IPv4-only file");
        assert_eq!(
            names.frontends[0].address,
            "10.96.0.10:80".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(
            names.endpoints[0].address,
            "10.0.0.1".parse::<IpAddr>().expect("addr")
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
