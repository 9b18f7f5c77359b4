//! One agent per pin directory: an exclusive `flock` on the directory itself (bpffs
//! holds no regular files, so there is no lock file), held for the agent's life and
//! released by the kernel when the process ends, however it ends.
//!
//! Two agents on one directory would each program the maps from their own view, and
//! the one that exits would unpin what the other still uses: the second is refused
//! before it opens, writes or removes anything. `kpr cleanup` takes the same lock, so
//! it cannot pull the pins from under a running agent.
use std::{
    fs::File,
    io,
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "another kpr agent{} already uses the pin directory {path}; one agent per directory \
         (stop it, or give this one another --bpffs)",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Held { path: PathBuf, holder: Option<u32> },
    /// The directory cannot be made where it is asked for (the datapath's own
    /// diagnosis: `ip netns exec` hiding /sys/fs/bpf).
    #[error(transparent)]
    Unusable(Box<super::Error>),
    #[error("locking the pin directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The lock; the directory is unlocked when it is dropped.
#[derive(Debug)]
pub struct PinDirLock {
    _dir: File,
}

impl PinDirLock {
    /// Creates `pin_dir` if needed (mode 0700: the pins are root's business) and locks
    /// it.
    ///
    /// # Errors
    /// [`Error::Held`] when another process holds the lock.
    pub fn acquire(pin_dir: &Path) -> Result<Self, Error> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(pin_dir)
            .map_err(|source| match super::pin_dir_on_sysfs(pin_dir) {
                Some(hidden) => Error::Unusable(Box::new(hidden)),
                None => Error::Io {
                    path: pin_dir.to_path_buf(),
                    source,
                },
            })?;
        Self::acquire_existing(pin_dir)?.ok_or_else(|| Error::Io {
            path: pin_dir.to_path_buf(),
            source: io::ErrorKind::NotFound.into(),
        })
    }

    /// Locks `pin_dir` if it exists (`None` when it does not: nothing to protect).
    ///
    /// # Errors
    /// [`Error::Held`] when another process holds the lock.
    pub fn acquire_existing(pin_dir: &Path) -> Result<Option<Self>, Error> {
        let io_error = |source| Error::Io {
            path: pin_dir.to_path_buf(),
            source,
        };
        let dir = match File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(pin_dir)
        {
            Ok(dir) => dir,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io_error(error)),
        };
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::Held {
                    path: pin_dir.to_path_buf(),
                    holder: dir.metadata().ok().and_then(|meta| holder(&meta)),
                });
            }
            return Err(io_error(error));
        }
        Ok(Some(Self { _dir: dir }))
    }
}

/// The process holding a `flock` on the file of `meta`, from `/proc/locks`
/// (`1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF`, major and minor in
/// hex).
fn holder(meta: &std::fs::Metadata) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let dev = meta.dev();
    let file = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&file.as_str()))
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holder_named_until_the_first_goes() {
        let dir = std::env::temp_dir().join(format!("kpr-lock-{}", std::process::id()));
        let first = PinDirLock::acquire(&dir).expect("the first lock");
        // flock locks belong to the open file: a second open in this process conflicts
        // as a second process would.
        match PinDirLock::acquire(&dir) {
            Err(Error::Held { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("a second lock: {other:?}"),
        }
        drop(first);
        let again = PinDirLock::acquire_existing(&dir).expect("free again");
        assert!(again.is_some());
        drop(again);
        let _ = std::fs::remove_dir(&dir);
        assert!(PinDirLock::acquire_existing(&dir)
            .expect("a missing directory")
            .is_none());
    }
}
