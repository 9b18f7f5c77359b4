//! Benchmark support (kube-proxy rule generators, runners).
