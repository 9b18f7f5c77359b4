//! A directory of YAML/JSON manifests as the source of Services, EndpointSlices and the
//! Node: for a standalone node, the demo and the tests. The files hold the same objects
//! the Kubernetes API serves (multi-document YAML and `List` kinds allowed).
//!
//! The whole directory is re-read on every change: it is small, and a full read is the
//! simplest way to never miss a deletion.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::Snapshot;
use crate::model::{Diagnostic, DiagnosticReason};

/// How long to wait for a burst of file events to settle before re-reading.
const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file of `dir` (not recursing), in name
/// order. Unreadable files and objects become diagnostics; the rest is used.
#[must_use]
pub fn read_dir(dir: &Path, node_name: Option<&str>) -> Snapshot {
    let mut snapshot = Snapshot::for_node(node_name);
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            snapshot
                .diagnostics
                .push(unreadable(dir, &error.to_string()));
            return snapshot;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.is_file()
                && path
                    .extension()
                    .and_then(|ext| ext.to_str())
                    .is_some_and(|ext| matches!(ext, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => parse_documents(&text, &file.display().to_string(), &mut snapshot),
            Err(error) => snapshot
                .diagnostics
                .push(unreadable(&file, &error.to_string())),
        }
    }
    snapshot
}

fn unreadable(path: &Path, message: &str) -> Diagnostic {
    Diagnostic {
        object: path.display().to_string(),
        reason: DiagnosticReason::UnreadableSource,
        message: message.to_owned(),
    }
}

/// Adds every object of a multi-document YAML (or JSON) text to `snapshot`.
pub fn parse_documents(text: &str, origin: &str, snapshot: &mut Snapshot) {
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
            Ok(service) => snapshot.add_service(service),
            Err(error) => malformed(snapshot, error.to_string()),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_yaml::from_value::<EndpointSlice>(value) {
                Ok(slice) => snapshot.add_endpoint_slice(slice),
                Err(error) => malformed(snapshot, error.to_string()),
            }
        }
        ("v1", "Node") => match serde_yaml::from_value::<Node>(value) {
            Ok(node) => snapshot.add_node(&node),
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

/// Publishes a fresh [`Snapshot`] of `dir` at start and after every change (settled
/// for [`DEBOUNCE`]), until the receiver is gone.
///
/// # Errors
/// When the directory cannot be watched.
pub async fn watch_dir(
    dir: PathBuf,
    node_name: Option<String>,
    snapshots: watch::Sender<Arc<Snapshot>>,
) -> Result<(), Error> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the files ourselves produces access events: only changes count, or
        // every read would trigger the next one.
        let changed = event.is_ok_and(|event| !matches!(event.kind, notify::EventKind::Access(_)));
        if changed {
            let _ = events_tx.send(());
        }
    })
    .map_err(|source| Error::Watch {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| Error::Watch {
            path: dir.clone(),
            source,
        })?;
    loop {
        let snapshot = read_dir(&dir, node_name.as_deref());
        if snapshots.send(Arc::new(snapshot)).is_err() {
            return Ok(());
        }
        // Wait for a change, then let the burst settle.
        if events.recv().await.is_none() {
            warn!(dir = %dir.display(), "file watcher stopped");
            return Ok(());
        }
        while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, events.recv()).await {}
    }
}
