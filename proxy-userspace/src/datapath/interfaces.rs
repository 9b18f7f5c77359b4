//! Network interfaces of the agent's network namespace: listing them and waking up when
//! they change (RTMGRP_LINK notifications), so a new pod's interface gets the program
//! attached as soon as it appears.
use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

/// An interface name and index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}

/// Every interface of the current network namespace.
///
/// # Errors
/// When the kernel cannot list them.
pub fn list() -> io::Result<Vec<Interface>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, which
    // if_freenameindex releases; names are NUL-terminated C strings.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut entry = head;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            out.push(Interface {
                name: CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
                index: (*entry).if_index,
            });
            entry = entry.add(1);
        }
        libc::if_freenameindex(head);
        out.sort();
        Ok(out)
    }
}

/// Whether `name` matches one of `patterns` (exact names, or prefixes ending in `*`).
#[must_use]
pub fn matches(name: &str, patterns: &[String]) -> bool {
    patterns
        .iter()
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == pattern,
        })
}

/// A netlink socket subscribed to link notifications; [`LinkEvents::changed`] returns
/// when any interface appeared, changed or vanished.
pub struct LinkEvents {
    socket: AsyncFd<OwnedFd>,
}

impl LinkEvents {
    /// Subscribes to link notifications of the current network namespace.
    ///
    /// # Errors
    /// When the socket cannot be created or bound.
    pub fn subscribe() -> io::Result<Self> {
        // SAFETY: plain socket calls; the fd is owned by OwnedFd from here on.
        let fd = unsafe {
            let raw = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            );
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(raw)
        };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid start.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd stays open, and the same fd, for the AsyncFd's lifetime.
        let socket = unsafe { AsyncFd::register(fd) }?;
        Ok(Self { socket })
    }

    /// Waits for the next batch of link notifications and drains it.
    ///
    /// # Errors
    /// When the socket fails.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buffer = [0u8; 8192];
        loop {
            let mut guard = self.socket.readable().await?;
            let mut drained_any = false;
            loop {
                // SAFETY: reading into a stack buffer of the given length.
                let read = unsafe {
                    libc::recv(
                        guard.get_inner().as_raw_fd(),
                        buffer.as_mut_ptr().cast(),
                        buffer.len(),
                        0,
                    )
                };
                if read >= 0 {
                    drained_any = true;
                    continue;
                }
                let error = io::Error::last_os_error();
                match error.kind() {
                    io::ErrorKind::WouldBlock => break,
                    // ENOBUFS: notifications were lost; a rescan catches up anyway.
                    _ if error.raw_os_error() == Some(libc::ENOBUFS) => {
                        drained_any = true;
                    }
                    _ => return Err(error),
                }
            }
            guard.clear_ready();
            if drained_any {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_prefixes_and_exact_names() {
        let patterns = vec!["veth*".to_owned(), "cbr0".to_owned()];
        for (name, expected) in [
            ("veth1234", true),
            ("veth", true),
            ("cbr0", true),
            ("cbr01", false),
            ("eth0", false),
            ("lxc1", false),
        ] {
            assert_eq!(matches(name, &patterns), expected, "{name}");
        }
    }

    #[test]
    fn lists_the_loopback_interface() {
        let interfaces = list().expect("if_nameindex");
        assert!(
            interfaces.iter().any(|i| i.name == "lo" && i.index == 1),
            "{interfaces:?}"
        );
    }
}
