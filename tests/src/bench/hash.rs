//! The names kube-proxy derives from hashes: base32 (RFC 4648 standard alphabet, as
//! Go's `base32.StdEncoding`) of SHA-256, truncated.
use sha2::{Digest as _, Sha256};

/// The first `len` characters of base32(sha256(`input`)): kube-proxy's chain-name hash.
#[must_use]
pub fn hash_prefix(input: &str, len: usize) -> String {
    let mut encoded = data_encoding::BASE32.encode(&Sha256::digest(input.as_bytes()));
    encoded.truncate(len);
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chain names that kube-proxy's own tests expect (pkg/proxy/iptables and
    /// pkg/proxy/nftables proxier_test.go, service `ns1/svc1` port `p80`, endpoint
    /// 10.180.0.1:80).
    #[test]
    fn reproduces_kube_proxy_chain_names() {
        assert_eq!(hash_prefix("ns1/svc1:p80tcp", 16), "XPGD46QRK7WJZT7O");
        assert_eq!(
            hash_prefix("ns1/svc1:p80tcp10.180.0.1:80", 16),
            "SXIVWICOYRO3J4NJ"
        );
        assert_eq!(hash_prefix("ns1/svc1/tcp/p80", 8), "ULMVA6XW");
        assert_eq!(
            hash_prefix("ns1/svc1/tcp/p80__10.180.0.1/80", 8),
            "5OJB2KTY"
        );
    }
}
