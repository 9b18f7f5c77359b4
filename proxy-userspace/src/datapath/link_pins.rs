//! Link pins kept pointing at the links this agent holds. A link pin removed behind the
//! agent's back costs nothing while it runs (its descriptor keeps the program
//! attached), but the program would be detached the moment the agent exits, even with
//! `--keep-state`, and the next agent would start with the hook missing. The periodic
//! resync calls [`ensure_pinned`] for every held link, as it does for map pins
//! ([`super::pins`]).
use std::path::{Path, PathBuf};

use super::cgroup::sys;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the id of the link pinned at {path}")]
    Id {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening link {id} to pin it again at {path}")]
    Open {
        id: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning link {id} at {path}")]
    Pin {
        id: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Makes `path` a pin of the link with id `id`: nothing when it is one already; else
/// whatever is there (another link, or nothing) is replaced. `true` when it pinned.
///
/// The link is pinned through a new descriptor opened by id, never through the one
/// the agent holds, so a failure here can never drop (and detach) the agent's link.
///
/// # Errors
/// When the link cannot be opened or pinned.
pub fn ensure_pinned(id: u32, path: &Path) -> Result<bool, Error> {
    if let Ok(pinned) = sys::obj_get(path) {
        if sys::link_id(&pinned).is_ok_and(|pinned_id| pinned_id == id) {
            return Ok(false);
        }
        // Another object under our name: the next agent would adopt the wrong link.
        let _ = std::fs::remove_file(path);
    }
    let fd = sys::link_fd_by_id(id).map_err(|source| Error::Open {
        id,
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    sys::obj_pin(&fd, path).map_err(|source| Error::Pin {
        id,
        path: path.to_path_buf(),
        source,
    })?;
    Ok(true)
}
