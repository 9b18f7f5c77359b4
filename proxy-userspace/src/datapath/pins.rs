//! The map pins, kept pointing at the maps this agent uses. A pin removed behind the
//! agent's back costs nothing while it runs (its programs hold the maps), but the next
//! agent would start on empty maps; a pin replaced by another map would give the next
//! agent someone else's. The periodic resync checks each pin against the id the map
//! had when the agent loaded it, and pins the map again where they differ.
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapInfo};
use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the map pinned at {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("opening map {name} (id {id}) to pin it again")]
    Open {
        name: &'static str,
        id: u32,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning map {name} at {path}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
}

/// Each map's pin path and the id of the map this agent uses.
#[derive(Debug)]
pub struct MapPins {
    pins: Vec<(&'static str, PathBuf, u32)>,
}

impl MapPins {
    /// The ids of the maps pinned under `pin_dir` as `names`, right after loading.
    ///
    /// # Errors
    /// When a pin cannot be read.
    pub fn record(pin_dir: &Path, names: &[&'static str]) -> Result<Self, Error> {
        let pins = names
            .iter()
            .map(|name| {
                let path = pin_dir.join(name);
                let info = MapInfo::from_pin(&path).map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })?;
                Ok((*name, path, info.id()))
            })
            .collect::<Result<_, Error>>()?;
        Ok(Self { pins })
    }

    /// Pins again every map whose pin is missing or names another map. Returns the
    /// names repaired, and the errors of those that could not be.
    pub fn repair(&self) -> (Vec<&'static str>, Vec<Error>) {
        let mut repaired = Vec::new();
        let mut errors = Vec::new();
        for (name, path, id) in &self.pins {
            let pinned = MapInfo::from_pin(path).ok().map(|info| info.id());
            if pinned == Some(*id) {
                continue;
            }
            debug!(map = name, ?pinned, id, "pin missing or replaced");
            if pinned.is_some() {
                let _ = std::fs::remove_file(path);
            }
            let result = MapData::from_id(*id)
                .map_err(|source| Error::Open {
                    name,
                    id: *id,
                    source,
                })
                .and_then(|map| {
                    map.pin(path).map_err(|source| Error::Pin {
                        name,
                        path: path.clone(),
                        source,
                    })
                });
            match result {
                Ok(()) => repaired.push(*name),
                Err(error) => errors.push(error),
            }
        }
        (repaired, errors)
    }
}
