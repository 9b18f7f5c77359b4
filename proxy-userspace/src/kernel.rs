//! The start-up kernel check: probe what the datapath needs and name what is missing,
//! instead of failing later with an errno from deep inside a load or an attach.
use std::os::fd::{FromRawFd as _, OwnedFd};

use aya::util::KernelVersion;

/// TCX links (atomic program replacement on TC hooks) arrived in Linux 6.6.
const TCX_SINCE: KernelVersion = KernelVersion::new(6, 6, 0);

/// `bpf_attr` for BPF_MAP_CREATE, as far as the probe needs it (the kernel zero-fills
/// the rest).
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const MAP_TYPES: [(u32, &str); 4] = [
    (1, "hash"),
    (2, "array"),
    (6, "per-CPU array"),
    (9, "LRU hash"),
];

/// Whether a map of `map_type` can be created (the bpf() syscall works, we have the
/// capability, and the kernel knows the type).
fn can_create_map(map_type: u32) -> Result<(), std::io::Error> {
    let attr = MapCreateAttr {
        map_type,
        key_size: 4,
        value_size: 8,
        max_entries: 1,
        map_flags: 0,
    };
    // SAFETY: bpf(BPF_MAP_CREATE) reads `size_of::<MapCreateAttr>()` bytes of `attr`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &raw const attr,
            std::mem::size_of::<MapCreateAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// Checks the kernel. Returns the list of what is missing, one per line.
///
/// # Errors
/// When something the datapath needs is absent.
pub fn check() -> Result<(), String> {
    let mut missing = Vec::new();
    match KernelVersion::current() {
        Ok(version) if version < TCX_SINCE => missing.push(format!(
            "  - TCX links need Linux 6.6 or newer (this is {version:?})"
        )),
        Ok(_) => {}
        Err(error) => missing.push(format!("  - cannot read the kernel version: {error}")),
    }
    for (map_type, name) in MAP_TYPES {
        if let Err(error) = can_create_map(map_type) {
            let hint = match error.raw_os_error() {
                Some(libc::EPERM) => " (needs CAP_BPF and CAP_NET_ADMIN, or root)",
                Some(libc::ENOSYS) => " (the kernel has no bpf() syscall)",
                _ => "",
            };
            missing.push(format!("  - cannot create a BPF {name} map: {error}{hint}"));
            if matches!(error.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) {
                break;
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_passes_when_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Without privileges the probe must say so, not pass.
            let error = check().expect_err("unprivileged");
            assert!(error.contains("CAP_BPF"), "{error}");
            return;
        }
        assert_eq!(check(), Ok(()));
    }
}
