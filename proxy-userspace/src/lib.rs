//! The node agent of the eBPF kube-proxy replacement.
//!
//! Pipeline: a source ([`source`]) delivers Services, EndpointSlices and the Node as a
//! [`state::ClusterState`]; the pure [`model`] turns them into desired frontends; the
//! [`sync::Syncer`] writes the difference into the BPF maps of the [`datapath`], whose
//! programs the agent attaches to pod-facing interfaces.
pub mod agent;
pub mod config;
pub mod datapath;
mod ebpf_stub;
pub mod family;
pub mod health;
pub mod healthcheck;
pub mod http;
pub mod inspect;
pub mod kernel;
pub mod kube_proxy_rules;
pub mod metrics;
pub mod model;
pub mod names;
pub mod service_counters;
pub mod socket_lb;
pub mod source;
pub mod state;
pub mod sync;
pub mod takeover;
pub mod upkeep;

/// A hash map for the agent's large in-memory indexes (the map mirror, the model's
/// claims): keys are small, and SipHash, the standard library's, was half of a
/// 50 000-service sync pass. foldhash seeds each map at random, so keys chosen to
/// collide cannot be prepared in advance.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The set of [`FastMap`].
pub type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// An error with all its causes, `outer: inner: root`, for log lines (library error
/// types keep causes as sources, which `Display` alone leaves out).
#[must_use]
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
