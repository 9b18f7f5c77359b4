//! Attaching the socket-layer programs (cgroup v2 sock_addr hooks) to a cgroup, for
//! clients in the node's own network namespace: kubelet, hostNetwork pods, anything
//! that never crosses a pod interface (see `proxy-ebpf/src/sock.rs`).
//!
//! Every process whose sockets belong to the cgroup, or to one below it, is translated;
//! in production that is the host's cgroup2 root. The hooks are opt-in (`--cgroup-path`):
//! a lab or a test must never reach beyond the cgroup it made.
//!
//! Links live like the TC ones (see [`super::attach`]): pinned as
//! `links/cgroup@<hook>`, so they stay attached when the agent exits with
//! `--keep-state` or crashes; the next agent takes each pinned link over and swaps its
//! program with `BPF_LINK_UPDATE`, so no `connect()` ever runs without a hook and none
//! runs through two. aya 0.14 offers that swap for TC and XDP links but not for cgroup
//! ones, hence the few raw `bpf()` calls in [`sys`].
use std::{
    collections::BTreeMap,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::programs::{
    links::FdLink, CgroupAttachMode, CgroupSockAddr, CgroupSockAddrAttachType, ProgramError,
};
use aya_obj::generated::bpf_attach_type;
use tracing::{debug, info, warn};

use super::Datapath;

/// A socket-layer program of the object and the hook it attaches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SockHook {
    /// `connect()`: frontend -> backend, `sock_connect4`.
    Connect4,
    /// `sendto()`/`sendmsg()` of unconnected UDP: frontend -> backend, `sock_sendmsg4`.
    Sendmsg4,
    /// `recvfrom()`/`recvmsg()` of UDP: backend source -> frontend, `sock_recvmsg4`.
    Recvmsg4,
    /// `getpeername()`: backend -> frontend, `sock_getpeername4`.
    Getpeername4,
    /// The AF_INET6 twins (`sock_*6`): IPv6 services, and IPv4 ones reached through
    /// IPv4-mapped addresses.
    Connect6,
    Sendmsg6,
    Recvmsg6,
    Getpeername6,
}

impl SockHook {
    pub const ALL: [Self; 8] = [
        Self::Connect4,
        Self::Sendmsg4,
        Self::Recvmsg4,
        Self::Getpeername4,
        Self::Connect6,
        Self::Sendmsg6,
        Self::Recvmsg6,
        Self::Getpeername6,
    ];

    /// The program's name in the object.
    #[must_use]
    pub fn program_name(self) -> &'static str {
        match self {
            Self::Connect4 => "sock_connect4",
            Self::Sendmsg4 => "sock_sendmsg4",
            Self::Recvmsg4 => "sock_recvmsg4",
            Self::Getpeername4 => "sock_getpeername4",
            Self::Connect6 => "sock_connect6",
            Self::Sendmsg6 => "sock_sendmsg6",
            Self::Recvmsg6 => "sock_recvmsg6",
            Self::Getpeername6 => "sock_getpeername6",
        }
    }

    /// Short name for pins, logs and metrics (the kernel's name of the hook).
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Sendmsg4 => "sendmsg4",
            Self::Recvmsg4 => "recvmsg4",
            Self::Getpeername4 => "getpeername4",
            Self::Connect6 => "connect6",
            Self::Sendmsg6 => "sendmsg6",
            Self::Recvmsg6 => "recvmsg6",
            Self::Getpeername6 => "getpeername6",
        }
    }

    fn attach_type(self) -> CgroupSockAddrAttachType {
        match self {
            Self::Connect4 => CgroupSockAddrAttachType::Connect4,
            Self::Sendmsg4 => CgroupSockAddrAttachType::UDPSendMsg4,
            Self::Recvmsg4 => CgroupSockAddrAttachType::UDPRecvMsg4,
            Self::Getpeername4 => CgroupSockAddrAttachType::GetPeerName4,
            Self::Connect6 => CgroupSockAddrAttachType::Connect6,
            Self::Sendmsg6 => CgroupSockAddrAttachType::UDPSendMsg6,
            Self::Recvmsg6 => CgroupSockAddrAttachType::UDPRecvMsg6,
            Self::Getpeername6 => CgroupSockAddrAttachType::GetPeerName6,
        }
    }

    /// The kernel's attach type number.
    fn kernel_attach_type(self) -> u32 {
        bpf_attach_type::from(self.attach_type()) as u32
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} is not a directory of a cgroup v2 hierarchy; {found}")]
    NotCgroup2 {
        path: PathBuf,
        /// Where cgroup2 is mounted, or where the agent looked for it.
        found: String,
    },
    #[error(
        "{path} is on a sysfs without cgroup mounts: `ip netns exec` mounts a fresh /sys for the namespace, hiding the host's /sys/fs/cgroup. Enter the namespace with `nsenter --net=/run/netns/NAME` (which keeps /sys), or mount cgroup2 there; {found}"
    )]
    FreshSysfs { path: PathBuf, found: String },
    #[error("opening the cgroup {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("the {hook} program is unavailable: {message}")]
    Unavailable { hook: &'static str, message: String },
    #[error("attaching {hook} to {path}")]
    Attach {
        hook: &'static str,
        path: PathBuf,
        source: ProgramError,
    },
    #[error("pinning the {hook} link")]
    Pin {
        hook: &'static str,
        source: aya::pin::PinError,
    },
    #[error("querying the programs of {path}")]
    Query { path: PathBuf, source: io::Error },
}

/// CGROUP2_SUPER_MAGIC from linux/magic.h.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// SYSFS_MAGIC from linux/magic.h.
pub(crate) const SYSFS_MAGIC: u64 = 0x6265_6572;

/// The filesystem magic of the filesystem holding `path`.
pub(crate) fn fs_magic(path: &Path) -> Option<u64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into the zeroed struct; the path is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        // f_type's width differs between architectures; the magics fit in 32 bits.
        (libc::statfs(c_path.as_ptr(), &raw mut stat) == 0)
            .then_some(stat.f_type as u64 & 0xffff_ffff)
    }
}

/// Mount points of the cgroup2 filesystems this process sees (`/proc/self/mountinfo`).
#[must_use]
pub fn cgroup2_mounts() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            // `id parent major:minor root mount-point options ... - type source ...`
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            (after.split(' ').next() == Some("cgroup2"))
                .then(|| PathBuf::from(mount_point.replace("\\040", " ")))
        })
        .collect()
}

/// What the agent found when looking for cgroup2, for error messages.
fn where_cgroup2_is() -> String {
    let mounts = cgroup2_mounts();
    if mounts.is_empty() {
        "no cgroup2 filesystem is mounted here (looked in /proc/self/mountinfo)".to_owned()
    } else {
        let list: Vec<String> = mounts
            .iter()
            .map(|path| path.display().to_string())
            .collect();
        format!("cgroup2 is mounted at {}", list.join(", "))
    }
}

/// Checks that `path` is a directory of a cgroup v2 hierarchy, so a wrong
/// `--cgroup-path` stops the agent at start instead of failing later.
///
/// # Errors
/// When it is not, saying where cgroup2 is mounted (or that `ip netns exec` hid it).
pub fn check_cgroup2(path: &Path) -> Result<(), Error> {
    match fs_magic(path) {
        Some(CGROUP2_SUPER_MAGIC) if path.is_dir() => Ok(()),
        Some(SYSFS_MAGIC) => Err(Error::FreshSysfs {
            path: path.to_path_buf(),
            found: where_cgroup2_is(),
        }),
        None if path.starts_with("/sys/fs/cgroup")
            && fs_magic(Path::new("/sys/fs/cgroup")) == Some(SYSFS_MAGIC) =>
        {
            Err(Error::FreshSysfs {
                path: path.to_path_buf(),
                found: where_cgroup2_is(),
            })
        }
        _ => Err(Error::NotCgroup2 {
            path: path.to_path_buf(),
            found: where_cgroup2_is(),
        }),
    }
}

/// The cgroup v2 directory `--cgroup-path` means. The hierarchy's root given as the
/// mount point of a hybrid layout (`/sys/fs/cgroup` a tmpfs of v1 controllers, cgroup2
/// at `/sys/fs/cgroup/unified`) means the cgroup2 root below it: the same cgroup, the
/// root, in the only v2 hierarchy there is.
///
/// # Errors
/// When neither `path` nor its `unified` directory is cgroup2 ([`check_cgroup2`]).
pub fn resolve_cgroup2(path: &Path) -> Result<PathBuf, Error> {
    let unified = path.join("unified");
    match check_cgroup2(path) {
        Ok(()) => Ok(path.to_path_buf()),
        Err(error) => {
            if check_cgroup2(&unified).is_ok() && cgroup2_mounts().contains(&unified) {
                info!(
                    given = %path.display(),
                    cgroup = %unified.display(),
                    "hybrid cgroup layout: the cgroup2 root is mounted below the given path; using it"
                );
                Ok(unified)
            } else {
                Err(error)
            }
        }
    }
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux
/// 5.14), which the socket-layer hooks compare with each socket's.
///
/// # Errors
/// When no socket can be made or the kernel has no such option.
pub fn own_netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .or_else(|_| std::net::UdpSocket::bind((std::net::Ipv6Addr::LOCALHOST, 0)))?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>())
        .map_err(|_| io::Error::other("socklen"))?;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut len,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The pin name of a hook's link.
#[must_use]
pub fn pin_name(hook: SockHook) -> String {
    format!("{PIN_PREFIX}{}", hook.label())
}

/// Every cgroup link pin starts with this; [`super::attach`] leaves such pins alone.
pub const PIN_PREFIX: &str = "cgroup@";

/// A link this agent holds: made by it, or taken over from a pin.
/// Either is held only for the reference it keeps on the link.
enum HeldLink {
    Created { _link: FdLink },
    Adopted { _link: OwnedFd },
}

/// The socket-layer hooks on one cgroup.
pub struct CgroupHooks {
    cgroup: PathBuf,
    links_dir: Option<PathBuf>,
    links: BTreeMap<SockHook, HeldLink>,
}

impl CgroupHooks {
    /// Hooks for `cgroup`, pinned under `pin_dir/links` (if any). Attaches nothing yet.
    #[must_use]
    pub fn new(cgroup: &Path, pin_dir: Option<&Path>) -> Self {
        Self {
            cgroup: cgroup.to_path_buf(),
            links_dir: pin_dir.map(|dir| dir.join("links")),
            links: BTreeMap::new(),
        }
    }

    /// The cgroup the hooks go on.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The hooks with a program attached.
    pub fn attached(&self) -> impl Iterator<Item = SockHook> + '_ {
        self.links.keys().copied()
    }

    /// Attaches every hook that is not attached yet: a pinned link of an earlier agent
    /// on the same cgroup is taken over and pointed at this agent's program; otherwise a
    /// new link is made and pinned. Returns the errors of hooks that failed (retried on
    /// the next call).
    pub fn attach(&mut self, datapath: &mut Datapath) -> Vec<Error> {
        let mut errors = Vec::new();
        if self.links.len() == SockHook::ALL.len() {
            return errors;
        }
        let cgroup = match std::fs::File::open(&self.cgroup) {
            Ok(cgroup) => cgroup,
            Err(source) => {
                errors.push(Error::Open {
                    path: self.cgroup.clone(),
                    source,
                });
                return errors;
            }
        };
        let cgroup_id = match cgroup.metadata() {
            // A cgroup v2 directory's inode number is the cgroup id the kernel reports
            // for links attached to it.
            Ok(metadata) => metadata.ino(),
            Err(source) => {
                errors.push(Error::Open {
                    path: self.cgroup.clone(),
                    source,
                });
                return errors;
            }
        };
        for hook in SockHook::ALL {
            if self.links.contains_key(&hook) {
                continue;
            }
            let program = match datapath.sock_program(hook) {
                Ok(program) => program,
                Err(error) => {
                    errors.push(Error::Unavailable {
                        hook: hook.label(),
                        message: crate::error_chain(&error),
                    });
                    continue;
                }
            };
            let held = match self.adopt(program, hook, cgroup_id) {
                Some(held) => Ok(held),
                None => self.attach_one(program, hook, &cgroup),
            };
            match held {
                Ok(held) => {
                    let how = match held {
                        HeldLink::Created { .. } => "attached",
                        HeldLink::Adopted { .. } => "adopted the pinned link",
                    };
                    info!(cgroup = %self.cgroup.display(), hook = hook.label(), "{how}");
                    self.links.insert(hook, held);
                }
                Err(error) => errors.push(error),
            }
        }
        errors
    }

    fn pin_path(&self, hook: SockHook) -> Option<PathBuf> {
        self.links_dir.as_ref().map(|dir| dir.join(pin_name(hook)))
    }

    /// Takes over the pinned link of `hook` if it is attached to this cgroup with the
    /// same hook, swapping in `program`. A pin that points elsewhere (the cgroup path
    /// changed, or the cgroup was removed) is removed, which detaches its link.
    fn adopt(&self, program: &CgroupSockAddr, hook: SockHook, cgroup_id: u64) -> Option<HeldLink> {
        let path = self.pin_path(hook).filter(|path| path.exists())?;
        let adopted = (|| -> Result<OwnedFd, String> {
            let link = sys::obj_get(&path).map_err(|error| error.to_string())?;
            let info = sys::cgroup_link_info(&link).map_err(|error| error.to_string())?;
            if info.cgroup_id != cgroup_id || info.attach_type != hook.kernel_attach_type() {
                return Err(format!(
                    "it is attached to cgroup id {} with attach type {}, wanted {cgroup_id} and {}",
                    info.cgroup_id,
                    info.attach_type,
                    hook.kernel_attach_type()
                ));
            }
            let program_fd = program.fd().map_err(|error| error.to_string())?;
            sys::link_update(&link, program_fd.as_fd().as_raw_fd())
                .map_err(|error| format!("BPF_LINK_UPDATE: {error}"))?;
            Ok(link)
        })();
        match adopted {
            Ok(link) => Some(HeldLink::Adopted { _link: link }),
            Err(message) => {
                warn!(pin = %path.display(), %message, "replacing a pinned cgroup link that cannot be adopted");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn attach_one(
        &self,
        program: &mut CgroupSockAddr,
        hook: SockHook,
        cgroup: &std::fs::File,
    ) -> Result<HeldLink, Error> {
        let attach_error = |source| Error::Attach {
            hook: hook.label(),
            path: self.cgroup.clone(),
            source,
        };
        // A BPF link always joins the cgroup's program list (multi mode): it never
        // displaces another owner's programs (systemd's, a CNI's).
        let link_id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(attach_error)?;
        let link: FdLink = program
            .take_link(link_id)
            .map_err(attach_error)?
            .try_into()
            .map_err(|_| attach_error(ProgramError::UnexpectedProgramType))?;
        let Some(path) = self.pin_path(hook) else {
            return Ok(HeldLink::Created { _link: link });
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // The pin keeps the link alive; the returned handle only holds a reference.
        let pinned = link.pin(&path).map_err(|source| Error::Pin {
            hook: hook.label(),
            source,
        })?;
        Ok(HeldLink::Created {
            _link: FdLink::from(pinned),
        })
    }

    /// Detaches every hook: pins are removed, then the links dropped (the kernel
    /// detaches a link once its last reference is gone).
    pub fn detach_all(&mut self) {
        for hook in SockHook::ALL {
            if let Some(path) = self.pin_path(hook) {
                match std::fs::remove_file(&path) {
                    Ok(()) => debug!(pin = %path.display(), "unpinned"),
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => warn!(pin = %path.display(), %error, "cannot unpin"),
                }
            }
        }
        self.links.clear();
    }

    /// Lets go of the links without detaching: pinned links stay attached.
    pub fn keep_all(&mut self) {
        self.links.clear();
    }

    /// Pins again every held link whose pin is missing or names another link (see
    /// [`super::link_pins`]). Returns the pins repaired and the errors.
    pub fn repair_pins(&self) -> (Vec<PathBuf>, Vec<super::link_pins::Error>) {
        let mut repaired = Vec::new();
        let mut errors = Vec::new();
        for (hook, held) in &self.links {
            let Some(path) = self.pin_path(*hook) else {
                continue;
            };
            let id = match held {
                HeldLink::Created { _link: link } => {
                    link.info()
                        .map(|info| info.id())
                        .map_err(|error| super::link_pins::Error::Id {
                            path: path.clone(),
                            source: std::io::Error::other(error.to_string()),
                        })
                }
                HeldLink::Adopted { _link: link } => {
                    sys::link_id(link).map_err(|source| super::link_pins::Error::Id {
                        path: path.clone(),
                        source,
                    })
                }
            };
            match id.and_then(|id| super::link_pins::ensure_pinned(id, &path)) {
                Ok(true) => repaired.push(path),
                Ok(false) => {}
                Err(error) => errors.push(error),
            }
        }
        (repaired, errors)
    }
}

/// Removes the cgroup link pins under `pin_dir/links` (detaching their links): what an
/// agent started without `--cgroup-path` does with hooks an earlier one left.
pub fn remove_pins(pin_dir: &Path) {
    let links = pin_dir.join("links");
    for hook in SockHook::ALL {
        let path = links.join(pin_name(hook));
        if std::fs::remove_file(&path).is_ok() {
            info!(pin = %path.display(), "detached a cgroup hook an earlier agent left");
        }
    }
}

/// The programs attached directly to `cgroup` at each hook, as kernel program ids (all
/// owners', not only ours): what `bpftool cgroup show` lists.
///
/// # Errors
/// When the cgroup cannot be opened or queried.
pub fn query(cgroup: &Path) -> Result<Vec<(SockHook, u32)>, Error> {
    let file = std::fs::File::open(cgroup).map_err(|source| Error::Open {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let mut attached = Vec::new();
    for hook in SockHook::ALL {
        let ids =
            sys::prog_query(&file, hook.kernel_attach_type()).map_err(|source| Error::Query {
                path: cgroup.to_path_buf(),
                source,
            })?;
        attached.extend(ids.into_iter().map(|id| (hook, id)));
    }
    Ok(attached)
}

/// The few `bpf()` commands aya 0.14 keeps private: opening a pinned object as a plain
/// descriptor, reading a cgroup link's target, swapping a link's program, listing a
/// cgroup's programs, opening socket iterators in the calling thread's namespace
/// ([`super::sock_destroy`]), and batched map writes ([`super::batch`]).
pub(crate) mod sys {
    use std::{
        io,
        os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
        path::Path,
    };

    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type};

    /// `bpf(cmd, attr)`.
    fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
        // SAFETY: `attr` is a valid, fully initialised bpf_attr of the size passed; the
        // kernel reads only the part `cmd` uses and writes only where that part points.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_long,
                std::ptr::from_mut(attr),
                std::mem::size_of::<bpf_attr>(),
            )
        };
        if result < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(result)
        }
    }

    fn zeroed_attr() -> bpf_attr {
        // SAFETY: bpf_attr is a plain C union of integers; all zeroes is the documented
        // way to start one (unused fields must be zero).
        unsafe { std::mem::zeroed() }
    }

    /// `BPF_OBJ_GET`: a descriptor of the object pinned at `path`.
    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_4.pathname = c_path.as_ptr() as u64;
        new_fd(bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?)
    }

    /// `BPF_OBJ_PIN`: pins the object behind `fd` at `path` (which must not exist).
    pub fn obj_pin(fd: &impl AsRawFd, path: &Path) -> io::Result<()> {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_4.pathname = c_path.as_ptr() as u64;
        attr.__bindgen_anon_4.bpf_fd =
            u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative descriptor"))?;
        bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(drop)
    }

    /// `BPF_LINK_GET_FD_BY_ID`: a new descriptor of the link with id `id`.
    pub fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_6.__bindgen_anon_1.link_id = id;
        new_fd(bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &mut attr)?)
    }

    /// The id of the link behind `link`.
    pub fn link_id(link: &impl AsRawFd) -> io::Result<u32> {
        Ok(link_info(link)?.id)
    }

    /// `BPF_LINK_CREATE` of an iterator program (`BPF_TRACE_ITER`).
    pub fn iter_link_create(program: i32) -> io::Result<OwnedFd> {
        let mut attr = zeroed_attr();
        attr.link_create.__bindgen_anon_1.prog_fd =
            u32::try_from(program).map_err(|_| io::Error::other("negative descriptor"))?;
        attr.link_create.attach_type = aya_obj::generated::bpf_attach_type::BPF_TRACE_ITER as u32;
        new_fd(bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)?)
    }

    /// `BPF_ITER_CREATE`: an iterator over the calling thread's network namespace.
    pub fn iter_create(link: &impl AsRawFd) -> io::Result<OwnedFd> {
        let mut attr = zeroed_attr();
        attr.iter_create.link_fd =
            u32::try_from(link.as_raw_fd()).map_err(|_| io::Error::other("negative descriptor"))?;
        new_fd(bpf(bpf_cmd::BPF_ITER_CREATE, &mut attr)?)
    }

    /// Owns a descriptor a `bpf()` command returned.
    fn new_fd(fd: i64) -> io::Result<OwnedFd> {
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
        // SAFETY: the command returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// What the kernel says about a cgroup link.
    pub struct CgroupLinkInfo {
        pub cgroup_id: u64,
        pub attach_type: u32,
    }

    /// `BPF_OBJ_GET_INFO_BY_FD` of a link.
    fn link_info(link: &impl AsRawFd) -> io::Result<bpf_link_info> {
        // SAFETY: an all-zero bpf_link_info is valid (integers and unions of integers).
        let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
        let mut attr = zeroed_attr();
        attr.info.bpf_fd =
            u32::try_from(link.as_raw_fd()).map_err(|_| io::Error::other("negative descriptor"))?;
        attr.info.info_len = u32::try_from(std::mem::size_of::<bpf_link_info>())
            .map_err(|_| io::Error::other("bpf_link_info too large"))?;
        attr.info.info = std::ptr::from_mut(&mut info) as u64;
        bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        Ok(info)
    }

    /// What the kernel says about `link`, which must be a cgroup link.
    pub fn cgroup_link_info(link: &impl AsRawFd) -> io::Result<CgroupLinkInfo> {
        let info = link_info(link)?;
        if info.type_ != bpf_link_type::BPF_LINK_TYPE_CGROUP as u32 {
            return Err(io::Error::other(format!(
                "link type {} is not a cgroup link",
                info.type_
            )));
        }
        // SAFETY: the kernel filled the cgroup member, as the link type says.
        let cgroup = unsafe { info.__bindgen_anon_1.cgroup };
        Ok(CgroupLinkInfo {
            cgroup_id: cgroup.cgroup_id,
            attach_type: cgroup.attach_type,
        })
    }

    /// `BPF_LINK_UPDATE`: the link runs `program` from now on, atomically.
    pub fn link_update(link: &impl AsRawFd, program: i32) -> io::Result<()> {
        let mut attr = zeroed_attr();
        attr.link_update.link_fd =
            u32::try_from(link.as_raw_fd()).map_err(|_| io::Error::other("negative descriptor"))?;
        attr.link_update.__bindgen_anon_1.new_prog_fd =
            u32::try_from(program).map_err(|_| io::Error::other("negative descriptor"))?;
        bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
    }

    /// `BPF_PROG_QUERY`: ids of the programs attached directly to a cgroup at one
    /// attach type.
    pub fn prog_query(cgroup: &impl AsRawFd, attach_type: u32) -> io::Result<Vec<u32>> {
        let target_fd = u32::try_from(cgroup.as_raw_fd())
            .map_err(|_| io::Error::other("negative descriptor"))?;
        // More than a cgroup usually holds at one hook; when the kernel finds the
        // buffer too small (ENOSPC) it says how many there are, and the call is repeated
        // once with that size (a program attached in between makes it fail).
        let mut capacity = 64usize;
        for attempt in 0..2 {
            let mut ids = vec![0u32; capacity];
            let mut attr = zeroed_attr();
            attr.query.__bindgen_anon_1.target_fd = target_fd;
            attr.query.attach_type = attach_type;
            attr.query.prog_ids = ids.as_mut_ptr() as u64;
            attr.query.__bindgen_anon_2.prog_cnt =
                u32::try_from(ids.len()).map_err(|_| io::Error::other("too many ids"))?;
            let result = bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr);
            // SAFETY: the kernel writes the count back into the member it read it from.
            let count = unsafe { attr.query.__bindgen_anon_2.prog_cnt } as usize;
            match result {
                Ok(_) => {
                    ids.truncate(count.min(ids.len()));
                    return Ok(ids);
                }
                Err(error) if error.raw_os_error() == Some(libc::ENOSPC) && attempt == 0 => {
                    capacity = count;
                }
                Err(error) => return Err(error),
            }
        }
        Err(io::Error::from_raw_os_error(libc::ENOSPC))
    }

    /// `BPF_MAP_UPDATE_BATCH` (with `values`) or `BPF_MAP_DELETE_BATCH` (without) of
    /// `count` entries on the map behind `map`. The kernel applies them in order and
    /// stops at the first it refuses: the error comes with `Some(n)`, the first `n`
    /// were applied and entry `n` was refused, or `None`, the call itself was refused
    /// (no batches for this map type or kernel) and nothing was applied.
    ///
    /// # Safety
    /// `keys` must point at `count` keys of the map's key size and `values`, if given,
    /// at `count` values of its value size.
    pub unsafe fn map_batch(
        map: std::os::fd::BorrowedFd<'_>,
        keys: *const u8,
        values: Option<*const u8>,
        count: u32,
    ) -> Result<(), (Option<u32>, io::Error)> {
        let mut attr = zeroed_attr();
        attr.batch.map_fd = u32::try_from(map.as_raw_fd())
            .map_err(|_| (None, io::Error::other("negative descriptor")))?;
        attr.batch.keys = keys as u64;
        attr.batch.count = count;
        let cmd = match values {
            Some(values) => {
                attr.batch.values = values as u64;
                bpf_cmd::BPF_MAP_UPDATE_BATCH
            }
            None => bpf_cmd::BPF_MAP_DELETE_BATCH,
        };
        let result = bpf(cmd, &mut attr);
        // SAFETY: the kernel writes how many it applied back into `count`, once it
        // started on the entries; a call refused before that leaves `count` as it was
        // (a refused entry is never counted, so `count` back means none was tried).
        let done = unsafe { attr.batch.count };
        result
            .map(drop)
            .map_err(|error| ((done < count).then_some(done), error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_root_is_found_in_either_layout() {
        // The machine's own layout, read only: unified (cgroup2 at /sys/fs/cgroup) or
        // hybrid (v1 controllers there, cgroup2 at /sys/fs/cgroup/unified).
        let mounts = cgroup2_mounts();
        assert!(!mounts.is_empty(), "no cgroup2 mount on this machine");
        let root = Path::new("/sys/fs/cgroup");
        let resolved = resolve_cgroup2(root).expect("the cgroup2 root");
        assert!(mounts.contains(&resolved), "{resolved:?} not in {mounts:?}");
        assert!(resolved == root || resolved == root.join("unified"));
    }

    #[test]
    fn a_path_outside_cgroup2_says_where_cgroup2_is() {
        let error = check_cgroup2(Path::new("/proc")).expect_err("/proc is no cgroup");
        let text = error.to_string();
        for mount in cgroup2_mounts() {
            assert!(text.contains(&mount.display().to_string()), "{text}");
        }
    }

    #[test]
    fn pin_names_are_distinct_and_marked() {
        let names: std::collections::BTreeSet<String> =
            SockHook::ALL.into_iter().map(pin_name).collect();
        assert_eq!(names.len(), SockHook::ALL.len());
        for name in &names {
            assert!(name.starts_with(PIN_PREFIX), "{name}");
            // bpffs refuses names with a dot.
            assert!(!name.contains('.'), "{name}");
        }
    }

    #[test]
    fn hooks_map_to_the_kernel_attach_types() {
        // Numbers from linux/bpf.h (enum bpf_attach_type).
        assert_eq!(SockHook::Connect4.kernel_attach_type(), 10);
        assert_eq!(SockHook::Sendmsg4.kernel_attach_type(), 14);
        assert_eq!(SockHook::Recvmsg4.kernel_attach_type(), 19);
        assert_eq!(SockHook::Getpeername4.kernel_attach_type(), 29);
        assert_eq!(SockHook::Connect6.kernel_attach_type(), 11);
        assert_eq!(SockHook::Sendmsg6.kernel_attach_type(), 15);
        assert_eq!(SockHook::Recvmsg6.kernel_attach_type(), 20);
        assert_eq!(SockHook::Getpeername6.kernel_attach_type(), 30);
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let error = check_cgroup2(&std::env::temp_dir()).expect_err("tmp is no cgroup");
        assert!(error.to_string().contains("cgroup v2"), "{error}");
    }
}
