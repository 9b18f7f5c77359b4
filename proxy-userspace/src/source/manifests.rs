//! A directory of YAML/JSON manifests as the source of Services, EndpointSlices and the
//! Node: for a standalone node, the demo and the tests. The files hold the same objects
//! the Kubernetes API serves (multi-document YAML and `List` kinds allowed).
//!
//! The whole directory is listed on every change (the simplest way to never miss a
//! deletion), but only files whose identity, size or times changed are read and parsed
//! again: the others stand in with the objects parsed last time, shared (not copied)
//! with the previous snapshot. At 100 000 services that is one `stat` per file instead
//! of parsing them all, and one copy of the objects in memory instead of two. A read
//! that fails changes nothing: when the
//! directory cannot be listed (removed, descriptors exhausted, an I/O error) nothing
//! is published, and a file that cannot be read stands in with its last readable
//! content, so the datapath keeps what it has until a successful read says otherwise. Failed
//! reads are retried on a timer (descriptor exhaustion ends without any file event),
//! and a directory removed and created again is watched again: its parent is watched
//! too, for the directory's return.
use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use prometheus_client::metrics::{counter::Counter, family::Family};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::Snapshot;
use crate::{
    metrics::ReasonLabels,
    model::{Diagnostic, DiagnosticReason},
    state::{ChangedKeys, ClusterState, NodeInfo, ObjectKey, Revisions, ServiceInfo, SliceInfo},
};

/// The largest manifest file read (a file of 65 535 endpoints is about 4 MiB).
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// The deepest nesting of a manifest: serde_yaml's own recursion limit, so nothing it
/// would accept is refused. It is checked first, in one linear pass, because
/// libyaml's parser takes time quadratic in the depth of flow collections before
/// serde_yaml gets to refuse them (`a: [[[[…` of 200 KB: half a minute).
pub const MAX_DEPTH: usize = 128;

/// How long to wait for a burst of file events to settle before re-reading.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// The first retry after a failed read, doubled after each failure up to
/// [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create a file watcher")]
    Watcher(#[source] notify::Error),
    #[error("the manifest reader panicked")]
    Reader(#[source] tokio::task::JoinError),
}

/// Why a read of the directory failed as a whole.
#[derive(Debug, thiserror::Error)]
#[error("cannot list the manifests directory {path}")]
pub struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Label of `kpr_source_read_failures_total{reason}` for an I/O error.
#[must_use]
pub fn failure_label(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => "descriptors_exhausted",
        _ => match error.kind() {
            io::ErrorKind::NotFound => "not_found",
            io::ErrorKind::PermissionDenied => "permission_denied",
            _ => "io_error",
        },
    }
}

/// Every label [`failure_label`] gives, to export them at 0.
pub const FAILURE_LABELS: [&str; 4] = [
    "descriptors_exhausted",
    "not_found",
    "permission_denied",
    "io_error",
];

/// One successful read of the directory.
#[derive(Debug)]
pub struct Read {
    pub snapshot: Snapshot,
    /// Files that could not be read, each with its error: they stand in with their
    /// last readable text (or not at all, without one), and the read is retried.
    pub unreadable: Vec<(PathBuf, io::Error)>,
}

/// What identifies a version of a file without reading it: a rewrite changes its
/// modification or change time (nanoseconds), a replacement its inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(metadata: &std::fs::Metadata) -> Self {
        let ns = |seconds: i64, nanos: i64| i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.size(),
            mtime_ns: ns(metadata.mtime(), metadata.mtime_nsec()),
            ctime_ns: ns(metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// The objects and diagnostics one file gave, and the version of the file they came
/// from (`None`: kept from an earlier version after a failed read).
#[derive(Debug)]
struct ParsedFile {
    stamp: Option<FileStamp>,
    content: Arc<Snapshot>,
}

/// The manifests directory, with what each file gave when it was last read.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    node_name: Option<String>,
    parsed: BTreeMap<PathBuf, ParsedFile>,
    /// The count of the snapshots read, with the keys each read changed.
    revisions: Revisions,
}

impl ManifestDir {
    #[must_use]
    pub fn new(dir: PathBuf, node_name: Option<String>) -> Self {
        Self {
            dir,
            node_name,
            parsed: BTreeMap::new(),
            revisions: Revisions::default(),
        }
    }

    /// Reads every `*.yaml`, `*.yml` and `*.json` file of the directory (not
    /// recursing), in name order. Objects that cannot be used become diagnostics; so
    /// do files that cannot be read, which keep their last readable text.
    ///
    /// # Errors
    /// When the directory cannot be listed: nothing is known then.
    pub fn read(&mut self) -> Result<Read, ReadError> {
        let failed = |source| ReadError {
            path: self.dir.clone(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(failed)? {
            let path = entry.map_err(failed)?.path();
            let manifest = path
                .extension()
                .and_then(|ext| ext.to_str())
                .is_some_and(|ext| matches!(ext, "yaml" | "yml" | "json"));
            if manifest {
                files.push(path);
            }
        }
        files.sort();
        let mut snapshot = Snapshot::for_node(self.node_name.as_deref());
        let mut merged = Merged::default();
        let mut unreadable = Vec::new();
        let mut parsed = BTreeMap::new();
        let mut reparsed = Vec::new();
        for file in files {
            let stamp = match std::fs::metadata(&file) {
                Ok(metadata) if !metadata.is_file() => continue,
                Ok(metadata) => Some(FileStamp::of(&metadata)),
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                // Reading it says what is wrong.
                Err(_) => None,
            };
            let unchanged = stamp.is_some()
                && self
                    .parsed
                    .get(&file)
                    .is_some_and(|known| known.stamp == stamp);
            if unchanged {
                if let Some(known) = self.parsed.remove(&file) {
                    merge(&mut snapshot, &mut merged, &known.content);
                    parsed.insert(file, known);
                    continue;
                }
            }
            let content = match read_file(&file) {
                Ok(Some(text)) => {
                    let mut content = Snapshot::for_node(self.node_name.as_deref());
                    parse_documents(&text, &file.display().to_string(), &mut content);
                    drop(text);
                    compact_maps(&mut content.state);
                    // Objects of the file that did not change keep their copy.
                    if let Some(known) = self.parsed.get(&file) {
                        content.share_unchanged(&known.content.state);
                    }
                    Arc::new(content)
                }
                // A directory, or gone since the listing.
                Ok(None) => continue,
                Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                    // Its content is at fault, not the reading: as with a syntax error.
                    snapshot
                        .diagnostics
                        .push(unreadable_diagnostic(&file, &error.to_string()));
                    continue;
                }
                Err(error) => {
                    let Some(known) = self.parsed.remove(&file) else {
                        snapshot
                            .diagnostics
                            .push(unreadable_diagnostic(&file, &error.to_string()));
                        unreadable.push((file, error));
                        continue;
                    };
                    snapshot.diagnostics.push(unreadable_diagnostic(
                        &file,
                        &format!("{error}; using its last readable content"),
                    ));
                    unreadable.push((file.clone(), error));
                    merge(&mut snapshot, &mut merged, &known.content);
                    // Read again next time, whatever its stamp says.
                    parsed.insert(
                        file,
                        ParsedFile {
                            stamp: None,
                            content: known.content,
                        },
                    );
                    continue;
                }
            };
            merge(&mut snapshot, &mut merged, &content);
            reparsed.push(file.clone());
            parsed.insert(file, ParsedFile { stamp, content });
        }
        // Later files replace objects of the same key: `collect` keeps the last.
        snapshot.state.services = merged.services.into_iter().collect();
        snapshot.state.endpoint_slices = merged.endpoint_slices.into_iter().collect();
        let changed = self.changed_keys(&parsed, &reparsed);
        snapshot.state.revision = self.revisions.next(Some(changed));
        self.parsed = parsed;
        Ok(Read {
            snapshot,
            unreadable,
        })
    }
}

impl ManifestDir {
    /// The keys a read changed: those of the files it parsed again whose object is
    /// not the one they held before (the file's unchanged objects kept their `Arc`),
    /// and every key of the files it no longer has. `self.parsed` still holds what
    /// the files `now` does not carry over unchanged had before the read.
    fn changed_keys(
        &self,
        now: &BTreeMap<PathBuf, ParsedFile>,
        reparsed: &[PathBuf],
    ) -> ChangedKeys {
        let mut changed = ChangedKeys::default();
        let empty = Snapshot::default();
        for (file, before) in &self.parsed {
            if !now.contains_key(file) {
                add_differences(&mut changed, &before.content, &empty);
            }
        }
        for file in reparsed {
            let before = self
                .parsed
                .get(file)
                .map_or(&empty, |known| &*known.content);
            if let Some(after) = now.get(file) {
                add_differences(&mut changed, before, &after.content);
            }
        }
        changed
    }
}

/// Adds to `changed` every key whose object differs between `before` and `after`
/// (by `Arc` identity: equal objects share one).
fn add_differences(changed: &mut ChangedKeys, before: &Snapshot, after: &Snapshot) {
    fn differing<T>(
        before: &BTreeMap<ObjectKey, Arc<T>>,
        after: &BTreeMap<ObjectKey, Arc<T>>,
        into: &mut std::collections::BTreeSet<ObjectKey>,
    ) {
        for (key, object) in before {
            if !after.get(key).is_some_and(|now| Arc::ptr_eq(now, object)) {
                into.insert(key.clone());
            }
        }
        for key in after.keys() {
            if !before.contains_key(key) {
                into.insert(key.clone());
            }
        }
    }
    differing(
        &before.state.services,
        &after.state.services,
        &mut changed.services,
    );
    differing(
        &before.state.endpoint_slices,
        &after.state.endpoint_slices,
        &mut changed.endpoint_slices,
    );
}

/// The objects of every file, in file order, for the directory's maps: built once
/// from all of them, their nodes are full (inserted one by one in key order, each
/// was about half full: 4 MiB more at 50 000 services), and no slower.
#[derive(Default)]
struct Merged {
    services: Vec<(ObjectKey, Arc<ServiceInfo>)>,
    endpoint_slices: Vec<(ObjectKey, Arc<SliceInfo>)>,
}

/// The maps of `state` built again in one go, their nodes full. For a file just
/// parsed (its objects were inserted one by one): a few thousand entries against
/// the seconds of YAML they came from.
fn compact_maps(state: &mut ClusterState) {
    state.services = std::mem::take(&mut state.services).into_iter().collect();
    state.endpoint_slices = std::mem::take(&mut state.endpoint_slices)
        .into_iter()
        .collect();
}

/// Adds what one file gave to the directory's snapshot (later files replace objects of
/// the same name, as when one text held them all), sharing the objects.
fn merge(snapshot: &mut Snapshot, merged: &mut Merged, file: &Snapshot) {
    merged.services.extend(
        file.state
            .services
            .iter()
            .map(|(key, service)| (key.clone(), Arc::clone(service))),
    );
    merged.endpoint_slices.extend(
        file.state
            .endpoint_slices
            .iter()
            .map(|(key, slice)| (key.clone(), Arc::clone(slice))),
    );
    if !file.state.node.labels.is_empty() {
        snapshot
            .state
            .node
            .labels
            .clone_from(&file.state.node.labels);
    }
    snapshot
        .diagnostics
        .extend(file.diagnostics.iter().cloned());
}

/// A manifest file's text; `None` when it is not a regular file (after following
/// symlinks, as ConfigMap volumes use them) or no longer exists.
fn read_file(path: &Path) -> io::Result<Option<String>> {
    match std::fs::metadata(path) {
        Ok(metadata) if !metadata.is_file() => return Ok(None),
        Ok(metadata) if metadata.len() > MAX_FILE_BYTES => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} bytes; a manifest file may have at most {MAX_FILE_BYTES}",
                    metadata.len()
                ),
            ))
        }
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    }
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

fn unreadable_diagnostic(path: &Path, message: &str) -> Diagnostic {
    Diagnostic {
        object: path.display().to_string(),
        reason: DiagnosticReason::UnreadableSource,
        message: message.to_owned(),
    }
}

/// Adds every object of a multi-document YAML (or JSON) text to `snapshot`.
pub fn parse_documents(text: &str, origin: &str, snapshot: &mut Snapshot) {
    if let Err(message) = check_depth(text, MAX_DEPTH) {
        snapshot.diagnostics.push(Diagnostic {
            object: origin.to_owned(),
            reason: DiagnosticReason::UnreadableSource,
            message,
        });
        return;
    }
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let object = format!("{origin} (document {})", index + 1);
        match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(value) => add_object(value, &object, snapshot),
            Err(error) => {
                snapshot.diagnostics.push(Diagnostic {
                    object,
                    reason: DiagnosticReason::UnreadableSource,
                    message: error.to_string(),
                });
                // The YAML stream cannot be resynchronised after a syntax error.
                return;
            }
        }
    }
}

/// Whether `text` nests flow collections (`[`, `{`) no deeper than `limit`, outside
/// quoted strings and comments. Block nesting needs indentation, so its depth is
/// bounded by the square root of the size and left to serde_yaml.
fn check_depth(text: &str, limit: usize) -> Result<(), String> {
    let (mut depth, mut line) = (0usize, 1usize);
    let (mut single, mut double, mut escaped, mut comment) = (false, false, false, false);
    let mut previous = '\n';
    for c in text.chars() {
        if c == '\n' {
            line += 1;
            comment = false;
        } else if comment {
        } else if double {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => double = false,
                _ => {}
            }
        } else if single {
            single = c != '\'';
        } else {
            match c {
                '#' if previous.is_whitespace() => comment = true,
                '"' => double = true,
                '\'' => single = true,
                '[' | '{' => {
                    depth += 1;
                    if depth > limit {
                        return Err(format!("nested deeper than {limit} levels at line {line}"));
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        previous = c;
    }
    Ok(())
}

fn add_object(value: serde_yaml::Value, origin: &str, snapshot: &mut Snapshot) {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or("")
    };
    let (api_version, kind) = (field("apiVersion").to_owned(), field("kind").to_owned());
    let malformed = |snapshot: &mut Snapshot, message: String| {
        snapshot.diagnostics.push(Diagnostic {
            object: format!("{kind} in {origin}"),
            reason: DiagnosticReason::Malformed,
            message,
        });
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => match serde_yaml::from_value::<Service>(value) {
            Ok(service) => snapshot.add_service(&service),
            Err(error) => malformed(snapshot, error.to_string()),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_yaml::from_value::<EndpointSlice>(value) {
                Ok(slice) => snapshot.add_endpoint_slice(&slice),
                Err(error) => malformed(snapshot, error.to_string()),
            }
        }
        ("v1", "Node") => match serde_yaml::from_value::<Node>(value) {
            Ok(node) => snapshot.add_node(&NodeInfo::from(&node)),
            Err(error) => malformed(snapshot, error.to_string()),
        },
        (_, "List" | "ServiceList" | "EndpointSliceList") => {
            let items = value
                .get("items")
                .and_then(serde_yaml::Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            for item in items {
                add_object(item, origin, snapshot);
            }
        }
        _ => debug!(%origin, %api_version, %kind, "ignoring object of another kind"),
    }
}

/// The watches that keep the directory followed: on the directory itself (its files),
/// and on its parent (the directory being removed and created again).
struct DirWatch {
    watcher: RecommendedWatcher,
    dir: PathBuf,
    /// The device and inode of the directory being watched, if any.
    watching: Option<(u64, u64)>,
    parent_watched: bool,
}

impl DirWatch {
    /// Watches the directory as it is now: again when it was replaced since, not at
    /// all while it does not exist (the parent's watch reports its return).
    fn refresh(&mut self) {
        if !self.parent_watched {
            if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                self.parent_watched = self
                    .watcher
                    .watch(parent, RecursiveMode::NonRecursive)
                    .inspect_err(|error| debug!(parent = %parent.display(), %error, "cannot watch the manifests directory's parent"))
                    .is_ok();
            }
        }
        let now = std::fs::metadata(&self.dir)
            .ok()
            .filter(std::fs::Metadata::is_dir)
            .map(|metadata| (metadata.dev(), metadata.ino()));
        if now == self.watching {
            return;
        }
        if self.watching.is_some() {
            // Already gone with the old directory, usually.
            let _ = self.watcher.unwatch(&self.dir);
        }
        self.watching = None;
        if now.is_some() {
            match self.watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watching = now;
                    debug!(dir = %self.dir.display(), "watching the manifests directory");
                }
                Err(error) => {
                    debug!(dir = %self.dir.display(), %error, "cannot watch the manifests directory yet");
                }
            }
        }
    }
}

/// Publishes a fresh [`Snapshot`] of `dir` at start and after every change (settled
/// for [`DEBOUNCE`]), until the receiver is gone. Reads that fail publish nothing;
/// they are logged, counted in `failures` (by [`failure_label`]) and retried.
///
/// # Errors
/// When no file watcher can be created, or the reader panicked.
pub async fn watch_dir(
    dir: PathBuf,
    node_name: Option<String>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    failures: Family<ReasonLabels, Counter>,
) -> Result<(), Error> {
    for reason in FAILURE_LABELS {
        let _ = failures.get_or_create(&ReasonLabels {
            reason: reason.to_owned(),
        });
    }
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let relevant = dir.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the files ourselves produces access events: only changes count, or
        // every read would trigger the next one. The parent's watch reports its other
        // entries too: only the directory and what is in it count.
        let changed = event.is_ok_and(|event| {
            !matches!(event.kind, notify::EventKind::Access(_))
                && (event.paths.is_empty()
                    || event.paths.iter().any(|path| path.starts_with(&relevant)))
        });
        if changed {
            let _ = events_tx.send(());
        }
    })
    .map_err(Error::Watcher)?;
    let mut watch = DirWatch {
        watcher,
        dir: dir.clone(),
        watching: None,
        parent_watched: false,
    };
    let mut reader = ManifestDir::new(dir.clone(), node_name);
    let mut retry = RETRY_MIN;
    let mut failing = false;
    loop {
        watch.refresh();
        // Parsing a large directory takes a while: not on the runtime's workers, which
        // serve health and metrics meanwhile.
        let (returned, read) = tokio::task::spawn_blocking(move || {
            let read = reader.read();
            (reader, read)
        })
        .await
        .map_err(Error::Reader)?;
        reader = returned;
        let complete = match read {
            Ok(read) => {
                for (file, error) in &read.unreadable {
                    failures
                        .get_or_create(&ReasonLabels {
                            reason: failure_label(error).to_owned(),
                        })
                        .inc();
                    debug!(file = %file.display(), %error, "cannot read a manifest");
                }
                if failing {
                    info!(dir = %dir.display(), "the manifests directory can be read again");
                    failing = false;
                }
                let complete = read.unreadable.is_empty();
                if snapshots.send(Arc::new(read.snapshot)).is_err() {
                    return Ok(());
                }
                complete
            }
            Err(error) => {
                failures
                    .get_or_create(&ReasonLabels {
                        reason: failure_label(&error.source).to_owned(),
                    })
                    .inc();
                if failing {
                    debug!(error = %crate::error_chain(&error), "the manifests directory still cannot be read");
                } else {
                    warn!(
                        error = %crate::error_chain(&error),
                        "the manifests directory cannot be read; keeping the datapath as it is and retrying"
                    );
                    failing = true;
                }
                false
            }
        };
        if complete {
            retry = RETRY_MIN;
            if events.recv().await.is_none() {
                warn!(dir = %dir.display(), "file watcher stopped");
                return Ok(());
            }
        } else {
            // A change or the retry timer, whichever comes first.
            match tokio::time::timeout(retry, events.recv()).await {
                Ok(None) => {
                    warn!(dir = %dir.display(), "file watcher stopped");
                    return Ok(());
                }
                Ok(Some(())) => {}
                Err(_) => retry = (retry * 2).min(RETRY_MAX),
            }
        }
        // Let the burst settle.
        while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, events.recv()).await {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A directory of this test's own under the system's temporary directory, removed
    /// on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "kpr-manifests-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(path.join("manifests")).expect("temporary directory");
            Self(path)
        }

        fn manifests(&self) -> PathBuf {
            self.0.join("manifests")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    fn names(snapshot: &Snapshot) -> Vec<String> {
        snapshot
            .state
            .services
            .keys()
            .map(|key| key.name.to_string())
            .collect()
    }

    /// Replaces `path` with a symlink to a file whose read fails with EIO (reading
    /// /proc/self/mem at offset 0, which is never mapped): a real I/O error, which a
    /// permission change cannot give a test running as root.
    fn make_unreadable(path: &Path) {
        let _ = std::fs::remove_file(path);
        std::os::unix::fs::symlink("/proc/self/mem", path).expect("symlink");
    }

    #[test]
    fn deep_nesting_is_refused_before_the_parser_sees_it() {
        let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let mut snapshot = Snapshot::default();
        parse_documents(&deep, "deep.yaml", &mut snapshot);
        let [diagnostic] = &snapshot.diagnostics[..] else {
            panic!("{:?}", snapshot.diagnostics);
        };
        assert_eq!(diagnostic.reason, DiagnosticReason::UnreadableSource);
        assert!(
            diagnostic.message.contains("deeper than 128"),
            "{}",
            diagnostic.message
        );
        // Brackets in quotes and comments are no nesting; 128 levels are fine.
        let fine = format!(
            "{}\n# {}\nb: '{}'\nc: \"{}\\\"\"\nd: {}{}\n",
            service("web", "10.96.0.10"),
            "[".repeat(500),
            "[".repeat(500),
            "{".repeat(500),
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        let mut snapshot = Snapshot::default();
        parse_documents(&fine, "fine.yaml", &mut snapshot);
        assert!(
            snapshot
                .diagnostics
                .iter()
                .all(|d| !d.message.contains("deeper")),
            "{:?}",
            snapshot.diagnostics
        );
    }

    #[test]
    fn a_file_over_the_size_limit_is_reported_not_read() {
        let temp = TempDir::new();
        let file = temp.manifests().join("huge.yaml");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(MAX_FILE_BYTES + 1))
            .expect("a sparse file");
        let read = ManifestDir::new(temp.manifests(), None)
            .read()
            .expect("readable");
        assert!(
            read.unreadable.is_empty(),
            "content, not reading, is at fault"
        );
        assert!(
            read.snapshot
                .diagnostics
                .iter()
                .any(|d| d.message.contains("at most")),
            "{:?}",
            read.snapshot.diagnostics
        );
    }

    #[test]
    fn a_directory_that_cannot_be_listed_is_an_error_not_an_empty_snapshot() {
        let temp = TempDir::new();
        let mut dir = ManifestDir::new(temp.0.join("missing"), None);
        let error = dir.read().expect_err("a missing directory");
        assert_eq!(failure_label(&error.source), "not_found");
    }

    /// `web.yaml` (services api and web) and `db.yaml` (service db); the api
    /// service's text, to write web.yaml again with it.
    fn two_files() -> (TempDir, PathBuf, PathBuf, String) {
        let temp = TempDir::new();
        let (web, db) = (
            temp.manifests().join("web.yaml"),
            temp.manifests().join("db.yaml"),
        );
        let api = service("api", "10.96.0.12");
        std::fs::write(&web, format!("{api}---\n{}", service("web", "10.96.0.10"))).expect("write");
        std::fs::write(&db, service("db", "10.96.0.11")).expect("write");
        (temp, web, db, api)
    }

    #[test]
    fn only_changed_files_are_parsed_again_and_the_others_share_their_objects() {
        let (temp, web, db, api) = two_files();
        let mut dir = ManifestDir::new(temp.manifests(), None);
        let first = dir.read().expect("readable").snapshot;
        let key = |name: &str| crate::state::ObjectKey::new("default", name);
        // Rewritten (another size, so whatever the clock's granularity).
        std::fs::write(&web, format!("{api}---\n{}", service("web", "10.96.0.100")))
            .expect("write");
        let second = dir.read().expect("readable").snapshot;
        assert_eq!(names(&second), ["api", "db", "web"]);
        let same = |name: &str| {
            Arc::ptr_eq(
                &first.state.services[&key(name)],
                &second.state.services[&key(name)],
            )
        };
        assert!(
            same("db"),
            "an unchanged file's objects are the same objects"
        );
        assert!(
            same("api"),
            "an unchanged object of a changed file is the same object"
        );
        assert_eq!(
            second.state.services[&key("web")]
                .spec
                .as_ref()
                .and_then(|spec| spec.cluster_ip.clone()),
            Some(crate::state::IpField::Ip(
                "10.96.0.100".parse().expect("an IP")
            )),
            "a changed file is parsed again"
        );
        assert!(!same("web"), "a changed object is a new object");
        std::fs::remove_file(&db).expect("remove");
        assert_eq!(
            names(&dir.read().expect("readable").snapshot),
            ["api", "web"]
        );
    }

    /// Each read's revision names the keys it changed, and only those: the model
    /// compares no other object.
    #[test]
    fn each_read_names_the_keys_it_changed() {
        let (temp, web, db, api) = two_files();
        let mut dir = ManifestDir::new(temp.manifests(), None);
        let mut last = dir.read().expect("readable").snapshot.state.revision;
        let mut read_changes = |dir: &mut ManifestDir| {
            let revision = dir.read().expect("readable").snapshot.state.revision;
            let changed = revision
                .changed_since(&last)
                .expect("one step after the last");
            last = revision;
            let mut names: Vec<String> = changed
                .services
                .iter()
                .map(|key| key.name.to_string())
                .collect();
            names.sort();
            names
        };
        assert!(read_changes(&mut dir).is_empty(), "nothing changed");
        std::fs::write(&web, format!("{api}---\n{}", service("web", "10.96.0.100")))
            .expect("write");
        assert_eq!(
            read_changes(&mut dir),
            ["web"],
            "one object of a changed file"
        );
        std::fs::write(&db, "kind: [unterminated").expect("write");
        assert_eq!(
            read_changes(&mut dir),
            ["db"],
            "a file that no longer parses"
        );
        std::fs::write(&db, service("db", "10.96.0.11")).expect("write");
        assert_eq!(read_changes(&mut dir), ["db"], "parsed again");
        std::fs::remove_file(&web).expect("remove");
        assert_eq!(read_changes(&mut dir), ["api", "web"], "a removed file");
    }

    #[test]
    fn an_unreadable_file_keeps_its_last_readable_content() {
        let temp = TempDir::new();
        let file = temp.manifests().join("web.yaml");
        std::fs::write(&file, service("web", "10.96.0.10")).expect("write");
        let mut dir = ManifestDir::new(temp.manifests(), None);
        let first = dir.read().expect("readable");
        assert_eq!(names(&first.snapshot), ["web"]);
        assert!(first.unreadable.is_empty());

        make_unreadable(&file);
        make_unreadable(&temp.manifests().join("new.yaml"));
        let second = dir.read().expect("the directory is readable");
        assert_eq!(names(&second.snapshot), ["web"], "web.yaml's objects kept");
        assert_eq!(second.unreadable.len(), 2, "{:?}", second.unreadable);
        let objects: Vec<&str> = second
            .snapshot
            .diagnostics
            .iter()
            .filter(|d| d.reason == DiagnosticReason::UnreadableSource)
            .map(|d| d.object.as_str())
            .collect();
        assert_eq!(objects.len(), 2, "{:?}", second.snapshot.diagnostics);
        assert!(second
            .snapshot
            .diagnostics
            .iter()
            .any(|d| d.message.contains("using its last readable content")));

        // Removed for real: its objects go.
        std::fs::remove_file(&file).expect("remove");
        std::fs::remove_file(temp.manifests().join("new.yaml")).expect("remove");
        let third = dir.read().expect("readable");
        assert!(names(&third.snapshot).is_empty());
        assert!(third.unreadable.is_empty());
    }

    /// Waits (bounded) until `counter` of `failures` is above zero.
    async fn wait_counted(failures: &Family<ReasonLabels, Counter>, reason: &str) {
        let labels = ReasonLabels {
            reason: reason.to_owned(),
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while failures.get_or_create(&labels).get() == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the failed read to be counted");
    }

    async fn next(snapshots: &mut watch::Receiver<Arc<Snapshot>>) -> Arc<Snapshot> {
        tokio::time::timeout(Duration::from_secs(10), snapshots.changed())
            .await
            .expect("a snapshot in time")
            .expect("the source runs");
        Arc::clone(&snapshots.borrow_and_update())
    }

    #[tokio::test]
    async fn a_removed_directory_publishes_nothing_and_is_followed_again_once_back() {
        let temp = TempDir::new();
        let dir = temp.manifests();
        std::fs::write(dir.join("web.yaml"), service("web", "10.96.0.10")).expect("write");
        let (tx, mut snapshots) = watch::channel(Arc::new(Snapshot::default()));
        snapshots.mark_unchanged();
        let failures = Family::<ReasonLabels, Counter>::default();
        let task = tokio::spawn(watch_dir(dir.clone(), None, tx, failures.clone()));
        assert_eq!(names(&*next(&mut snapshots).await), ["web"]);

        std::fs::remove_dir_all(&dir).expect("remove the directory");
        wait_counted(&failures, "not_found").await;
        assert!(
            !snapshots.has_changed().expect("the source runs"),
            "a failed read published a snapshot"
        );

        std::fs::create_dir(&dir).expect("create it again");
        std::fs::write(dir.join("web.yaml"), service("web", "10.96.0.10")).expect("write");
        let mut snapshot = next(&mut snapshots).await;
        // The directory's creation and its first file may come as two reads.
        if names(&snapshot).is_empty() {
            snapshot = next(&mut snapshots).await;
        }
        assert_eq!(names(&snapshot), ["web"]);
        // Followed again: a change in the new directory arrives.
        std::fs::write(dir.join("db.yaml"), service("db", "10.96.0.11")).expect("write");
        assert_eq!(names(&*next(&mut snapshots).await), ["db", "web"]);
        task.abort();
    }
}
