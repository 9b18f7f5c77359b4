//! Destroying sockets the socket layer translated to a backend that has left: the
//! kernel side is `proxy-ebpf/src/sock_destroy.rs` (socket iterators calling the
//! `bpf_sock_destroy` kfunc on the cookies listed in `SOCK_DESTROY_V1`).
//!
//! Two things our toolchain does not do, done here:
//! - **kfunc calls.** bpf-linker 0.13 leaves a call to an `extern "C"` function as a
//!   BPF-to-BPF call (`src_reg` 1) with a relocation against an undefined symbol, which
//!   aya 0.14 cannot link (it looks for a function at the call's target). Before the
//!   object is loaded, [`patch_kfunc_calls`] rewrites each such call into a kfunc call
//!   (`src_reg` 2, `imm` = the function's id in the kernel's BTF), which aya then leaves
//!   alone and the verifier resolves. Measured on this project's toolchain (kernel
//!   6.18, aya 0.14, bpf-linker 0.13): the iterator loads, and a destroyed connected
//!   UDP socket reports `ECONNABORTED` on its next `recv()`.
//! - **namespaces.** A socket iterator walks the network namespace of the thread that
//!   opens it (`BPF_ITER_CREATE`). Pod sockets live in pod namespaces, so
//!   [`destroy`] runs on a thread of its own that enters each namespace holding a socket
//!   to destroy. The namespaces are found from the processes of the hooked cgroup:
//!   only their sockets were translated, and nothing outside it is ever entered.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{self, Read as _},
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{maps::HashMap, programs::Iter, Btf};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};
use tracing::debug;

use super::{cgroup, Datapath};

/// What a kernel without a kfunc gets instead of its calls.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Missing {
    /// A kfunc call with id 0, which the verifier refuses: only the program that
    /// calls it fails to load, saying why.
    Refuse,
    /// `r0 = 0` in place of the call: the kfunc "found nothing", and the program
    /// loads (the takeover check of the TC programs, which must load everywhere).
    ReturnZero,
}

/// The kfuncs the object calls, and what a kernel without them gets.
const KFUNCS: [(&str, Missing); 3] = [
    ("bpf_sock_destroy", Missing::Refuse),
    // proxy-ebpf/src/takeover.rs: asking netfilter's conntrack about a new flow.
    ("bpf_skb_ct_lookup", Missing::ReturnZero),
    ("bpf_ct_release", Missing::ReturnZero),
];

/// `r0 = 0` (`BPF_ALU64 | BPF_MOV | BPF_K`, dst r0, imm 0).
const MOV_R0_0: [u8; 8] = [0xb7, 0, 0, 0, 0, 0, 0, 0];

/// `BPF_PSEUDO_KFUNC_CALL`: the call's `imm` is a BTF id of the kernel's.
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;

/// The iterator programs and the kernel iterator each one walks.
const ITERATORS: [(&str, &str); 2] = [("sock_destroy_udp", "udp"), ("sock_destroy_tcp", "tcp")];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the socket iterator {name} is unavailable")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the kernel's BTF is unavailable")]
    Btf(#[source] aya::BtfError),
    #[error(transparent)]
    Map(#[from] super::MapAccessError),
    #[error("reading the processes of {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("running the socket iterators")]
    Iterate(#[source] io::Error),
}

/// Rewrites every call to a kfunc of [`KFUNCS`] in the ELF object into a kfunc call,
/// with the function's id in `btf` (the kernel's). A kfunc the kernel lacks gets what
/// [`KFUNCS`] says: id 0 (only the program that calls it then fails to load, with the
/// verifier saying so) or `r0 = 0`.
#[must_use]
pub fn patch_kfunc_calls(object_bytes: &[u8], btf: Option<&Btf>) -> Vec<u8> {
    let mut patched = object_bytes.to_vec();
    let Ok(file) = object::File::parse(object_bytes) else {
        // aya reports the malformed object itself when it parses it.
        return patched;
    };
    for section in file.sections() {
        let Some((section_offset, section_size)) = section.file_range() else {
            continue;
        };
        for (offset, relocation) in section.relocations() {
            let RelocationTarget::Symbol(index) = relocation.target() else {
                continue;
            };
            let Some((name, missing)) = file
                .symbol_by_index(index)
                .ok()
                .filter(|symbol| symbol.is_undefined())
                .and_then(|symbol| symbol.name().ok())
                .and_then(|name| KFUNCS.iter().find(|(kfunc, _)| *kfunc == name))
            else {
                continue;
            };
            let id = btf.and_then(|btf| {
                btf.id_by_type_name_kind(name, aya_obj::btf::BtfKind::Func)
                    .ok()
            });
            // One instruction: code, registers (dst low nibble, src high), off, imm.
            let Some(at) = usize::try_from(section_offset + offset)
                .ok()
                .filter(|_| offset + 8 <= section_size)
            else {
                continue;
            };
            let Some(instruction) = patched.get_mut(at..at + 8) else {
                continue;
            };
            match (id, missing) {
                (None, Missing::ReturnZero) => instruction.copy_from_slice(&MOV_R0_0),
                (id, _) => {
                    instruction[1] = (instruction[1] & 0x0f) | (BPF_PSEUDO_KFUNC_CALL << 4);
                    instruction[4..8].copy_from_slice(&id.unwrap_or(0).to_le_bytes());
                }
            }
        }
    }
    patched
}

/// What one destroy pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Network namespaces the iterators ran in.
    pub namespaces: usize,
    /// Namespaces that held a listed socket but were not found among the cgroup's
    /// processes (their processes exited: the sockets are gone with them).
    pub namespaces_missing: usize,
}

/// Loads the iterator programs on first use (an agent without socket-layer hooks never
/// asks the kernel to verify them) and returns their descriptors.
fn iterator_fds(datapath: &mut Datapath) -> Result<Vec<i32>, Error> {
    let mut fds = Vec::new();
    for (name, kind) in ITERATORS {
        let program: &mut Iter = datapath
            .ebpf
            .program_mut(name)
            .ok_or(Error::Program {
                name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        if program.fd().is_err() {
            let btf = Btf::from_sys_fs().map_err(Error::Btf)?;
            program
                .load(kind, &btf)
                .map_err(|source| Error::Program { name, source })?;
        }
        let fd = program
            .fd()
            .map_err(|source| Error::Program { name, source })?;
        fds.push(fd.as_fd().as_raw_fd());
    }
    Ok(fds)
}

/// Whether the iterators load on this kernel (checked at start, so a kernel without
/// `bpf_sock_destroy` is reported before the first backend leaves).
///
/// # Errors
/// The reason they do not.
pub fn check(datapath: &mut Datapath) -> Result<(), Error> {
    iterator_fds(datapath).map(drop)
}

/// Destroys the sockets whose cookies are in `cookies`, living in the network
/// namespaces `netns_cookies`, which are looked for among the processes of `cgroup`.
///
/// # Errors
/// When the iterators cannot be loaded or run, or the cgroup cannot be read.
pub fn destroy(
    datapath: &mut Datapath,
    cgroup: &Path,
    cookies: &BTreeSet<u64>,
    netns_cookies: &BTreeSet<u64>,
) -> Result<Report, Error> {
    if cookies.is_empty() {
        return Ok(Report::default());
    }
    let programs = iterator_fds(datapath)?;
    let name = proxy_common::sock::DESTROY_V4_NAME;
    let mut set: HashMap<_, u64, u8> = datapath.hash_map(name)?;
    let mut report = Report::default();
    let namespaces = namespaces_of(cgroup)?;
    // The set holds at most its capacity: larger lists go in batches.
    let listed: Vec<u64> = cookies.iter().copied().collect();
    let batch = usize::try_from(proxy_common::sock::DESTROY_V4_CAPACITY).unwrap_or(1024);
    for chunk in listed.chunks(batch) {
        for cookie in chunk {
            set.insert(cookie, 1, 0)
                .map_err(super::MapAccessError::kernel(name))?;
        }
        let ran = run_in_namespaces(&programs, &namespaces, netns_cookies);
        for cookie in chunk {
            let _ = set.remove(cookie);
        }
        let found = ran.map_err(Error::Iterate)?;
        report.namespaces = found.len();
        report.namespaces_missing = netns_cookies.difference(&found).count();
    }
    Ok(report)
}

/// One namespace file per distinct network namespace of the processes in `cgroup` and
/// the cgroups below it.
fn namespaces_of(cgroup: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut pids = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs =
            std::fs::read_to_string(dir.join("cgroup.procs")).map_err(|source| Error::Cgroup {
                path: dir.clone(),
                source,
            })?;
        pids.extend(procs.lines().filter_map(|line| line.parse::<u32>().ok()));
        // A cgroup removed meanwhile simply has no more children to visit.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                    .map(|entry| entry.path()),
            );
        }
    }
    let mut by_inode = BTreeMap::new();
    for pid in pids {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        // A process that exited since the listing has no namespace to visit.
        if let Ok(metadata) = std::fs::metadata(&path) {
            by_inode
                .entry((metadata.dev(), metadata.ino()))
                .or_insert(path);
        }
    }
    Ok(by_inode.into_values().collect())
}

/// Runs every iterator in each namespace of `namespaces` whose cookie is wanted, on a
/// thread of its own (entering a namespace changes the calling thread). Returns the
/// cookies of the namespaces it ran in.
fn run_in_namespaces(
    programs: &[i32],
    namespaces: &[PathBuf],
    wanted: &BTreeSet<u64>,
) -> io::Result<BTreeSet<u64>> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut visited = BTreeSet::new();
                for path in namespaces {
                    // The process may have exited since the listing.
                    let Ok(netns) = File::open(path) else {
                        continue;
                    };
                    // SAFETY: setns on this thread only; it exits when done.
                    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let cookie = cgroup::own_netns_cookie()?;
                    if !wanted.contains(&cookie) || !visited.insert(cookie) {
                        continue;
                    }
                    for program in programs {
                        run_iterator(*program)?;
                    }
                    debug!(netns = %path.display(), cookie, "socket iterators ran");
                }
                Ok(visited)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the socket iterator thread panicked")))
    })
}

/// Attaches the iterator program, opens an iterator in the calling thread's network
/// namespace and reads it to the end, which runs the program on every socket there.
fn run_iterator(program: i32) -> io::Result<()> {
    let link = cgroup::sys::iter_link_create(program)?;
    let iterator: OwnedFd = cgroup::sys::iter_create(&link)?;
    let mut output = Vec::new();
    File::from(iterator).read_to_end(&mut output)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calls of the real object to `bpf_sock_destroy`, as (section, instruction
    /// bytes).
    fn kfunc_calls(bytes: &[u8]) -> Vec<(String, [u8; 8])> {
        calls_to(bytes, "bpf_sock_destroy")
    }

    /// The calls of the object to `kfunc`, as (section, instruction bytes).
    fn calls_to(bytes: &[u8], kfunc: &str) -> Vec<(String, [u8; 8])> {
        let file = object::File::parse(bytes).expect("the eBPF object parses");
        let mut calls = Vec::new();
        for section in file.sections() {
            let Some((offset, _)) = section.file_range() else {
                continue;
            };
            for (at, relocation) in section.relocations() {
                let RelocationTarget::Symbol(index) = relocation.target() else {
                    continue;
                };
                let symbol = file.symbol_by_index(index).expect("symbol");
                if symbol.name() == Ok(kfunc) {
                    let start = usize::try_from(offset + at).expect("offset");
                    let mut instruction = [0u8; 8];
                    instruction.copy_from_slice(&bytes[start..start + 8]);
                    calls.push((section.name().unwrap_or("?").to_owned(), instruction));
                }
            }
        }
        calls
    }

    #[test]
    fn every_bpf_sock_destroy_call_becomes_a_kfunc_call() {
        let object = super::super::EBPF_OBJECT;
        let before = kfunc_calls(object);
        let sections: BTreeSet<&str> = before.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            sections,
            BTreeSet::from(["iter/tcp", "iter/udp"]),
            "{before:?}"
        );
        for (_, instruction) in &before {
            // As bpf-linker leaves it: call (0x85), src_reg 1 (BPF-to-BPF), imm -1.
            assert_eq!(instruction[0], 0x85);
            assert_eq!(instruction[1] >> 4, 1);
        }
        // No kernel BTF: the call is still rewritten (so aya can link the object), with
        // id 0, which only the verifier of that one program refuses.
        for (_, instruction) in kfunc_calls(&patch_kfunc_calls(object, None)) {
            assert_eq!(instruction[0], 0x85);
            assert_eq!(instruction[1] >> 4, BPF_PSEUDO_KFUNC_CALL);
            assert_eq!(instruction[1] & 0x0f, 0, "dst_reg untouched");
            assert_eq!(
                i32::from_le_bytes(instruction[4..8].try_into().expect("imm")),
                0
            );
        }
    }

    #[test]
    fn the_kfunc_gets_the_kernels_btf_id() {
        // The machine's own BTF: the kernels this project supports all have it.
        let btf = Btf::from_sys_fs().expect("/sys/kernel/btf/vmlinux");
        let id = btf
            .id_by_type_name_kind("bpf_sock_destroy", aya_obj::btf::BtfKind::Func)
            .expect("kernel 6.5+ has bpf_sock_destroy");
        let patched = patch_kfunc_calls(super::super::EBPF_OBJECT, Some(&btf));
        for (_, instruction) in kfunc_calls(&patched) {
            assert_eq!(
                u32::from_le_bytes(instruction[4..8].try_into().expect("imm")),
                id
            );
        }
    }

    #[test]
    fn the_takeover_kfuncs_become_found_nothing_on_a_kernel_without_them() {
        let object = super::super::EBPF_OBJECT;
        for kfunc in ["bpf_skb_ct_lookup", "bpf_ct_release"] {
            let before = calls_to(object, kfunc);
            // Both TC ingress programs (pod- and node-facing) ask netfilter.
            assert!(before.len() >= 2, "{kfunc}: {before:?}");
            for (section, instruction) in calls_to(&patch_kfunc_calls(object, None), kfunc) {
                assert_eq!(instruction, MOV_R0_0, "{kfunc} in {section}");
            }
        }
    }

    #[test]
    fn the_takeover_kfuncs_get_the_kernels_btf_ids() {
        let btf = Btf::from_sys_fs().expect("/sys/kernel/btf/vmlinux");
        let patched = patch_kfunc_calls(super::super::EBPF_OBJECT, Some(&btf));
        for kfunc in ["bpf_skb_ct_lookup", "bpf_ct_release"] {
            let id = btf
                .id_by_type_name_kind(kfunc, aya_obj::btf::BtfKind::Func)
                .expect("kernel 6.0+ with netfilter conntrack has the kfunc");
            for (_, instruction) in calls_to(&patched, kfunc) {
                assert_eq!(instruction[1] >> 4, BPF_PSEUDO_KFUNC_CALL);
                assert_eq!(
                    u32::from_le_bytes(instruction[4..8].try_into().expect("imm")),
                    id
                );
            }
        }
    }

    #[test]
    fn other_bytes_stay_as_they_were() {
        let object = super::super::EBPF_OBJECT;
        let patched = patch_kfunc_calls(object, None);
        let changed = object
            .iter()
            .zip(&patched)
            .filter(|(old, new)| old != new)
            .count();
        // Per call: the register byte and up to four immediate bytes, or the whole
        // instruction where it becomes `r0 = 0`.
        let calls: usize = KFUNCS
            .iter()
            .map(|(name, _)| calls_to(object, name).len())
            .sum();
        assert!(changed <= 8 * calls, "{changed} bytes changed");
        assert_eq!(patched.len(), object.len());
    }
}
