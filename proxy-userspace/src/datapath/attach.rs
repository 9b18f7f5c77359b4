//! Attaching the TC programs to interfaces with TCX links: the pod hooks on
//! pod-facing interfaces, the node hooks on the node's external interfaces.
//!
//! With a pin directory, each link is pinned as `links/<ifname>@<ifindex>:<hook>` (bpffs refuses
//! names with a dot): the program
//! stays attached when the agent exits (restart without a gap), and the next agent
//! takes the pinned link over and swaps its program atomically (`bpf_link_update`), so
//! no packet ever meets an interface without a program.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    LinkOrder, SchedClassifier,
};
use tracing::{debug, info, warn};

use super::{interfaces::Interface, Datapath, Hook};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("attaching to {interface}")]
    Attach {
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning the link of {interface}")]
    Pin {
        interface: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("the {hook} program is unavailable: {message}")]
    Unavailable { hook: &'static str, message: String },
    #[error("adopting the pinned link {path}: {message}")]
    Adopt { path: PathBuf, message: String },
}

/// The links this agent holds, by interface and hook.
#[derive(Default)]
pub struct Attachments {
    links_dir: Option<PathBuf>,
    links: BTreeMap<(Interface, Hook), FdLink>,
}

fn pin_name(interface: &Interface, hook: Hook) -> String {
    format!("{}@{}:{}", interface.name, interface.index, hook.label())
}

fn parse_pin_name(name: &str) -> Option<(Interface, Hook)> {
    let (link, label) = name.rsplit_once(':')?;
    let hook = Hook::ALL.into_iter().find(|hook| hook.label() == label)?;
    let (ifname, index) = link.rsplit_once('@')?;
    let interface = Interface {
        name: ifname.to_owned(),
        index: index.parse().ok()?,
    };
    Some((interface, hook))
}

impl Attachments {
    /// Attachments pinned under `pin_dir/links` (if any).
    #[must_use]
    pub fn new(pin_dir: Option<&Path>) -> Self {
        Self {
            links_dir: pin_dir.map(|dir| dir.join("links")),
            links: BTreeMap::new(),
        }
    }

    /// The (interface, hook) pairs with a program attached.
    pub fn attached(&self) -> impl Iterator<Item = &(Interface, Hook)> {
        self.links.keys()
    }

    /// Attaches programs to exactly the `wanted` (interface, hook) pairs: new ones get
    /// links (or take over pinned ones), vanished ones are forgotten. Returns the errors
    /// of attachments that failed (retried on the next call).
    pub fn reconcile(
        &mut self,
        datapath: &mut Datapath,
        wanted: &[(Interface, Hook)],
    ) -> Vec<Error> {
        let mut errors = Vec::new();
        let gone: Vec<(Interface, Hook)> = self
            .links
            .keys()
            .filter(|pair| !wanted.contains(pair))
            .cloned()
            .collect();
        for (interface, hook) in gone {
            debug!(interface = %interface.name, hook = hook.label(), "interface gone; dropping its link");
            self.links.remove(&(interface.clone(), hook));
            self.remove_pin(&interface, hook);
        }
        for hook in Hook::ALL {
            let program = match datapath.program(hook) {
                Ok(program) => program,
                Err(error) => {
                    errors.push(Error::Unavailable {
                        hook: hook.label(),
                        message: crate::error_chain(&error),
                    });
                    continue;
                }
            };
            for interface in wanted
                .iter()
                .filter(|(_, wanted_hook)| *wanted_hook == hook)
                .map(|(interface, _)| interface)
            {
                let key = (interface.clone(), hook);
                if self.links.contains_key(&key) {
                    continue;
                }
                match self.attach_one(program, interface, hook) {
                    Ok(link) => {
                        info!(interface = %interface.name, ifindex = interface.index, hook = hook.label(), "attached");
                        self.links.insert(key, link);
                    }
                    Err(error) => errors.push(error),
                }
            }
        }
        errors
    }

    fn attach_one(
        &self,
        program: &mut SchedClassifier,
        interface: &Interface,
        hook: Hook,
    ) -> Result<FdLink, Error> {
        let pin_path = self
            .links_dir
            .as_ref()
            .map(|dir| dir.join(pin_name(interface, hook)));
        if let Some(path) = pin_path.as_ref().filter(|path| path.exists()) {
            match adopt(program, path) {
                Ok(link) => return Ok(link),
                Err(error) => {
                    warn!(error = %crate::error_chain(&error), "replacing a pinned link that cannot be adopted");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let link_id = program
            .attach_with_options(
                &interface.name,
                hook.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|source| Error::Attach {
                interface: interface.name.clone(),
                source,
            })?;
        let link = program.take_link(link_id).map_err(|source| Error::Attach {
            interface: interface.name.clone(),
            source,
        })?;
        let link: FdLink = link.try_into().map_err(|_| Error::Attach {
            interface: interface.name.clone(),
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        let Some(path) = pin_path else {
            return Ok(link);
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // The pin keeps the link alive; the returned handle only holds a reference.
        let pinned = link.pin(&path).map_err(|source| Error::Pin {
            interface: interface.name.clone(),
            source,
        })?;
        Ok(FdLink::from(pinned))
    }

    fn remove_pin(&self, interface: &Interface, hook: Hook) {
        if let Some(dir) = &self.links_dir {
            let _ = std::fs::remove_file(dir.join(pin_name(interface, hook)));
        }
    }

    /// Removes pins of links whose interface no longer exists (their links died with
    /// the interface).
    pub fn sweep_stale_pins(&self, existing: &[Interface]) {
        let Some(dir) = &self.links_dir else { return };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            // The cgroup hooks' pins share the directory (see `super::cgroup`).
            if name.starts_with(super::cgroup::PIN_PREFIX) {
                continue;
            }
            if parse_pin_name(&name).is_none_or(|(interface, _)| !existing.contains(&interface)) {
                debug!(pin = %name, "removing the pin of a vanished interface");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Detaches everything: pins are removed, then the links dropped.
    pub fn detach_all(&mut self) {
        let keys: Vec<(Interface, Hook)> = self.links.keys().cloned().collect();
        for (interface, hook) in keys {
            self.remove_pin(&interface, hook);
            self.links.remove(&(interface, hook));
        }
        if let Some(dir) = &self.links_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Pins again every held link whose pin is missing or names another link (see
    /// [`super::link_pins`]). Returns the pins repaired and the errors.
    pub fn repair_pins(&self) -> (Vec<PathBuf>, Vec<super::link_pins::Error>) {
        let mut repaired = Vec::new();
        let mut errors = Vec::new();
        let Some(dir) = &self.links_dir else {
            return (repaired, errors);
        };
        for ((interface, hook), link) in &self.links {
            let path = dir.join(pin_name(interface, *hook));
            let id =
                link.info()
                    .map(|info| info.id())
                    .map_err(|error| super::link_pins::Error::Id {
                        path: path.clone(),
                        source: std::io::Error::other(error.to_string()),
                    });
            match id.and_then(|id| super::link_pins::ensure_pinned(id, &path)) {
                Ok(true) => repaired.push(path),
                Ok(false) => {}
                Err(error) => errors.push(error),
            }
        }
        (repaired, errors)
    }

    /// Lets go of the links without detaching: pinned links stay attached.
    pub fn keep_all(&mut self) {
        self.links.clear();
    }
}

/// Takes over a pinned link and points it at `program` atomically.
fn adopt(program: &mut SchedClassifier, path: &Path) -> Result<FdLink, Error> {
    let adopt_error = |message: String| Error::Adopt {
        path: path.to_path_buf(),
        message,
    };
    let pinned = PinnedLink::from_pin(path).map_err(|error| adopt_error(error.to_string()))?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned))
        .map_err(|error| adopt_error(error.to_string()))?;
    let link_id = program
        .attach_to_link(link)
        .map_err(|error| adopt_error(error.to_string()))?;
    let link = program
        .take_link(link_id)
        .map_err(|error| adopt_error(error.to_string()))?;
    FdLink::try_from(link).map_err(|error| adopt_error(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        let interface = Interface {
            name: "veth-a@b.c".into(),
            index: 42,
        };
        for hook in Hook::ALL {
            assert_eq!(
                parse_pin_name(&pin_name(&interface, hook)),
                Some((interface.clone(), hook))
            );
        }
        assert_eq!(parse_pin_name("garbage"), None);
        assert_eq!(parse_pin_name("eth0@3:unknown-hook"), None);
    }
}
