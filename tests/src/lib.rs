//! The lab: everything tests and benchmarks need to put real packets through real
//! kernels. Network namespaces (`netns`), the lab topology and the agent process
//! (`lab`), traffic helpers (`traffic`), host-network clients in a cgroup of their own (`host`), crafted packets and the datapath test table
//! (`packets`, `datapath_cases`), and a test Kubernetes API server (`apiserver`).

pub mod apiserver;
pub mod bench;
pub mod cluster;
pub mod datapath_cases;
pub mod host;
pub mod ipv6;
pub mod kube_proxy;
pub mod lab;
pub mod netns;
pub mod packets;
pub mod scenario;
pub mod socket_lab;
pub mod traffic;

/// Stops a test that needs the kernel unless it runs as root. Such tests fail loudly
/// instead of skipping: CI runs them as root, and a skipped datapath test proves nothing.
///
/// # Panics
/// When the effective user is not root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads BPF programs and builds network namespaces: run it as root \
         (`cargo xtask test` does)"
    );
}
