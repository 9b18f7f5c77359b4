//! Where Kubernetes objects come from.
pub mod manifests;
