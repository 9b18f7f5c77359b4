//! The node agent of the eBPF kube-proxy replacement.
//!
//! Pipeline: a source ([`source`]) delivers Services, EndpointSlices and the Node as a
//! [`state::ClusterState`]; the pure [`model`] turns them into desired frontends; the
//! [`sync::Syncer`] writes the difference into the BPF maps of the [`datapath`], whose
//! programs the agent attaches to pod-facing interfaces.
pub mod agent;
pub mod datapath;
pub mod health;
pub mod model;
pub mod source;
pub mod state;
pub mod sync;
